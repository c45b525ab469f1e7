"""DynamoLLM-style energy manager: per pool, the cheapest configuration that meets the SLOs.

Three time scales, as in DynamoLLM:

* instances (server share per pool) and TP, every `reconfig_every` intervals (the env applies
  them only then): sized for the forecast peak of the coming window, chosen jointly over pools
  among the server splits the action codec can produce within its share budget
  (`ActionCodec.server_splits`, remainders included, so the servers predicted are the servers
  that run); a change is made only when the current
  configuration would miss the SLO or the predicted saving exceeds `min_saving` (instances
  being re-sharded are down for the model-load time, so small savings do not pay);
* frequency, every interval: the lowest clock at which the predicted TTFT and TBT of the
  current instances stay within `slo_margin` of the SLO for the next interval's forecast load
  (plus the backlog to drain);
* batch cap: the largest (it costs nothing in energy; the clock does the work).

Predictions come from the profile tables through `controllers.perfmodel.PoolModel` (one per pool
and TP over the clock choices, built once).
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.forecast import LoadForecaster
from llm_cluster_gym.controllers.perfmodel import PoolModel
from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig


class DynamoController(RuleBasedController):
    """Energy manager over the pools of the action (energy and combined tasks).

    Args:
        ctx: Static description of the env.
        slo_margin: Predicted latency must stay below this fraction of the SLO.
        peak_headroom: Multiplier on the forecast peak when sizing instances.
        min_saving: Fraction of the servers' power a new instance/TP layout must save to be adopted.
        rate_source: Optional callable ``(step) -> rate per pool (req/s)`` replacing the
            forecast (the hindsight oracle passes the true future rates).
    """

    name = "dynamo"

    def __init__(self, ctx: ControllerContext, slo_margin: float = 0.4,
                 peak_headroom: float = 1.25, min_saving: float = 0.1,
                 rate_source=None) -> None:
        if not ctx.codec.has_pools:
            raise ValueError(f"DynamoController needs a task with pool actions, got {ctx.task!r}")
        super().__init__(ctx)
        self.slo_margin, self.peak_headroom, self.min_saving = slo_margin, peak_headroom, min_saving
        self.rate_source = rate_source
        lay = ctx.layout
        self.tps = np.array(lay.tp_choices)
        self.freqs = np.array(lay.freq_choices_mhz, dtype=float)
        self.batch_idx = int(np.argmax(lay.batch_choices))
        self.models = {(p, ti): PoolModel(ctx, p, int(tp), self.freqs[None, :])
                       for p in range(lay.n_pools) for ti, tp in enumerate(self.tps)}
        prior = lay.nominal_rps * ctx.pool_stats.fraction
        self.forecaster = LoadForecaster(prior, window=ctx.reconfig_every)
        self.reset()

    def reset(self) -> None:
        """Forget the forecast and the current layout."""
        self.forecaster.reset()
        self.step = 0
        lay = self.ctx.layout
        init = self.ctx.initial_pools
        # SaaS servers per pool of the current layout: always a split the codec executes.
        self.servers = self.ctx.codec.pool_servers(init)
        self.tp_idx = np.array([lay.tp_choices.index(p.tp) for p in init], dtype=np.int64)

    # ------------------------------------------------------------------ model helpers
    def _freq_table(self, p: int, tp_i: int, servers: np.ndarray, rate: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per server count: feasible?, cheapest feasible frequency index, power of its servers (W)."""
        ctx, lay = self.ctx, self.ctx.layout
        tp = int(self.tps[tp_i])
        prof = ctx.profiles[tp]
        n_inst = np.asarray(servers, dtype=float) * (lay.gpus_per_server // tp)
        ok, pred = self.models[p, tp_i].within_slo(rate, n_inst[:, None], lay.batch_choices[self.batch_idx],
                                                   self.slo_margin)
        # The whole power of the servers the pool holds (GPUs, idle ones included, plus the
        # non-GPU power): a server the pool gives back powers off, so fewer, busier servers
        # win whenever they meet the SLO (DynamoLLM's scale-in; its GPU-hour saving).
        gpus = lay.gpus_per_server
        server_w = ctx.server.server_power_w(gpus * pred.gpu_power_w, prof.idle_power_w)
        power = np.asarray(servers, dtype=float)[:, None] * server_w
        cost = np.where(ok, power, np.inf)
        f_idx = np.argmin(cost, axis=1)
        feasible = ok.any(axis=1)
        return feasible, f_idx, cost[np.arange(len(servers)), f_idx]

    def _layout_cost(self, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Cheapest (servers per pool, tp indices) over the codec's splits, and its cost.

        Each pool's cost depends on its own servers only, so it is tabulated per server count
        (best TP each); a split costs the sum over pools. Ties go to the first split in the
        codec's order (fewest share levels, then the last pool's level, ...).
        """
        n_pools = len(rate)
        splits = self.ctx.codec.server_splits()
        counts = np.unique(splits)  # always starts at 0: the all-zero split
        best_cost = np.full((n_pools, len(counts)), np.inf)
        best_tp = np.zeros((n_pools, len(counts)), dtype=np.int64)
        for p in range(n_pools):
            for ti in range(len(self.tps)):
                feas, _, cost = self._freq_table(p, ti, counts, float(rate[p]))
                cost = np.where(feas, cost, np.inf)
                if rate[p] <= 0:
                    cost[0] = 0.0
                better = cost < best_cost[p]
                best_cost[p] = np.where(better, cost, best_cost[p])
                best_tp[p] = np.where(better, ti, best_tp[p])
        col = np.searchsorted(counts, splits)
        total = np.zeros(len(splits))
        for p in range(n_pools):
            total = total + best_cost[p, col[:, p]]
        j = int(np.argmin(total))
        return splits[j].copy(), best_tp[np.arange(n_pools), col[j]], float(total[j])

    def _current_cost(self, rate: np.ndarray) -> float:
        total = 0.0
        for p in range(len(rate)):
            feas, _, cost = self._freq_table(p, int(self.tp_idx[p]), self.servers[p:p + 1],
                                             float(rate[p]))
            if not feas[0] and rate[p] > 0:
                return np.inf
            total += float(cost[0]) if feas[0] else 0.0
        return total

    # ------------------------------------------------------------------ policy
    def _rates(self, observation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(next-interval rate, window peak rate) per pool, req/s."""
        view, lay = self.ctx.view, self.ctx.layout
        backlog_rps = view.pool_backlog(observation) / lay.control_interval_s
        if self.rate_source is not None:
            now = np.asarray(self.rate_source(self.step, 1), dtype=float)
            peak = np.asarray(self.rate_source(self.step, self.ctx.reconfig_every), dtype=float)
            return now + backlog_rps, np.maximum(peak, now + backlog_rps)
        if self.step > 0:
            self.forecaster.update(view.pool_rate_rps(observation))
        nxt = np.maximum(self.forecaster.forecast(1),
                         view.pool_rate_rps(observation) if self.step > 0 else 0.0)
        peak = self.forecaster.peak(self.ctx.reconfig_every) * self.peak_headroom
        return nxt + backlog_rps, np.maximum(peak, nxt + backlog_rps)

    def next_pools(self, observation: np.ndarray) -> tuple[PoolConfig, ...]:
        """The pool configurations for the next interval (one call per interval: it counts)."""
        lay = self.ctx.layout
        rate_next, rate_peak = self._rates(observation)
        if self.step % self.ctx.reconfig_every == 0:
            servers, tp_idx, cost = self._layout_cost(rate_peak)
            current = self._current_cost(rate_peak)
            if np.isfinite(cost) and (not np.isfinite(current)
                                      or cost < (1.0 - self.min_saving) * current):
                self.servers, self.tp_idx = servers, tp_idx
        f_idx = np.full(lay.n_pools, len(self.freqs) - 1)
        for p in range(lay.n_pools):
            feas, fi, _ = self._freq_table(p, int(self.tp_idx[p]), self.servers[p:p + 1],
                                           float(rate_next[p]))
            if feas[0]:
                f_idx[p] = fi[0]
        self.step += 1
        gpus, batch = lay.gpus_per_server, int(lay.batch_choices[self.batch_idx])
        return tuple(
            PoolConfig(n_instances=int(self.servers[p]) * (gpus // int(self.tps[self.tp_idx[p]])),
                       tp=int(self.tps[self.tp_idx[p]]), freq_mhz=float(self.freqs[f_idx[p]]),
                       max_batch=batch)
            for p in range(lay.n_pools))

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """Pools from the energy manager; rows (combined task) at full weight and uncapped."""
        return self.ctx.uncapped_action(self.next_pools(observation), action_mask)
