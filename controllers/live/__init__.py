"""Deploying a policy as a live controller: the loop, its guards, metrics and logs."""

from llm_cluster_gym.controllers.live.exporter import DecisionLog, MetricsExporter
from llm_cluster_gym.controllers.live.governor import PowerGovernor
from llm_cluster_gym.controllers.live.loop import Drill, GuardedBackend, LiveLoop, LiveLoopError, guarded_env
from llm_cluster_gym.controllers.live.policies import build_policy
from llm_cluster_gym.controllers.live.supervise import SupervisedWorker

__all__ = ["DecisionLog", "Drill", "GuardedBackend", "LiveLoop", "LiveLoopError",
           "MetricsExporter", "PowerGovernor", "SupervisedWorker", "build_policy", "guarded_env"]
