"""Deploying a policy as a live controller: the loop, its guards, metrics and logs."""

from controllers.live.exporter import DecisionLog, MetricsExporter
from controllers.live.governor import PowerGovernor
from controllers.live.loop import Drill, GuardedBackend, LiveLoop, LiveLoopError, guarded_env
from controllers.live.policies import build_policy
from controllers.live.supervise import SupervisedWorker

__all__ = ["DecisionLog", "Drill", "GuardedBackend", "LiveLoop", "LiveLoopError",
           "MetricsExporter", "PowerGovernor", "SupervisedWorker", "build_policy", "guarded_env"]
