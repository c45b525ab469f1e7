"""Faults: cooling failures, power-feed failures and load spikes, scheduled or drawn at random.

A fault is a window in time with a target domain and a magnitude: the fraction of an aisle's
cooling capacity or of a row's power limit that remains, or a multiplier on arriving load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_cluster_gym.envs.sim.scenario import FaultSpec, Scenario


@dataclass(frozen=True)
class FaultSchedule:
    """Every fault of an episode, with vectorized lookups of what is active at a time."""

    kind: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    magnitude: np.ndarray
    target: np.ndarray
    _edges: np.ndarray = field(init=False, repr=False, compare=False)
    _memo: dict[tuple, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Between consecutive start/end times the same faults are on, so lookups are memoized
        # per stretch (the simulator asks several times per tick).
        object.__setattr__(self, "_edges", np.unique(np.concatenate([self.start_s, self.end_s])))

    @classmethod
    def build(cls, scenario: Scenario, rng: np.random.Generator) -> FaultSchedule:
        """The scenario's scheduled faults plus random ones drawn from `rng`."""
        faults: list[FaultSpec] = list(scenario.faults)
        rf = scenario.random_faults
        if rf.per_hour > 0 and rf.kinds:
            n = rng.poisson(rf.per_hour * scenario.duration_s / 3600.0)
            for _ in range(n):
                kind = rf.kinds[rng.integers(len(rf.kinds))]
                domains = scenario.n_aisles if kind == "cooling_failure" else scenario.datacenter.rows
                faults.append(
                    FaultSpec(
                        kind=kind,
                        start_s=float(rng.uniform(0.0, scenario.duration_s)),
                        duration_s=rf.duration_s,
                        magnitude=rf.magnitude if kind != "load_spike" else 1.0 + rf.magnitude,
                        target=int(rng.integers(domains)),
                    )
                )
        return cls(
            kind=np.array([f.kind for f in faults], dtype=object),
            start_s=np.array([f.start_s for f in faults], dtype=float),
            end_s=np.array([f.start_s + f.duration_s for f in faults], dtype=float),
            magnitude=np.array([f.magnitude for f in faults], dtype=float),
            target=np.array([f.target for f in faults], dtype=np.int64),
        )

    def spikes(self) -> list[tuple[float, float, float]]:
        """(start_s, duration_s, multiplier) of every load spike (applied to the workload)."""
        sel = self.kind == "load_spike"
        return [
            (float(s), float(e - s), float(m))
            for s, e, m in zip(self.start_s[sel], self.end_s[sel], self.magnitude[sel], strict=True)
        ]

    def _memoized(self, what: str, t_s: float, compute: Callable[..., Any], *args: Any) -> Any:
        """`compute(t_s, *args)`, computed once per stretch of time with the same faults on."""
        key = (what, int(self._edges.searchsorted(t_s, side="right")), *args)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = compute(t_s, *args)
        return hit

    def factors(self, t_s: float, n_rows: int, n_aisles: int) -> tuple[np.ndarray, np.ndarray]:
        """Row power-limit and aisle cooling-capacity fractions in force at `t_s` (read-only)."""
        return self._memoized("factors", t_s, self._factors, n_rows, n_aisles)

    def _factors(self, t_s: float, n_rows: int, n_aisles: int) -> tuple[np.ndarray, np.ndarray]:
        row = np.ones(n_rows)
        aisle = np.ones(n_aisles)
        on = (self.start_s <= t_s) & (t_s < self.end_s)
        if on.any():
            for kind, arr in (("power_failure", row), ("cooling_failure", aisle)):
                sel = on & (self.kind == kind)
                if sel.any():
                    np.minimum.at(arr, self.target[sel], self.magnitude[sel])
        row.flags.writeable = False  # memoized: shared by every caller in the stretch
        aisle.flags.writeable = False
        return row, aisle

    def active_names(self, t_s: float) -> tuple[str, ...]:
        """Human-readable names of the faults in force at `t_s`."""
        if not len(self.kind):
            return ()
        return self._memoized("names", t_s, self._active_names)

    def _active_names(self, t_s: float) -> tuple[str, ...]:
        on = np.flatnonzero((self.start_s <= t_s) & (t_s < self.end_s))
        return tuple(f"{self.kind[i]}@{int(self.target[i])}" for i in on)

    def active_kinds(self, t_s: float) -> np.ndarray:
        """Flags (cooling_failure, power_failure, load_spike) in force at `t_s`."""
        on = (self.start_s <= t_s) & (t_s < self.end_s)
        return np.array(
            [bool((on & (self.kind == k)).any()) for k in ("cooling_failure", "power_failure",
                                                           "load_spike")]
        )
