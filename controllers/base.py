"""The one interface every policy implements, learned or rule-based.

A controller maps the environment's observation vector to an action of the environment's
action space. Rule-based controllers are built with the environment's static description
(`ClusterLayout`, observation names, action codec), which an operator knows in advance; at run
time they see only the observation, as a trained agent does. That is what makes rule-based
baselines, trained agents and the shield interchangeable in evaluation and deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.envs.backend import ClusterAction


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


class RuleBasedController:
    """Base of the rule-based controllers: they decide a `ClusterAction`, the codec encodes it.

    Subclasses implement `decide`; `act` is the same for all of them, so the flat vector is built
    in one place only (the env's `ActionCodec`).
    """

    name = "rule-based"

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    def reset(self) -> None:
        """Forget episode state (nothing by default)."""

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> ClusterAction:
        """The next interval's decision as a `ClusterAction`."""
        raise NotImplementedError

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """`decide`, as the env's action vector."""
        return self.ctx.codec.encode_action(self.decide(observation, action_mask))
