"""The safety shield: wraps any controller and overrides it when a hard limit would break.

Each interval the shield reads the hardware telemetry (per-GPU power and temperature, row
limits in force, aisle inlets: what an operator's monitoring shows) and the proposed action,
and predicts the next interval:

* row power: IaaS servers keep their present draw (VMs cannot be reconfigured; they can only
  leave within an interval), a newly placed VM adds its server at the VM's expected GPU power
  (the P95 of its type's readings so far in the episode, its declared mean before any ran: the
  waiting VM's own future draw is unknown to an operator; a VM whose draw swings above that
  P95 is row capping's to handle), and each
  SaaS server is bounded at its clock ceiling by ``idle + D * (f / f_max)**gamma`` per GPU,
  with ``D`` = `burst_factor` x the largest mean SaaS dynamic power seen in that row lately
  (rescaled to the maximum clock); the server overhead follows the simulator's linear model;
* GPU temperature: ``inlet + INLET_RISE_C + max(present rise, R_total x bound power)`` with the
  fitted two-node thermal resistance (the heatsink only relaxes toward ``R * P``), the bound
  power here from the hottest SaaS GPU seen lately, floored at `min_worst_fraction` of the
  profile's saturated-prefill power.

The shield overrides when the proposal would put a row above `power_margin` of its limit, or a
GPU within `temp_margin_c` of its slowdown point, with a clock the prediction says is too high
for that row (a row already at its safest clock, or one no clock can make safe, is left alone:
its excess comes from VMs no action can reconfigure), a VM where it would break either, a pool
with load and no instance anywhere, a backlogged cluster losing capacity, a TP change sooner than
`min_reshard_intervals` after the last (only that change is undone), or when
an emergency is declared (any fault flag). The override
is the rule-based fallback (TAPAS-style for row tasks, the scenario's pools otherwise), with
every row's clock ceiling (or every pool's clock, energy task) clamped to the highest step the
prediction allows. Each override is counted with its reasons (`last_override`, `overrides`,
`reason_counts`).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.perfmodel import worst_gpu_power_w
from llm_cluster_gym.envs.actions import ROUTE_WEIGHT_LEVELS
from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig, Telemetry

INLET_RISE_C = 1.5
"""Bound on the inlet rise over one 5 s interval (C). The aisle inlet relaxes with tau = 300 s
(envs/data/thermal/aisle_cooling_default.json, an assumption there), so 5 s moves it 1.7% of
the way to its steady state; steady states within 90 C of the present inlet give < 1.5 C."""


@dataclass(frozen=True)
class ShieldForecast:
    """The shield's prediction about one proposed action (`Shield.forecast`).

    Attributes:
        safe_row_freq_mhz: Per row, the highest clock ceiling the prediction allows (the lowest
            choice where none does).
        clock_helps: Per row, whether some clock ceiling makes the row safe (False: its excess
            comes from VMs no clock can reconfigure; the shield leaves such a row alone).
        row_clock_mhz: Per row, the action's effective SaaS clock ceiling.
        placements: The action's placements.
        safe_placements: How many of them, in slot order, keep their rows safe before the first
            that would not (at the ceilings the prediction allows).
        safe_vm_servers: Per slot, the server the shield would place that slot's VM on at the
            ceilings the prediction allows (the proposed one if safe, else the first safe legal
            one, else None); None without a mask.
    """

    safe_row_freq_mhz: np.ndarray
    clock_helps: np.ndarray
    row_clock_mhz: np.ndarray
    placements: int
    safe_placements: int
    safe_vm_servers: tuple[int | None, ...] | None

    @property
    def rows_to_lower(self) -> np.ndarray:
        """Rows whose clock ceiling is above what the prediction allows, where a lower one would help."""
        return self.clock_helps & (self.row_clock_mhz > self.safe_row_freq_mhz + 1e-9)


def heed_forecast_placements(servers: tuple[int | None, ...], forecast: ShieldForecast
                             ) -> tuple[int | None, ...]:
    """Each placed slot moved where the forecast says its VM fits (None: it waits).

    A slot the action leaves waiting stays waiting; without the forecast's servers (no mask) the
    placements are kept.
    """
    if forecast.safe_vm_servers is None:
        return tuple(servers)
    return tuple(f if s is not None else None
                 for s, f in zip(servers, forecast.safe_vm_servers, strict=False))


class HeldProposal:
    """A shield's wrapped controller for actions decided elsewhere: `act` returns `vector`.

    A trainer sets `vector` to the agent's action before asking the shield (`Shield.act`); a
    forecaster (`Shield.forecaster`) keeps it None and judges no action, so asking it raises.
    """

    def __init__(self, name: str = "held") -> None:
        self.name = name
        self.vector: np.ndarray | None = None

    def reset(self) -> None:
        """Nothing to forget (the vector is set before every `act`)."""

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """The held vector.

        Raises:
            RuntimeError: None is held (a forecaster's).
        """
        if self.vector is None:
            raise RuntimeError(f"{self.name}: no proposal held (a forecaster shield judges no action: "
                               "call forecast(), not act())")
        return self.vector


class Shield:
    """Wraps a controller; replaces unsafe actions with the clamped rule-based fallback.

    Args:
        inner: The wrapped controller (any `Controller`).
        ctx: Static description of the env.
        telemetry: Callable returning the latest `Telemetry` (e.g. ``env.backend.telemetry``).
        fallback: Rule-based controller used on override (default: TAPAS-style for tasks with
            row actions, the scenario's pool configuration otherwise).
        power_margin: Fraction of the row limit the predicted power must stay under.
        temp_margin_c: Predicted GPU temperature must stay this far below slowdown.
        burst_factor: Multiplier on recently seen SaaS dynamic power in the power bound.
        min_worst_fraction: Floor of the SaaS dynamic bound as a fraction of saturated prefill.
        history: Intervals of SaaS power history kept per row.
        min_reshard_intervals: Intervals a pool's TP is held after a change (resharding pace).
    """

    def __init__(self, inner, ctx: ControllerContext, telemetry: Callable[[], Telemetry],
                 fallback=None, power_margin: float = 0.93, temp_margin_c: float = 3.0,
                 burst_factor: float = 1.5, min_worst_fraction: float = 0.6,
                 history: int = 12, min_reshard_intervals: int = 60) -> None:
        self.inner, self.ctx, self.telemetry = inner, ctx, telemetry
        self.name = f"shield({getattr(inner, 'name', type(inner).__name__)})"
        if fallback is None and ctx.codec.has_rows:
            from llm_cluster_gym.controllers.tapas import TapasController

            fallback = TapasController(ctx)
        self.fallback = fallback
        self.power_margin, self.temp_margin_c = power_margin, temp_margin_c
        self.min_reshard_intervals = min_reshard_intervals
        self.burst_factor, self.min_worst_fraction = burst_factor, min_worst_fraction
        lay = ctx.layout
        self.prof = ctx.profiles[max(lay.tp_choices)]
        self.freqs = np.array(lay.freq_choices_mhz, dtype=float)
        self.gpu_row = np.repeat(lay.server_row, lay.gpus_per_server)
        self.gpu_aisle = np.repeat(lay.server_aisle, lay.gpus_per_server)
        self.saas_server = np.asarray(lay.server_is_saas, dtype=bool)
        self.r_total = ctx.thermal.r_die_c_per_w + ctx.thermal.r_sink_c_per_w
        self._dyn_hist: deque[np.ndarray] = deque(maxlen=history)
        self.reset()

    @classmethod
    def forecaster(cls, ctx: ControllerContext, telemetry: Callable[[], Telemetry]) -> Shield:
        """A shield that wraps nothing, kept for `forecast` (its own power history)."""
        return cls(HeldProposal("forecaster"), ctx, telemetry)

    def reset(self) -> None:
        """Reset the wrapped and fallback controllers and the override statistics."""
        self.inner.reset()
        if self.fallback is not None:
            self.fallback.reset()
        self._dyn_hist.clear()
        self._tp_now: np.ndarray | None = None
        self._last_pools: tuple[PoolConfig, ...] | None = None
        self._tp_changed_at = np.full(self.ctx.layout.n_pools, -(10**9))
        self.overrides = 0
        self.emergency_only_overrides = 0
        self.steps = 0
        self.reason_counts: Counter[str] = Counter()
        self.last_override: tuple[str, ...] = ()

    @property
    def override_rate(self) -> float:
        """Fraction of intervals in which the shield replaced the action."""
        return self.overrides / self.steps if self.steps else 0.0

    @property
    def avoidable_override_rate(self) -> float:
        """Fraction of intervals overridden for a reason besides a declared emergency.

        During an emergency the shield replaces every action, whatever the policy proposed.
        """
        return (self.overrides - self.emergency_only_overrides) / self.steps if self.steps else 0.0

    # ------------------------------------------------------------------ prediction
    def _saas_dyn_w(self, tel: Telemetry) -> np.ndarray:
        """Per row: dynamic power bounds per SaaS GPU at the maximum clock (W), shape (2, rows).

        Row 0 bounds the row's *mean* SaaS GPU (what its power sum needs); row 1 the hottest
        SaaS GPU (what its temperature needs, floored at `min_worst_fraction` of saturated
        prefill). Both take `burst_factor` x the largest value seen over `history` intervals.
        """
        lay, prof = self.ctx.layout, self.prof
        idle = prof.idle_power_w
        f_rel = np.clip(np.asarray(tel.gpu_freq_mhz, dtype=float) / lay.max_freq_mhz, 0.2, 1.0)
        dyn = np.maximum(np.asarray(tel.gpu_power_w) - idle, 0.0) / f_rel**prof.power_freq_exponent
        saas_gpu = np.repeat(self.saas_server, lay.gpus_per_server)
        rows = self.gpu_row[saas_gpu]
        n = np.maximum(np.bincount(rows, minlength=lay.n_rows), 1)
        mean = np.bincount(rows, weights=dyn[saas_gpu], minlength=lay.n_rows) / n
        peak = np.zeros(lay.n_rows)
        np.maximum.at(peak, rows, dyn[saas_gpu])
        self._dyn_hist.append(np.stack([mean, peak]))
        seen = np.max(np.stack(self._dyn_hist), axis=0)
        worst = float(worst_gpu_power_w(prof, lay.max_freq_mhz)) - idle
        bound = np.minimum(self.burst_factor * seen, worst)
        bound[1] = np.maximum(bound[1], self.min_worst_fraction * worst)
        return bound

    def _saas_gpu_w(self, dyn_w: np.ndarray, f_mhz: np.ndarray) -> np.ndarray:
        prof = self.prof
        rel = np.asarray(f_mhz, dtype=float) / self.ctx.layout.max_freq_mhz
        return np.minimum(prof.idle_power_w + dyn_w * rel**prof.power_freq_exponent,
                          prof.gpu_power_limit_w)

    def _predict(self, tel: Telemetry, dyn_w: np.ndarray, f_row_mhz: np.ndarray,
                 placements: tuple[tuple[int, float], ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(row power W, hottest predicted GPU temperature per row C) for row clock ceilings.

        `placements` are new VMs as (server, expected per-GPU power W), each adding its server.
        """
        lay, srv, idle = self.ctx.layout, self.ctx.server, self.prof.idle_power_w
        gpu_w = np.asarray(tel.gpu_power_w, dtype=float).reshape(lay.n_servers, -1).sum(axis=1)
        server_w = srv.server_power_w(gpu_w, idle)
        per_gpu = np.asarray(tel.gpu_power_w, dtype=float).reshape(lay.n_servers, -1).max(axis=1)
        f_srv = f_row_mhz[lay.server_row]
        saas_mean_w = self._saas_gpu_w(dyn_w[0][lay.server_row], f_srv)
        server_w = np.where(self.saas_server, srv.server_power_w(saas_mean_w * lay.gpus_per_server,
                                                                 idle), server_w)
        per_gpu = np.where(self.saas_server, self._saas_gpu_w(dyn_w[1][lay.server_row], f_srv),
                           per_gpu)
        new_vm = np.zeros(lay.n_servers, dtype=bool)
        for vm_server, vm_gpu_w in placements:
            server_w[vm_server] = srv.server_power_w(vm_gpu_w * lay.gpus_per_server, idle)
            per_gpu[vm_server] = vm_gpu_w
            new_vm[vm_server] = True
        row_w = np.bincount(lay.server_row, weights=server_w, minlength=lay.n_rows)
        inlet = np.asarray(tel.aisle_inlet_c, dtype=float)
        rise_now = (np.asarray(tel.gpu_temp_c, dtype=float) - inlet[self.gpu_aisle]).reshape(
            lay.n_servers, -1).max(axis=1)
        temp = inlet[lay.server_aisle] + INLET_RISE_C + np.maximum(
            np.where(self.saas_server | new_vm, rise_now, 0.0),
            self.r_total * per_gpu)
        # IaaS GPUs already placed cannot be reconfigured: only SaaS and new VMs are checked.
        checked = self.saas_server | new_vm
        row_temp = np.full(lay.n_rows, -np.inf)
        np.maximum.at(row_temp, lay.server_row[checked], temp[checked])
        return row_w, row_temp

    def _safe_row_freq_idx(self, tel: Telemetry, dyn_w: np.ndarray,
                           with_feasible: bool = False):
        """Highest clock-ceiling index per row that the prediction allows (0 if none does).

        With `with_feasible`, also the mask of rows where some clock is allowed at all.
        """
        lay = self.ctx.layout
        limit = np.asarray(tel.row_limit_w, dtype=float) * self.power_margin
        out = np.zeros(lay.n_rows, dtype=np.int64)
        feasible = np.zeros(lay.n_rows, dtype=bool)
        for i, f in enumerate(self.freqs):
            row_w, row_t = self._predict(tel, dyn_w, np.full(lay.n_rows, f))
            ok = (row_w <= limit) & (row_t <= lay.slowdown_temp_c - self.temp_margin_c)
            out = np.where(ok, i, out)
            feasible |= ok
        return (out, feasible) if with_feasible else out

    # ------------------------------------------------------------------ policy
    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """The wrapped controller's action, or the clamped fallback when it would be unsafe.

        The wrapped controller's vector comes back unchanged when the shield lets it through;
        otherwise the shield edits the decoded `ClusterAction` and the codec encodes it.
        """
        ctx, lay, view = self.ctx, self.ctx.layout, self.ctx.view
        vector = np.asarray(self.inner.act(observation, action_mask), dtype=np.int64)
        fb_vector = (self.fallback.act(observation, action_mask)
                     if self.fallback is not None else None)
        # Without a mask legality is unknown: the proposed placements are judged as proposed.
        legal = (ctx.slot_legal_servers(action_mask) if action_mask is not None
                 else np.ones(lay.n_servers, dtype=bool))
        action, _ = ctx.codec.decode(vector, legal)
        fb_action = ctx.codec.decode(fb_vector, legal)[0] if fb_vector is not None else None
        tel = self.telemetry()
        dyn_w = self._saas_dyn_w(tel)
        self.steps += 1
        reasons: list[str] = []
        faults = view.faults(observation)
        if faults.any():
            kinds = np.array(["cooling_failure", "power_failure", "load_spike"])[faults]
            reasons.append("emergency:" + "+".join(kinds))
        f_row = self._row_clocks(action)
        vm_w = view.pending_vms_expected_gpu_w(observation)  # each VM's type's past P95
        placements = self._placements(action, vm_w)
        row_w, row_t = self._predict(tel, dyn_w, f_row, placements)
        limit = np.asarray(tel.row_limit_w, dtype=float)
        # Only a risk a lower clock would remove counts: a row at or under the highest clock the
        # prediction allows is as safe as the action can make it, and a row no clock makes safe
        # owes its excess to VMs that cannot be reconfigured (row capping handles those).
        safe_idx, feasible = self._safe_row_freq_idx(tel, dyn_w, with_feasible=True)
        lowerable = feasible & (f_row > self.freqs[safe_idx] + 1e-9)
        hot_power = row_w > self.power_margin * limit
        hot_temp = row_t > lay.slowdown_temp_c - self.temp_margin_c
        if (hot_power & lowerable).any():
            reasons.append("row_power")
        if (hot_temp & lowerable).any():
            reasons.append("gpu_temp")
        if self._first_unsafe_placement(tel, dyn_w, f_row, placements, (row_w, row_t)) is not None:
            reasons.append("placement")
        if ctx.codec.has_pools and (self._starves_a_pool(action, observation)
                                    or self._shrinks_while_backlogged(action, observation)):
            reasons.append("capacity")
        if reasons:
            out = self._safe_fallback(action, fb_action, observation, action_mask, tel, dyn_w)
            if ctx.codec.has_pools:  # the fallback's configuration is the safe one: let it in
                self._pace_resharding(out, force=True)
        else:
            out = action
            if ctx.codec.has_pools:  # the wrapped policy's TP changes are paced
                out, resharded = self._pace_resharding(out)
                if resharded:
                    reasons.append("resharding")
        self.last_override = tuple(reasons)
        if reasons:
            self.overrides += 1
            self.emergency_only_overrides += all(r.startswith("emergency") for r in reasons)
            self.reason_counts.update(reasons)
        if ctx.codec.has_pools:
            self._last_pools = out.pools
        return vector if out is action else ctx.codec.encode_action(out)

    def _first_unsafe_placement(self, tel: Telemetry, dyn_w: np.ndarray, f_row: np.ndarray,
                                placements: tuple[tuple[int, float], ...],
                                predicted_all: tuple[np.ndarray, np.ndarray] | None = None
                                ) -> int | None:
        """Index of the first placement that makes its row unsafe (None: every one keeps it safe).

        Placements in slot order, each judged on top of the ones before it.
        ``predicted_all``: `_predict` with every placement, when the caller has it already.
        """
        lay = self.ctx.layout
        limit = np.asarray(tel.row_limit_w, dtype=float)
        t_max = lay.slowdown_temp_c - self.temp_margin_c
        for k, (vm_server, _) in enumerate(placements):
            r = lay.server_row[vm_server]
            if k + 1 == len(placements) and predicted_all is not None:
                row_w1, row_t1 = predicted_all
            else:
                row_w1, row_t1 = self._predict(tel, dyn_w, f_row, placements[:k + 1])
            row_w0, row_t0 = self._predict(tel, dyn_w, f_row, placements[:k])
            w_max = self.power_margin * limit[r]
            if (row_w1[r] > w_max and not row_w0[r] > w_max) or (
                    row_t1[r] > t_max and not row_t0[r] > t_max):
                return k
        return None

    def forecast(self, observation: np.ndarray, action: ClusterAction,
                 action_mask: np.ndarray | None = None) -> ShieldForecast:
        """What the shield's prediction says about an action for the coming interval, without judging it.

        Reads the telemetry and adds it to the power history, as `act` does: call it once per
        interval, on a shield that does not also `act` (a forecaster of its own), or the history
        would count an interval twice. Counts no step and no override.
        """
        view = self.ctx.view
        tel = self.telemetry()
        dyn_w = self._saas_dyn_w(tel)
        safe_idx, feasible = self._safe_row_freq_idx(tel, dyn_w, with_feasible=True)
        safe_f = self.freqs[safe_idx]
        f_row = self._row_clocks(action)
        # Placements are judged at the ceilings an action that heeds the forecast would set.
        if action.row_freq_cap_mhz is not None:
            action = replace(action, row_freq_cap_mhz=np.minimum(
                np.asarray(action.row_freq_cap_mhz, dtype=float), safe_f))
        placements = self._placements(action, view.pending_vms_expected_gpu_w(observation))
        first = self._first_unsafe_placement(tel, dyn_w, self._row_clocks(action), placements)
        safe_servers = (self._safe_placements(action, observation, action_mask, tel, dyn_w)
                        if action_mask is not None else None)
        return ShieldForecast(
            safe_row_freq_mhz=safe_f, clock_helps=feasible,
            row_clock_mhz=f_row, placements=len(placements),
            safe_placements=len(placements) if first is None else first,
            safe_vm_servers=safe_servers)

    def _pool_capacity(self, pools: tuple[PoolConfig, ...]) -> np.ndarray:
        """Concurrent sequences x relative clock per pool: a proxy of its serving capacity."""
        inst = np.array([p.n_instances for p in pools])
        batch = np.array([p.max_batch for p in pools])
        freq = np.array([p.freq_mhz for p in pools], dtype=float)
        return inst * batch * freq / self.ctx.layout.max_freq_mhz

    def _shrinks_while_backlogged(self, action: ClusterAction, observation: np.ndarray) -> bool:
        """The cluster holds more than an interval of arrivals in its queues and loses capacity.

        Shrinking a backlogged cluster lets its queues age past the drop deadline; the shield
        keeps the capacity until the backlog drains (pools may still trade capacity).
        """
        if self._last_pools is None:
            return False
        view, lay = self.ctx.view, self.ctx.layout
        backlog = view.pool_backlog(observation).sum()
        backlogged = backlog > max(view.pool_rate_rps(observation).sum() * lay.control_interval_s, 1.0)
        shrinks = self._pool_capacity(action.pools).sum() < self._pool_capacity(
            self._last_pools).sum() * 0.999
        return bool(backlogged and shrinks)

    def _pace_resharding(self, action: ClusterAction, force: bool = False
                         ) -> tuple[ClusterAction, bool]:
        """Hold each pool's TP unless its last change is `min_reshard_intervals` old.

        A TP change restarts every instance of the pool at once (model-load downtime); back to
        back, such restarts let queued requests age past the drop deadline. Spacing them keeps
        the downtime a small fraction of the time, so the backlog drains in between. With
        `force` (the shield's own fallback) the change is recorded but never held back. A held
        pool keeps its servers at the old TP (instances per server follow the TP).
        """
        tp = np.array([p.tp for p in action.pools])
        if self._tp_now is None:
            self._tp_now = np.array([p.tp for p in self.ctx.initial_pools])
        changed = tp != self._tp_now
        recent = (self.steps - self._tp_changed_at) < self.min_reshard_intervals
        if force:
            recent = np.zeros_like(recent)
        blocked = changed & recent
        allowed = changed & ~recent
        self._tp_changed_at = np.where(allowed, self.steps, self._tp_changed_at)
        if not blocked.any():
            self._tp_now = tp
            return action, False
        servers = self.ctx.codec.pool_servers(action.pools)
        gpus = self.ctx.layout.gpus_per_server
        pools = tuple(
            replace(p, tp=int(self._tp_now[i]), n_instances=int(servers[i]) * (gpus // int(self._tp_now[i])))
            if blocked[i] else p for i, p in enumerate(action.pools))
        self._tp_now = np.array([p.tp for p in pools])
        return replace(action, pools=pools), True

    def _row_clocks(self, action: ClusterAction) -> np.ndarray:
        """Effective SaaS clock ceiling per row of an action (pool clocks and row ceilings)."""
        lay = self.ctx.layout
        f = np.full(lay.n_rows, lay.max_freq_mhz)
        if action.pools is not None:
            f[:] = max(p.freq_mhz for p in action.pools)
        if action.row_freq_cap_mhz is not None:
            f = np.minimum(f, action.row_freq_cap_mhz)
        return f

    def _starves_a_pool(self, action: ClusterAction, observation: np.ndarray) -> bool:
        view = self.ctx.view
        inst = sum(p.n_instances for p in action.pools)
        # A pool without instances of its own is served by the others (the router spills its
        # requests over every live instance, DynamoLLM-style consolidation); only a cluster
        # with no instance at all starves.
        demand = (view.pool_rate_rps(observation) > 0) | (view.pool_backlog(observation) > 0)
        return bool(inst == 0 and (demand | (self.ctx.pool_stats.fraction > 0)).any())

    def _safe_fallback(self, action: ClusterAction, fb_action: ClusterAction | None,
                       observation, action_mask, tel, dyn_w) -> ClusterAction:
        ctx = self.ctx
        out = fb_action if fb_action is not None else action
        safe_idx = self._safe_row_freq_idx(tel, dyn_w)
        if ctx.codec.has_pools:
            pools = ctx.initial_pools if self._starves_a_pool(out, observation) else out.pools
            if not ctx.codec.has_rows:
                ceiling = float(self.freqs[safe_idx.min()])
                pools = tuple(replace(p, freq_mhz=min(p.freq_mhz, ceiling)) for p in pools)
            out = replace(out, pools=pools)
        if ctx.codec.has_rows:
            cap = np.minimum(out.row_freq_cap_mhz, self.freqs[safe_idx])
            # Steer new requests away from rows pinned at their lowest clock, but starve none.
            pinned = safe_idx == 0
            weight = np.maximum(out.row_route_weight, ROUTE_WEIGHT_LEVELS[1])
            if pinned.any() and not pinned.all():
                weight[pinned] = ROUTE_WEIGHT_LEVELS[1]
            if not (weight == ROUTE_WEIGHT_LEVELS[-1]).any():
                weight[int(np.argmax(safe_idx))] = ROUTE_WEIGHT_LEVELS[-1]
            out = replace(out, row_freq_cap_mhz=cap, row_route_weight=weight)
            out = replace(out, vm_servers=self._safe_placements(out, observation, action_mask, tel,
                                                                dyn_w))
        return out

    @staticmethod
    def _placements(action: ClusterAction, vm_w: np.ndarray) -> tuple[tuple[int, float], ...]:
        """An action's placements as (server, expected per-GPU power W of that slot's VM), slot order."""
        return tuple((int(s), float(vm_w[i])) for i, s in enumerate(action.vm_servers)
                     if s is not None and i < len(vm_w))

    def _safe_placements(self, action: ClusterAction, observation, action_mask, tel, dyn_w
                         ) -> tuple[int | None, ...]:
        """Per slot, in order: the proposed server if safe, else the first safe legal server, else None.

        Each slot is checked on top of the placements already kept for the slots before it (the
        same cumulative accounting as the placement check); a slot with no safe server keeps its
        VM waiting (a masked choice is not executed).
        """
        ctx, lay, view = self.ctx, self.ctx.layout, self.ctx.view
        f_row = self._row_clocks(action)
        vm_w = view.pending_vms_expected_gpu_w(observation)  # each VM's type's past P95
        limit = np.asarray(tel.row_limit_w, dtype=float) * self.power_margin
        kept: list[tuple[int, float]] = []
        out: list[int | None] = []
        proposals = action.vm_servers or (None,) * ctx.codec.placement_slots
        for slot, (legal, proposed) in enumerate(zip(ctx.slot_legal_servers(action_mask), proposals,
                                                      strict=False)):
            taken = {s for s, _ in kept}
            chosen = None
            for s in ([] if proposed is None else [proposed]) + [int(s) for s in np.flatnonzero(legal)]:
                if not legal[s] or s in taken:
                    continue
                row_w, row_t = self._predict(tel, dyn_w, f_row, (*kept, (s, float(vm_w[slot]))))
                slack = min(float(np.min(limit - row_w) / limit.max()),
                            float(np.min(lay.slowdown_temp_c - self.temp_margin_c - row_t)) / 40.0)
                if slack >= 0:
                    chosen = s
                    break
            out.append(chosen)
            if chosen is not None:
                kept.append((chosen, float(vm_w[slot])))
        return tuple(out)
