"""Power governor: holds measured row power under its limit by admission control.

The shield (``controllers/shield.py``) keeps a policy's *configuration* safe: it clamps clock
ceilings and batch caps to what its power prediction allows. On a node where clocks must not be
touched (the shared H100 machines: the actuators stay disabled) and where even one decoding
sequence draws more than a lowered budget (single-stream decode on the H100 worker: ~361 W,
idle ~124 W; ``envs/data/real/README.md``), configuration alone cannot meet the budget: the
only lever left is how much work is admitted. The governor closes that loop on the *measured*
power, AIMD-style (as TCP congestion control): multiplicative decrease of the admitted
fraction when the hottest row's smoothed power (an exponential average, so one prefill burst
does not shed load) is above ``margin`` of its limit, a full stop as soon as one reading is
above the limit itself, additive increase when below. It runs after the policy and the shield
in the live loop, on the same telemetry snapshot, and only ever lowers admission below what
the policy would do (the env's action space has no admission knob).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.backend import Telemetry


class GovernorError(ValueError):
    """Bad governor parameter (the message names the field and value)."""


@dataclass(frozen=True)
class GovernorDecision:
    """What the governor decided for the next interval.

    Attributes:
        admit_fraction: Fraction of arriving requests to admit.
        power_ratio: Hottest row's measured power over its limit in force.
        reason: ``over_limit`` (admission stopped), ``near_limit`` (decreased), ``recover``
            (increased), ``hold`` (unchanged: telemetry stale or already fully open).
    """

    admit_fraction: float
    power_ratio: float
    reason: str


class PowerGovernor:
    """AIMD admission control on measured row power.

    Args:
        margin: Target fraction of the row limit (below it admission grows).
        decrease: Multiplier on the admitted fraction while above the target.
        increase: Added to the admitted fraction per interval while below the target.
        floor: Smallest admitted fraction short of a full stop (keeps some service alive
            while between the target and the limit).
        smoothing: Weight of the newest reading in the smoothed power ratio (1: none).
    """

    def __init__(self, margin: float = 0.95, decrease: float = 0.5, increase: float = 0.1,
                 floor: float = 0.05, smoothing: float = 0.5) -> None:
        for name, v, lo, hi in (("margin", margin, 0.0, 1.0), ("decrease", decrease, 0.0, 1.0),
                                ("increase", increase, 0.0, 1.0), ("floor", floor, 0.0, 1.0),
                                ("smoothing", smoothing, 0.0, 1.0)):
            if not (isinstance(v, (int, float)) and lo < v <= hi):
                raise GovernorError(f"PowerGovernor: field '{name}' must be in ({lo}, {hi}], "
                                    f"got {v!r}")
        self.margin, self.decrease, self.increase, self.floor = margin, decrease, increase, floor
        self.smoothing = smoothing
        self.reset()

    def reset(self) -> None:
        """Admit everything again and forget the smoothed power."""
        self.admit_fraction = 1.0
        self.smoothed_ratio: float | None = None

    def decide(self, tel: Telemetry, stale: bool = False) -> GovernorDecision:
        """Admission for the next interval from the latest telemetry.

        Args:
            tel: Latest telemetry (row power and the row limits in force).
            stale: The telemetry could not be refreshed: never open admission further.
        """
        limit = np.asarray(tel.row_limit_w, dtype=float)
        power = np.asarray(tel.row_power_w, dtype=float)
        ok = limit > 0
        ratio = float(np.max(power[ok] / limit[ok])) if ok.any() else 0.0
        prev = self.smoothed_ratio
        smooth = ratio if prev is None else self.smoothing * ratio + (1 - self.smoothing) * prev
        self.smoothed_ratio = smooth
        a = self.admit_fraction
        if ratio > 1.0:
            a, reason = 0.0, "over_limit"
        elif smooth > self.margin:
            a, reason = (a * self.decrease if a > self.floor else a), "near_limit"
            a = max(a, self.floor) if a > 0 else a
        elif stale or a >= 1.0:
            reason = "hold"
        else:
            a, reason = min(1.0, a + self.increase), "recover"
        self.admit_fraction = float(a)
        return GovernorDecision(self.admit_fraction, ratio, reason)
