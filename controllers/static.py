"""Static baseline (DynamoLLM's): provisioned for peak, maximum clock, TP 8, largest batch.

With several pools the SaaS servers are split in proportion to each pool's expected work
(request share x service time at TP 8 and the maximum clock, from the profile tables); every
level of the share is always in use. Rows (thermal/combined tasks) get full routing weight, no
clock ceiling, no quantization, and VMs are placed first-fit.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.envs.backend import ClusterAction


def split_levels(weights: np.ndarray, levels: int) -> np.ndarray:
    """Integer share levels summing to ``levels``, proportional to ``weights``.

    Each pool gets at least one level when there are at least as many levels as pools; the
    rest goes by largest remainders.
    """
    w = np.maximum(np.asarray(weights, dtype=float), 0.0)
    n = len(w)
    if w.sum() <= 0:
        w = np.ones(n)
    floor = 1 if levels >= n else 0
    spare = levels - floor * n
    want = w / w.sum() * spare
    out = np.floor(want).astype(np.int64)
    rest = spare - int(out.sum())
    out[np.argsort(-(want - out), kind="stable")[:rest]] += 1
    return out + floor


class StaticController(RuleBasedController):
    """Peak-provisioned, maximum-frequency TP-8 configuration that never changes."""

    name = "static"

    def __init__(self, ctx: ControllerContext) -> None:
        super().__init__(ctx)
        lay = ctx.layout
        tp = max(lay.tp_choices)
        prof = ctx.profiles[tp]
        st = ctx.pool_stats
        f = lay.max_freq_mhz
        service_s = (prof.prefill_time_s(st.mean_input_tokens, f)
                     + st.mean_output_tokens * prof.decode_iter_time_s(
                         max(lay.batch_choices) / 2, st.mean_input_tokens, f))
        self.levels = split_levels(st.fraction * service_s, ctx.codec.share_levels)
        n = lay.n_pools
        self.pools = ctx.codec.pool_configs(self.levels, [tp] * n, [lay.freq_choices_mhz[-1]] * n,
                                            [max(lay.batch_choices)] * n)

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """The fixed configuration; a waiting VM goes to the first legal server."""
        return self.ctx.uncapped_action(self.pools, action_mask)
