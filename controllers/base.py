"""The one interface every policy implements, learned or rule-based.

A controller maps the environment's observation vector to an action of the environment's
action space. Rule-based controllers are built with the environment's static description
(`ClusterLayout`, observation names, action codec), which an operator knows in advance; at run
time they see only the observation, as a trained agent does. That is what makes rule-based
baselines, trained agents and the shield interchangeable in evaluation and deployment.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Controller(Protocol):
    """A policy: `act(observation) -> action` (MultiDiscrete vector of the env's space)."""

    name: str

    def reset(self) -> None:
        """Forget episode state (forecasts, counters) before a new episode."""
        ...

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """Choose the next action; `action_mask` is the env's `action_masks()` where it has one."""
        ...
