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


class UnawareController:
    """The TAPAS paper's baseline: places and routes without looking at power or temperature."""

    name = "unaware"

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        lay = ctx.layout
        r = lay.n_rows
        self.pool_block = ctx.initial_pool_block() if ctx.codec.has_pools else None
        self.row_block = ctx.row_block(np.full(r, 3), np.full(r, len(lay.freq_choices_mhz) - 1),
                                       np.zeros(r))

    def reset(self) -> None:
        """Nothing to forget."""

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """Equal routing, no caps, first-fit placement."""
        place = first_fit(self.ctx.legal_servers(action_mask))
        return self.ctx.assemble(self.pool_block, self.row_block, place)
