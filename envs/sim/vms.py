"""Opaque IaaS GPU VMs: whole servers whose GPUs draw power the operator cannot reconfigure.

VMs arrive as a Poisson process (drawn for the whole episode at reset), wait for a placement
decision, run for an exponential lifetime and leave. Their power level is drawn from the
scenario's list (W per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llm_cluster_gym.envs.sim.scenario import VmSpec


@dataclass
class VmPool:
    """VM occupancy of the IaaS servers and the queue of VMs waiting for placement."""

    spec: VmSpec
    host_servers: np.ndarray
    n_servers: int
    gpu_power_w: np.ndarray = field(init=False)
    leave_at_s: np.ndarray = field(init=False)
    pending_power_w: list[float] = field(default_factory=list)
    pending_since_s: list[float] = field(default_factory=list)
    placed: int = 0

    def __post_init__(self) -> None:
        self.gpu_power_w = np.zeros(self.n_servers)
        self.leave_at_s = np.full(self.n_servers, np.inf)
        self._next_leave_s = np.inf  # earliest of leave_at_s: no departure scan before then

    def reset(self, rng: np.random.Generator, duration_s: float) -> None:
        """Start an episode: initial VMs, and every VM arrival drawn up front.

        Drawing arrival times, power levels and lifetimes at reset keeps the VM history
        independent of the simulator's tick length (request-level vs aggregate).
        """
        self.gpu_power_w[:] = 0.0
        self.leave_at_s[:] = np.inf
        self.pending_power_w.clear()
        self.pending_since_s.clear()
        self.pending_lifetime_s: list[float] = []
        self.placed = 0
        n0 = int(round(len(self.host_servers) * self.spec.initial_fraction))
        if n0:
            hosts = rng.choice(self.host_servers, size=n0, replace=False)
            self.gpu_power_w[hosts] = rng.choice(self.spec.gpu_power_w, size=n0)
            self.leave_at_s[hosts] = rng.exponential(self.spec.lifetime_s, size=n0)
        rate_per_s = self.spec.arrivals_per_hour / 3600.0
        n = rng.poisson(rate_per_s * duration_s) if rate_per_s > 0 else 0
        self._arrival_s = np.sort(rng.uniform(0.0, duration_s, size=n))
        self._arrival_power_w = rng.choice(self.spec.gpu_power_w, size=n) if n else np.zeros(0)
        self._arrival_lifetime_s = rng.exponential(self.spec.lifetime_s, size=n)
        self._next = 0
        self._next_leave_s = float(self.leave_at_s.min(initial=np.inf))

    def occupied(self) -> np.ndarray:
        """Servers currently hosting a VM."""
        return self.gpu_power_w > 0

    def legal_servers(self) -> np.ndarray:
        """Servers where the pending VM may be placed (free IaaS hosts)."""
        legal = np.zeros(self.n_servers, dtype=bool)
        legal[self.host_servers] = True
        return legal & ~self.occupied()

    def advance(self, t0_s: float, dt_s: float) -> None:
        """Departures and arrivals during [t0, t0 + dt)."""
        t1_s = t0_s + dt_s
        if self._next_leave_s <= t1_s:
            gone = self.leave_at_s <= t1_s
            self.gpu_power_w[gone] = 0.0
            self.leave_at_s[gone] = np.inf
            self._next_leave_s = float(self.leave_at_s.min(initial=np.inf))
        end = int(self._arrival_s.searchsorted(t1_s, side="left"))
        for i in range(self._next, end):
            self.pending_power_w.append(float(self._arrival_power_w[i]))
            self.pending_since_s.append(float(self._arrival_s[i]))
            self.pending_lifetime_s.append(float(self._arrival_lifetime_s[i]))
        self._next = end

    @property
    def pending(self) -> bool:
        """A VM is waiting for placement."""
        return bool(self.pending_power_w)

    def place(self, server: int, now_s: float) -> None:
        """Place the head-of-queue VM on `server` (must be legal)."""
        if not self.pending:
            return
        if not (0 <= server < self.n_servers) or not self.legal_servers()[server]:
            raise ValueError(f"VM placement on server {server} is not legal (occupied or SaaS)")
        self.gpu_power_w[server] = self.pending_power_w.pop(0)
        self.pending_since_s.pop(0)
        self.leave_at_s[server] = now_s + self.pending_lifetime_s.pop(0)
        self._next_leave_s = min(self._next_leave_s, float(self.leave_at_s[server]))
        self.placed += 1

    def first_fit(self) -> int | None:
        """Lowest-numbered legal server (the thermal/power-unaware baseline)."""
        legal = np.flatnonzero(self.legal_servers())
        return int(legal[0]) if len(legal) else None
