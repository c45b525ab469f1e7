"""The DynamoLLM-style energy manager for N copies of one scenario at once (issue 20).

`DynamoController` plans for one cluster with a few hundred small numpy calls per interval;
stepping it once per copy bounds a residual agent's training on the batched simulator
(`envs.sim.batched`, `envs.vector_env.BatchedClusterEnv`) at the manager's speed. This is the
same manager with every per-copy quantity an array over copies: its forecaster
(`BatchedLoadForecaster`), its current servers and TP per pool, its step count. The planning
model (`controllers.perfmodel.PoolModel`) is evaluated once per (pool, TP) for all copies, the
copies' rates broadcast against the candidate server counts and clocks.

Each copy decides exactly what a `DynamoController` built on the same scenario decides from the
same observations (`tests/test_dynamo_batched.py` checks it interval by interval): the same
configurations, the same ties, the same bits.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.forecast import BatchedLoadForecaster
from llm_cluster_gym.controllers.perfmodel import PoolModel


class BatchedDynamoManager:
    """`DynamoController`'s decisions for N copies: arrays (copies, pools).

    Args:
        ctx: Static description of the scenario every copy runs (any one copy's env).
        n_copies: N.
        slo_margin, peak_headroom, min_saving: As `DynamoController`.
    """

    def __init__(self, ctx: ControllerContext, n_copies: int, slo_margin: float = 0.4,
                 peak_headroom: float = 1.25, min_saving: float = 0.1) -> None:
        if not ctx.codec.has_pools:
            raise ValueError(f"BatchedDynamoManager needs a task with pool actions, got {ctx.task!r}")
        self.ctx, self.n = ctx, int(n_copies)
        self.slo_margin, self.peak_headroom, self.min_saving = slo_margin, peak_headroom, min_saving
        lay = ctx.layout
        self.n_pools = lay.n_pools
        self.tps = np.array(lay.tp_choices)
        self.freqs = np.array(lay.freq_choices_mhz, dtype=float)
        self.batch = int(np.max(lay.batch_choices))
        self.models = {(p, ti): PoolModel(ctx, p, int(tp), self.freqs[None, None, :])
                       for p in range(lay.n_pools) for ti, tp in enumerate(self.tps)}
        self.forecaster = BatchedLoadForecaster(lay.nominal_rps * ctx.pool_stats.fraction, self.n,
                                                window=ctx.reconfig_every)
        self.splits = ctx.codec.server_splits()
        self.counts = np.unique(self.splits)
        self._split_col = np.searchsorted(self.counts, self.splits)
        init = ctx.initial_pools
        self._init_servers = ctx.codec.pool_servers(init)
        self._init_tp_idx = np.array([lay.tp_choices.index(p.tp) for p in init], dtype=np.int64)
        self.step = np.zeros(self.n, dtype=np.int64)
        self.servers = np.tile(self._init_servers, (self.n, 1))
        self.tp_idx = np.tile(self._init_tp_idx, (self.n, 1))

    def reset(self, copies: np.ndarray | None = None) -> None:
        """Forget the forecast and the layout of ``copies`` (a boolean mask; None: every copy)."""
        c = np.ones(self.n, dtype=bool) if copies is None else np.asarray(copies, dtype=bool)
        self.forecaster.reset(c)
        self.step[c] = 0
        self.servers[c] = self._init_servers
        self.tp_idx[c] = self._init_tp_idx

    # ------------------------------------------------------------------ the planning model
    def _freq_table(self, p: int, ti: int, servers: np.ndarray, rate: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per copy and server count: feasible?, cheapest feasible clock index, its power (W).

        ``servers`` is (copies, k) or (1, k), ``rate`` (copies,); results (copies, k).
        """
        ctx, lay = self.ctx, self.ctx.layout
        prof = ctx.profiles[int(self.tps[ti])]
        servers = np.asarray(servers, dtype=float)
        n_inst = servers * (lay.gpus_per_server // int(self.tps[ti]))
        ok, pred = self.models[p, ti].within_slo(rate[:, None, None], n_inst[:, :, None], self.batch,
                                                 self.slo_margin)
        server_w = ctx.server.server_power_w(lay.gpus_per_server * pred.gpu_power_w, prof.idle_power_w)
        cost = np.where(ok, servers[:, :, None] * server_w, np.inf)
        f_idx = np.argmin(cost, axis=2)
        feasible = ok.any(axis=2)
        return feasible, f_idx, np.take_along_axis(cost, f_idx[:, :, None], axis=2)[:, :, 0]

    def _layout_cost(self, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per copy, the cheapest (servers per pool, TP indices) over the codec's splits, and its cost."""
        n, n_pools, counts = self.n, self.n_pools, self.counts
        best_cost = np.full((n, n_pools, len(counts)), np.inf)
        best_tp = np.zeros((n, n_pools, len(counts)), dtype=np.int64)
        for p in range(n_pools):
            for ti in range(len(self.tps)):
                feas, _, cost = self._freq_table(p, ti, counts[None, :], rate[:, p])
                cost = np.where(feas, cost, np.inf)
                cost[rate[:, p] <= 0, 0] = 0.0
                better = cost < best_cost[:, p]
                best_cost[:, p] = np.where(better, cost, best_cost[:, p])
                best_tp[:, p] = np.where(better, ti, best_tp[:, p])
        col = self._split_col
        total = np.zeros((n, len(self.splits)))
        for p in range(n_pools):
            total = total + best_cost[:, p, col[:, p]]
        j = np.argmin(total, axis=1)
        rows = np.arange(n)
        tp_idx = best_tp[rows[:, None], np.arange(n_pools)[None, :], col[j]]
        return self.splits[j].copy(), tp_idx, total[rows, j]

    def _current(self, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per copy and pool, for the current layout: feasible?, cheapest clock index, cost (W)."""
        shape = (self.n, self.n_pools)
        feas, f_idx, cost = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.int64), np.zeros(shape)
        for p in range(self.n_pools):
            for ti in np.unique(self.tp_idx[:, p]):
                on = self.tp_idx[:, p] == ti
                fe, fi, co = self._freq_table(p, int(ti), self.servers[:, p:p + 1], rate[:, p])
                feas[on, p], f_idx[on, p], cost[on, p] = fe[on, 0], fi[on, 0], co[on, 0]
        return feas, f_idx, cost

    def _current_cost(self, rate: np.ndarray) -> np.ndarray:
        """`DynamoController._current_cost` per copy: inf where a loaded pool is infeasible."""
        feas, _, cost = self._current(rate)
        total = np.zeros(self.n)
        for p in range(self.n_pools):
            total = total + np.where(feas[:, p], cost[:, p], 0.0)
        return np.where((~feas & (rate > 0)).any(axis=1), np.inf, total)

    # ------------------------------------------------------------------ policy
    def _rates(self, observation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(next-interval rate, window peak rate) per copy and pool, req/s."""
        view, lay = self.ctx.view, self.ctx.layout
        obs = np.asarray(observation)
        backlog_rps = view.pool_backlog(obs) / lay.control_interval_s
        seen = self.step > 0
        observed = view.pool_rate_rps(obs)
        self.forecaster.update(observed, seen)
        nxt = np.maximum(self.forecaster.forecast(1), np.where(seen[:, None], observed, 0.0))
        peak = self.forecaster.peak(self.ctx.reconfig_every) * self.peak_headroom
        return nxt + backlog_rps, np.maximum(peak, nxt + backlog_rps)

    def next_pools(self, observation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every copy's pool configurations for the next interval, from its observation (copies, dim).

        One call per interval (it counts). Returns arrays (copies, pools): instances, TP degree,
        clock (MHz), batch cap, as `DynamoController.next_pools` per copy.
        """
        rate_next, rate_peak = self._rates(observation)
        plan = self.step % self.ctx.reconfig_every == 0
        if plan.any():
            servers, tp_idx, cost = self._layout_cost(rate_peak)
            current = self._current_cost(rate_peak)
            adopt = plan & np.isfinite(cost) & (~np.isfinite(current)
                                                | (cost < (1.0 - self.min_saving) * current))
            self.servers = np.where(adopt[:, None], servers, self.servers)
            self.tp_idx = np.where(adopt[:, None], tp_idx, self.tp_idx)
        feas, f_idx, _ = self._current(rate_next)
        f_idx = np.where(feas, f_idx, len(self.freqs) - 1)
        self.step = self.step + 1
        tp = self.tps[self.tp_idx]
        n_inst = self.servers * (self.ctx.layout.gpus_per_server // tp)
        return n_inst, tp, self.freqs[f_idx], np.full_like(n_inst, self.batch)
