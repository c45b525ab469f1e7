"""Action spaces of the control tasks, and the codec between their vectors and `ClusterAction`s.

Every task uses one flat `MultiDiscrete` space (what stable-baselines3 and sb3-contrib's
MaskablePPO support), made of blocks:

* pools (energy, combined): per request-length pool, four choices —
  share of the SaaS servers (0..K of K levels), TP degree, GPU frequency, batch cap.
* rows (thermal, combined): per row, three choices — routing weight level, SM clock ceiling,
  quantized serving on/off.
* servers (thermal, combined, only where the scenario sets `serving.route_per_server`): per SaaS
  server (server order), its routing weight level, which multiplies its row's (routing per SaaS
  instance; all levels 0 read as weight 1 everywhere, as for rows).
* placement (thermal, combined): P = `layout.vm_placements_per_interval` slots (1 unless the
  scenario sets `vms.placements_per_interval`), slot i for the i-th waiting VM in queue order:
  a server, or the last index for "no placement" (the only legal choice of a slot with no VM
  or no free server left for it: slot i offers the free IaaS servers only while at least i + 1
  VMs wait and i + 1 servers are free). Illegal servers are masked by `action_masks()`; a
  masked choice is never executed (the VM keeps waiting), nor is a server an earlier slot of
  the same action took (a mask cannot say that), and the step's `info["placement_masked"]`
  counts both.

Only `ActionCodec` knows this layout. Controllers think in `ClusterAction`s: they read a
vector with `decode`, build or edit the decoded action, and write it back with
`encode_action` (its exact inverse); `servers_per_pool`, `pool_configs` and `server_splits`
say which server counts a share vector really produces, so a controller can predict what
executes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

from llm_cluster_gym.envs.backend import ClusterAction, ClusterLayout, PoolConfig

ROUTE_WEIGHT_LEVELS = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)
"""Routing weight of a row per level; a row at 0 gets new requests only if every row is at 0."""

_ROUTE_LEVELS = np.array(ROUTE_WEIGHT_LEVELS)

TASKS = ("energy", "thermal", "combined")

_MATCH_TOL = 1e-9
"""Relative tolerance when a float setting (clock, routing weight) is matched to its choice."""


class InvalidActionError(ValueError):
    """An action outside the space, with NaN or non-integer entries, or not representable."""


MAX_SHARE_LEVELS = 32
"""Most levels of a pool's server share (the action's first pool dimension has K + 1 values)."""


def _decode_weights(levels: np.ndarray) -> np.ndarray:
    """Routing weights of routing levels (read-only); all levels 0 read as weight 1 everywhere."""
    weight = _ROUTE_LEVELS[levels]
    if not weight.any():
        weight = np.ones(len(levels))
    weight.flags.writeable = False
    return weight


def _share_order(levels: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Sort key of the canonical order of share vectors.

    Fewest levels in total first, then the last pool's level ascending, then the one before
    it, ... (the order in which DynamoLLM's budget DP breaks ties).
    """
    return sum(levels), levels[::-1]


@dataclass(frozen=True)
class ActionCodec:
    """Maps between the flat MultiDiscrete action and a `ClusterAction` for one task.

    `decode` reads a vector; `encode_action` writes one (``decode(encode_action(a)) == a`` for
    every action `decode` can return); `servers_per_pool`, `pool_configs`, `server_splits` and
    `pool_servers` relate share levels, server counts and instance counts exactly as `decode`
    does; `slot_legality` says which servers each placement slot may take, `masks` writes it
    into the action mask and `legal_servers`/`slot_legal_servers` read it back.
    """

    task: str
    layout: ClusterLayout
    n_saas_servers: int

    @property
    def share_levels(self) -> int:
        """Levels of the per-pool server share (K): one per server up to `MAX_SHARE_LEVELS`.

        Fine enough that a 128-server cluster moves in steps of four servers (DynamoLLM
        resizes pools instance by instance); coarse enough that the joint split search of the
        energy manager stays small (C(K + pools, pools) splits).
        """
        return max(1, min(MAX_SHARE_LEVELS, self.n_saas_servers))

    @property
    def has_pools(self) -> bool:
        """The task reconfigures pools (DynamoLLM knobs)."""
        return self.task in ("energy", "combined")

    @property
    def has_rows(self) -> bool:
        """The task acts on rows and places VMs (TAPAS knobs)."""
        return self.task in ("thermal", "combined")

    @property
    def route_servers(self) -> int:
        """Per-server routing dimensions of the vector (SaaS servers with `route_per_server`, else 0)."""
        if not (self.has_rows and self.layout.route_per_server):
            return 0
        return int(np.count_nonzero(self.layout.server_is_saas))

    @property
    def placement_slots(self) -> int:
        """Placement dimensions of the vector (P; 0 for a task without placement)."""
        return self.layout.vm_placements_per_interval if self.has_rows else 0

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
            dims += [len(ROUTE_WEIGHT_LEVELS)] * self.route_servers
            dims += [lay.n_servers + 1] * self.placement_slots
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

    # ------------------------------------------------------------------ vector -> action
    def decode(self, action: np.ndarray, legal_servers: np.ndarray) -> tuple[ClusterAction, int]:
        """Turn an action into a ClusterAction, and count the placement choices not executed.

        The pools are the configurations `pool_configs` gives for the block's share levels (the
        task always sets every pool); the rows get the chosen routing weights (all levels 0 read
        as equal weight 1), clock ceilings and quantized flags; each placement slot is its chosen
        server when that is legal for the slot and no earlier slot took it, else None (the VM
        keeps waiting). The count adds one per masked choice: an illegal server, a server an
        earlier slot took, or "no placement" where the mask offered servers (0 or 1 with one slot).

        Args:
            action: The vector.
            legal_servers: Per slot, the servers it may take, shape (P, n_servers)
                (`slot_legality`), or one (n_servers,) array that holds for every slot.
        """
        a = self.validate(action)
        lay = self.layout
        pools = None
        i = 0
        if self.has_pools:
            i = 4 * lay.n_pools
            pools = self._pools(a[:i].tobytes(), a[:i])
        if not self.has_rows:
            return ClusterAction(pools=pools), 0
        block = a[i: i + 3 * lay.n_rows]
        cap, quant, weight = self._rows(block.tobytes(), block)
        i += 3 * lay.n_rows
        server_weight = None
        if self.route_servers:
            block = a[i: i + self.route_servers]
            server_weight = self._memoized("_server_cache", block.tobytes(),
                                           lambda: _decode_weights(block))
        n_slots = self.placement_slots
        legal = self._slot_legal(legal_servers)
        servers: list[int | None] = []
        masked = 0
        for slot, place in enumerate(a[len(a) - n_slots:].tolist()):
            ok = legal[slot]
            if place < lay.n_servers:
                if ok[place] and place not in servers:
                    servers.append(place)
                    continue
                masked += 1
            elif np.count_nonzero(ok):
                masked += 1
            servers.append(None)
        return ClusterAction(pools=pools, row_freq_cap_mhz=cap, row_quantized=quant,
                             row_route_weight=weight, server_route_weight=server_weight,
                             vm_servers=tuple(servers)), masked

    def _slot_legal(self, legal_servers: np.ndarray) -> np.ndarray:
        """Per-slot legality (P, n_servers) from a (P, n) or an (n,) array (the same for every slot)."""
        legal = np.asarray(legal_servers, dtype=bool)
        shape = (self.placement_slots, self.layout.n_servers)
        if legal.ndim == 1:
            return np.broadcast_to(legal, shape)
        if legal.shape != shape:
            raise ValueError(f"legal servers must have shape {shape} or ({shape[1]},), got {legal.shape}")
        return legal

    def slot_legality(self, free_servers: np.ndarray, n_waiting: int) -> np.ndarray:
        """Servers each placement slot may take, shape (P, n_servers) (P = 0 without placement).

        Slot i offers the free servers while at least i + 1 VMs wait and at least i + 1 servers
        are free (so that distinct choices exist for every open slot); later slots offer none,
        and "no placement" is their only legal choice.

        Args:
            free_servers: Servers a waiting VM may go to (free IaaS hosts), shape (n_servers,).
            n_waiting: VMs waiting for placement.
        """
        free = np.asarray(free_servers, dtype=bool)
        out = np.zeros((self.placement_slots, self.layout.n_servers), dtype=bool)
        out[: min(int(n_waiting), int(np.count_nonzero(free)))] = free
        return out

    def _memoized(self, cache_name: str, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` cached under ``key`` (policies repeat their choices; bounded size)."""
        cache = self.__dict__.setdefault(cache_name, {})
        if key in cache:
            return cache[key]
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
        weight = _decode_weights(rows[:, 0])
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
        return self.pool_configs(block[:, 0], [lay.tp_choices[i] for i in block[:, 1]],
                                 [lay.freq_choices_mhz[i] for i in block[:, 2]],
                                 [lay.batch_choices[i] for i in block[:, 3]])

    # ------------------------------------------------------------------ share levels
    def servers_per_pool(self, levels: Sequence[int] | np.ndarray) -> np.ndarray:
        """SaaS servers each pool gets for its share level (0..K), as `decode` assigns them.

        Level ``l`` asks for ``l / K`` of the SaaS servers; when the asks add up to more than
        all of them they are scaled down to fit. Each pool gets the floor of its ask, then the
        servers left over go one each to the pools with the largest fractional remainders
        (ties to the lower pool index) — so a pool may get one server more than its floor.

        Raises:
            InvalidActionError: A level outside 0..K.
        """
        lv = np.asarray(levels, dtype=np.int64)
        k = self.share_levels
        if lv.size and (lv.min() < 0 or lv.max() > k):
            raise InvalidActionError(f"share levels must be in 0..{k}, got {lv.tolist()}")
        want = lv / k * self.n_saas_servers
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

    def pool_configs(self, levels: Sequence[int] | np.ndarray, tp: Sequence[int],
                     freq_mhz: Sequence[float], max_batch: Sequence[int]) -> tuple[PoolConfig, ...]:
        """The pool configurations a share vector produces with these per-pool settings.

        What `decode` returns for a pool block with these levels: each pool runs
        ``servers_per_pool(levels)[p] * (gpus_per_server // tp[p])`` instances.
        """
        servers = self.servers_per_pool(levels)
        gpus = self.layout.gpus_per_server
        return tuple(
            PoolConfig(n_instances=int(servers[p]) * (gpus // int(tp[p])), tp=int(tp[p]),
                       freq_mhz=float(freq_mhz[p]), max_batch=int(max_batch[p]))
            for p in range(self.layout.n_pools))

    def pool_servers(self, pools: Sequence[PoolConfig]) -> np.ndarray:
        """SaaS servers each pool occupies: its instances over the instances a server holds.

        Raises:
            InvalidActionError: A pool whose instances do not fill whole servers at its TP.
        """
        gpus = self.layout.gpus_per_server
        out = np.zeros(len(pools), dtype=np.int64)
        for p, cfg in enumerate(pools):
            per_server = gpus // int(cfg.tp) if cfg.tp > 0 else 0
            n = cfg.n_instances
            if n == 0:
                continue
            if per_server <= 0 or n < 0 or n != int(n) or int(n) % per_server:
                raise InvalidActionError(
                    f"pools[{p}].n_instances={_plain(n)!r} is not a whole number of servers at "
                    f"tp={_plain(cfg.tp)} ({per_server} instances per {gpus}-GPU server)")
            out[p] = int(n) // per_server
        return out

    def server_splits(self) -> np.ndarray:
        """Every split of the SaaS servers over the pools that share levels within budget give.

        Within budget: levels adding up to at most K (no ask scaled down). Each split is what
        `servers_per_pool` (so `decode`) really assigns, remainders included.

        Returns:
            Read-only int array (splits, n_pools), distinct rows, in the canonical order of
            their share levels (fewest levels in total first, then the last pool's level
            ascending, then the one before it, ...).
        """
        cached = self.__dict__.get("_splits")
        if cached is None:
            seen: dict[tuple[int, ...], None] = {}
            for lv in self._levels_in_order():
                if sum(lv) <= self.share_levels:
                    seen.setdefault(tuple(int(s) for s in self.servers_per_pool(lv)), None)
            cached = np.array(list(seen), dtype=np.int64).reshape(-1, self.layout.n_pools)
            cached.flags.writeable = False
            object.__setattr__(self, "_splits", cached)
        return cached

    def _levels_in_order(self) -> list[tuple[int, ...]]:
        """Every share vector, in the canonical order (cached)."""
        cached = self.__dict__.get("_all_levels")
        if cached is None:
            cached = sorted(itertools.product(range(self.share_levels + 1),
                                              repeat=self.layout.n_pools), key=_share_order)
            object.__setattr__(self, "_all_levels", cached)
        return cached

    def share_levels_for(self, servers: Sequence[int] | np.ndarray) -> np.ndarray:
        """The canonical share levels that `servers_per_pool` turns into this server split.

        The first in canonical order (see `server_splits`) of the share vectors giving it.

        Raises:
            InvalidActionError: No share vector gives this split.
        """
        split = tuple(int(s) for s in np.asarray(servers, dtype=np.int64).ravel())
        levels = None
        if len(split) == self.layout.n_pools:
            levels = self._levels_for_servers(split)
        if levels is None:
            raise InvalidActionError(
                f"servers per pool {list(split)}: no share levels 0..{self.share_levels} over "
                f"{self.layout.n_pools} pools split the {self.n_saas_servers} SaaS servers so "
                "(see server_splits)")
        return np.array(levels, dtype=np.int64)

    def _levels_for_servers(self, servers: tuple[int, ...]) -> tuple[int, ...] | None:
        """The first share vector (canonical order) that `servers_per_pool` maps to `servers`.

        Without scaling, a pool gets the floor of its ask or one more, so the few levels whose
        floor is ``s`` or ``s - 1`` are tried first; splits that need the asks scaled down are
        looked up in a table of every share vector, built once. None when no share vector
        produces them.
        """
        def search() -> tuple[int, ...] | None:
            target = np.array(servers, dtype=np.int64)
            k, n = self.share_levels, self.n_saas_servers
            if target.min(initial=0) < 0 or target.sum() > n:
                return None
            floors = np.floor(np.arange(k + 1) / k * n + 1e-9)
            near = [np.flatnonzero((floors == s) | (floors == s - 1)).tolist() for s in servers]
            close = sorted((c for c in itertools.product(*near) if sum(c) <= k), key=_share_order)
            for lv in close:
                if np.array_equal(self.servers_per_pool(lv), target):
                    return tuple(int(v) for v in lv)
            return self._all_splits().get(servers)

        return self._memoized("_levels_cache", servers, search)

    def _all_splits(self) -> dict[tuple[int, ...], tuple[int, ...]]:
        """Split -> first share vector (canonical order) producing it, over every share vector."""
        cached = self.__dict__.get("_split_table")
        if cached is None:
            cached = {}
            for lv in self._levels_in_order():
                cached.setdefault(tuple(int(s) for s in self.servers_per_pool(lv)), lv)
            object.__setattr__(self, "_split_table", cached)
        return cached

    # ------------------------------------------------------------------ action -> vector
    def encode_action(self, action: ClusterAction) -> np.ndarray:
        """The vector that `decode` turns into `action`: its exact inverse.

        ``decode(encode_action(a), legal)`` equals ``a`` for every representable action whose
        placement is legal (so for every action `decode` returns). Where several vectors decode
        to the same action, the canonical one is written: the first share levels producing the
        pools' server counts (in `server_splits`' order), routing levels as the weights say,
        and "no placement" (index ``n_servers``) for a slot that is None or beyond
        ``vm_servers`` (a shorter tuple is padded with None; `decode` always returns one entry
        per slot).

        Raises:
            InvalidActionError: (a ValueError) a field the task's vector cannot express, named
                with its value: a missing block (None "keeps" a setting, but the vector sets
                every pool and row of its task), a block the task has no dimensions for, a TP,
                clock, batch cap, routing weight or server outside its choices, instances
                that fill no whole number of servers or no share vector produces,
                ``admit_fraction``, a per-pool ``quantized``, more placements than slots or a
                server two slots share.
        """
        if action.admit_fraction is not None:
            raise InvalidActionError(
                f"admit_fraction={action.admit_fraction!r}: the action vector has no admission "
                "dimension (leave it None)")
        parts: list[np.ndarray] = []
        if self.has_pools:
            parts.append(self._encode_pools(action.pools))
        elif action.pools is not None:
            raise InvalidActionError(f"pools={action.pools!r}: the {self.task} task's vector "
                                     "has no pool dimensions (leave it None)")
        row_fields = ("row_route_weight", "row_freq_cap_mhz", "row_quantized", "server_route_weight")
        if self.has_rows:
            parts.append(self._encode_rows(action))
            parts.append(self._encode_servers(action.server_route_weight))
            parts.append(self._encode_placements(action.vm_servers))
        else:
            if action.vm_servers:
                raise InvalidActionError(
                    f"vm_servers={action.vm_servers!r}: the {self.task} task's vector has no "
                    "placement dimensions (leave it empty)")
            for name in row_fields:
                if getattr(action, name) is not None:
                    raise InvalidActionError(
                        f"{name}={getattr(action, name)!r}: the {self.task} task's vector has no "
                        "row or placement dimensions (leave it None)")
        return np.concatenate(parts).astype(np.int64)

    def _encode_pools(self, pools: tuple[PoolConfig, ...] | None) -> np.ndarray:
        lay = self.layout
        if pools is None:
            raise InvalidActionError(
                f"pools=None (keep): the {self.task} task's vector sets every pool; pass the "
                "configurations to keep")
        if len(pools) != lay.n_pools:
            raise InvalidActionError(f"pools has {len(pools)} configurations, the layout "
                                     f"{lay.n_pools} pools")
        block = np.zeros((lay.n_pools, 4), dtype=np.int64)
        for p, cfg in enumerate(pools):
            if cfg.quantized:
                raise InvalidActionError(
                    f"pools[{p}].quantized=True: the vector quantizes per row (row_quantized), "
                    "not per pool")
            block[p, 1] = _choice_index(lay.tp_choices, cfg.tp, f"pools[{p}].tp")
            block[p, 2] = _choice_index(lay.freq_choices_mhz, cfg.freq_mhz, f"pools[{p}].freq_mhz")
            block[p, 3] = _choice_index(lay.batch_choices, cfg.max_batch, f"pools[{p}].max_batch")
        servers = self.pool_servers(pools)
        try:
            block[:, 0] = self.share_levels_for(servers)
        except InvalidActionError as exc:
            raise InvalidActionError(
                f"pools n_instances={[_plain(c.n_instances) for c in pools]}: {exc}") from None
        return block.ravel()

    def _encode_rows(self, action: ClusterAction) -> np.ndarray:
        lay = self.layout
        n = lay.n_rows
        arrays = {}
        for name in ("row_route_weight", "row_freq_cap_mhz", "row_quantized"):
            value = getattr(action, name)
            if value is None:
                raise InvalidActionError(
                    f"{name}=None (keep): the {self.task} task's vector sets every row; pass "
                    "the values to keep")
            arr = np.asarray(value)
            if arr.shape != (n,):
                raise InvalidActionError(f"{name} must have shape ({n},), got {arr.shape}")
            arrays[name] = arr
        weight = arrays["row_route_weight"].astype(float)
        if not weight.any():
            raise InvalidActionError(
                f"row_route_weight={weight.tolist()}: all 0 decodes as equal weight 1 on "
                "every row; pass np.ones(n_rows)")
        rows = np.zeros((n, 3), dtype=np.int64)
        rows[:, 0] = _choice_indices(ROUTE_WEIGHT_LEVELS, weight, "row_route_weight")
        rows[:, 1] = _choice_indices(lay.freq_choices_mhz, arrays["row_freq_cap_mhz"],
                                     "row_freq_cap_mhz")
        quant = arrays["row_quantized"]
        bad = ~np.isin(quant, (0, 1))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise InvalidActionError(f"row_quantized[{r}]={_plain(quant[r])!r} is not a bool")
        rows[:, 2] = quant.astype(np.int64)
        return rows.ravel()

    def _encode_servers(self, weight: np.ndarray | None) -> np.ndarray:
        """The per-server routing levels (empty without `route_per_server`)."""
        n = self.route_servers
        if not n:
            if weight is not None:
                raise InvalidActionError(
                    f"server_route_weight={weight!r}: the vector has no per-server routing "
                    "dimensions (the scenario does not set serving.route_per_server; leave it None)")
            return np.zeros(0, dtype=np.int64)
        if weight is None:
            raise InvalidActionError(
                f"server_route_weight=None (keep): the {self.task} task's vector sets every SaaS "
                "server's routing weight; pass the values to keep")
        w = np.asarray(weight, dtype=float)
        if w.shape != (n,):
            raise InvalidActionError(f"server_route_weight must have shape ({n},) (one per SaaS "
                                     f"server), got {w.shape}")
        if not w.any():
            raise InvalidActionError(
                f"server_route_weight={w.tolist()}: all 0 decodes as equal weight 1 on every "
                "server; pass np.ones(n_saas_servers)")
        return _choice_indices(ROUTE_WEIGHT_LEVELS, w, "server_route_weight")

    def _encode_placements(self, vm_servers: tuple[int | None, ...]) -> np.ndarray:
        n, n_slots = self.layout.n_servers, self.placement_slots
        if len(vm_servers) > n_slots:
            raise InvalidActionError(
                f"vm_servers={tuple(_plain(s) for s in vm_servers)!r} has {len(vm_servers)} "
                f"placements; the vector has {n_slots} slot(s) (vms.placements_per_interval)")
        out = np.full(n_slots, n, dtype=np.int64)
        for i, server in enumerate(vm_servers):
            if server is None:
                continue
            if isinstance(server, (bool, np.bool_)) or not isinstance(server, (int, np.integer)) \
                    or not 0 <= server < n:
                raise InvalidActionError(
                    f"vm_servers[{i}]={_plain(server)!r} is not a server index in [0, {n - 1}] or None")
            if server in out[:i]:
                raise InvalidActionError(
                    f"vm_servers[{i}]={_plain(server)!r}: an earlier slot takes that server "
                    "(decode would drop it)")
            out[i] = server
        return out

    # ------------------------------------------------------------------ masks
    def masks(self, legal_servers: np.ndarray) -> np.ndarray:
        """Flat boolean mask over all dimensions' choices (sb3-contrib MultiDiscrete format).

        Args:
            legal_servers: Per placement slot, the servers it may take, shape (P, n_servers)
                (`slot_legality`), or one (n_servers,) array that holds for every slot. A slot
                offering no server gets "no placement" as its only choice.
        """
        all_legal = self.__dict__.get("_all_legal")
        if all_legal is None:
            all_legal = np.ones(int(self.nvec().sum()), dtype=bool)
            object.__setattr__(self, "_all_legal", all_legal)
        mask = all_legal.copy()
        if self.has_rows:
            n = self.layout.n_servers
            legal = self._slot_legal(legal_servers)
            block = mask[len(mask) - self.placement_slots * (n + 1):].reshape(-1, n + 1)
            block[:, :n] = legal
            block[:, n] = ~legal.any(axis=1)
        return mask

    def legal_servers(self, action_mask: np.ndarray | None) -> np.ndarray:
        """Servers the first waiting VM (placement slot 0) may go to, read back from a `masks` vector.

        All False without a mask or for a task without placement.
        """
        n = self.layout.n_servers
        if action_mask is None or not self.has_rows:
            return np.zeros(n, dtype=bool)
        return self.slot_legal_servers(action_mask)[0]

    def slot_legal_servers(self, action_mask: np.ndarray | None) -> np.ndarray:
        """Per placement slot, the servers it may take, read back from a `masks` vector: (P, n_servers).

        All False without a mask (P = 0 rows for a task without placement). The slots offering
        any server are the VMs a controller may place now.
        """
        n, n_slots = self.layout.n_servers, self.placement_slots
        if action_mask is None or not self.has_rows:
            return np.zeros((n_slots, n), dtype=bool)
        block = np.asarray(action_mask[len(action_mask) - n_slots * (n + 1):], dtype=bool)
        return block.reshape(n_slots, n + 1)[:, :n]

    # ------------------------------------------------------------------ nearest block
    def encode(self, pools: tuple[PoolConfig, ...]) -> np.ndarray:
        """The pool block that best represents a configuration (for observations/baselines).

        Unlike `encode_action` it never refuses: each setting goes to its nearest choice.
        """
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

    def nearest_pools(self, pools: tuple[PoolConfig, ...]) -> tuple[PoolConfig, ...]:
        """The representable configuration nearest to `pools`: what `decode` makes of `encode`."""
        block = self.encode(pools)
        return self._pools(block.tobytes(), block)


def _choice_index(choices: Sequence[float], value: float, name: str) -> int:
    """Index of `value` among `choices` (within `_MATCH_TOL`, relative)."""
    return int(_choice_indices(choices, np.array([value]), name, scalar=True)[0])


def _choice_indices(choices: Sequence[float], values: np.ndarray, name: str,
                    scalar: bool = False) -> np.ndarray:
    """Index of each value among `choices`; names the first value that matches none."""
    c = np.asarray(choices, dtype=float)
    try:
        v = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InvalidActionError(f"{name}={values!r} is not numeric") from None
    hit = np.abs(v[:, None] - c[None, :]) <= _MATCH_TOL * np.maximum(np.abs(c[None, :]), 1.0)
    ok = hit.any(axis=1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        where = name if scalar else f"{name}[{i}]"
        raise InvalidActionError(
            f"{where}={_plain(values[i])!r} is not one of the choices {tuple(choices)}")
    return np.argmax(hit, axis=1)


def _plain(value: Any) -> Any:
    """A numpy scalar as its Python value (for readable error messages)."""
    return value.item() if isinstance(value, np.generic) else value
