"""What a training run writes to TensorBoard beyond stable-baselines3's own scalars.

`train` logs, under ``<out>/tb/<task>_<n>`` (and ``<task>_finetune_<n>`` for the fine-tuning
stage):

* per rollout, the means over the training episodes that ended in it (:class:`EpisodeScalars`):
  ``episode/reward`` (the episode return as the env computes it, before VecNormalize's
  scaling), each weighted reward term ``episode/reward_<term>`` (``energy``, ``slo``,
  ``thermal``, ``power``, ``quality``; they sum to the reward), ``episode/slo_attainment``
  (every arrival counted, `envs.backend.slo_attainment`) and ``episode/energy_j``;
* at every periodic evaluation on the validation window, ``validation/reward``,
  ``validation/energy_j`` and ``validation/slo_attainment`` (`agents.train.CheckpointAndEval`);
* at the end, the shipped policy against the static baseline on the test window
  (:func:`log_evaluation`): ``evaluation/<who>_<figure>`` for who in ``policy``, ``static`` and
  the figures of :data:`EVALUATION_FIGURES`, ``evaluation/energy_ratio_vs_static`` and
  ``evaluation/reward_gain_vs_static``.

SB3 adds ``rollout/ep_rew_mean``, ``rollout/ep_len_mean``, ``train/*`` and ``time/fps``.
:data:`TENSORBOARD_SCALARS` lists the tags a run with evaluation always has; a test reads them
back with TensorBoard's own reader.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from llm_cluster_gym.envs.backend import slo_attainment
from llm_cluster_gym.envs.reward import TERMS

EVALUATION_FIGURES = ("reward", "energy_j", "slo_attainment", "thermal_throttle_events",
                      "power_throttle_events")
"""Per-policy figures of the final test-window comparison logged as ``evaluation/<who>_<figure>``."""

TENSORBOARD_SCALARS = (
    "episode/reward", *(f"episode/reward_{t}" for t in TERMS), "episode/slo_attainment",
    "episode/energy_j", "validation/reward", "validation/energy_j", "validation/slo_attainment",
    *(f"evaluation/{who}_{k}" for who in ("policy", "static") for k in EVALUATION_FIGURES),
    "evaluation/energy_ratio_vs_static", "evaluation/reward_gain_vs_static",
    "rollout/ep_rew_mean",
)
"""Scalar tags of a training run with evaluation (the README's TensorBoard list)."""

_SUMMED = ("energy_j", "finished", "slo_violations", "dropped", "arrived",
           *(f"reward_{t}" for t in TERMS))


class EpisodeScalars(BaseCallback):
    """Totals each training env's episode from its ``info``; logs their means per rollout."""

    def __init__(self) -> None:
        super().__init__()
        self._running: list[dict[str, float]] = []
        self._ended: list[dict[str, float]] = []

    def _on_training_start(self) -> None:
        self._running = [dict.fromkeys(_SUMMED, 0.0) for _ in range(self.training_env.num_envs)]
        self._ended = []

    def _on_step(self) -> bool:
        for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"],
                                             strict=True)):
            acc = self._running[i]
            for k in _SUMMED:
                acc[k] += float(info.get(k, 0.0))
            if done:
                ep = info.get("episode")  # Monitor's raw return of the episode
                reward = float(ep["r"]) if ep else sum(acc[f"reward_{t}"] for t in TERMS)
                self._ended.append({
                    "reward": reward, **{f"reward_{t}": acc[f"reward_{t}"] for t in TERMS},
                    "slo_attainment": slo_attainment(
                        acc["finished"], acc["slo_violations"], acc["dropped"],
                        unserved=max(float(info.get("in_flight", 0.0)), 0.0), arrived=acc["arrived"]),
                    "energy_j": acc["energy_j"]})
                self._running[i] = dict.fromkeys(_SUMMED, 0.0)
        return True

    def _on_rollout_end(self) -> None:
        if not self._ended:
            return
        for k in self._ended[0]:
            values = [e[k] for e in self._ended if math.isfinite(e[k])]
            if values:
                self.logger.record(f"episode/{k}", float(np.mean(values)))
        self._ended = []


def log_evaluation(model: Any, evaluation: dict[str, Any]) -> None:
    """Write the final test-window comparison (`agents.evaluate.compare_with_static`) as scalars."""
    for who in ("policy", "static"):
        for k in EVALUATION_FIGURES:
            model.logger.record(f"evaluation/{who}_{k}", float(evaluation[who][k]["mean"]))
    for k in ("energy_ratio_vs_static", "reward_gain_vs_static"):
        model.logger.record(f"evaluation/{k}", float(evaluation[k]))
    model.logger.dump(int(model.num_timesteps))
