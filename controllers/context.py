"""What a rule-based controller knows before it runs: the env's static description.

An operator knows its cluster's layout, the meaning of each observation index, the action
codec, the profile tables of the model it serves and the length mix of its request pools (from
its own request history). `ControllerContext` bundles exactly that, built once from a
`ClusterEnv`; at run time controllers read only the observation vector, through `ObsView`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_cluster_gym.envs.actions import ROUTE_WEIGHT_LEVELS
from llm_cluster_gym.envs.backend import (
    ClusterAction,
    ClusterLayout,
    PoolConfig,
    PoolStats,
    ServerPowerSpec,
)
from llm_cluster_gym.envs.sim.profiles import Profile, ProfileLibrary
from llm_cluster_gym.envs.sim.thermal import ThermalParams

__all__ = ["ControllerContext", "ControllerError", "ObsView", "PoolStats", "ServerPowerSpec"]

_ROUTE_WEIGHTS = np.array(ROUTE_WEIGHT_LEVELS)


class ControllerError(ValueError):
    """A controller was built from an unusable description; the message names what and why."""


class ObsView:
    """Named, de-normalized reads of the observation vector (indices from the env's names)."""

    def __init__(self, names: tuple[str, ...], layout: ClusterLayout) -> None:
        self.index = {n: i for i, n in enumerate(names)}
        self.layout = layout
        lay = layout

        def idx(fmt: str, keys: Any) -> np.ndarray:
            try:
                return np.array([self.index[fmt.format(k)] for k in keys], dtype=np.int64)
            except KeyError as exc:
                raise ControllerError(f"observation has no index named {exc.args[0]!r}") from None

        pools, rows, aisles = lay.pool_names, range(lay.n_rows), range(lay.n_aisles)
        self.i_rate = idx("pool[{}].arrival_rate", pools)
        self.i_queued = idx("pool[{}].queued", pools)
        self.i_running = idx("pool[{}].running", pools)
        self.i_row_power = idx("row[{}].power", rows)
        self.i_row_headroom = idx("row[{}].headroom", rows)
        self.i_row_capped = idx("row[{}].capped", rows)
        self.i_inlet = idx("aisle[{}].inlet", aisles)
        self.i_aisle_temp = idx("aisle[{}].max_gpu_temp", aisles)
        self.i_heat = idx("aisle[{}].heat_over_capacity", aisles)
        self.i_capacity = idx("aisle[{}].capacity", aisles)
        self.i_faults = idx("fault.{}", ("cooling", "power", "load_spike"))
        self.i_vm = self.index["vm.pending_power"]
        self.i_vms = np.array([self.i_vm] + [self.index[f"vm.pending_power[{i}]"] for i in
                                              range(1, lay.vm_placements_per_interval)], dtype=np.int64)
        saas = lay.saas_servers if lay.route_per_server else ()
        self.i_server_temp = idx("server[{}].max_gpu_temp", saas)
        self.i_attain = self.index["slo.attainment"]
        self.i_ttft = self.index["slo.ttft_p99"]

    def pool_rate_rps(self, obs: np.ndarray) -> np.ndarray:
        """Arrival rate per pool over the last interval (req/s); rows of a 2-D ``obs`` are copies."""
        return np.maximum(obs[..., self.i_rate], 0.0) * self.layout.nominal_rps

    def pool_backlog(self, obs: np.ndarray) -> np.ndarray:
        """Requests waiting per pool at the end of the last interval (rows of a 2-D ``obs``: copies)."""
        lay = self.layout
        return np.maximum(obs[..., self.i_queued], 0.0) * lay.nominal_rps * lay.control_interval_s

    def row_power_w(self, obs: np.ndarray) -> np.ndarray:
        """Row power at the end of the last interval (W)."""
        return obs[self.i_row_power] * self.layout.row_limit_w

    def row_limit_w(self, obs: np.ndarray) -> np.ndarray:
        """Row limit in force now (W): power + headroom (lower during a power-feed failure)."""
        return (obs[self.i_row_power] + obs[self.i_row_headroom]) * self.layout.row_limit_w

    def aisle_inlet_c(self, obs: np.ndarray) -> np.ndarray:
        """Aisle inlet temperature (C)."""
        return obs[self.i_inlet] * 20.0 + 20.0

    def aisle_max_temp_c(self, obs: np.ndarray) -> np.ndarray:
        """Hottest GPU per aisle (C)."""
        return obs[self.i_aisle_temp] * (self.layout.slowdown_temp_c - 40.0) + 40.0

    def saas_server_max_temp_c(self, obs: np.ndarray) -> np.ndarray:
        """Hottest GPU per SaaS server (C), server order; empty without `route_per_server`."""
        return obs[self.i_server_temp] * (self.layout.slowdown_temp_c - 40.0) + 40.0

    def aisle_heat_ratio(self, obs: np.ndarray) -> np.ndarray:
        """Aisle heat over its (current) cooling capacity."""
        return obs[self.i_heat]

    def aisle_capacity_w(self, obs: np.ndarray) -> np.ndarray:
        """Cooling capacity in force (W)."""
        return obs[self.i_capacity] * self.layout.aisle_capacity_w

    def faults(self, obs: np.ndarray) -> np.ndarray:
        """Flags (cooling failure, power-feed failure, load spike)."""
        return obs[self.i_faults] > 0.5

    def pending_vm_expected_gpu_w(self, obs: np.ndarray) -> float:
        """Expected per-GPU power of the VM waiting for placement (0 when none).

        The P95 of the per-GPU power measured earlier in the episode from running VMs of the
        waiting VM's type (the type's declared mean before any ran): history, never the
        waiting VM's own future draw, which no operator can read.
        """
        return float(obs[self.i_vm]) * self.layout.gpu_power_limit_w

    def pending_vms_expected_gpu_w(self, obs: np.ndarray) -> np.ndarray:
        """Expected per-GPU power of each of the first P waiting VMs, queue order (0 where none).

        P is `layout.vm_placements_per_interval`; entry 0 is `pending_vm_expected_gpu_w`, each
        the P95 of its own type's past readings.
        """
        return obs[self.i_vms].astype(float) * self.layout.gpu_power_limit_w


@dataclass(frozen=True)
class ControllerContext:
    """The static description every rule-based controller is built from.

    Attributes:
        task: "energy" | "thermal" | "combined".
        layout: Cluster layout (sizes, limits, SLOs, choice lists).
        codec: The env's `ActionCodec` (action blocks and their meaning).
        view: Named reads of the observation.
        profiles: Profile per TP degree of the served model (the operator's profile tables).
        thermal: GPU thermal model parameters (the operator's calibrated fit).
        pool_stats: Request-length statistics per pool.
        server: Server power model constants.
        reconfig_every: Intervals between instance-count/TP changes (the env's slow time scale).
    """

    task: str
    layout: ClusterLayout
    codec: Any
    view: ObsView
    profiles: dict[int, Profile]
    thermal: ThermalParams
    pool_stats: PoolStats
    server: ServerPowerSpec
    reconfig_every: int

    @classmethod
    def from_env(cls, env: Any, profiles: ProfileLibrary | None = None) -> ControllerContext:
        """Build the context from a `ClusterEnv` (or a gymnasium wrapper of one).

        Everything but the env's own codec and observation names comes from the backend's
        description (`ClusterBackend.describe`).

        Args:
            env: The env the controller will act on.
            profiles: A profile library to read the served model's profiles from instead of
                the backend's own.

        Raises:
            envs.sim.profiles.ProfileError: `profiles` lacks the served model at some TP degree.
        """
        env = env.unwrapped
        lay: ClusterLayout = env.layout
        desc = env.backend.describe()
        by_tp = dict(desc.profiles_by_tp)
        if profiles is not None:
            by_tp = {tp: profiles.get(lay.model, lay.gpu, tp) for tp in lay.tp_choices}
        return cls(
            task=env.task,
            layout=lay,
            codec=env.codec,
            view=ObsView(tuple(env.observation_names), lay),
            profiles=by_tp,
            thermal=desc.thermal,
            pool_stats=desc.pool_stats,
            server=desc.server,
            reconfig_every=int(env.reconfig_every),
        )

    # --------------------------------------------------------------- action helpers
    @property
    def initial_pools(self) -> tuple[PoolConfig, ...]:
        """The scenario's initial pool configuration as the action codec represents it."""
        return self.codec.nearest_pools(self.layout.initial_pools)

    def action(self, pools: tuple[PoolConfig, ...] | None = None,
               route_level: np.ndarray | None = None, cap_idx: np.ndarray | None = None,
               quantized: np.ndarray | None = None,
               vm_servers: tuple[int | None, ...] = (),
               server_route_level: np.ndarray | None = None) -> ClusterAction:
        """A `ClusterAction` for this task; the parts the task has no action for are dropped.

        Args:
            pools: Pool configurations (tasks with pool actions).
            route_level: Per row, the routing weight's index in `ROUTE_WEIGHT_LEVELS`.
            cap_idx: Per row, the SaaS clock ceiling's index in `layout.freq_choices_mhz`.
            quantized: Per row, serve the quantized model (0/1).
            vm_servers: Per placement slot (the i-th waiting VM), its server or None to keep
                it waiting.
            server_route_level: Per SaaS server, its routing weight's index in
                `ROUTE_WEIGHT_LEVELS` (layouts with `route_per_server`; None there: all at full
                weight).
        """
        if not self.codec.has_rows:
            return ClusterAction(pools=pools if self.codec.has_pools else None)
        freqs = np.asarray(self.layout.freq_choices_mhz, dtype=float)
        return ClusterAction(
            pools=pools if self.codec.has_pools else None,
            row_route_weight=None if route_level is None else _ROUTE_WEIGHTS[np.asarray(route_level)],
            row_freq_cap_mhz=None if cap_idx is None else freqs[np.asarray(cap_idx)],
            row_quantized=None if quantized is None else np.asarray(quantized).astype(bool),
            server_route_weight=self._server_weights(server_route_level),
            vm_servers=tuple(vm_servers))

    def _server_weights(self, level: np.ndarray | None) -> np.ndarray | None:
        """Per-SaaS-server routing weights of `level` (all full when None); None without the block."""
        n = self.codec.route_servers
        if not n:
            if level is not None:
                raise ControllerError("server_route_level: the layout does not route per server "
                                      "(serving.route_per_server is false)")
            return None
        if level is None:
            return np.ones(n)
        return _ROUTE_WEIGHTS[np.asarray(level)]

    def uncapped_action(self, pools: tuple[PoolConfig, ...] | None,
                        action_mask: np.ndarray | None) -> ClusterAction:
        """`pools` with power- and heat-unaware rows.

        Every row at full routing weight, no clock ceiling, no quantization; each waiting VM the
        mask lets place (one per open slot, queue order) on the lowest-numbered legal server
        not taken by an earlier slot (first fit).
        """
        r = self.layout.n_rows
        servers: list[int | None] = []
        for legal in self.slot_legal_servers(action_mask):
            free = np.flatnonzero(legal)
            free = free[~np.isin(free, [s for s in servers if s is not None])]
            servers.append(int(free[0]) if len(free) else None)
        return self.action(pools, route_level=np.full(r, len(_ROUTE_WEIGHTS) - 1),
                           cap_idx=np.full(r, len(self.layout.freq_choices_mhz) - 1),
                           quantized=np.zeros(r), vm_servers=tuple(servers))

    def legal_servers(self, action_mask: np.ndarray | None) -> np.ndarray:
        """Servers the first waiting VM may go to, as the codec reads them from the action mask.

        All False without a mask or for a task without placement.
        """
        return self.codec.legal_servers(action_mask)

    def slot_legal_servers(self, action_mask: np.ndarray | None) -> np.ndarray:
        """Per placement slot (the i-th waiting VM), the servers it may go to: (P, n_servers).

        Read from the action mask by the codec; all False without a mask.
        """
        return self.codec.slot_legal_servers(action_mask)
