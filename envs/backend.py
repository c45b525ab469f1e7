"""The seam between the environment and the world: the ClusterBackend protocol and its records.

The simulated datacenter (`envs.sim.SimCluster`) and the real GPU node implement the same small
protocol, so an environment, a rule-based controller or a trained policy runs unchanged on both.
Every quantity carries its unit in its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from llm_cluster_gym.envs.latency import empty_histogram

if TYPE_CHECKING:
    from llm_cluster_gym.envs.sim.profiles import Profile
    from llm_cluster_gym.envs.sim.thermal import ThermalParams

FAULT_KINDS = ("cooling_failure", "power_failure", "load_spike")

SERVER_POWER_STATES = ("off", "waking", "idle", "serving")
"""A server's power states; `Telemetry.server_power_state` holds indices into this tuple.

off: powered down (standby draw only); waking: booting (idle draw, nothing runs yet); idle:
powered with nothing on it; serving: hosts an instance (serving or loading) or a VM."""


@dataclass(frozen=True)
class PoolConfig:
    """How one request-length pool is served (DynamoLLM's per-pool knobs).

    Attributes:
        n_instances: LLM instances serving this pool (0 parks the pool on the others).
        tp: Tensor-parallel degree of each instance (GPUs per instance).
        freq_mhz: SM frequency the instances run at (before power or thermal caps).
        max_batch: Continuous-batching cap on concurrent sequences per instance.
        quantized: Serve a quantized (FP8) variant: faster and cooler, with a quality cost.
    """

    n_instances: int
    tp: int
    freq_mhz: float
    max_batch: int
    quantized: bool = False


@dataclass(frozen=True)
class ClusterAction:
    """Everything a controller may change for the next control interval; None keeps the setting.

    Attributes:
        pools: Per-pool serving configuration (instance count, TP, frequency, batch cap).
        row_freq_cap_mhz: Per-row SM frequency ceiling applied to SaaS instances (TAPAS
            reconfiguration during spikes and emergencies).
        row_quantized: Per-row switch to the quantized model variant for SaaS instances.
        row_route_weight: Per-row preference for routing new requests (0 avoids the row).
        server_route_weight: Per SaaS server (the servers `ClusterLayout.server_is_saas` marks,
            in server order), a preference multiplying its row's: new requests reach an
            instance in proportion to its row's weight x its server's weight x its batch cap
            (an instance never spans two servers, so this is routing per SaaS instance). Only
            for layouts with `route_per_server`; None keeps the setting (all 1 at the start).
        admit_fraction: Fraction of arriving requests admitted (the rest are rejected and counted
            as dropped); a last-resort load shed.
        vm_servers: IaaS VM placements, one slot per waiting VM in queue order: entry i is the
            server for the i-th VM waiting when the action is applied, or None to keep that VM
            waiting; VMs beyond the tuple keep waiting. At most
            `ClusterLayout.vm_placements_per_interval` entries, distinct servers; the backend
            places them in slot order. Empty: place nothing.
    """

    pools: tuple[PoolConfig, ...] | None = None
    row_freq_cap_mhz: np.ndarray | None = None
    row_quantized: np.ndarray | None = None
    row_route_weight: np.ndarray | None = None
    server_route_weight: np.ndarray | None = None
    admit_fraction: float | None = None
    vm_servers: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class ClusterLayout:
    """Static shape of the cluster, what a controller needs to size its decisions."""

    n_rows: int
    n_aisles: int
    n_servers: int
    gpus_per_server: int
    server_row: np.ndarray
    server_aisle: np.ndarray
    server_is_saas: np.ndarray
    pool_names: tuple[str, ...]
    tp_choices: tuple[int, ...]
    freq_choices_mhz: tuple[float, ...]
    batch_choices: tuple[int, ...]
    model: str
    gpu: str
    control_interval_s: float
    slo_ttft_s: np.ndarray
    slo_tbt_s: np.ndarray
    row_limit_w: np.ndarray = field(default_factory=lambda: np.zeros(0))
    aisle_capacity_w: np.ndarray = field(default_factory=lambda: np.zeros(0))
    initial_pools: tuple[PoolConfig, ...] = ()
    nominal_rps: float = 1.0
    max_freq_mhz: float = 1980.0
    gpu_power_limit_w: float = 700.0
    slowdown_temp_c: float = 89.0
    vm_placements_per_interval: int = 1
    route_per_server: bool = False
    """Routing weights per SaaS server as well as per row (`ClusterAction.server_route_weight`)."""

    @property
    def saas_servers(self) -> np.ndarray:
        """Indices of the SaaS servers, in server order (the entries of `server_route_weight`)."""
        return np.flatnonzero(self.server_is_saas)

    @property
    def n_gpus(self) -> int:
        """Total GPUs in the cluster."""
        return self.n_servers * self.gpus_per_server

    @property
    def n_pools(self) -> int:
        """Number of request-length pools."""
        return len(self.pool_names)


@dataclass(frozen=True)
class Telemetry:
    """What an operator can read off the hardware at the end of an interval.

    `pending_vm_expected_gpu_w` is what an operator knows of the VM waiting for placement: the
    P95 of the per-GPU power measured earlier in the episode from running VMs of its type (its
    declared mean before any ran; 0 when none waits), never the waiting VM's own future power.
    `pending_vms_expected_gpu_w` is the same figure for each of the first
    `ClusterLayout.vm_placements_per_interval` waiting VMs in queue order (fewer when fewer wait;
    its first entry is `pending_vm_expected_gpu_w`): its length is how many VMs a controller may
    place now.
    """

    time_s: float
    gpu_power_w: np.ndarray
    gpu_temp_c: np.ndarray
    gpu_freq_mhz: np.ndarray
    gpu_thermal_throttled: np.ndarray
    gpu_power_capped: np.ndarray
    row_power_w: np.ndarray
    row_limit_w: np.ndarray
    aisle_inlet_c: np.ndarray
    aisle_heat_w: np.ndarray
    aisle_capacity_w: np.ndarray
    outside_temp_c: float
    active_faults: tuple[str, ...] = ()
    pending_vm_expected_gpu_w: float = 0.0
    legal_vm_servers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    server_power_state: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    pending_vms_expected_gpu_w: tuple[float, ...] = ()

    def server_state_counts(self) -> dict[str, int]:
        """Servers in each power state (`SERVER_POWER_STATES`); empty where the backend has none."""
        if not self.server_power_state.size:
            return {}
        n = np.bincount(self.server_power_state, minlength=len(SERVER_POWER_STATES))
        return {name: int(n[i]) for i, name in enumerate(SERVER_POWER_STATES)}


@dataclass(frozen=True)
class ServiceMetrics:
    """Service-level results of one control interval (counts are per interval).

    Energy three ways: ``gpu_energy_j`` the GPUs alone, ``energy_j`` what the backend measures
    of its servers (the simulator: whole servers, the IT energy; the real node: its GPUs), and
    ``facility_energy_j`` the facility's (IT energy x PUE; NaN where the backend has no facility
    model, as on the real node). ``carbon_g`` is operational carbon: the simulator's facility
    energy times the grid intensity of each tick; the real node's GPU energy times a constant.

    ``ttft_hist`` and ``tbt_hist`` count the interval's finished requests per latency bin
    (`envs.latency`), so that episode percentiles can be computed from intervals.

    Harm of throttling, beside the event counts (``*_events``: onsets only): ``thermal_throttled_gpu_s``
    and ``power_capped_gpu_s`` are the GPU-seconds under thermal slowdown and under row power
    capping, each split by the GPU's role, ``saas_*`` (a server that serves the LLM) and ``iaas_*``
    (a server that hosts IaaS VMs); the two parts sum to the total. ``clock_lost_mhz_s`` sums, over
    GPUs at work (holding an LLM instance or a running VM) and time, the set clock minus the clock
    the throttling or capping ceiling leaves (MHz x s; zero when nothing is throttled or capped),
    split the same way (``saas_clock_lost_mhz_s`` + ``iaas_clock_lost_mhz_s``).
    ``saas_tokens_lost`` is the throughput lost on the SaaS instances, to first order: the output
    tokens their throttled decode iterations would have added at the set clock, at the same batch
    (the decode slowdown ratio of the profile, `IntervalStats.add_tokens_lost`); an instance
    unthrottled would also have drained its queue differently, which this does not follow. For
    IaaS VMs, whose work is not modelled, ``iaas_clock_lost_mhz_s`` / the maximum clock bounds the
    GPU-seconds of work lost (a compute-bound VM slows with its clock).

    ``gpu_hours`` are the GPU-hours the service pays for: on the simulator, the GPUs of its
    powered SaaS servers (serving, idle or waking; a server that is off is released);
    ``servers_powered`` is the mean number of powered servers (SaaS and IaaS) over the interval
    (NaN where the backend does not know).

    IaaS service: ``vm_wait_s`` are the VM-seconds the interval's waiting VMs spent waiting for a
    placement, ``vm_running_s`` the VM-seconds hosted (both 0 where the backend hosts no VMs, as
    on the real node). A controller or shield that holds VMs back to keep rows cool pays here:
    the throttling it saves is judged beside the service it deferred.
    """

    interval_s: float
    arrived: int
    finished: int
    dropped: int
    in_flight: int
    tokens_generated: float
    energy_j: float
    gpu_energy_j: float
    ttft_p50_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p99_s: float
    slo_ttft_violations: int
    slo_tbt_violations: int
    slo_violations: int
    thermal_throttle_events: int
    power_throttle_events: int
    thermal_throttled_gpu_s: float
    power_capped_gpu_s: float
    saas_throttled_gpu_s: float
    iaas_throttled_gpu_s: float
    saas_capped_gpu_s: float
    iaas_capped_gpu_s: float
    clock_lost_mhz_s: float
    saas_clock_lost_mhz_s: float
    iaas_clock_lost_mhz_s: float
    saas_tokens_lost: float
    quality_loss: float
    reconfigurations: int
    arrivals_per_pool: np.ndarray
    queued_per_pool: np.ndarray
    running_per_pool: np.ndarray
    peak_row_power_w: float
    max_gpu_temp_c: float
    carbon_g: float
    gpu_hours: float
    facility_energy_j: float
    ttft_hist: np.ndarray = field(default_factory=empty_histogram)
    tbt_hist: np.ndarray = field(default_factory=empty_histogram)
    servers_powered: float = math.nan
    vm_wait_s: float = 0.0
    vm_running_s: float = 0.0

    @property
    def slo_attainment(self) -> float:
        """SLO attainment of this interval (`slo_attainment`): met / (finished + dropped).

        The requests counted are those the interval resolved: finished (within both SLOs or
        not) or dropped. An interval that resolved none reads 1.0: no request failed in it
        (its arrivals still waiting are counted when they finish, are dropped, or the episode
        ends), and the value feeds the observation and the reward, which need a finite number.
        """
        a = slo_attainment(self.finished, self.slo_violations, self.dropped)
        return 1.0 if math.isnan(a) else a

    def as_dict(self) -> dict[str, float]:
        """Scalar fields as plain floats (for `info` and reports)."""
        out = {name: float(getattr(self, name)) for name in _scalar_metric_names()}
        out["slo_attainment"] = self.slo_attainment
        return out


def slo_attainment(finished: float, violations: float, dropped: float, unserved: float = 0.0,
                   arrived: float = 0.0) -> float:
    """Fraction of the requests judged that finished within both the TTFT and the TBT SLO.

    Every request counts; a request that is not served within its SLOs is a violation,
    whatever the reason:

    * per control interval (`ServiceMetrics.slo_attainment`, the observation, the reward), a
      request is judged in the interval it leaves the system: finished (met or violated) or
      dropped (refused by admission control, or still waiting `drop_after_s` after arrival);
    * over an episode (`EpisodeResult.summary`, evaluation totals, the live loop's summary),
      the requests still in flight at its end (``unserved``) are violations too, so that the
      requests judged are every arrival (``arrived``).

    Attainment is (finished - violations) / judged, with judged = max(finished + dropped +
    unserved, arrived): the two agree when no request was in flight at the start (requests
    are conserved; the fluid model to rounding), and a span that starts with requests in
    flight (a cut warm-up) counts those too. Hence attainment <= finished / judged (the served
    fraction) always; serving nothing gives 0, not 1.

    Returns:
        The attainment in [0, 1], or NaN when no request was judged.
    """
    judged = max(finished + dropped + unserved, arrived)
    if judged <= 0:
        return math.nan
    return (finished - violations) / judged


@lru_cache(maxsize=1)
def _scalar_metric_names() -> tuple[str, ...]:
    return tuple(
        f.name for f in fields(ServiceMetrics)
        if f.name not in ("arrivals_per_pool", "queued_per_pool", "running_per_pool",
                          "ttft_hist", "tbt_hist")
    )


@dataclass(frozen=True)
class ServerPowerSpec:
    """Server power model constants (a scenario's `datacenter.server`, or the real node's).

    Attributes:
        gpus: GPUs per server.
        max_power_w: Server nameplate power (DGX H100 datasheet: 10.2 kW).
        gpu_tdp_w: GPU TDP (700 W for H100 SXM).
        overhead_idle_w: Non-GPU power at idle GPUs (DGX H100: 1,624 W, measured; see
            envs/data/server_power/README.md).
        standby_w: Power of a server that is off (BMC and PSU standby).
        wake_latency_s: Power-on to usable of a server that is off (its instances then load).
        idle_to_off_s: Idle time after which a server powers off; None: servers never power off.
        overhead_max_w: Non-GPU power with the GPUs at TDP (DGX H100: 2,780 W, measured; see
            envs/data/server_power/README.md); None: the nameplate's remainder,
            ``max_power_w - gpus * gpu_tdp_w``.
    """

    gpus: int
    max_power_w: float
    gpu_tdp_w: float
    overhead_idle_w: float
    standby_w: float = 0.0
    wake_latency_s: float = 0.0
    idle_to_off_s: float | None = None
    overhead_max_w: float | None = None

    @property
    def overhead_full_load_w(self) -> float:
        """Non-GPU power with the GPUs at TDP (`overhead_max_w`, else the nameplate's remainder)."""
        if self.overhead_max_w is not None:
            return float(self.overhead_max_w)
        return self.max_power_w - self.gpus * self.gpu_tdp_w

    def server_power_w(self, gpu_sum_w: np.ndarray | float, idle_gpu_w: float) -> np.ndarray:
        """Server power for a total GPU power (same linear overhead as the simulator's)."""
        g = np.asarray(gpu_sum_w, dtype=float)
        load = np.clip((g - self.gpus * idle_gpu_w) / (self.gpus * (self.gpu_tdp_w - idle_gpu_w)),
                       0.0, 1.0)
        return g + self.overhead_idle_w + (self.overhead_full_load_w - self.overhead_idle_w) * load


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


ArrivalOracle = Callable[[float, int, float], np.ndarray]
"""``(t0_s, horizon, interval_s) -> rates_rps``: the true arrival rate per pool (req/s) of each of
the `horizon` intervals of length `interval_s` starting at `t0_s`, shape (horizon, n_pools).
Only a simulator knows the future; it is what the hindsight oracle cheats with."""


@dataclass(frozen=True)
class BackendDescription:
    """What a controller may know about a backend before it runs (static, read once).

    The power and cooling limits (row limits, aisle cooling capacities, GPU power limit) are
    in `layout` (``row_limit_w``, ``aisle_capacity_w``, ``gpu_power_limit_w``).

    Attributes:
        layout: Static shape, limits, SLOs and choice lists of the cluster.
        server: Server power model constants.
        thermal: GPU thermal model parameters (the calibrated fit).
        pool_stats: Request-length statistics per pool (the operator's request history).
        profiles_by_tp: Performance/power profile of the served model per TP degree.
        scenario_name: Name of the scenario, or None (a live node has none).
        gpu_hour_usd: Price of one GPU-hour (USD) for cost lines; 0 when unknown.
        episode_intervals: Control intervals in an episode, or None when unknown.
        slowdown_temp_c: GPU thermal slowdown temperature (C), or None when unknown.
        arrival_oracle: True future arrival rates (see `ArrivalOracle`); None on a real node.
    """

    layout: ClusterLayout
    server: ServerPowerSpec
    thermal: ThermalParams
    pool_stats: PoolStats
    profiles_by_tp: Mapping[int, Profile]
    scenario_name: str | None = None
    gpu_hour_usd: float = 0.0
    episode_intervals: int | None = None
    slowdown_temp_c: float | None = None
    arrival_oracle: ArrivalOracle | None = None


@dataclass(frozen=True)
class TickHistory:
    """Per-tick history inside the control intervals (a simulator that records ticks).

    Attributes:
        time_s: End time of each tick (s), shape (m,).
        row_power_w: Row power at each tick (W), shape (m, rows).
        row_power_avg_w: Moving-average row power the power capping acts on (W), shape (m, rows).
        row_limit_w: Row power limit in force at each tick (W), shape (m, rows).
        aisle_inlet_c: Aisle inlet temperature at each tick (C), shape (m, aisles).
        max_gpu_temp_c: Hottest GPU at each tick (C), shape (m,).
    """

    time_s: np.ndarray
    row_power_w: np.ndarray
    row_power_avg_w: np.ndarray
    row_limit_w: np.ndarray
    aisle_inlet_c: np.ndarray
    max_gpu_temp_c: np.ndarray


@runtime_checkable
class ClusterBackend(Protocol):
    """A cluster the environment can drive, simulated or real."""

    layout: ClusterLayout

    def reset(self, seed: int | None = None) -> Telemetry:
        """Start a new episode; returns the first telemetry."""
        ...

    def apply(self, action: ClusterAction) -> None:
        """Apply a controller's decision for the next interval."""
        ...

    def advance(self) -> ServiceMetrics:
        """Run one control interval and return its service metrics."""
        ...

    def telemetry(self) -> Telemetry:
        """Read the latest hardware telemetry."""
        ...

    @property
    def done(self) -> bool:
        """True once the workload (trace) is exhausted."""
        ...

    def describe(self) -> BackendDescription:
        """What a controller may know about this backend (static description)."""
        ...

    def tick_history(self) -> TickHistory | None:
        """The current episode's per-tick history, or None when none is kept."""
        ...

    def close(self) -> None:
        """Release what the backend holds (processes, samplers, GPU settings)."""
        ...
