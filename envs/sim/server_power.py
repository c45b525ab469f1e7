"""Server power states: which servers are powered, which are off, and which are booting.

Every server (SaaS or IaaS) is in one of four states (`SERVER_POWER_STATES`):

* ``serving``: it hosts an instance (serving, or loading its model) or a VM;
* ``idle``: powered, with nothing on it (GPUs idle without a CUDA context, the non-GPU parts at
  their idle power);
* ``off``: powered down after `idle_to_off_s` of idling; it draws only its standby power (BMC and
  PSU standby rails) and nothing can run on it;
* ``waking``: booting after something was placed on a server that was off; it draws its idle
  power and nothing runs on it until `wake_latency_s` has passed (then its instances load their
  model; a VM starts drawing).

With `idle_to_off_s` None no server ever powers off: servers are only serving or idle, and the
simulator's power arithmetic is the one it had before power states existed.

A server's state changes at tick starts (`ServerPowerStates.update`): a freed server turns idle,
an idle one turns off once `idle_to_off_s` has passed, an occupied server that is off starts
waking, a waking one is up once its wake latency has passed. A reconfiguration wakes the servers
its new instances need at once (`wake`), so that their instances' load starts after the boot.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.envs.backend import SERVER_POWER_STATES

OFF, WAKING, IDLE, SERVING = (SERVER_POWER_STATES.index(s) for s in ("off", "waking", "idle", "serving"))
"""State codes: indices into `SERVER_POWER_STATES`."""


class ServerPowerStates:
    """The power state of every server and the timers that move it.

    Attributes:
        state: Per-server state code (`OFF`, `WAKING`, `IDLE`, `SERVING`), int8.
        awake_at_s: When each waking server is up (meaningful while `WAKING`).
        idle_since_s: When each idle server last became idle (meaningful while `IDLE`).
        version: Bumped on every change of `state` (derived arrays are cached on it).
    """

    def __init__(self, n_servers: int, wake_latency_s: float, idle_to_off_s: float | None) -> None:
        self.n_servers = n_servers
        self.wake_latency_s = float(wake_latency_s)
        self.idle_to_off_s = None if idle_to_off_s is None else float(idle_to_off_s)
        self.state = np.full(n_servers, IDLE, dtype=np.int8)
        self.awake_at_s = np.zeros(n_servers)
        self.idle_since_s = np.zeros(n_servers)
        self.version = 0
        self._occupied = np.zeros(n_servers, dtype=bool)
        self._next_event_s = np.inf
        self._refresh()

    def reset(self, occupied: np.ndarray) -> None:
        """Start an episode in the steady state of the initial layout.

        Occupied servers serve; the others have been idle long enough to be off (idle when
        servers never power off), as in a datacenter that has been running this layout.
        """
        occupied = np.asarray(occupied, dtype=bool)
        empty = IDLE if self.idle_to_off_s is None else OFF
        self.state = np.where(occupied, SERVING, empty).astype(np.int8)
        self.awake_at_s[:] = 0.0
        self.idle_since_s[:] = 0.0
        self._occupied = occupied.copy()
        self.version += 1
        self._refresh()

    # ------------------------------------------------------------------ transitions
    def wake(self, servers: np.ndarray, now_s: float) -> None:
        """Start booting those of ``servers`` (a bool mask) that are off."""
        start = np.asarray(servers, dtype=bool) & (self.state == OFF)
        if start.any():
            self.state[start] = WAKING
            self.awake_at_s[start] = now_s + self.wake_latency_s
            self.version += 1
            self._refresh()

    def update(self, now_s: float, occupied: np.ndarray) -> None:
        """Move every server to its state at ``now_s`` given which servers hold something."""
        if now_s < self._next_event_s and np.array_equal(occupied, self._occupied):
            return  # nothing placed or freed, no timer due: every state holds
        s = self.state
        woke = (s == WAKING) & (self.awake_at_s <= now_s)
        s[woke] = IDLE
        self.idle_since_s[woke] = self.awake_at_s[woke]
        start = (s == OFF) & occupied
        s[start] = WAKING
        self.awake_at_s[start] = now_s + self.wake_latency_s
        s[(s == IDLE) & occupied] = SERVING
        freed = (s == SERVING) & ~occupied
        s[freed] = IDLE
        self.idle_since_s[freed] = now_s
        if self.idle_to_off_s is not None:
            s[(s == IDLE) & (self.idle_since_s + self.idle_to_off_s <= now_s)] = OFF
        self._occupied = np.array(occupied, dtype=bool)
        self.version += 1
        self._refresh()

    def _refresh(self) -> None:
        """Derived flags and the next time a timer moves a state."""
        s = self.state
        self.off = s == OFF
        self.waking = s == WAKING
        self.any_down = bool(np.count_nonzero(s <= WAKING))
        due = [np.inf]
        if self.waking.any():
            due.append(float(self.awake_at_s[self.waking].min()))
        idle = s == IDLE
        if self.idle_to_off_s is not None and idle.any():
            due.append(float(self.idle_since_s[idle].min()) + self.idle_to_off_s)
        self._next_event_s = min(due)

    # ------------------------------------------------------------------ queries
    def up_at_s(self, now_s: float) -> np.ndarray:
        """When each server can run something: its wake end while waking, else ``now_s``."""
        return np.where(self.waking, self.awake_at_s, now_s)

    def powered(self) -> np.ndarray:
        """Servers drawing more than standby power (serving, idle or waking)."""
        return ~self.off

    def counts(self) -> dict[str, int]:
        """Servers in each state, keyed by the names of `SERVER_POWER_STATES`."""
        n = np.bincount(self.state, minlength=len(SERVER_POWER_STATES))
        return {name: int(n[i]) for i, name in enumerate(SERVER_POWER_STATES)}
