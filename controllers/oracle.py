"""Hindsight oracle for the energy task: knows the future load and tries its options.

This controller CHEATS on purpose: it reads the true future arrival rates per pool from the
backend's description (`BackendDescription.arrival_oracle`, which only the simulator offers)
and simulates candidate actions on deep copies of the env (same random state, hence the same
future). It is the hindsight reference energy policies are compared with, and it only works
on the simulated backend. It is not a bound: it searches only clock shifts around the
optimizer's proposal (the optimizer's instance counts and TP, planned on its own latency model)
over a short lookahead, so a policy can use less energy than it (the shipped residual energy
agent does on `small`'s test window, at lower SLO attainment). The energy task's planning-model
lower bound is the relaxed MILP of `controllers.milp_plan`.

Each interval: the DynamoLLM optimizer, fed with the true rates of the next interval and of
the coming reconfiguration window, proposes a configuration; the oracle then simulates that
proposal with every pool's clock shifted by `freq_shifts` steps on a copy of the env for
`lookahead` intervals and keeps the candidate with the least energy among those without SLO
violations or drops (the fewest
violations if none is clean).
"""

from __future__ import annotations

import copy

import numpy as np

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.dynamo import DynamoController


class OracleController:
    """Hindsight oracle (reads the future from the simulator; see the module docstring).

    Args:
        ctx: Static description of the env.
        env: The very `ClusterEnv` the oracle will act on (SimCluster backend required).
        freq_shifts: Clock-index shifts tried around the optimizer's proposal.
        lookahead: Intervals each candidate is simulated for (violations are counted when a
            request finishes, often intervals after the decision that caused them).
    """

    name = "oracle"

    def __init__(self, ctx: ControllerContext, env,
                 freq_shifts: tuple[int, ...] = (-2, -1, 0, 1), lookahead: int = 3) -> None:
        self.env = env.unwrapped
        arrivals = self.env.backend.describe().arrival_oracle
        if arrivals is None:
            raise ValueError("OracleController needs a backend that knows its future arrivals "
                             "(the simulator's arrival_oracle); this one has none")
        self._arrivals = arrivals
        self.ctx = ctx
        self.freq_shifts = freq_shifts
        self.lookahead = max(1, int(lookahead))
        self.planner = DynamoController(ctx, peak_headroom=1.0,
                                        rate_source=self._true_rate)

    def _true_rate(self, step: int, horizon: int) -> np.ndarray:
        """True arrival rate per pool over the next `horizon` intervals (req/s).

        The largest per-interval rate of the window when horizon > 1.
        """
        t0_s = self.env.last_telemetry.time_s
        return self._arrivals(t0_s, horizon, self.ctx.layout.control_interval_s).max(axis=0)

    def reset(self) -> None:
        """Forget the planner's state."""
        self.planner.reset()

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """The cheapest SLO-clean candidate found by simulating the next interval."""
        from dataclasses import replace

        base = self.planner.decide(observation, action_mask)
        freqs = self.ctx.layout.freq_choices_mhz
        encode = self.ctx.codec.encode_action
        best, best_key = encode(base), None
        for shift in self.freq_shifts:
            pools = tuple(
                replace(p, freq_mhz=float(freqs[int(np.clip(freqs.index(p.freq_mhz) + shift, 0,
                                                            len(freqs) - 1))]))
                for p in base.pools)
            if shift != 0 and pools == base.pools:
                continue
            cand = encode(replace(base, pools=pools))
            sim = copy.deepcopy(self.env)
            bad = energy_j = 0.0
            for _ in range(self.lookahead):
                _, _, _, truncated, info = sim.step(cand)
                bad += info["slo_violations"] + info["dropped"]
                energy_j += info["energy_j"]
                if truncated:
                    break
            key = (bad > 0, bad, energy_j)
            if best_key is None or key < best_key:
                best, best_key = cand, key
        return best
