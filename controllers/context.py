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
from llm_cluster_gym.envs.backend import ClusterLayout
from llm_cluster_gym.envs.sim.profiles import Profile, ProfileLibrary
from llm_cluster_gym.envs.sim.thermal import ThermalParams


class ControllerError(ValueError):
    """A controller was built from an unusable description; the message names what and why."""


@dataclass(frozen=True)
class ServerPowerSpec:
    """Server power model constants (from the scenario's `datacenter.server`).

    Attributes:
        gpus: GPUs per server.
        max_power_w: Server nameplate power (DGX H100 datasheet: 10.2 kW).
        gpu_tdp_w: GPU TDP (700 W for H100 SXM).
        overhead_idle_w: Non-GPU power at idle GPUs (modelling assumption of the scenario).
    """

    gpus: int
    max_power_w: float
    gpu_tdp_w: float
    overhead_idle_w: float

    def server_power_w(self, gpu_sum_w: np.ndarray | float, idle_gpu_w: float) -> np.ndarray:
        """Server power for a total GPU power (same linear overhead as the simulator's)."""
        g = np.asarray(gpu_sum_w, dtype=float)
        load = np.clip((g - self.gpus * idle_gpu_w) / (self.gpus * (self.gpu_tdp_w - idle_gpu_w)),
                       0.0, 1.0)
        over_max = self.max_power_w - self.gpus * self.gpu_tdp_w
        return g + self.overhead_idle_w + (over_max - self.overhead_idle_w) * load


@dataclass(frozen=True)
class PoolStats:
    """Request-length statistics per pool (what the operator knows from its request history).

    Attributes:
        fraction: Share of requests falling in each pool.
        mean_input_tokens: Mean prompt length per pool.
        p90_input_tokens: 90th-percentile prompt length per pool (sizes TTFT).
        mean_output_tokens: Mean output length per pool.
        mean_input_all: Mean prompt length over all requests (the simulator's prefill clock
            under the GPU power limit is set from it).
    """

    fraction: np.ndarray
    mean_input_tokens: np.ndarray
    p90_input_tokens: np.ndarray
    mean_output_tokens: np.ndarray
    mean_input_all: float


def pool_stats_from_backend(backend: Any) -> PoolStats:
    """Pool statistics from the scenario's request trace (SimCluster), i.e. request history.

    Raises:
        ControllerError: The backend has no scenario/pool description to derive them from.
    """
    from llm_cluster_gym.envs.sim.workload import builtin_trace, load_trace

    scenario = getattr(backend, "scenario", None)
    pools = getattr(backend, "pools", None)
    if scenario is None or pools is None:
        raise ControllerError(
            f"{type(backend).__name__}: no 'scenario'/'pools' to derive pool statistics from; "
            "pass PoolStats explicitly")
    name = scenario.workload.trace
    trace = builtin_trace(name) if "/" not in name and "." not in name else load_trace(name)
    pid = pools.assign(trace.input_tokens, trace.output_tokens)
    n = pools.n_pools
    frac, mean_in, p90_in, mean_out = (np.zeros(n) for _ in range(4))
    for p in range(n):
        sel = pid == p
        if not sel.any():
            frac[p], mean_in[p], p90_in[p], mean_out[p] = 0.0, 1.0, 1.0, 1.0
            continue
        frac[p] = sel.mean()
        mean_in[p] = trace.input_tokens[sel].mean()
        p90_in[p] = np.percentile(trace.input_tokens[sel], 90)
        mean_out[p] = trace.output_tokens[sel].mean()
    return PoolStats(frac, mean_in, p90_in, mean_out, float(trace.input_tokens.mean()))


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
        self.i_attain = self.index["slo.attainment"]
        self.i_ttft = self.index["slo.ttft_p99"]

    def pool_rate_rps(self, obs: np.ndarray) -> np.ndarray:
        """Arrival rate per pool over the last interval (req/s)."""
        return np.maximum(obs[self.i_rate], 0.0) * self.layout.nominal_rps

    def pool_backlog(self, obs: np.ndarray) -> np.ndarray:
        """Requests waiting per pool at the end of the last interval."""
        lay = self.layout
        return np.maximum(obs[self.i_queued], 0.0) * lay.nominal_rps * lay.control_interval_s

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

    def aisle_heat_ratio(self, obs: np.ndarray) -> np.ndarray:
        """Aisle heat over its (current) cooling capacity."""
        return obs[self.i_heat]

    def aisle_capacity_w(self, obs: np.ndarray) -> np.ndarray:
        """Cooling capacity in force (W)."""
        return obs[self.i_capacity] * self.layout.aisle_capacity_w

    def faults(self, obs: np.ndarray) -> np.ndarray:
        """Flags (cooling failure, power-feed failure, load spike)."""
        return obs[self.i_faults] > 0.5

    def pending_vm_gpu_w(self, obs: np.ndarray) -> float:
        """Per-GPU power of the VM waiting for placement (0 when none)."""
        return float(obs[self.i_vm]) * self.layout.gpu_power_limit_w


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
        """Build the context from a `ClusterEnv` (or a gymnasium wrapper of one)."""
        env = getattr(env, "unwrapped", env)
        lay: ClusterLayout = env.layout
        lib = profiles or ProfileLibrary.load()
        backend = env.backend
        spec = getattr(getattr(getattr(backend, "scenario", None), "datacenter", None), "server",
                       None)
        if spec is None:
            raise ControllerError(f"{type(backend).__name__}: no scenario.datacenter.server spec")
        return cls(
            task=env.task,
            layout=lay,
            codec=env.codec,
            view=ObsView(tuple(env.observation_names), lay),
            profiles={tp: lib.get(lay.model, lay.gpu, tp) for tp in lay.tp_choices},
            thermal=getattr(backend, "thermal", None) or ThermalParams.load(),
            pool_stats=pool_stats_from_backend(backend),
            server=ServerPowerSpec(spec.gpus, spec.max_power_w, spec.gpu_tdp_w,
                                   spec.overhead_idle_w),
            reconfig_every=int(env.reconfig_every),
        )

    # --------------------------------------------------------------- action-block helpers
    @property
    def n_pool_dims(self) -> int:
        """Length of the pool block of the action (0 for the thermal task)."""
        return 4 * self.layout.n_pools if self.codec.has_pools else 0

    def initial_pool_block(self) -> np.ndarray:
        """The pool block encoding the scenario's initial configuration."""
        return self.codec.encode(self.layout.initial_pools)

    def row_block(self, route_level: np.ndarray, cap_idx: np.ndarray,
                  quantized: np.ndarray) -> np.ndarray:
        """The per-row block (routing level, clock-ceiling index, quantized)."""
        return np.column_stack([route_level, cap_idx, quantized]).astype(np.int64).ravel()

    def assemble(self, pool_block: np.ndarray | None, row_block: np.ndarray | None,
                 placement: int | None) -> np.ndarray:
        """A full action vector for this task from its blocks."""
        parts = []
        if self.codec.has_pools:
            parts.append(np.asarray(pool_block, dtype=np.int64))
        if self.codec.has_rows:
            parts.append(np.asarray(row_block, dtype=np.int64))
            parts.append(np.array([self.layout.n_servers if placement is None else placement],
                                  dtype=np.int64))
        return np.concatenate(parts)

    def legal_servers(self, action_mask: np.ndarray | None) -> np.ndarray:
        """Servers the pending VM may go to (from the action mask; none without a mask)."""
        n = self.layout.n_servers
        if action_mask is None or not self.codec.has_rows:
            return np.zeros(n, dtype=bool)
        return np.asarray(action_mask[-(n + 1):-1], dtype=bool)
