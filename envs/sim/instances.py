"""The SaaS instance table: which GPUs form which LLM instance, and how each is configured.

Instances live in fixed slots, one per SaaS GPU; an instance of TP degree t occupies t adjacent
slots of one server and is represented by its first slot. Reconfiguring rebuilds the layout from
per-pool configurations and keeps every instance whose GPUs, TP and model variant are unchanged;
the others pay the model-load downtime from the profile tables.

Placement packs: the pools are laid out one after the other from the first SaaS server, each on
as few servers as its instances need, so a smaller configuration empties whole servers at the
end of the list (they can power off) and a larger one fills them again in the order they were
emptied: the servers it takes first are those that stopped serving last, the ones most likely
still powered. An instance placed on a server that is booting loads its model once the server is
up (`defer_start`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from llm_cluster_gym.envs.backend import PoolConfig


def packed_first_slots(pools: Sequence[PoolConfig], gpus_per_server: int,
                       n_servers: int) -> list[np.ndarray]:
    """First slot of every instance of each pool, packed onto as few servers as possible.

    A cursor walks the servers in order: each pool's instances follow the previous pool's on
    the same server while a whole instance (``tp`` GPUs) still fits there, then fill the next
    servers. Instances that do not fit in the table are left out (counts are clipped). A pool
    whose instances fill whole servers from a server boundary lands exactly where the
    server-per-pool layout put it. The arrays are read-only (memoized by instance counts and TP
    degrees: controllers and training revisit the same layouts).
    """
    key = tuple((int(cfg.tp), max(int(cfg.n_instances), 0)) for cfg in pools)
    return list(_packed(key, gpus_per_server, n_servers))


@lru_cache(maxsize=4096)
def _packed(pools: tuple[tuple[int, int], ...], gpus_per_server: int,
            n_servers: int) -> tuple[np.ndarray, ...]:
    """`packed_first_slots` of (tp, instances) per pool."""
    g = gpus_per_server
    server, offset = 0, 0
    out = []
    for tp, n in pools:
        per_server = g // tp
        if n and offset + tp > g:  # no room left for one instance here: next server
            server, offset = server + 1, 0
        here = min(n, (g - offset) // tp) if n else 0
        first = [server * g + offset + np.arange(here) * tp]
        offset += here * tp
        rest = n - here
        if rest:
            server, offset = server + 1, 0
            i = np.arange(rest)
            first.append((server + i // per_server) * g + (i % per_server) * tp)
            server += rest // per_server
            offset = (rest % per_server) * tp
        if offset >= g:
            server, offset = server + 1, 0
        slots = np.concatenate(first).astype(np.int64)
        slots = slots[slots // g < n_servers]
        slots.flags.writeable = False
        out.append(slots)
    return tuple(out)


@lru_cache(maxsize=4096)
def pool_layout(pools: tuple[tuple[int, int, bool], ...], gpus_per_server: int, n_servers: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per slot of a table: first slot of an instance?, its pool, TP degree and quantized flag.

    For pools given as (tp, instances, quantized) on `n_servers` servers, packed as
    `packed_first_slots` packs them. Read-only arrays, memoized.
    """
    n_slots = n_servers * gpus_per_server
    active = np.zeros(n_slots, dtype=bool)
    pool = np.full(n_slots, -1, dtype=np.int64)
    tp = np.ones(n_slots, dtype=np.int64)
    quant = np.zeros(n_slots, dtype=bool)
    packed = _packed(tuple((t, n) for t, n, _ in pools), gpus_per_server, n_servers)
    for p, ((t, _, q), first) in enumerate(zip(pools, packed, strict=True)):
        active[first] = True
        pool[first] = p
        tp[first] = t
        quant[first] = q
    for arr in (active, pool, tp, quant):
        arr.flags.writeable = False
    return active, pool, tp, quant


def replace_instances(old_active: np.ndarray, old_tp: np.ndarray, old_quantized: np.ndarray,
                      old_ready_at_s: np.ndarray, new_active: np.ndarray, new_tp: np.ndarray,
                      new_quantized: np.ndarray, now_s: float, load_time_s: Mapping[int, float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Which instances a new layout stops, and when each of its instances is ready.

    An instance is kept where the same slot starts one of the same TP degree and variant; a kept
    one keeps its ready time, a started one is ready after its model-load time. Any shape (one
    table, or copies of it row by row).

    Returns:
        (first slots whose instance stopped, ready time of every slot).
    """
    kept = new_active & old_active & (new_tp == old_tp) & (new_quantized == old_quantized)
    stopped = old_active & ~kept
    started = new_active & ~kept
    ready = np.where(kept, old_ready_at_s, 0.0)
    for tp in np.unique(new_tp[started]):
        sel = started & (new_tp == tp)
        ready[sel] = now_s + load_time_s.get(int(tp), 0.0)
    return stopped, ready


@dataclass
class InstanceTable:
    """Per-slot instance state (arrays of length `n_slots`, valid where `active`)."""

    n_slots: int
    gpus_per_server: int
    slot_gpu: np.ndarray
    active: np.ndarray
    pool: np.ndarray
    tp: np.ndarray
    freq_mhz: np.ndarray
    max_batch: np.ndarray
    quantized: np.ndarray
    ready_at_s: np.ndarray

    @classmethod
    def empty(cls, saas_servers: np.ndarray, gpus_per_server: int) -> InstanceTable:
        """A table with no instances over the given SaaS servers."""
        n = len(saas_servers) * gpus_per_server
        slot_gpu = (saas_servers[:, None] * gpus_per_server + np.arange(gpus_per_server)).ravel()
        return cls(
            n_slots=n,
            gpus_per_server=gpus_per_server,
            slot_gpu=slot_gpu,
            active=np.zeros(n, dtype=bool),
            pool=np.full(n, -1, dtype=np.int64),
            tp=np.ones(n, dtype=np.int64),
            freq_mhz=np.zeros(n),
            max_batch=np.zeros(n, dtype=np.int64),
            quantized=np.zeros(n, dtype=bool),
            ready_at_s=np.zeros(n),
        )

    def slot_owner(self) -> np.ndarray:
        """For every slot (GPU), the first slot of the instance that owns it, or -1."""
        owner = np.full(self.n_slots, -1, dtype=np.int64)
        first = np.flatnonzero(self.active)
        if len(first):
            tps = self.tp[first]
            owner_idx = np.repeat(first, tps)
            offsets = np.arange(len(owner_idx)) - np.repeat(np.cumsum(tps) - tps, tps)
            owner[owner_idx + offsets] = owner_idx
        return owner

    def reconfigure(
        self, pools: Sequence[PoolConfig], now_s: float, load_time_s: Mapping[int, float]
    ) -> np.ndarray:
        """Lay the pools out again; returns a bool mask of slots whose instance was replaced.

        Args:
            pools: Wanted configuration per pool (instance counts are clipped to what fits).
            now_s: Current simulated time.
            load_time_s: Model-load downtime of a new instance, by TP degree.

        Returns:
            Mask of first slots whose previous instance stopped (its requests must be requeued).
        """
        key = tuple((int(c.tp), max(int(c.n_instances), 0), bool(c.quantized)) for c in pools)
        new_active, new_pool, new_tp, new_quant = pool_layout(key, self.gpus_per_server,
                                                              self.n_slots // self.gpus_per_server)
        of_pool = np.maximum(new_pool, 0)
        new_freq = np.where(new_active, np.array([c.freq_mhz for c in pools], dtype=float)[of_pool],
                            0.0)
        new_batch = np.where(new_active,
                             np.array([c.max_batch for c in pools], dtype=np.int64)[of_pool], 0)
        stopped, ready = replace_instances(self.active, self.tp, self.quantized, self.ready_at_s,
                                           new_active, new_tp, new_quant, now_s, load_time_s)
        self.active, self.pool = new_active.copy(), new_pool.copy()
        self.tp, self.quantized = new_tp.copy(), new_quant.copy()
        self.freq_mhz, self.max_batch = new_freq, new_batch
        self.ready_at_s = ready
        return stopped

    def occupied_servers(self) -> np.ndarray:
        """Per server of the table (in its SaaS-server order): some instance is on it."""
        g = self.gpus_per_server
        return np.bincount(np.flatnonzero(self.active) // g, minlength=self.n_slots // g) > 0

    def defer_start(self, server_up_at_s: np.ndarray, now_s: float,
                    load_time_s: Mapping[int, float]) -> None:
        """Instances on servers still booting load their model once the server is up.

        Args:
            server_up_at_s: Per server of the table, when it can run something (its boot end;
                ``now_s`` or earlier for a powered server).
            now_s: Current simulated time.
            load_time_s: Model-load downtime of an instance, by TP degree.
        """
        first = np.flatnonzero(self.active)
        up = server_up_at_s[first // self.gpus_per_server]
        booting = up > now_s
        if booting.any():
            sel = first[booting]
            load = np.array([load_time_s.get(int(t), 0.0) for t in self.tp[sel]])
            self.ready_at_s[sel] = np.maximum(self.ready_at_s[sel], up[booting] + load)

    def serving(self, now_s: float) -> np.ndarray:
        """Mask of first slots whose instance is up (active and not loading)."""
        return self.active & (self.ready_at_s <= now_s)
