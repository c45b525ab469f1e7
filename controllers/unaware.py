"""Thermal/power-unaware baseline: first-fit placement, least-loaded routing, no reconfiguration.

Routing weights are equal on every row, so the simulator's router sends each request to the
least-loaded instance anywhere (join-shortest-queue); no clock ceilings, no quantization; the
pools keep the scenario's initial configuration; a waiting VM goes to the lowest-numbered free
server whatever the power or cooling headroom there.
"""

from __future__ import annotations

import numpy as np
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.static import first_fit
from llm_cluster_gym.envs.backend import ClusterAction


class UnawareController:
    """The TAPAS paper's baseline: places and routes without looking at power or temperature."""

    name = "unaware"

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.pools = ctx.initial_pools if ctx.codec.has_pools else None

    def reset(self) -> None:
        """Nothing to forget."""

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """Equal routing, no caps, first-fit placement."""
        r = self.ctx.layout.n_rows
        return self.ctx.action(self.pools, route_level=np.full(r, 3),
                               cap_idx=np.full(r, len(self.ctx.layout.freq_choices_mhz) - 1),
                               quantized=np.zeros(r),
                               vm_server=first_fit(self.ctx.legal_servers(action_mask)))

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """`decide`, as the env's action vector."""
        return self.ctx.codec.encode_action(self.decide(observation, action_mask))
