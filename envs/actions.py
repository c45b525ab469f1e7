"""Action spaces of the control tasks and their decoding into `ClusterAction`s.

Every task uses one flat `MultiDiscrete` space (what stable-baselines3 and sb3-contrib's
MaskablePPO support), made of blocks:

* pools (energy, combined): per request-length pool, four choices —
  share of the SaaS servers (0..K of K levels), TP degree, GPU frequency, batch cap.
* rows (thermal, combined): per row, three choices — routing weight level, SM clock ceiling,
  quantized serving on/off.
* placement (thermal, combined): one choice — a server for the waiting IaaS VM, or the last
  index for "no placement" (the only legal choice when no VM waits). Illegal servers are
  masked by `action_masks()`; a masked choice is never executed (the VM keeps waiting) and
  the step's `info["placement_masked"]` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces
from llm_cluster_gym.envs.backend import ClusterAction, ClusterLayout, PoolConfig

ROUTE_WEIGHT_LEVELS = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)
"""Routing weight of a row per level; a row at 0 gets new requests only if every row is at 0."""

_ROUTE_LEVELS = np.array(ROUTE_WEIGHT_LEVELS)

TASKS = ("energy", "thermal", "combined")


class InvalidActionError(ValueError):
    """An action outside the space, or with NaN or non-integer entries."""


@dataclass(frozen=True)
class ActionCodec:
    """Maps between the flat MultiDiscrete action and a `ClusterAction` for one task."""

    task: str
    layout: ClusterLayout
    n_saas_servers: int

    @property
    def share_levels(self) -> int:
        """Levels of the per-pool server share (K)."""
        return max(1, min(8, self.n_saas_servers))

    @property
    def has_pools(self) -> bool:
        """The task reconfigures pools (DynamoLLM knobs)."""
        return self.task in ("energy", "combined")

    @property
    def has_rows(self) -> bool:
        """The task acts on rows and places VMs (TAPAS knobs)."""
        return self.task in ("thermal", "combined")

    def nvec(self) -> np.ndarray:
        """Choices per dimension."""
        cached = self.__dict__.get("_nvec")
        if cached is not None:
            return cached
        lay = self.layout
        dims: list[int] = []
        if self.has_pools:
            for _ in range(lay.n_pools):
                dims += [self.share_levels + 1, len(lay.tp_choices), len(lay.freq_choices_mhz),
                         len(lay.batch_choices)]
        if self.has_rows:
            for _ in range(lay.n_rows):
                dims += [len(ROUTE_WEIGHT_LEVELS), len(lay.freq_choices_mhz), 2]
            dims.append(lay.n_servers + 1)
        out = np.array(dims, dtype=np.int64)
        out.flags.writeable = False
        object.__setattr__(self, "_nvec", out)
        return out

    def space(self) -> spaces.MultiDiscrete:
        """The task's action space."""
        return spaces.MultiDiscrete(self.nvec())

    def validate(self, action: np.ndarray) -> np.ndarray:
        """Check shape, finiteness and range; returns the action as int64."""
        a = np.asarray(action)
        nvec = self.nvec()
        if a.shape != nvec.shape:
            raise InvalidActionError(f"action must have shape {nvec.shape}, got {a.shape}")
        if a.dtype.kind == "f":
            if not np.isfinite(a).all():
                raise InvalidActionError(f"action contains NaN or inf: {a}")
            if not np.array_equal(a, np.round(a)):
                raise InvalidActionError(f"action must be integers, got {a}")
        elif a.dtype.kind not in "iub":
            raise InvalidActionError(f"action must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        # As unsigned, a negative entry is huge: one comparison checks both ends of the range.
        if np.count_nonzero(a.view(np.uint64) >= nvec.view(np.uint64)):
            i = int(np.flatnonzero((a < 0) | (a >= nvec))[0])
            raise InvalidActionError(
                f"action[{i}] = {a[i]} is outside [0, {nvec[i] - 1}] (space nvec={nvec.tolist()})"
            )
        return a

    def decode(self, action: np.ndarray, legal_servers: np.ndarray) -> tuple[ClusterAction, bool]:
        """Turn an action into a ClusterAction; the flag is True if a masked placement was dropped."""
        a = self.validate(action)
        lay = self.layout
        pools = None
        i = 0
        if self.has_pools:
            i = 4 * lay.n_pools
            pools = self._pools(a[:i].tobytes(), a[:i])
        if not self.has_rows:
            return ClusterAction(pools=pools), False
        block = a[i: i + 3 * lay.n_rows]
        cap, quant, weight = self._rows(block.tobytes(), block)
        place = int(a[-1])
        vm_server = None
        masked = False
        if place < lay.n_servers:
            if legal_servers[place]:
                vm_server = place
            else:
                masked = True
        elif np.count_nonzero(legal_servers):
            masked = True
        return ClusterAction(pools=pools, row_freq_cap_mhz=cap, row_quantized=quant,
                             row_route_weight=weight, vm_server=vm_server), masked

    def _memoized(self, cache_name: str, key: bytes, build: Callable[[], Any]) -> Any:
        """``build()`` cached under ``key`` (policies repeat their choices; bounded size)."""
        cache = self.__dict__.setdefault(cache_name, {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 4096:
                cache.clear()
            cache[key] = hit = build()
        return hit

    def _rows(self, key: bytes, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clock ceilings, quantized flags and routing weights of a row block (memoized, read-only)."""
        return self._memoized("_row_cache", key, lambda: self._decode_rows(flat))

    def _decode_rows(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lay = self.layout
        rows = flat.reshape(lay.n_rows, 3)
        weight = _ROUTE_LEVELS[rows[:, 0]]
        if not weight.any():
            weight = np.ones(lay.n_rows)
        cap = np.asarray(lay.freq_choices_mhz, dtype=float)[rows[:, 1]]
        quant = rows[:, 2].astype(bool)
        for arr in (cap, quant, weight):
            arr.flags.writeable = False  # shared by every action with this block
        return cap, quant, weight

    def _pools(self, key: bytes, flat: np.ndarray) -> tuple[PoolConfig, ...]:
        """Pool configurations of a pool block (memoized: policies repeat their choices)."""
        return self._memoized("_pool_cache", key, lambda: self._decode_pools(flat))

    def _decode_pools(self, flat: np.ndarray) -> tuple[PoolConfig, ...]:
        lay = self.layout
        block = flat.reshape(lay.n_pools, 4)
        servers = self._servers_per_pool(block[:, 0])
        cfgs = []
        for p in range(lay.n_pools):
            tp = lay.tp_choices[block[p, 1]]
            cfgs.append(PoolConfig(
                n_instances=int(servers[p]) * (lay.gpus_per_server // tp),
                tp=tp,
                freq_mhz=float(lay.freq_choices_mhz[block[p, 2]]),
                max_batch=int(lay.batch_choices[block[p, 3]]),
            ))
        return tuple(cfgs)

    def _servers_per_pool(self, levels: np.ndarray) -> np.ndarray:
        """Server counts per pool from share levels, scaled down to fit the SaaS servers."""
        k = self.share_levels
        want = levels / k * self.n_saas_servers
        total = want.sum()
        if total > self.n_saas_servers:
            want = want * self.n_saas_servers / total
        servers = np.floor(want + 1e-9).astype(np.int64)
        spare = self.n_saas_servers - int(servers.sum())
        frac = want - servers
        for j in np.argsort(-frac, kind="stable"):
            if spare <= 0 or frac[j] <= 1e-9:
                break
            servers[j] += 1
            spare -= 1
        return servers

    def masks(self, legal_servers: np.ndarray) -> np.ndarray:
        """Flat boolean mask over all dimensions' choices (sb3-contrib MultiDiscrete format)."""
        all_legal = self.__dict__.get("_all_legal")
        if all_legal is None:
            all_legal = np.ones(int(self.nvec().sum()), dtype=bool)
            object.__setattr__(self, "_all_legal", all_legal)
        mask = all_legal.copy()
        if self.has_rows:
            n = self.layout.n_servers
            mask[-n - 1: -1] = legal_servers
            mask[-1] = not np.count_nonzero(legal_servers)
        return mask

    def encode(self, pools: tuple[PoolConfig, ...]) -> np.ndarray:
        """The pool block that best represents a configuration (for observations/baselines)."""
        lay = self.layout
        out = []
        for p in pools:
            servers = p.n_instances * p.tp / lay.gpus_per_server
            level = int(round(servers / self.n_saas_servers * self.share_levels))
            out += [
                min(max(level, 0), self.share_levels),
                lay.tp_choices.index(p.tp) if p.tp in lay.tp_choices else 0,
                int(np.argmin(np.abs(np.array(lay.freq_choices_mhz) - p.freq_mhz))),
                int(np.argmin(np.abs(np.array(lay.batch_choices) - p.max_batch))),
            ]
        return np.array(out, dtype=np.int64)
