"""Moved: the episode runner and the measured cell live in `llm_cluster_gym.envs.rollout`."""

from __future__ import annotations

from llm_cluster_gym.envs.rollout import run_episode, run_measured, skip_warmup

__all__ = ["run_episode", "run_measured", "skip_warmup"]
