"""Opaque IaaS GPU VMs: whole servers whose GPUs draw power the operator cannot reconfigure.

VMs arrive as a Poisson process (drawn for the whole episode at reset), wait for a placement
decision, run for an exponential lifetime and leave. Each VM is of a type (`vms.types`, or one
constant-power type per level of the legacy `vms.gpu_power_w`); a type's VMs draw a per-GPU power
that may follow a daily cosine and carry their own Ornstein-Uhlenbeck noise (`VmTypes`).

A placer never sees the waiting VM's own power: `VmPool.expected_gpu_w` is the P95 of what the
pool measured of that type's running VMs earlier in the episode (`PowerHistory`), or the type's
declared mean before any VM of it has run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llm_cluster_gym.envs.sim.scenario import VmSpec

EXPECTED_POWER_PERCENTILE = 95.0
"""Percentile of a type's past per-GPU power a placer is shown for a waiting VM of that type."""

HISTORY_SAMPLES_PER_TYPE = 4096
"""Reservoir size per VM type: the history keeps a uniform sample of every reading, in bounded memory."""

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class VmTypes:
    """Every VM type's parameters as arrays indexed by type (what the per-tick update reads)."""

    names: tuple[str, ...]
    share: np.ndarray | None  # None: equal shares drawn as the legacy levels were
    mean_w: np.ndarray
    lifetime_s: np.ndarray
    amplitude: np.ndarray
    peak_hour: np.ndarray
    noise_sd_w: np.ndarray
    noise_tau_s: np.ndarray  # inf where a type has no noise

    @classmethod
    def from_spec(cls, spec: VmSpec) -> VmTypes:
        """The scenario's types; with `spec.types` empty, one constant type per `gpu_power_w` level."""
        if not spec.types:
            levels = np.asarray(spec.gpu_power_w, dtype=float)
            n = len(levels)
            zeros = np.zeros(n)
            return cls(names=tuple(f"level{i}_{w:g}W" for i, w in enumerate(levels)), share=None,
                       mean_w=levels, lifetime_s=np.full(n, spec.lifetime_s), amplitude=zeros,
                       peak_hour=zeros, noise_sd_w=zeros, noise_tau_s=np.full(n, np.inf))
        t = spec.types
        return cls(
            names=tuple(x.name for x in t),
            share=np.array([x.share for x in t]) / sum(x.share for x in t),
            mean_w=np.array([x.mean_gpu_w for x in t]),
            lifetime_s=np.array([x.lifetime_s for x in t]),
            amplitude=np.array([x.diurnal_amplitude for x in t]),
            peak_hour=np.array([x.diurnal_peak_hour for x in t]),
            noise_sd_w=np.array([x.noise_sd_w for x in t]),
            noise_tau_s=np.array([np.inf if x.noise_tau_s is None else x.noise_tau_s for x in t]))

    @property
    def n(self) -> int:
        """Number of types."""
        return len(self.names)

    @property
    def varies(self) -> np.ndarray:
        """Per type: its power moves over a VM's lifetime (a daily swing or noise)."""
        return (self.amplitude > 0) | (self.noise_sd_w > 0)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Types of `n` VMs (legacy levels: the same draws `rng.choice(levels, n)` made)."""
        return rng.choice(self.n, size=n, p=self.share)

    def mean_at_w(self, kind: np.ndarray, clock_s: float) -> np.ndarray:
        """Per-GPU mean power of VMs of types `kind` at `clock_s` seconds after day 0's midnight."""
        hour = clock_s / 3600.0
        swing = self.amplitude[kind] * np.cos(2 * np.pi * (hour - self.peak_hour[kind]) / 24.0)
        return self.mean_w[kind] * (1.0 + swing)


class PowerHistory:
    """Per type, a uniform sample (reservoir) of the per-GPU power readings of its running VMs.

    Bounded memory (`HISTORY_SAMPLES_PER_TYPE` per type) whatever the episode's length; the
    reservoir draws come from a generator of their own so keeping history never shifts another
    random stream. Percentiles are cached until the type's next reading.
    """

    def __init__(self, n_types: int, rng: np.random.Generator, size: int = HISTORY_SAMPLES_PER_TYPE) -> None:
        self.size = size
        self.samples = np.zeros((n_types, size))
        self.seen = np.zeros(n_types, dtype=np.int64)
        self._rng = rng
        self._cache: dict[int, float] = {}

    def add(self, kind: int, values_w: np.ndarray) -> None:
        """Record readings of type `kind` (Vitter's algorithm R, vectorised over the batch)."""
        k = len(values_w)
        if not k:
            return
        self._cache.pop(kind, None)
        seen, row = int(self.seen[kind]), self.samples[kind]
        fill = min(max(self.size - seen, 0), k)
        row[seen:seen + fill] = values_w[:fill]
        if fill < k:  # reading number m (1-based) replaces a random slot with probability size / m
            m = seen + np.arange(fill, k) + 1
            slot = self._rng.integers(0, m)
            keep = slot < self.size
            row[slot[keep]] = values_w[fill:][keep]
        self.seen[kind] = seen + k

    def percentile_w(self, kind: int, q: float) -> float | None:
        """The q-th percentile of type `kind`'s readings so far, or None before any."""
        n = int(min(self.seen[kind], self.size))
        if n == 0:
            return None
        if kind not in self._cache:
            self._cache[kind] = float(np.percentile(self.samples[kind, :n], q))
        return self._cache[kind]


@dataclass
class VmPool:
    """VM occupancy of the IaaS servers, each VM's power, and the queue of VMs waiting for placement.

    Args:
        spec: The scenario's `vms` section.
        host_servers: Servers that may host VMs.
        n_servers: Servers in the datacenter.
        gpu_idle_w: The GPU profile's idle power (a VM draws at least this).
        gpu_limit_w: The GPU power limit (a VM draws at most this).
        clock_offset_s: Episode time 0 on the daily clock (`workload.start_s`; 0 = midnight).
    """

    spec: VmSpec
    host_servers: np.ndarray
    n_servers: int
    gpu_idle_w: float = 0.0
    gpu_limit_w: float = np.inf
    clock_offset_s: float = 0.0
    gpu_power_w: np.ndarray = field(init=False)
    leave_at_s: np.ndarray = field(init=False)
    pending_kind: list[int] = field(default_factory=list)
    pending_since_s: list[float] = field(default_factory=list)
    placed: int = 0

    def __post_init__(self) -> None:
        self.types = VmTypes.from_spec(self.spec)
        self._varies = self.types.varies
        self._dynamic = bool(self._varies.any())
        self.gpu_power_w = np.zeros(self.n_servers)
        self.kind = np.full(self.n_servers, -1, dtype=np.int64)
        self.noise_w = np.zeros(self.n_servers)
        self.leave_at_s = np.full(self.n_servers, np.inf)
        self._next_leave_s = np.inf  # earliest of leave_at_s: no departure scan before then

    def reset(self, rng: np.random.Generator, duration_s: float) -> None:
        """Start an episode: initial VMs, and every VM arrival drawn up front.

        Drawing arrival times, types and lifetimes at reset keeps the VM history independent of
        the simulator's tick length (request-level vs aggregate). The power noise and the history's
        reservoir use generators spawned from `rng` (spawning draws nothing from it), so turning
        noise on leaves every other draw where it was.
        """
        noise_seed, history_seed = rng.spawn(2)
        self._noise_rng = noise_seed
        self.history = PowerHistory(self.types.n, history_seed)
        self.gpu_power_w[:] = 0.0
        self.kind[:] = -1
        self.noise_w[:] = 0.0
        self.leave_at_s[:] = np.inf
        self.pending_kind.clear()
        self.pending_since_s.clear()
        self.pending_lifetime_s: list[float] = []
        self.placed = 0
        n0 = int(round(len(self.host_servers) * self.spec.initial_fraction))
        if n0:
            hosts = rng.choice(self.host_servers, size=n0, replace=False)
            kinds = self.types.draw(rng, n0)
            self.leave_at_s[hosts] = rng.exponential(self.types.lifetime_s[kinds])
            self._start(hosts, kinds, 0.0)
        rate_per_s = self.spec.arrivals_per_hour / 3600.0
        n = rng.poisson(rate_per_s * duration_s) if rate_per_s > 0 else 0
        self._arrival_s = np.sort(rng.uniform(0.0, duration_s, size=n))
        self._arrival_kind = self.types.draw(rng, n) if n else np.zeros(0, dtype=np.int64)
        self._arrival_lifetime_s = rng.exponential(self.types.lifetime_s[self._arrival_kind])
        self._next = 0
        self._next_leave_s = float(self.leave_at_s.min(initial=np.inf))

    def _start(self, servers: np.ndarray, kinds: np.ndarray, now_s: float) -> None:
        """VMs of types `kinds` start on `servers`: their noise from its stationary law, their power now."""
        self.kind[servers] = kinds
        if self._dynamic:
            self.noise_w[servers] = self.types.noise_sd_w[kinds] * self._noise_rng.standard_normal(len(kinds))
        self._set_power(servers, now_s)

    def _set_power(self, servers: np.ndarray, clock_s: float) -> None:
        """Per-GPU power of the VMs on `servers` at episode time `clock_s`, clipped to the GPU's range."""
        kinds = self.kind[servers]
        if not self._dynamic:  # constant types: the declared level itself
            self.gpu_power_w[servers] = self.types.mean_w[kinds]
            return
        mean = self.types.mean_at_w(kinds, self.clock_offset_s + clock_s)
        self.gpu_power_w[servers] = np.clip(mean + self.noise_w[servers], self.gpu_idle_w, self.gpu_limit_w)

    def occupied(self) -> np.ndarray:
        """Servers currently hosting a VM."""
        return self.kind >= 0

    def legal_servers(self) -> np.ndarray:
        """Servers where the pending VM may be placed (free IaaS hosts)."""
        legal = np.zeros(self.n_servers, dtype=bool)
        legal[self.host_servers] = True
        return legal & ~self.occupied()

    def advance(self, t0_s: float, dt_s: float) -> None:
        """Departures and arrivals during [t0, t0 + dt), then the running VMs' power for that tick.

        The noise steps exactly by `dt_s` (x <- a x + sd sqrt(1 - a^2) z, a = exp(-dt / tau)), and
        the daily swing is read at the tick's middle: the tick's power, piecewise constant.
        """
        t1_s = t0_s + dt_s
        if self._next_leave_s <= t1_s:
            gone = self.leave_at_s <= t1_s
            self.gpu_power_w[gone] = 0.0
            self.kind[gone] = -1
            self.noise_w[gone] = 0.0
            self.leave_at_s[gone] = np.inf
            self._next_leave_s = float(self.leave_at_s.min(initial=np.inf))
        end = int(self._arrival_s.searchsorted(t1_s, side="left"))
        for i in range(self._next, end):
            self.pending_kind.append(int(self._arrival_kind[i]))
            self.pending_since_s.append(float(self._arrival_s[i]))
            self.pending_lifetime_s.append(float(self._arrival_lifetime_s[i]))
        self._next = end
        if self._dynamic:
            self._step_power(t0_s, dt_s)

    def _step_power(self, t0_s: float, dt_s: float) -> None:
        running = np.flatnonzero(self.kind >= 0)
        if not len(running):
            return
        kinds = self.kind[running]
        tau = self.types.noise_tau_s[kinds]  # inf for a type without noise: a = 1, nothing added
        a = np.exp(-dt_s / tau)
        kick = self.types.noise_sd_w[kinds] * np.sqrt(-np.expm1(-2.0 * dt_s / tau))  # sd sqrt(1 - a^2)
        z = self._noise_rng.standard_normal(len(running))
        self.noise_w[running] = a * self.noise_w[running] + kick * z
        self._set_power(running, t0_s + 0.5 * dt_s)

    def observe(self) -> None:
        """Record each running VM's per-GPU power now into its type's history (once per interval).

        Constant types are not recorded: every reading would be the declared level, whose
        percentile is the level itself.
        """
        if not self._dynamic:
            return
        running = np.flatnonzero(self.kind >= 0)
        kinds = self.kind[running]
        for k in np.unique(kinds):
            if self._varies[k]:
                self.history.add(int(k), self.gpu_power_w[running[kinds == k]])

    def expected_gpu_w(self, kind: int) -> float:
        """What a placer may expect of a VM of type `kind`: the P95 of its type's past readings.

        Before any VM of the type has been read, the type's declared mean (`mean_gpu_w`, or the
        legacy constant level). Never the waiting VM's own power: its readings do not exist yet.
        """
        past = self.history.percentile_w(kind, EXPECTED_POWER_PERCENTILE) if self._varies[kind] else None
        return float(self.types.mean_w[kind]) if past is None else past

    def drawn_arrivals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This episode's VM arrivals as drawn at reset: (times s, type indices, lifetimes s), copies."""
        return self._arrival_s.copy(), self._arrival_kind.copy(), self._arrival_lifetime_s.copy()

    @property
    def pending(self) -> bool:
        """A VM is waiting for placement."""
        return bool(self.pending_kind)

    @property
    def pending_expected_gpu_w(self) -> float:
        """`expected_gpu_w` of the head-of-queue VM's type (0 when none waits)."""
        return self.expected_gpu_w(self.pending_kind[0]) if self.pending_kind else 0.0

    def pending_expected_queue_gpu_w(self, k: int) -> tuple[float, ...]:
        """`expected_gpu_w` of each of the first `k` waiting VMs, queue order (fewer when fewer wait)."""
        return tuple(self.expected_gpu_w(kind) for kind in self.pending_kind[:k])

    @property
    def n_pending(self) -> int:
        """VMs waiting for placement."""
        return len(self.pending_kind)

    @property
    def n_running(self) -> int:
        """VMs hosted on a server now."""
        return int(np.count_nonzero(self.kind >= 0))

    def place(self, server: int, now_s: float, queue_index: int = 0) -> None:
        """Place the waiting VM at `queue_index` (0: the head of the queue) on `server` (must be legal).

        Nothing happens when fewer than ``queue_index + 1`` VMs wait.
        """
        if queue_index >= len(self.pending_kind):
            return
        if not (0 <= server < self.n_servers) or not self.legal_servers()[server]:
            raise ValueError(f"VM placement on server {server} is not legal (occupied or SaaS)")
        kind = self.pending_kind.pop(queue_index)
        self.pending_since_s.pop(queue_index)
        self.leave_at_s[server] = now_s + self.pending_lifetime_s.pop(queue_index)
        self._start(np.array([server]), np.array([kind]), now_s)
        self._next_leave_s = min(self._next_leave_s, float(self.leave_at_s[server]))
        self.placed += 1

    def first_fit(self) -> int | None:
        """Lowest-numbered legal server (the thermal/power-unaware baseline)."""
        legal = np.flatnonzero(self.legal_servers())
        return int(legal[0]) if len(legal) else None
