"""TAPAS-style thermal- and power-aware placement, routing and SaaS reconfiguration.

From the observation only:

* history: per row, an exponentially weighted peak of power over its limit; per aisle, of
  the hottest GPU's margin to the slowdown point and of heat over cooling capacity (the
  paper's "historical telemetry per workload type": rows mix SaaS and VM load, so their
  observed peaks are what a new VM must fit next to);
* placement: a waiting VM goes to the legal server whose row and aisle keep the most headroom
  after adding the VM's power, estimated from its type's history (the P95 of the per-GPU power
  measured from running VMs of its type so far, its declared mean before any ran; never the
  VM's own future draw) and the server overhead; ties favour rows with less recent load, which
  spreads VM types across rows. With several placements per interval the VMs are placed in
  queue order, each VM's expected power added to the row and aisle it lands on before the next
  is placed, so one interval's VMs do not pile onto one row;
* routing: new requests are steered away from rows with little power or thermal slack (four
  weight levels; the row with the most slack always keeps full weight); during a cooling
  failure the rows of the aisle that lost cooling get no new requests at all (while any aisle
  still has its cooling), so their SaaS servers fall to idle power and the aisle's heat, which
  its IaaS VMs keep producing, rises more slowly: TAPAS's "move load out of the affected area";
  where the scenario routes per SaaS server (`serving.route_per_server`), the same rule works
  inside each row on each server's hottest GPU (its inlet varies with the rack's place along the
  row): servers with little thermal slack get less new work, the coolest server of every row
  keeps full weight (power capping is row-wide, so power slack stays a row's matter);
* reconfiguration on spikes, faults and tight rows, in the order that costs least: first the
  row's SaaS clock ceiling goes down step by step (decode is memory-bound, so latency barely
  moves); then, only if the ceiling is already low and the row is still tight, tensor
  parallelism (tasks with pool actions: TP is a pool's setting): each pool moves, on the GPUs
  it holds, to the TP degree the operator's performance model (`controllers.perfmodel`)
  predicts to draw the least power at the observed load within the SLOs, if that saves at
  least `tp_min_saving` (a one-off cost: the instances reload their model); the quantized
  model (a lasting quality cost) comes last, and not while a TP change of the last
  `ctx.reconfig_every` intervals is still taking effect. Released in reverse order once slack
  returns: quantization, then the pools' own TP, then the clock, one step at a time.
  On the calibrated physics a TP change seldom pays: a 70B model's fewest, largest instances
  (TP 8) read its weights the fewest times per token, so at `tapas_dc`'s load TP 4 and TP 2
  draw more, not less (`bench/emergency_knobs.py` measures every rung).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.perfmodel import PoolModel
from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig


class TapasController(RuleBasedController):
    """Thermal/power-aware policy over the row and placement blocks (thermal, combined).

    Args:
        ctx: Static description of the env.
        power_high: Row power / limit above which the row is tightened.
        power_low: Below this (and thermally cool) the row is relaxed.
        temp_margin_c: Tighten when the aisle's hottest GPU is within this of slowdown.
        pool_controller: Optional controller whose `next_pools` are used (combined task);
            otherwise the scenario's initial pool configuration is kept.
        cooling_lost_below: An aisle whose cooling capacity in force is below this fraction of
            its nominal one has lost cooling (a failure in force): its rows get no new requests.
        tp_min_saving: Least predicted cut of a pool's power (fraction) for which the TP rung
            reconfigures the pool (tasks with pool actions).
    """

    name = "tapas"

    def __init__(self, ctx: ControllerContext, power_high: float = 0.85,
                 power_low: float = 0.7, temp_margin_c: float = 8.0,
                 pool_controller=None, cooling_lost_below: float = 0.95,
                 tp_min_saving: float = 0.05) -> None:
        if not ctx.codec.has_rows:
            raise ValueError(f"TapasController needs a task with row actions, got {ctx.task!r}")
        super().__init__(ctx)
        self.power_high, self.power_low, self.temp_margin_c = power_high, power_low, temp_margin_c
        if not 0.0 < cooling_lost_below <= 1.0:
            raise ValueError(f"cooling_lost_below must be in (0, 1], got {cooling_lost_below}")
        self.cooling_lost_below = cooling_lost_below
        if not 0.0 <= tp_min_saving < 1.0:
            raise ValueError(f"tp_min_saving must be in [0, 1), got {tp_min_saving}")
        self.tp_min_saving = tp_min_saving
        self.pool_controller = pool_controller
        lay = ctx.layout
        self.n_f = len(lay.freq_choices_mhz)
        self.quant_below_idx = min(2, self.n_f - 1)
        self.floor_idx = min(2, self.n_f - 1)
        # Power a server adds per W of GPU power (GPU + overhead that follows GPU load).
        s = ctx.server
        # Aisle of each row (static layout: computed once, used every interval).
        self.row_aisle = np.zeros(lay.n_rows, dtype=np.int64)
        self.row_aisle[lay.server_row] = lay.server_aisle
        self.overhead_per_gpu_w = (s.overhead_full_load_w - s.overhead_idle_w) / (
            s.gpus * (s.gpu_tdp_w - ctx.profiles[lay.tp_choices[0]].idle_power_w))
        self.reset()

    def reset(self) -> None:
        """Forget telemetry history and the current ceilings."""
        lay = self.ctx.layout
        self.row_peak = np.zeros(lay.n_rows)
        self.aisle_hot = np.zeros(lay.n_aisles)
        self.cap_idx = np.full(lay.n_rows, self.n_f - 1)
        self.quant = np.zeros(lay.n_rows, dtype=np.int64)
        self.tp_hold = np.zeros(lay.n_pools, dtype=np.int64)  # per pool: TP the rung holds (0: none)
        self.intervals_since_tp = np.iinfo(np.int64).max // 2
        self._escalate = np.zeros(lay.n_rows, dtype=bool)
        self._relaxed = True
        if self.pool_controller is not None:
            self.pool_controller.reset()

    # ------------------------------------------------------------------ pieces
    def _observe(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        view, lay = self.ctx.view, self.ctx.layout
        frac = view.row_power_w(obs) / np.maximum(view.row_limit_w(obs), 1.0)
        self.row_peak = np.maximum(frac, 0.9 * self.row_peak + 0.1 * frac)
        hot = view.aisle_max_temp_c(obs) - (lay.slowdown_temp_c - self.temp_margin_c)
        self.aisle_hot = np.maximum(hot, 0.9 * self.aisle_hot + 0.1 * hot)
        return frac, view.aisle_max_temp_c(obs), view.aisle_heat_ratio(obs)

    def _place(self, obs: np.ndarray, slot_legal: np.ndarray) -> tuple[int | None, ...]:
        """Servers for the waiting VMs, queue order: each where the most room is left after it.

        For each open slot (the i-th waiting VM; `slot_legal` row i, shape (P, n_servers)) the
        legal server not yet taken with the most row, aisle and thermal room after adding the
        VM, whose per-GPU power is the observation's expected power for it: the P95 of its
        type's past readings (per-type history, as TAPAS places), never the VM's own power to
        come. Each placed VM's power joins its row's and aisle's load before the next VM is
        placed (the estimate of this interval's headroom the controller keeps itself).
        """
        lay, view = self.ctx.layout, self.ctx.view
        vm_w = view.pending_vms_expected_gpu_w(obs)  # per-type history (P95), not the VMs' own
        idle = self.ctx.profiles[lay.tp_choices[0]].idle_power_w
        limit = np.maximum(view.row_limit_w(obs), 1.0)
        cap = np.maximum(view.aisle_capacity_w(obs), 1.0)
        row_load = self.row_peak
        aisle_load = view.aisle_heat_ratio(obs)
        temp_room_all = (lay.slowdown_temp_c - view.aisle_max_temp_c(obs)) / 20.0
        taken = np.zeros(lay.n_servers, dtype=bool)
        out: list[int | None] = []
        for slot, legal in enumerate(slot_legal):
            cand = np.flatnonzero(legal & ~taken)
            if len(cand) == 0:
                out.append(None)
                continue
            add_w = lay.gpus_per_server * max(float(vm_w[slot]) - idle, 0.0) * (1.0 + self.overhead_per_gpu_w)
            row = lay.server_row[cand]
            aisle = lay.server_aisle[cand]
            row_room = 1.0 - row_load[row] - add_w / limit[row]
            aisle_room = 1.0 - aisle_load[aisle] - add_w / cap[aisle]
            score = np.minimum(np.minimum(row_room, aisle_room), temp_room_all[aisle])
            best = int(cand[np.argmax(score + 1e-3 * (1.0 - row_load[row]))])
            out.append(best)
            taken[best] = True
            if slot + 1 < len(slot_legal):  # the next VM sees this one's load
                row_load = row_load.copy()
                aisle_load = aisle_load.copy()
                row_load[lay.server_row[best]] += add_w / limit[lay.server_row[best]]
                aisle_load[lay.server_aisle[best]] += add_w / cap[lay.server_aisle[best]]
        return tuple(out)

    def _routing(self, frac: np.ndarray, temp_c: np.ndarray, cooling_lost: np.ndarray
                 ) -> np.ndarray:
        """Weight level (0-3) per row; `cooling_lost` marks rows whose aisle lost cooling."""
        power_slack = 1.0 - np.maximum(frac, self.row_peak)
        slack = np.minimum(power_slack, self._thermal_slack(temp_c[self.row_aisle]))
        # Never starve a row completely unless it is over its limit: a row at weight 0 pushes
        # all its load onto the others, which then run out of SLO headroom.
        level = _slack_levels(slack)
        level[frac > 1.0] = 0
        level[int(np.argmax(slack))] = 3
        if cooling_lost.any() and not cooling_lost.all():
            level[cooling_lost] = 0
        return level

    def _server_routing(self, obs: np.ndarray) -> np.ndarray:
        """Weight level (1-3) per SaaS server from its hottest GPU's margin to slowdown.

        The thresholds are the rows' (8 C and 4 C of margin); the coolest SaaS server of each
        row keeps level 3, so the row's own weight decides how much the row takes.
        """
        lay = self.ctx.layout
        slack = self._thermal_slack(self.ctx.view.saas_server_max_temp_c(obs))
        level = _slack_levels(slack)
        row = lay.server_row[lay.saas_servers]
        coolest = np.full(lay.n_rows, -np.inf)
        np.maximum.at(coolest, row, slack)
        level[slack >= coolest[row]] = 3
        return level

    def _thermal_slack(self, temp_c: np.ndarray) -> np.ndarray:
        """Margin of the hottest GPU to the slowdown point, in units of 40 C."""
        return (self.ctx.layout.slowdown_temp_c - temp_c) / 40.0

    def _cooling_lost_rows(self, obs: np.ndarray) -> np.ndarray:
        """Rows whose aisle runs on less than `cooling_lost_below` of its nominal cooling."""
        view, lay = self.ctx.view, self.ctx.layout
        aisle_lost = view.aisle_capacity_w(obs) < self.cooling_lost_below * lay.aisle_capacity_w
        return aisle_lost[self.row_aisle]


    def _reconfigure(self, obs: np.ndarray, frac: np.ndarray, temp_c: np.ndarray) -> None:
        lay, view = self.ctx.layout, self.ctx.view
        faults = view.faults(obs)
        hot = temp_c[self.row_aisle] > lay.slowdown_temp_c - self.temp_margin_c
        tight = (frac > self.power_high) | hot
        # Emergencies: a spike tightens every row near its limit; a power-feed or cooling
        # failure shows up as low headroom or heat in the rows it hits.
        if faults[2]:
            tight |= frac > self.power_low
        if faults[1] or faults[0]:
            tight |= (frac > self.power_high - 0.1) | (
                temp_c[self.row_aisle] > lay.slowdown_temp_c - 2 * self.temp_margin_c)
        relax = (frac < self.power_low) & ~hot & ~faults.any()
        step = np.where(frac > 1.0, 2, 1)
        # The clock floor is `floor_idx` unless the row is over its limit or a fault is active:
        # below it SaaS capacity falls faster than the power it saves.
        floor = np.where((frac > 1.0) | faults.any(), 0, self.floor_idx)
        lower = tight & (self.cap_idx > floor)
        self.cap_idx = np.where(lower, np.maximum(self.cap_idx - step, floor), self.cap_idx)
        # The next rungs (TP, then quantization) only once the clock has come down far and
        # the row is still tight.
        self._escalate = tight & (self.cap_idx <= self.quant_below_idx)
        # Release in reverse order: quantization first, then TP (in `_tp_rung`), then the clock.
        release_q = relax & (self.quant == 1)
        self.quant = np.where(release_q, 0, self.quant)
        self._relaxed = bool(relax.all() and not release_q.any())
        raise_cap = relax & ~release_q & (self.cap_idx < self.n_f - 1) & ~self.tp_hold.any()
        self.cap_idx = np.where(raise_cap, self.cap_idx + 1, self.cap_idx)

    def _quantize(self) -> None:
        """The last rung: rows still tight at a low clock serve the quantized model.

        Not while a TP change made within the last `reconfig_every` intervals is taking effect.
        """
        if self.intervals_since_tp < self.ctx.reconfig_every:
            return
        self.quant = np.where(self._escalate, 1, self.quant)

    def _tp_rung(self, observation: np.ndarray, pools: tuple[PoolConfig, ...]) -> tuple[PoolConfig, ...]:
        """`pools` with the TP the rung holds: new holds where rows need the next rung.

        For each pool, on the GPUs it holds at the clock the pool runs, the TP choice whose
        predicted power at the last interval's arrival rate is least among those within the
        pool's SLOs; held if it cuts the prediction for the pool's own TP by `tp_min_saving`.
        Holds are dropped once every row has relaxed.
        """
        self.intervals_since_tp += 1
        if self._relaxed and self.tp_hold.any():
            self.tp_hold[:] = 0
        if self._escalate.any():
            rate = self.ctx.view.pool_rate_rps(observation)
            for p, cfg in enumerate(pools):
                if self.tp_hold[p] == 0:
                    best = self._least_power_tp(p, cfg, float(rate[p]))
                    if best != cfg.tp:
                        self.tp_hold[p] = best
                        self.intervals_since_tp = 0
        return tuple(self._at_tp(cfg, int(self.tp_hold[p])) if self.tp_hold[p] else cfg
                     for p, cfg in enumerate(pools))

    def _least_power_tp(self, pool: int, cfg: PoolConfig, rate_rps: float) -> int:
        """The TP degree for the pool's GPUs that the performance model says draws least."""
        if cfg.n_instances == 0:
            return cfg.tp
        power: dict[int, float] = {}
        for tp in self.ctx.layout.tp_choices:
            n = self._at_tp(cfg, tp).n_instances  # same servers, so the same GPUs
            ok, pred = PoolModel(self.ctx, pool, tp, cfg.freq_mhz).within_slo(
                rate_rps, n, cfg.max_batch, 1.0)
            if bool(ok):
                power[tp] = float(pred.pool_power_w)
        if cfg.tp not in power:
            return cfg.tp
        best = min(power, key=power.__getitem__)
        return best if power[best] < (1.0 - self.tp_min_saving) * power[cfg.tp] else cfg.tp

    def _at_tp(self, cfg: PoolConfig, tp: int) -> PoolConfig:
        """`cfg` at TP `tp` on the same servers (whole servers, as the codec lays pools out)."""
        servers = int(self.ctx.codec.pool_servers((cfg,))[0])
        return replace(cfg, tp=tp, n_instances=servers * (self.ctx.layout.gpus_per_server // tp))

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """Placement, routing and per-row SaaS reconfiguration for the next interval."""
        ctx = self.ctx
        frac, temp_c, _ = self._observe(observation)
        self._reconfigure(observation, frac, temp_c)
        pools = None
        if ctx.codec.has_pools:
            pools = (self.pool_controller.next_pools(observation)
                     if self.pool_controller is not None else ctx.initial_pools)
            pools = self._tp_rung(observation, pools)
        self._quantize()
        route_level = self._routing(frac, temp_c, self._cooling_lost_rows(observation))
        server_level = self._server_routing(observation) if ctx.codec.route_servers else None
        place = self._place(observation, ctx.slot_legal_servers(action_mask))
        return ctx.action(pools, route_level=route_level, cap_idx=self.cap_idx,
                          quantized=self.quant, vm_servers=place, server_route_level=server_level)


def _slack_levels(slack: np.ndarray) -> np.ndarray:
    """Routing weight level per slack: 3 above 0.2, 2 above 0.1, else 1 (rows and servers alike)."""
    return np.select([slack > 0.2, slack > 0.1], [3, 2], 1)
