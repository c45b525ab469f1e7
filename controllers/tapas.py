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
  moves), then, only if the ceiling is already low and the row is still tight, the row serves
  the quantized model (a quality cost). Both are released one step at a time once slack
  returns.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.envs.backend import ClusterAction


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
    """

    name = "tapas"

    def __init__(self, ctx: ControllerContext, power_high: float = 0.85,
                 power_low: float = 0.7, temp_margin_c: float = 8.0,
                 pool_controller=None, cooling_lost_below: float = 0.95) -> None:
        if not ctx.codec.has_rows:
            raise ValueError(f"TapasController needs a task with row actions, got {ctx.task!r}")
        super().__init__(ctx)
        self.power_high, self.power_low, self.temp_margin_c = power_high, power_low, temp_margin_c
        if not 0.0 < cooling_lost_below <= 1.0:
            raise ValueError(f"cooling_lost_below must be in (0, 1], got {cooling_lost_below}")
        self.cooling_lost_below = cooling_lost_below
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
        lay = self.ctx.layout
        power_slack = 1.0 - np.maximum(frac, self.row_peak)
        thermal_slack = (lay.slowdown_temp_c - temp_c[self.row_aisle]) / 40.0
        slack = np.minimum(power_slack, thermal_slack)
        # Never starve a row completely unless it is over its limit: a row at weight 0 pushes
        # all its load onto the others, which then run out of SLO headroom.
        level = np.select([slack > 0.2, slack > 0.1], [3, 2], 1)
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
        temp_c = self.ctx.view.saas_server_max_temp_c(obs)
        slack = (lay.slowdown_temp_c - temp_c) / 40.0
        level = np.select([slack > 0.2, slack > 0.1], [3, 2], 1)
        row = lay.server_row[lay.saas_servers]
        coolest = np.full(lay.n_rows, -np.inf)
        np.maximum.at(coolest, row, slack)
        level[slack >= coolest[row]] = 3
        return level

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
        # Quantize only once the clock has already come down far and the row is still tight.
        self.quant = np.where(tight & (self.cap_idx <= self.quant_below_idx), 1, self.quant)
        # Release in reverse order: quantization first, then the clock.
        release_q = relax & (self.quant == 1)
        self.quant = np.where(release_q, 0, self.quant)
        raise_cap = relax & ~release_q & (self.cap_idx < self.n_f - 1)
        self.cap_idx = np.where(raise_cap, self.cap_idx + 1, self.cap_idx)

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None
               ) -> ClusterAction:
        """Placement, routing and per-row SaaS reconfiguration for the next interval."""
        ctx = self.ctx
        frac, temp_c, _ = self._observe(observation)
        self._reconfigure(observation, frac, temp_c)
        route_level = self._routing(frac, temp_c, self._cooling_lost_rows(observation))
        server_level = self._server_routing(observation) if ctx.codec.route_servers else None
        place = self._place(observation, ctx.slot_legal_servers(action_mask))
        pools = None
        if ctx.codec.has_pools:
            pools = (self.pool_controller.next_pools(observation)
                     if self.pool_controller is not None else ctx.initial_pools)
        return ctx.action(pools, route_level=route_level, cap_idx=self.cap_idx,
                          quantized=self.quant, vm_servers=place, server_route_level=server_level)
