"""Thermal/power-unaware baseline: first-fit placement, least-loaded routing, no reconfiguration.

Routing weights are equal on every row, so the simulator's router sends each request to the
least-loaded instance anywhere (join-shortest-queue); no clock ceilings, no quantization; the
pools keep the scenario's initial configuration; a waiting VM goes to the lowest-numbered free
server whatever the power or cooling headroom there.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.envs.backend import ClusterAction


class UnawareController(RuleBasedController):
    """The TAPAS paper's baseline: places and routes without looking at power or temperature."""

    name = "unaware"

    def __init__(self, ctx: ControllerContext) -> None:
        super().__init__(ctx)
        self.pools = ctx.initial_pools if ctx.codec.has_pools else None

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """Equal routing, no caps, first-fit placement."""
        return self.ctx.uncapped_action(self.pools, action_mask)
