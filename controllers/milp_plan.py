"""Offline optimum of the energy task's planning model: a MILP over the horizon (scipy HiGHS).

DynamoLLM sizes its pools with an optimization over instance counts, TP degrees and clocks.
This module solves that optimization for a whole episode at once with full knowledge of the
future arrival rates (the simulator's `BackendDescription.arrival_oracle`, a deliberate cheat),
in two forms:

* **relaxed** (the bound): per period whole servers per pool (or, with
  ``integral_servers=False``, continuous ones: an LP), shared over the period by any mix of
  configurations (TP, clock), capacity for the period's *mean* rate. Its optimum is a lower
  bound of the planning model's energy (below);
* **executable**: one configuration per pool and period (binary choice), servers a split the
  action codec can produce when ``splits`` is given, capacity for the period's *peak* rate. This
  is the plan `PlanController` replays in the simulator; its objective is at least the relaxed
  one's.

The planning model (what both forms optimize) is the steady state `controllers.perfmodel.predict_pool`
predicts, the model the DynamoLLM-style manager decides with. Per pool ``p`` and configuration
``c = (tp, clock)`` at the largest batch cap:

* ``cap[p, c]``: the largest per-instance rate at which the predicted TTFT and TBT stay within
  ``slo_margin`` x the SLOs (`perfmodel.PoolModel.within_slo`, the manager's own test); a server
  holds ``gpus_per_server // tp`` instances;
* a powered server draws ``S(lam)``: its GPUs at the predicted per-GPU power for a per-instance
  rate ``lam``, plus the non-GPU power of `ServerPowerSpec.server_power_w`; ``S(0)`` (idle GPUs
  of loaded instances plus the non-GPU idle power) is ``base_server_w``; a server that is off
  draws ``standby_w``.

``S`` is concave in the load, up to short nearly straight stretches (prefill and decode power
saturate while utilization grows linearly), so the chord from ``(0, S(0))`` to
``(cap, S(cap))`` lies under it; a tangent would not. The linear cost ``n * base + x * slope``
uses the *smallest* secant slope from ``S(0)`` over a 512-point grid of ``(0, cap]`` (on
`dynamo_week` and `small` at most 0.8% below the chord's), so
``n * base + x * slope <= n * S(x / (n * instances))`` on that grid (tests/test_milp_plan.py
checks it on 1,001 points), for an even spread of the load over the instances and, summed per
instance, for any uneven spread. The price is looseness at partial load: at half the cap the
line is a median 12% (at most 26%) under ``S`` on `dynamo_week`. Hence:

* the relaxed optimum (its HiGHS dual bound, reported as `PlanResult.bound_server_energy_j`) is a
  lower bound of the energy that any plan meeting the predicted SLOs at every interval needs
  **in the planning model**, if it holds each pool's whole servers through each period: the
  average of such a plan over a period is a feasible point of the relaxed form with the same
  linear cost, which is why the period's mean rate suffices (mixing configurations within the
  period and packing load are allowed). With the periods the env's reconfiguration windows,
  that is every controller acting through the env. With ``integral_servers=False`` (an LP) it
  bounds every plan whatever its time scale, pools sharing servers included (on a day of
  `dynamo_week` the LP is 0.3% below the whole-server form);
* it is **not** a bound of the simulator's energy: it ignores reconfiguration outages (model
  loads), server wake latency and the idle time before a freed server powers off, queueing
  transients and backlogs, the power-capped prefill clock beyond what `predict_pool` models,
  and every request-level effect. Call it the "planning-model optimum", never the optimum of the
  simulator. The IaaS servers (if any) are outside the plan.

Energies are reported for the SaaS servers (GPUs plus non-GPU power, off servers at standby) and
for their GPUs alone. Both forms decouple per period (no term links two periods), so each period
is its own small HiGHS problem; the sums are the horizon's optimum. Two exceptions, both exact:
the executable form restricted to the action codec's splits is an enumeration of the splits,
and with a charge for TP changes (which couples the periods) each pool's plan is a shortest
path over periods (`solve_plan`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.perfmodel import PoolModel
from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig

if TYPE_CHECKING:
    from llm_cluster_gym.envs.backend import ArrivalOracle

__all__ = ["PeriodRates", "PlanController", "PlanResult", "PlanningTables", "episode_rates",
           "planning_tables", "round_up_split", "solve_plan"]

FORMS = ("relaxed", "executable")
"""The two forms of the MILP (see the module docstring)."""

_GRID = 512
"""Points of the per-instance load grid on which the linear cost is checked to lie under S."""

_STATUS = {0: "optimal", 1: "time or iteration limit", 2: "infeasible", 3: "unbounded", 4: "other"}


# ---------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class PlanningTables:
    """The planning model linearized per pool and configuration (see the module docstring).

    Configurations ``c`` run over every (TP, clock) pair of the layout, TP-major.

    Attributes:
        tp: TP degree per configuration, shape (C,).
        freq_mhz: SM clock per configuration, shape (C,).
        instances_per_server: ``gpus_per_server // tp`` per configuration, shape (C,).
        cap_rps: Largest per-instance rate meeting ``slo_margin`` x the SLOs (0: never), (P, C).
        base_server_w: Power of a powered server whose instances are idle, (C,).
        base_gpu_w: Power of that server's GPUs, (C,).
        server_j_per_req: Linear cost per request served on top of the base (server), (P, C).
        gpu_j_per_req: The same for the GPUs alone, (P, C).
        standby_w: Power of a server that is off.
        n_servers: SaaS servers the plan may power.
        max_batch: Batch cap the tables assume (the largest choice).
        slo_margin: Fraction of the SLOs the predicted latencies must stay within.
    """

    tp: np.ndarray
    freq_mhz: np.ndarray
    instances_per_server: np.ndarray
    cap_rps: np.ndarray
    base_server_w: np.ndarray
    base_gpu_w: np.ndarray
    server_j_per_req: np.ndarray
    gpu_j_per_req: np.ndarray
    standby_w: float
    n_servers: int
    max_batch: int
    slo_margin: float

    @property
    def n_pools(self) -> int:
        """Pools P."""
        return int(self.cap_rps.shape[0])

    @property
    def n_configs(self) -> int:
        """Configurations C (TP x clock)."""
        return int(self.cap_rps.shape[1])

    @property
    def server_cap_rps(self) -> np.ndarray:
        """Largest rate one server serves within the SLOs, per pool and configuration (P, C)."""
        return self.cap_rps * self.instances_per_server[None, :]

    def config_index(self, tp: int, freq_mhz: float) -> int:
        """Index of configuration (tp, freq_mhz)."""
        hit = np.flatnonzero((self.tp == int(tp)) & np.isclose(self.freq_mhz, float(freq_mhz)))
        if not len(hit):
            raise ValueError(f"no planning configuration tp={tp} freq_mhz={freq_mhz}")
        return int(hit[0])


def _slo_ok(ctx: ControllerContext, p: int, tp: int, lam: np.ndarray, freq: np.ndarray,
            batch: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(meets the SLOs?, per-GPU power) of one instance at per-instance rates `lam` (broadcast)."""
    ok, pred = PoolModel(ctx, p, tp, freq).within_slo(lam, 1, batch, margin)
    return ok, pred.gpu_power_w


def _capacity(ctx: ControllerContext, p: int, tp: int, freqs: np.ndarray, batch: int,
              margin: float) -> np.ndarray:
    """Largest per-instance rate with the SLOs met, per clock (bisection; 0 if never met).

    Predicted latency grows with the rate, so the SLOs hold on ``[0, cap]``; the grid check in
    `planning_tables` lowers the cap should they not.
    """
    ok0, _ = _slo_ok(ctx, p, tp, np.zeros_like(freqs), freqs, batch, margin)
    hi = np.ones_like(freqs)
    for _ in range(60):  # double until the SLO breaks (the prefill saturates: it always does)
        ok, _ = _slo_ok(ctx, p, tp, hi, freqs, batch, margin)
        if not ok.any():
            break
        hi = np.where(ok, hi * 2.0, hi)
    lo = np.zeros_like(freqs)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ok, _ = _slo_ok(ctx, p, tp, mid, freqs, batch, margin)
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return np.where(ok0, lo, 0.0)


def planning_tables(ctx: ControllerContext, slo_margin: float = 1.0) -> PlanningTables:
    """Capacity and linear power per pool and (TP, clock), from `predict_pool` (module docstring).

    Args:
        ctx: The controller context (profiles, pool statistics, SLOs, server power constants).
        slo_margin: Predicted TTFT and TBT must stay within this fraction of the SLOs (1.0: the
            SLOs themselves, the most permissive, so the relaxed optimum bounds any stricter
            planner's).
    """
    lay, server = ctx.layout, ctx.server
    gpus = lay.gpus_per_server
    batch = int(max(lay.batch_choices))
    freqs = np.asarray(lay.freq_choices_mhz, dtype=float)
    tps = np.repeat(np.asarray(lay.tp_choices, dtype=np.int64), len(freqs))
    fq = np.tile(freqs, len(lay.tp_choices))
    n_c, n_p = len(tps), lay.n_pools
    ips = gpus // tps
    cap = np.zeros((n_p, n_c))
    base_srv, base_gpu = np.zeros(n_c), np.zeros(n_c)
    srv_j, gpu_j = np.zeros((n_p, n_c)), np.zeros((n_p, n_c))
    frac = np.linspace(1.0 / _GRID, 1.0, _GRID)
    for tp in lay.tp_choices:
        sel = np.flatnonzero(tps == tp)
        idle = ctx.profiles[tp].idle_power_w
        base_gpu[sel] = gpus * idle
        base_srv[sel] = float(server.server_power_w(gpus * idle, idle))
        for p in range(n_p):
            c_tp = _capacity(ctx, p, int(tp), freqs, batch, slo_margin)
            lam = c_tp[:, None] * frac[None, :]  # (clocks, grid)
            ok, gpu_w = _slo_ok(ctx, p, int(tp), lam, freqs[:, None], batch, slo_margin)
            for k in range(len(freqs)):  # the grid must lie inside the SLO region
                bad = np.flatnonzero(~ok[k])
                if c_tp[k] > 0 and len(bad):
                    c_tp[k] = lam[k, bad[0] - 1] if bad[0] > 0 else 0.0
            lam = c_tp[:, None] * frac[None, :]
            _, gpu_w = _slo_ok(ctx, p, int(tp), lam, freqs[:, None], batch, slo_margin)
            srv_w = server.server_power_w(gpus * gpu_w, idle)
            rate = np.maximum(lam * ips[sel][:, None], 1e-300)  # server rate
            srv_slope = (srv_w - base_srv[sel][:, None]) / rate
            k_min = np.argmin(srv_slope, axis=1)  # smallest secant: the line under S on the grid
            rows = np.arange(len(freqs))
            cap[p, sel] = c_tp
            srv_j[p, sel] = np.where(c_tp > 0, np.maximum(srv_slope[rows, k_min], 0.0), 0.0)
            gpu_slope = (gpus * gpu_w - base_gpu[sel][:, None]) / rate
            gpu_j[p, sel] = np.where(c_tp > 0, np.maximum(gpu_slope[rows, k_min], 0.0), 0.0)
    for arr in (cap, base_srv, base_gpu, srv_j, gpu_j):
        arr.flags.writeable = False
    return PlanningTables(tp=tps, freq_mhz=fq, instances_per_server=ips, cap_rps=cap,
                          base_server_w=base_srv, base_gpu_w=base_gpu, server_j_per_req=srv_j,
                          gpu_j_per_req=gpu_j, standby_w=float(server.standby_w),
                          n_servers=int(ctx.codec.n_saas_servers), max_batch=batch,
                          slo_margin=float(slo_margin))


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PeriodRates:
    """True arrival rates of a horizon, per planning period and pool.

    Attributes:
        mean_rps: Mean rate over each period (P columns): what the relaxed form (the bound)
            takes; it underestimates the capacity a period needs, so the bound stays a bound.
        peak_rps: Largest control-interval rate within each period: what the executable form
            takes (the plan must serve the period's peak).
        duration_s: Length of each period (the last may be shorter than the others), (T,).
        interval_rps: The per-interval rates they come from, (intervals, P).
        period_intervals: Control intervals per period.
        interval_s: Control interval (s).
        t0_s: Start of the horizon (episode time, s).
    """

    mean_rps: np.ndarray
    peak_rps: np.ndarray
    duration_s: np.ndarray
    interval_rps: np.ndarray
    period_intervals: int
    interval_s: float
    t0_s: float

    @property
    def n_periods(self) -> int:
        """Periods T."""
        return int(self.mean_rps.shape[0])

    def period_of(self, t_s: float) -> int:
        """Index of the period containing episode time `t_s` (clipped to the horizon)."""
        k = math.floor((t_s - self.t0_s) / (self.period_intervals * self.interval_s) + 1e-9)
        return min(max(k, 0), self.n_periods - 1)


def episode_rates(arrivals: ArrivalOracle, t0_s: float, n_intervals: int, interval_s: float,
                  period_intervals: int) -> PeriodRates:
    """Per-period mean and peak arrival rates from the simulator's arrival oracle (a cheat).

    Args:
        arrivals: `BackendDescription.arrival_oracle` (``(t0_s, horizon, interval_s) -> rates``).
        t0_s: Start of the horizon (episode time, s).
        n_intervals: Control intervals in the horizon.
        interval_s: Control interval (s).
        period_intervals: Control intervals per planning period (a period is a whole number of
            intervals; the last period may hold fewer).

    Raises:
        ValueError: A non-positive interval count or period.
    """
    if n_intervals <= 0 or period_intervals <= 0:
        raise ValueError(f"episode_rates: n_intervals ({n_intervals}) and period_intervals "
                         f"({period_intervals}) must be positive")
    r = np.asarray(arrivals(float(t0_s), int(n_intervals), float(interval_s)), dtype=float)
    n_t = -(-n_intervals // period_intervals)
    pad = np.full((n_t * period_intervals, r.shape[1]), np.nan)
    pad[:n_intervals] = r
    blocks = pad.reshape(n_t, period_intervals, r.shape[1])
    counts = np.sum(~np.isnan(blocks[:, :, 0]), axis=1)
    return PeriodRates(mean_rps=np.nanmean(blocks, axis=1), peak_rps=np.nanmax(blocks, axis=1),
                       duration_s=counts * float(interval_s), interval_rps=r,
                       period_intervals=int(period_intervals), interval_s=float(interval_s),
                       t0_s=float(t0_s))


# ---------------------------------------------------------------------------- the MILP
@dataclass(frozen=True)
class PlanResult:
    """One form of the MILP solved over a horizon (energies of the planning model, SaaS servers).

    Attributes:
        form: "relaxed" (the planning-model lower bound) or "executable" (one config per pool).
        what: What the numbers are, in words (for tables and logs).
        servers: Servers per period, pool and configuration, (T, P, C): whole numbers in the
            executable form; in the relaxed form a pool's whole servers may be shared among
            configurations over the period (fractions of its server-time).
        pool_servers: Servers per period and pool, (T, P) int (rounded up in the LP).
        rate_rps: Rate served per period, pool and configuration, (T, P, C).
        rates_rps: The rates planned for, per period and pool (mean or peak), (T, P).
        duration_s: Length of each period (s), (T,).
        server_energy_j: The optimum found: servers' energy (GPUs, non-GPU power, off servers
            at standby) under the linear cost.
        gpu_energy_j: The GPUs' share of it.
        period_server_energy_j: `server_energy_j` per period, (T,).
        bound_server_energy_j: HiGHS's dual bound of the server energy (equal to
            `server_energy_j` at a zero gap): what the relaxed form bounds with.
        mip_gap: Relative gap between `server_energy_j` and `bound_server_energy_j`.
        status: "optimal" when every period was solved to optimality, else the worst status.
        solve_time_s: Wall time of the solves (s).
        tables: The planning tables it was solved with.
        tp_changes: Changes of a pool's TP degree from one period to the next (re-shards).
    """

    form: str
    what: str
    servers: np.ndarray
    pool_servers: np.ndarray
    rate_rps: np.ndarray
    rates_rps: np.ndarray
    duration_s: np.ndarray
    server_energy_j: float
    gpu_energy_j: float
    period_server_energy_j: np.ndarray
    bound_server_energy_j: float
    mip_gap: float
    status: str
    solve_time_s: float
    tables: PlanningTables = field(repr=False)
    tp_changes: int = 0

    def pool_choice(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(configuration index per pool, -1 where none; servers per pool) of period `t`.

        For the relaxed form, the configuration holding the most servers of each pool.
        """
        servers = self.pool_servers[t].copy()
        cfg = np.where(servers > 0, np.argmax(self.servers[t], axis=1), -1)
        return cfg, servers

    def summary(self) -> dict[str, Any]:
        """Headline numbers (kWh) with what they are."""
        return {"form": self.form, "what": self.what, "status": self.status,
                "server_energy_kwh": self.server_energy_j / 3.6e6,
                "gpu_energy_kwh": self.gpu_energy_j / 3.6e6,
                "bound_server_energy_kwh": self.bound_server_energy_j / 3.6e6,
                "mip_gap": self.mip_gap, "solve_time_s": self.solve_time_s,
                "periods": int(self.servers.shape[0]), "tp_changes": self.tp_changes,
                "max_servers": int(self.pool_servers.sum(axis=1).max(initial=0))}


def _what(form: str, integral: bool) -> str:
    if form == "relaxed":
        kind = "integer" if integral else "continuous"
        scope = ("plans holding servers per period" if integral
                 else "plans changing servers and clocks at any interval")
        return (f"planning-model lower bound (relaxed MILP, {kind} servers, mean rates): bounds the "
                f"predict_pool model's energy of {scope}; not a bound of the simulator "
                "(no reconfiguration outages, wake latency or queueing transients)")
    return ("planning-model optimum of executable plans (one config per pool and period, peak "
            "rates): the plan PlanController replays")


class _Model:
    """Sparse matrices of one period's problem (the same every period; only bounds change).

    Variable blocks: ``n[p, c]`` servers per configuration, ``x[p, c]`` rate per configuration,
    ``m[p]`` servers per pool (``= sum_c n[p, c]``), then for the executable form ``y[p, c]``
    (the pool's one configuration). Relaxed form: only ``m`` is integer (a pool's servers are
    whole; the configurations they run may change within the period, so their shares are
    continuous); with ``integral`` False nothing is (an LP). Executable form: ``n`` and ``y``
    are integer (so ``m`` is).
    """

    def __init__(self, tb: PlanningTables, form: str, integral: bool) -> None:
        from scipy.sparse import coo_matrix

        n_p, n_c = tb.n_pools, tb.n_configs
        pc = n_p * n_c
        self.pc, self.n_p = pc, n_p
        exe = form == "executable"
        i_n, i_x, i_m, i_y = 0, pc, 2 * pc, 2 * pc + n_p
        self.i_m = i_m
        self.n_var = 2 * pc + n_p + (pc if exe else 0)
        scap = tb.server_cap_rps.ravel()
        usable = _undominated(tb).ravel()
        nmax = float(tb.n_servers)
        rows, cols, vals, lo, hi = [], [], [], [], []
        r = 0

        def add(cs: list[int], vs: list[float], low: float, high: float) -> None:
            nonlocal r
            rows.extend([r] * len(cs))
            cols.extend(cs)
            vals.extend(vs)
            lo.append(low)
            hi.append(high)
            r += 1

        self.rate_rows = []
        for p in range(n_p):  # sum_c x[p, c] = rate[p]
            self.rate_rows.append(r)
            add([i_x + p * n_c + c for c in range(n_c)], [1.0] * n_c, 0.0, 0.0)
        for k in range(pc):  # x <= cap * instances * n
            if usable[k]:
                add([i_x + k, i_n + k], [1.0, -scap[k]], -np.inf, 0.0)
        for p in range(n_p):  # m[p] = sum_c n[p, c]
            add([i_n + p * n_c + c for c in range(n_c)] + [i_m + p], [1.0] * n_c + [-1.0], 0.0, 0.0)
        add(list(range(i_m, i_m + n_p)), [1.0] * n_p, -np.inf, nmax)  # within the cluster
        if exe:
            for k in range(pc):  # n <= N y
                add([i_n + k, i_y + k], [1.0, -nmax], -np.inf, 0.0)
            for p in range(n_p):  # one configuration per pool
                add([i_y + p * n_c + c for c in range(n_c)], [1.0] * n_c, -np.inf, 1.0)
        self.A = coo_matrix((vals, (rows, cols)), shape=(r, self.n_var)).tocsr()
        self.lo, self.hi = np.array(lo), np.array(hi)
        ub = np.full(self.n_var, np.inf)
        ub[i_n:i_n + pc] = np.where(usable, nmax, 0.0)
        ub[i_x:i_x + pc] = np.where(usable, np.inf, 0.0)
        ub[i_m:i_m + n_p] = nmax
        if exe:
            ub[i_y:i_y + pc] = np.where(usable, 1.0, 0.0)
        self.ub = ub
        self.integrality = np.zeros(self.n_var)
        if integral and not exe:  # executable: whole n already make m whole
            self.integrality[i_m:i_m + n_p] = 1
        if exe:
            self.integrality[i_n:i_n + pc] = 1
            self.integrality[i_y:] = 1
        # cost per second: servers at base minus standby (standby is a constant), requests
        self.cost = np.zeros(self.n_var)
        self.cost[i_n:i_n + pc] = np.repeat(tb.base_server_w[None, :] - tb.standby_w, n_p, 0).ravel()
        self.cost[i_x:i_x + pc] = tb.server_j_per_req.ravel()
        self.gpu_cost = np.zeros(self.n_var)
        self.gpu_cost[i_n:i_n + pc] = np.repeat(tb.base_gpu_w[None, :], n_p, 0).ravel()
        self.gpu_cost[i_x:i_x + pc] = tb.gpu_j_per_req.ravel()


def _undominated(tb: PlanningTables) -> np.ndarray:
    """Per pool and configuration: usable and not dominated, (P, C) bool.

    A configuration is dominated when another one serves at least as much per server at no
    more base power and no more energy per request (strictly better in one, or equal and
    earlier): every plan using it costs at least as much moved onto the other, so leaving it
    out changes neither form's optimum.
    """
    cap = tb.server_cap_rps
    keep = cap > 0
    base = tb.base_server_w
    for p in range(tb.n_pools):
        j = tb.server_j_per_req[p]
        for c in np.flatnonzero(keep[p]):
            ge = (cap[p] >= cap[p, c]) & (base <= base[c]) & (j <= j[c]) & (cap[p] > 0)
            strict = (cap[p] > cap[p, c]) | (base < base[c]) | (j < j[c])
            ge[c] = False
            if (ge & (strict | (np.arange(len(j)) < c))).any():
                keep[p, c] = False
    return keep


def _check_servable(tb: PlanningTables, rates: np.ndarray, splits: np.ndarray | None) -> None:
    """Raise a ValueError naming the first period and pool no configuration can serve."""
    most = float(tb.n_servers) if splits is None else np.asarray(splits).max(axis=0).astype(float)
    limit = (tb.server_cap_rps.max(axis=1) * most)  # per pool, every server at the best config
    over = rates > limit[None, :] * (1.0 + 1e-9)
    if over.any():
        t, p = (int(v) for v in np.argwhere(over)[0])
        raise ValueError(
            f"period {t}, pool {p}: rate {rates[t, p]:.4g} req/s exceeds what the cluster serves "
            f"within {tb.slo_margin:g} x the SLOs ({limit[p]:.4g} req/s with all "
            f"{tb.n_servers} servers at the pool's best configuration)")


def solve_plan(tables: PlanningTables, rates_rps: np.ndarray, duration_s: np.ndarray | float,
               form: str = "relaxed", splits: np.ndarray | None = None,
               integral_servers: bool = True, mip_rel_gap: float = 1e-4,
               time_limit_s: float | None = None,
               reshard_j_per_server: np.ndarray | None = None) -> PlanResult:
    """Solve one form of the MILP over a horizon (one HiGHS problem per period).

    Per period ``t``: servers ``n[p, c] >= 0`` and rates ``x[p, c] >= 0`` per pool and
    configuration with ``sum_c x[p, c] = rate[t, p]``, ``x <= cap * instances_per_server * n``,
    whole servers per pool ``m[p] = sum_c n[p, c]`` and ``sum_p m[p] <= n_servers``; minimize
    ``duration * (sum n (base - standby) + sum x j_per_req) + duration * n_servers * standby``.
    In the relaxed form only ``m`` is integer: a pool's servers are whole and held through the
    period while the configurations they run may change within it, so ``n`` is their
    time-share; averaging any such plan over the period gives a feasible point of the same
    cost, which is why the mean rates suffice and the optimum is a bound (module docstring).
    The executable form makes ``n`` integer and adds binaries ``y[p, c]`` with ``n <= N y`` and
    ``sum_c y <= 1`` (one configuration per pool).

    Given ``splits`` (executable form), the pools' servers must be one row of it. For a given
    server count a pool's best single configuration is the cheapest one that serves its rate,
    so the problem becomes picking the cheapest row of a table: that is done by enumeration
    (exact, and far faster than HiGHS on the split-choice binaries).

    Given ``reshard_j_per_server`` (executable form), a pool that changes its TP degree from one
    period to the next pays that many joules per server of its new configuration (a model
    load: the energy of servers that draw power and serve nothing). That couples the periods;
    each pool's plan is then a shortest path over (period, configuration) (dynamic
    programming, exact for the pool), on its fewest servers (rounded up to an executable
    split with ``splits``). Where the pools' servers then exceed the cluster (or no split
    covers them), that period falls back to its own optimum without the penalty. The
    penalty is not part of the reported energies.

    Args:
        tables: `planning_tables` of the env.
        rates_rps: Rates per period and pool, (T, P): `PeriodRates.mean_rps` for the bound,
            `PeriodRates.peak_rps` for the executable plan.
        duration_s: Length of each period (s), scalar or (T,).
        form: "relaxed" or "executable".
        splits: Server splits allowed (executable form; e.g. `ActionCodec.server_splits()`),
            (J, P); None: any whole counts within the cluster.
        integral_servers: Relaxed form only: whole servers per pool (a bound of plans that
            hold each pool's servers through each period, as the env does between its
            reconfiguration steps when the period is that window) or continuous ones (an LP: a
            bound of plans at any time granularity, pools sharing servers included).
        mip_rel_gap: HiGHS's relative MIP gap tolerance (the bound is HiGHS's dual bound, valid
            at any gap).
        time_limit_s: HiGHS's time limit per period (None: none).
        reshard_j_per_server: Executable form: joules per server charged when a pool changes
            its TP degree into configuration ``c``, shape (C,); None: TP changes are free and
            every period is solved on its own.

    Returns:
        The `PlanResult` (energies in J, servers per period, pool and configuration).

    Raises:
        ValueError: Unknown form; rates of the wrong shape or negative; a period whose rate no
            plan can serve within the SLOs (the message names the period and pool); a solver
            failure (naming the period and HiGHS's message).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    rates = np.asarray(rates_rps, dtype=float)
    if rates.ndim != 2 or rates.shape[1] != tables.n_pools:
        raise ValueError(f"rates_rps must have shape (periods, {tables.n_pools}), got {rates.shape}")
    if not np.all(np.isfinite(rates)) or (rates < 0).any():
        raise ValueError("rates_rps must be finite and non-negative")
    n_t = rates.shape[0]
    dur = np.broadcast_to(np.asarray(duration_s, dtype=float), (n_t,)).copy()
    exe = form == "executable"
    integral = integral_servers or exe
    sp = None if (splits is None or not exe) else np.asarray(splits, dtype=np.int64)
    _check_servable(tables, rates, sp)
    if exe and reshard_j_per_server is not None:
        return _with_reshards(tables, rates, dur, sp, np.asarray(reshard_j_per_server, dtype=float))
    if sp is not None:
        return _by_splits(tables, rates, dur, sp)
    model = _Model(tables, form, integral)
    n_p, n_c = tables.n_pools, tables.n_configs
    pc = model.pc
    servers = np.zeros((n_t, n_p, n_c))
    pool_servers = np.zeros((n_t, n_p), dtype=np.int64)
    x_out = np.zeros((n_t, n_p, n_c))
    watts, gpu_watts, bound_w = np.zeros(n_t), np.zeros(n_t), np.zeros(n_t)
    worst = 0
    options: dict[str, Any] = {"disp": False, "mip_rel_gap": float(mip_rel_gap)}
    if time_limit_s is not None:
        options["time_limit"] = float(time_limit_s)
    bounds = Bounds(np.zeros(model.n_var), model.ub)
    start = time.perf_counter()
    for t in range(n_t):
        if not rates[t].any():
            continue  # nothing to serve: every server off
        lo, hi = model.lo.copy(), model.hi.copy()
        lo[model.rate_rows] = rates[t]
        hi[model.rate_rows] = rates[t]
        res = milp(model.cost, integrality=model.integrality, bounds=bounds,
                   constraints=LinearConstraint(model.A, lo, hi), options=options)
        if res.x is None:
            raise ValueError(
                f"period {t}: HiGHS found no {form} plan ({_STATUS.get(res.status, res.status)}: "
                f"{res.message}); rates per pool {np.round(rates[t], 4).tolist()} req/s need more "
                f"than the {tables.n_servers} servers within {tables.slo_margin:g} x the SLOs")
        worst = max(worst, int(res.status))
        v = res.x
        n = np.maximum(v[:pc].reshape(n_p, n_c), 0.0)
        servers[t] = np.rint(n) if exe else n
        m = v[model.i_m:model.i_m + n_p]
        # continuous servers (the LP bound): the whole servers a plan would power, rounded up
        pool_servers[t] = np.rint(m) if integral else np.ceil(m - 1e-6)
        x_out[t] = v[pc:2 * pc].reshape(n_p, n_c)
        watts[t] = float(model.cost @ v)
        gpu_watts[t] = float(model.gpu_cost @ v)
        dual = getattr(res, "mip_dual_bound", None)
        bound_w[t] = watts[t] if dual is None or not np.isfinite(dual) else min(float(dual), watts[t])
    elapsed = time.perf_counter() - start
    return _result(tables, form, _what(form, integral), servers, pool_servers, x_out, rates, dur,
                   watts, gpu_watts, bound_w, _STATUS.get(worst, str(worst)), elapsed)


def _result(tb: PlanningTables, form: str, what: str, servers: np.ndarray,
            pool_servers: np.ndarray, x: np.ndarray, rates: np.ndarray, dur: np.ndarray,
            watts: np.ndarray, gpu_watts: np.ndarray, bound_w: np.ndarray, status: str,
            elapsed: float) -> PlanResult:
    """A `PlanResult` from per-period power (W, standby excluded) and durations."""
    standby_j = dur * tb.n_servers * tb.standby_w
    per_period = dur * watts + standby_j
    total = float(per_period.sum())
    bound = float((dur * bound_w + standby_j).sum())
    gap = 0.0 if total <= 0 else max(0.0, (total - bound) / total)
    return PlanResult(
        form=form, what=what, servers=servers, pool_servers=pool_servers, rate_rps=x,
        rates_rps=rates, duration_s=dur, server_energy_j=total,
        gpu_energy_j=float((dur * gpu_watts).sum()), period_server_energy_j=per_period,
        bound_server_energy_j=bound, mip_gap=gap, status=status, solve_time_s=elapsed, tables=tb,
        tp_changes=_tp_changes(tb, servers) if form == "executable" else 0)


def _tp_changes(tb: PlanningTables, servers: np.ndarray) -> int:
    """Changes of a pool's TP degree between consecutive periods (pools without servers skip)."""
    changes = 0
    for p in range(servers.shape[1]):
        used = servers[:, p, :].sum(axis=1) > 0
        tp = tb.tp[np.argmax(servers[:, p, :], axis=1)][used]
        changes += int(np.count_nonzero(np.diff(tp)))
    return changes


def _with_reshards(tb: PlanningTables, rates: np.ndarray, dur: np.ndarray,
                   splits: np.ndarray | None, reshard_j: np.ndarray) -> PlanResult:
    """The executable form with a charge for TP changes (see `solve_plan`): a path per pool."""
    start = time.perf_counter()
    n_t, n_p = rates.shape
    n_c = tb.n_configs
    if reshard_j.shape != (n_c,):
        raise ValueError(f"reshard_j_per_server must have shape ({n_c},), got {reshard_j.shape}")
    usable = _undominated(tb)
    scap = tb.server_cap_rps
    base = tb.base_server_w - tb.standby_w
    counts_by_pool = [np.unique(splits[:, p]) if splits is not None
                      else np.arange(tb.n_servers + 1) for p in range(n_p)]
    chosen_c = np.zeros((n_t, n_p), dtype=np.int64)
    chosen_k = np.zeros((n_t, n_p), dtype=np.int64)
    same_tp = tb.tp[:, None] == tb.tp[None, :]  # (from, to)
    for p in range(n_p):
        allowed = counts_by_pool[p]
        need = np.where(scap[p] > 0, rates[:, p, None] / np.maximum(scap[p], 1e-300), np.inf)
        idx = np.searchsorted(allowed, need - 1e-9, side="left")  # fewest allowed servers
        ok = usable[p][None, :] & (idx < len(allowed))
        k = np.where(ok, allowed[np.minimum(idx, len(allowed) - 1)], 0)
        k = np.where(rates[:, p, None] > 0, k, 0)
        ok = ok | (rates[:, p, None] == 0)
        cost = np.where(ok, dur[:, None] * (k * base[None, :] + rates[:, p, None]
                                            * tb.server_j_per_req[p][None, :]), np.inf)
        value = cost[0].copy()
        back = np.zeros((n_t, n_c), dtype=np.int64)
        for t in range(1, n_t):
            switch = np.where(same_tp, 0.0, (reshard_j * k[t])[None, :])  # (from, to)
            total = value[:, None] + switch
            back[t] = np.argmin(total, axis=0)
            value = total[back[t], np.arange(n_c)] + cost[t]
        c = int(np.argmin(value))
        for t in range(n_t - 1, -1, -1):
            chosen_c[t, p], chosen_k[t, p] = c, k[t, c]
            c = int(back[t, c])
    servers = np.zeros((n_t, n_p, n_c))
    x = np.zeros_like(servers)
    fallback = []
    for t in range(n_t):
        ks = chosen_k[t]
        if splits is not None:
            up = round_up_split(ks, splits)
            ks = up if up is not None else None
        elif ks.sum() > tb.n_servers:
            ks = None
        if ks is None:  # the pools' paths do not fit together: this period's own optimum
            fallback.append(t)
            own = solve_plan(tb, rates[t:t + 1], dur[t:t + 1], "executable", splits=splits)
            servers[t], x[t] = own.servers[0], own.rate_rps[0]
            continue
        for p in range(n_p):
            if ks[p] > 0:
                servers[t, p, chosen_c[t, p]] = ks[p]
                x[t, p, chosen_c[t, p]] = rates[t, p]
    pool_servers = np.rint(servers.sum(axis=2)).astype(np.int64)
    watts = (servers * base[None, None, :]).sum(axis=(1, 2)) + (x * tb.server_j_per_req).sum(axis=(1, 2))
    gpu_watts = ((servers * tb.base_gpu_w[None, None, :]).sum(axis=(1, 2))
                 + (x * tb.gpu_j_per_req).sum(axis=(1, 2)))
    what = (_what("executable", True) + "; TP changes charged a model load per server (a path per "
            f"pool){'; servers an executable split' if splits is not None else ''}"
            f"{f'; {len(fallback)} periods on their own optimum' if fallback else ''}")
    return _result(tb, "executable", what, servers, pool_servers, x, rates, dur, watts, gpu_watts,
                   watts.copy(), "optimal" if not fallback else "optimal per pool; fallbacks",
                   time.perf_counter() - start)


def _by_splits(tb: PlanningTables, rates: np.ndarray, dur: np.ndarray,
               splits: np.ndarray) -> PlanResult:
    """The executable form restricted to `splits`, by enumeration (see `solve_plan`).

    Per period, pool and server count ``k`` of the splits, the cheapest configuration serving
    the pool's rate on ``k`` servers; per period, the split of least total cost (the first in
    the splits' order on a tie).
    """
    start = time.perf_counter()
    n_t, n_p = rates.shape
    usable = _undominated(tb)  # (P, C)
    scap = tb.server_cap_rps
    base = tb.base_server_w - tb.standby_w
    counts = np.unique(splits)  # (K,)
    k = counts[None, None, :, None].astype(float)
    r = rates[:, :, None, None]
    ok = usable[None, :, None, :] & (scap[None, :, None, :] * k >= r)  # (T, P, K, C)
    cost = np.where(ok, k * base[None, None, None, :] + r * tb.server_j_per_req[None, :, None, :],
                    np.inf)
    cost = np.where((k == 0) & (r == 0), 0.0, cost)
    best_c = np.argmin(cost, axis=3)  # (T, P, K)
    best = np.take_along_axis(cost, best_c[..., None], axis=3)[..., 0]
    col = np.searchsorted(counts, splits)  # (J, P)
    per_split = np.zeros((n_t, len(splits)))
    for p in range(n_p):
        per_split += best[:, p, col[:, p]]
    j = np.argmin(per_split, axis=1)  # first minimum: the codec's canonical order
    bad = ~np.isfinite(per_split[np.arange(n_t), j])
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"period {t}: no executable split serves the rates per pool "
            f"{np.round(rates[t], 4).tolist()} req/s within {tb.slo_margin:g} x the SLOs "
            f"(largest servers per pool {splits.max(axis=0).tolist()})")
    chosen = splits[j]  # (T, P)
    servers = np.zeros((n_t, n_p, tb.n_configs))
    x = np.zeros_like(servers)
    watts, gpu_watts = np.zeros(n_t), np.zeros(n_t)
    for t in range(n_t):
        for p in range(n_p):
            kk = int(chosen[t, p])
            if kk == 0:
                continue
            c = int(best_c[t, p, col[j[t], p]])
            servers[t, p, c], x[t, p, c] = kk, rates[t, p]
            watts[t] += kk * base[c] + rates[t, p] * tb.server_j_per_req[p, c]
            gpu_watts[t] += kk * tb.base_gpu_w[c] + rates[t, p] * tb.gpu_j_per_req[p, c]
    what = _what("executable", True) + "; servers per pool an executable split (enumerated)"
    return _result(tb, "executable", what, servers, chosen.astype(np.int64), x, rates, dur, watts,
                   gpu_watts, watts.copy(), "optimal", time.perf_counter() - start)


# ---------------------------------------------------------------------------- execution
def round_up_split(servers: np.ndarray, splits: np.ndarray) -> np.ndarray | None:
    """The executable split with the fewest servers that gives every pool at least `servers`.

    Ties go to the first in `splits`' order (the codec's canonical order). None when no split
    covers `servers`.
    """
    sp = np.asarray(splits, dtype=np.int64)
    want = np.asarray(servers, dtype=np.int64)
    cover = np.flatnonzero((sp >= want[None, :]).all(axis=1))
    if not len(cover):
        return None
    return sp[cover[np.argmin(sp[cover].sum(axis=1))]].copy()


class PlanController(RuleBasedController):
    """Replays the executable MILP plan in the simulator (hindsight: it reads the future).

    Like `controllers.oracle.OracleController` it CHEATS on purpose: at the first decision of
    an episode it reads the whole episode's true arrival rates from the backend's
    `arrival_oracle` and solves the executable MILP (one configuration per pool and period,
    servers an executable split of the action codec, capacity for each period's peak rate).
    It then replays the plan:

    * layouts (servers and TP per pool) change only at the env's reconfiguration steps (every
      `reconfig_every` intervals; the env ignores instance and TP changes in between). At such
      a step the layout is the plan of the current period, merged with the plans of the periods
      that begin within ``lead_s`` (per pool the larger server count, on the next plan's TP when
      it serves the current period's peak, else the current TP; rounded up to an executable
      split, the current plan alone when none covers the merge): servers being woken and
      models being loaded are then ready when their period begins;
    * every interval, each pool runs at the lowest clock at which its servers serve the
      current period's planned peak rate within the SLOs (the planning tables), the largest
      batch cap.

    Args:
        ctx: Static description of the env.
        env: The `ClusterEnv` it acts on (its backend must offer `arrival_oracle`).
        period_s: Planning period (s): a whole number of control intervals, rounded to one.
        slo_margin: Fraction of the SLOs the plan's capacities are computed at.
        lead_s: How far ahead of a period its layout is put in place (s). Default: the wake
            latency plus the longest model load, rounded up to whole reconfiguration windows.
        use_splits: Plan within the codec's executable server splits (True) or plan any server
            counts and round them up to a split (False).
        compute_bound: Also solve the relaxed form over the same horizon (`bound`), as the LP
            (continuous servers): the planning-model bound of every controller, whatever its
            time scale (about 0.6 s for a day; whole servers per pool over the env's
            reconfiguration windows is about 0.3% tighter and takes about 20 s: `solve_plan`).
        reshard_penalty: TP changes are charged this many times the energy their servers draw
            while the model loads (``base_server_w x load_time_s`` per server; see `solve_plan`),
            so that the plan does not re-shard for a small saving (each re-shard is an outage
            the planning model does not see); 0: free.

    Attributes:
        plan: The executable `PlanResult` of the current episode (None before its first act).
        bound: The relaxed `PlanResult` over the same horizon (when `compute_bound`; None when
            some period's mean rate exceeds what the cluster serves within the SLOs).
        rates: The episode's `PeriodRates`.
        clipped: Periods whose peak no plan serves within the SLOs; they are planned at the
            largest servable fraction of it.
    """

    name = "milp"

    def __init__(self, ctx: ControllerContext, env: Any, period_s: float = 300.0,
                 slo_margin: float = 1.0, lead_s: float | None = None, use_splits: bool = True,
                 compute_bound: bool = False, reshard_penalty: float = 1.0) -> None:
        if not ctx.codec.has_pools:
            raise ValueError(f"PlanController needs a task with pool actions, got {ctx.task!r}")
        super().__init__(ctx)
        self.env = env.unwrapped
        desc = self.env.backend.describe()
        if desc.arrival_oracle is None:
            raise ValueError("PlanController needs a backend that knows its future arrivals "
                             "(the simulator's arrival_oracle); this one has none")
        self._arrivals = desc.arrival_oracle
        self._episode_intervals = desc.episode_intervals
        lay = ctx.layout
        dt = lay.control_interval_s
        self.period_intervals = max(1, int(round(period_s / dt)))
        window = ctx.reconfig_every * dt
        if lead_s is None:
            load = max(float(prof.load_time_s) for prof in ctx.profiles.values())
            lead_s = math.ceil((ctx.server.wake_latency_s + load) / window - 1e-9) * window
        self.lead_s = float(lead_s)
        self.use_splits = use_splits
        self.compute_bound = compute_bound
        self.tables = planning_tables(ctx, slo_margin)
        self.splits = np.asarray(ctx.codec.server_splits(), dtype=np.int64)
        load_s = np.array([float(ctx.profiles[int(tp)].load_time_s) for tp in self.tables.tp])
        self.reshard_j = (None if reshard_penalty <= 0
                          else reshard_penalty * self.tables.base_server_w * load_s)
        self.reset()

    def reset(self) -> None:
        """Forget the episode's plan (the next act plans again)."""
        self.plan: PlanResult | None = None
        self.bound: PlanResult | None = None
        self.rates: PeriodRates | None = None
        self.clipped: list[int] = []
        self.step = 0
        self._layout: tuple[np.ndarray, np.ndarray] | None = None  # (servers, config per pool)

    def _make_plan(self) -> None:
        """Solve the executable plan (and the bound) for the rest of the episode."""
        dt = self.ctx.layout.control_interval_s
        t0 = float(self.env.last_telemetry.time_s)
        total = self._episode_intervals
        if total is None:
            raise ValueError("PlanController needs the episode length (episode_intervals)")
        self.rates = episode_rates(self._arrivals, t0, max(1, int(total) - self.step), dt,
                                   self.period_intervals)
        rates = self.rates
        splits = self.splits if self.use_splits else None
        try:
            self.plan = solve_plan(self.tables, rates.peak_rps, rates.duration_s,
                                   form="executable", splits=splits,
                                   reshard_j_per_server=self.reshard_j)
        except ValueError:  # some period's peak is beyond the cluster: plan what it serves
            peak = self._servable(rates.peak_rps, rates.duration_s, splits)
            self.plan = solve_plan(self.tables, peak, rates.duration_s, form="executable",
                                   splits=splits, reshard_j_per_server=self.reshard_j)
        if self.compute_bound:
            try:
                self.bound = solve_plan(self.tables, rates.mean_rps, rates.duration_s,
                                        form="relaxed", integral_servers=False)
            except ValueError:  # no plan meets the SLOs in some period: no bound to give
                self.bound = None

    def _servable(self, peak: np.ndarray, duration_s: np.ndarray,
                  splits: np.ndarray | None) -> np.ndarray:
        """`peak` with each period no plan can serve scaled down until one can (`clipped`).

        An overloaded period is then planned at what the cluster serves within the SLOs
        (found by bisection on the scale), instead of stopping the episode.
        """
        out = peak.copy()
        self.clipped = []

        def fits(r: np.ndarray, t: int) -> bool:
            try:
                solve_plan(self.tables, r[None, :], duration_s[t:t + 1], "executable", splits=splits)
            except ValueError:
                return False
            return True

        for t in range(len(out)):
            if fits(out[t], t):
                continue
            lo, hi = 0.0, 1.0
            for _ in range(20):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if fits(out[t] * mid, t) else (lo, mid)
            out[t] = out[t] * lo
            self.clipped.append(t)
        return out

    def _merged_layout(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(servers, configuration) per pool for a reconfiguration step at time `t_s`."""
        rates, plan, tb = self.rates, self.plan, self.tables
        k_now = rates.period_of(t_s)
        cfg, servers = plan.pool_choice(k_now)
        cfg, servers = cfg.copy(), servers.copy()
        if not self.use_splits:
            up = round_up_split(servers, self.splits)
            servers = servers if up is None else up
        k_last = rates.period_of(t_s + self.lead_s)
        if k_last == k_now:
            return servers, cfg
        merged_s, merged_c = servers.copy(), cfg.copy()
        for k in range(k_now + 1, k_last + 1):
            c_k, s_k = plan.pool_choice(k)
            for p in range(tb.n_pools):
                if c_k[p] < 0:
                    continue
                n = max(int(merged_s[p]), int(s_k[p]))
                if merged_c[p] < 0 or tb.tp[c_k[p]] == tb.tp[merged_c[p]]:
                    merged_c[p] = c_k[p] if merged_c[p] < 0 else merged_c[p]
                else:  # a TP change: early if the next TP serves this period's peak
                    same_tp = tb.tp == tb.tp[c_k[p]]
                    best = float((tb.server_cap_rps[p] * same_tp).max()) * n
                    if best >= rates.peak_rps[k_now, p]:
                        merged_c[p] = c_k[p]
                merged_s[p] = n
        up = round_up_split(merged_s, self.splits)
        if up is None:
            return servers, cfg
        return up, merged_c

    def _clock_index(self, p: int, cfg: int, servers: int, rate: float) -> int:
        """Lowest-clock configuration of `cfg`'s TP whose `servers` serve `rate` (else the top)."""
        tb = self.tables
        same = np.flatnonzero(tb.tp == tb.tp[cfg])  # ascending clocks
        ok = same[tb.server_cap_rps[p, same] * servers >= rate]
        return int(ok[0]) if len(ok) else int(same[-1])

    def next_pools(self) -> tuple[PoolConfig, ...]:
        """The pool configurations for the next interval (one call per interval: it counts)."""
        lay = self.ctx.layout
        if self.plan is None:
            self._make_plan()
        t_s = self.rates.t0_s + self.step * lay.control_interval_s
        if self._layout is None or self.step % self.ctx.reconfig_every == 0:
            self._layout = self._merged_layout(t_s)
        servers, cfg = self._layout
        k_now = self.rates.period_of(t_s)
        tb, gpus = self.tables, lay.gpus_per_server
        init = self.ctx.initial_pools
        pools = []
        for p in range(lay.n_pools):
            if servers[p] == 0:
                tp = int(tb.tp[cfg[p]]) if cfg[p] >= 0 else int(init[p].tp)
                pools.append(PoolConfig(n_instances=0, tp=tp, freq_mhz=float(lay.freq_choices_mhz[0]),
                                        max_batch=tb.max_batch))
                continue
            c = cfg[p] if cfg[p] >= 0 else tb.config_index(init[p].tp, lay.freq_choices_mhz[-1])
            c = self._clock_index(p, int(c), int(servers[p]), float(self.rates.peak_rps[k_now, p]))
            tp = int(tb.tp[c])
            pools.append(PoolConfig(n_instances=int(servers[p]) * (gpus // tp), tp=tp,
                                    freq_mhz=float(tb.freq_mhz[c]), max_batch=tb.max_batch))
        self.step += 1
        return tuple(pools)

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """The plan's pools; rows (combined task) at full weight and uncapped."""
        return self.ctx.uncapped_action(self.next_pools(), action_mask)
