# ruff: noqa: E501  (the docstring's observation table is wider than the code)
"""Spaces that do not depend on the layout: one policy for every scenario size (issue 20).

`ClusterEnv`'s spaces grow with the layout (8 observations and 4 action dimensions per pool, 6
and 3 per row, 4 observations per aisle, one placement choice per server), so a checkpoint
trained on `small` does not load on `medium`. `LayoutFreeSpaces` wraps any `ClusterEnv` (any
backend, any task) in spaces whose shapes are the same for every scenario.

## The choice: a fixed-size summary, not a per-entity network
Pools are few and fixed per pool set (``S/M/L`` or ``all``), so each gets a slot of its own,
padded to `MAX_POOLS` with a presence flag. Rows and aisles are summarised by order statistics
over the domain (min, P10, mean, P90, max) and by three *rank groups* of rows (tightest third,
middle third, loosest third by power/thermal slack). A per-entity network (one shared encoder
per row, pooled) would keep every row addressable but needs a custom policy class in
stable-baselines3 and variable-size batches; the summary works with any off-the-shelf MLP
policy, PPO and MaskablePPO unchanged. Its cost: the policy cannot address one row by index
(it acts on the rows of a rank group together), it cannot place a VM on a server of its own
choice (it picks a placement *rule*), and two rows in one group get the same settings.

## Observation (`FIXED_OBSERVATION_NAMES`, `Box(-10, 10, (87,), float32)`)
Derived from the wrapped env's observation vector through its `observation_spec` names (so it
runs on the real backend too), plus the legal-server share read from its action mask:

| names | meaning |
|---|---|
| ``layout.saas_share``, ``layout.log2_servers`` | SaaS servers / servers; log2(servers) / 10 (static context) |
| ``pool_slot[s].present`` + the 8 ``pool[..]`` entries | per pool slot s < `MAX_POOLS`, the env's own normalized pool entries (zeros when absent) |
| ``row.load.<stat>`` | row power over its limit in force (power + headroom) |
| ``row.headroom.<stat>`` | (limit - power) / nominal row limit |
| ``row.capped_share``, ``row.route_weight_mean``, ``row.freq_cap_mean``, ``row.quantized_share`` | over all rows |
| ``row_group[g].share/slack/route_weight/freq_cap/quantized`` | per rank group g: rows in it / rows; mean slack; mean settings |
| ``aisle.inlet.<stat>``, ``aisle.gpu_margin.<stat>``, ``aisle.heat_over_capacity.<stat>`` | inlet (C-20)/20; 1 - (hottest GPU C - 40)/(slowdown C - 40); heat / capacity |
| ``aisle.capacity.min``, ``aisle.capacity.mean`` | cooling capacity in force / nominal |
| ``time_of_day.*``, ``fault.*``, ``slo.*``, ``gpu.throttled`` | the env's entries as they are |
| ``vm.pending_power``, ``vm.waiting_share``, ``vm.legal_servers`` | head VM's expected GPU power / limit; waiting VMs shown / placement slots; legal servers / servers |

``<stat>`` is min, p10, mean, p90, max. A row's *slack* is min(1 - load, thermal slack), the
thermal slack being (slowdown C - hottest GPU C of its aisle) / 40 C, as the TAPAS-style
controller measures it.

## Action (`MultiDiscrete`, `FixedActionLayout`)
* pools (energy, combined), per pool slot: [share level 0..`SHARE_LEVELS` (a fraction l /
  `SHARE_LEVELS` of the SaaS servers), TP index < `TP_LEVELS`, clock index < `FREQ_LEVELS`,
  batch index < `BATCH_LEVELS`]. Each fixed index goes to the scenario's choice at the same
  normalized position, ``round(j (n - 1) / (F - 1))`` for F fixed and n scenario choices (the
  share level: ``round(l K / SHARE_LEVELS)`` of the codec's K). The fixed counts are the largest
  of the shipped scenarios, so every scenario choice is reachable and scenario -> fixed ->
  scenario is the identity (`pool_block`); a scenario with more choices than the fixed grid
  would get an evenly spread subset. A slot without a pool is ignored (masked to 0).
* rows (thermal, combined), per rank group g < `ROW_GROUPS`: [routing level (the codec's
  `ROUTE_WEIGHT_LEVELS`), clock-ceiling index < `FREQ_LEVELS` (by position, as above),
  quantize 0/1]. Rows are ranked by slack at the last observation (ties to the lower row) and
  row of rank k goes to group ``floor((k + 1/2) G / n_rows)``: thirds of the rows, the tightest
  first (one row: the middle group; two rows: the tightest and the loosest groups).
* placement (thermal, combined): one rule of `PLACEMENT_RULES` for the waiting VMs, executed on
  the wrapped env's legal servers (its action mask): none, first fit (lowest legal server),
  most headroom (the legal server whose row and aisle keep the most room after adding the VM's
  expected power, as a fraction of their limits), coolest aisle (the lowest legal server of
  the aisle with the largest GPU margin). With several placement slots the rule places each
  waiting VM in queue order on distinct servers, adding each VM's power before the next.

The wrapped env's vector is built only through `ClusterAction` and its `ActionCodec`
(`pool_configs`, `encode_action`), so its decode, masks and time scales apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_gym.envs.actions import ROUTE_WEIGHT_LEVELS, ActionCodec, InvalidActionError
from llm_cluster_gym.envs.backend import ClusterAction, ClusterLayout, PoolConfig
from llm_cluster_gym.envs.observation import OBS_CLIP

MAX_POOLS = 3
"""Pool slots (the largest pool set, S/M/L)."""

SHARE_LEVELS = 32
"""Fixed share levels per pool (the codec's `MAX_SHARE_LEVELS`: identity at 32+ SaaS servers)."""

TP_LEVELS = 3
FREQ_LEVELS = 7
BATCH_LEVELS = 4
"""Fixed choice counts: the largest of the shipped scenarios (3 TP degrees, 7 clocks, 4 batch caps)."""

ROW_GROUPS = 3
"""Rank groups of rows: tightest, middle and loosest third by slack."""

PLACEMENT_RULES = ("none", "first_fit", "most_headroom", "coolest_aisle")
"""Placement rules, in action index order."""

STATS = ("min", "p10", "mean", "p90", "max")
"""Order statistics over a domain's rows or aisles."""

_QUANTILES = (0.1, 0.9)
_POOL_FIELDS = ("arrival_rate", "trend", "queued", "running", "server_share", "tp", "freq", "max_batch")
_GROUP_FIELDS = ("share", "slack", "route_weight", "freq_cap", "quantized")
_ROW_FIELDS = ("power", "headroom", "capped", "route_weight", "freq_cap", "quantized")
_AISLE_FIELDS = ("inlet", "max_gpu_temp", "heat_over_capacity", "capacity")
_ROUTE_LEVELS = np.asarray(ROUTE_WEIGHT_LEVELS, dtype=float)


def _names() -> tuple[str, ...]:
    names = ["layout.saas_share", "layout.log2_servers"]
    for s in range(MAX_POOLS):
        names.append(f"pool_slot[{s}].present")
        names += [f"pool_slot[{s}].{f}" for f in _POOL_FIELDS]
    names += [f"row.load.{st}" for st in STATS] + [f"row.headroom.{st}" for st in STATS]
    names += ["row.capped_share", "row.route_weight_mean", "row.freq_cap_mean", "row.quantized_share"]
    for g in range(ROW_GROUPS):
        names += [f"row_group[{g}].{f}" for f in _GROUP_FIELDS]
    for key in ("inlet", "gpu_margin", "heat_over_capacity"):
        names += [f"aisle.{key}.{st}" for st in STATS]
    names += ["aisle.capacity.min", "aisle.capacity.mean"]
    names += ["time_of_day.sin", "time_of_day.cos", "fault.cooling", "fault.power", "fault.load_spike"]
    names += ["vm.pending_power", "vm.waiting_share", "vm.legal_servers"]
    names += ["slo.attainment", "slo.ttft_p99", "slo.tbt_p99", "gpu.throttled"]
    return tuple(names)


FIXED_OBSERVATION_NAMES = _names()
"""Every index of the fixed observation (the same for every scenario and task)."""


def position_map(n_fixed: int, n_choices: int) -> np.ndarray:
    """Scenario choice index for each fixed index: the same normalized position, rounded half up."""
    if n_choices <= 1 or n_fixed <= 1:
        return np.zeros(n_fixed, dtype=np.int64)
    return np.floor(np.arange(n_fixed) * (n_choices - 1) / (n_fixed - 1) + 0.5).astype(np.int64)


def position_inverse(n_fixed: int, n_choices: int) -> np.ndarray:
    """Fixed index for each scenario choice index (the inverse of `position_map` when n_fixed >= n)."""
    if n_choices <= 1 or n_fixed <= 1:
        return np.zeros(max(n_choices, 1), dtype=np.int64)
    return np.floor(np.arange(n_choices) * (n_fixed - 1) / (n_choices - 1) + 0.5).astype(np.int64)


@dataclass(frozen=True)
class FixedActionLayout:
    """The fixed MultiDiscrete layout of one task: which blocks, and their dimension names."""

    task: str

    @property
    def has_pools(self) -> bool:
        """Pool slots are in the vector (energy, combined)."""
        return self.task in ("energy", "combined")

    @property
    def has_rows(self) -> bool:
        """Row groups and the placement rule are in the vector (thermal, combined)."""
        return self.task in ("thermal", "combined")

    @property
    def rows_at(self) -> int:
        """Index of the first row-group dimension."""
        return 4 * MAX_POOLS if self.has_pools else 0

    def nvec(self) -> np.ndarray:
        """Choices per dimension."""
        dims: list[int] = []
        if self.has_pools:
            dims += [SHARE_LEVELS + 1, TP_LEVELS, FREQ_LEVELS, BATCH_LEVELS] * MAX_POOLS
        if self.has_rows:
            dims += [len(ROUTE_WEIGHT_LEVELS), FREQ_LEVELS, 2] * ROW_GROUPS + [len(PLACEMENT_RULES)]
        return np.array(dims, dtype=np.int64)

    def names(self) -> tuple[str, ...]:
        """Name of each dimension."""
        out: list[str] = []
        if self.has_pools:
            for s in range(MAX_POOLS):
                out += [f"pool_slot[{s}].{f}" for f in ("share", "tp", "freq", "batch")]
        if self.has_rows:
            for g in range(ROW_GROUPS):
                out += [f"row_group[{g}].{f}" for f in ("route", "freq_cap", "quantize")]
            out.append("placement_rule")
        return tuple(out)


class _ObsIndex:
    """Indices of the wrapped env's observation entries, looked up by name once."""

    def __init__(self, names: tuple[str, ...], lay: ClusterLayout) -> None:
        where = {n: i for i, n in enumerate(names)}

        def idx(fmt: str, keys: Any) -> np.ndarray:
            return np.array([where[fmt.format(k)] for k in keys], dtype=np.int64)

        rows, aisles = range(lay.n_rows), range(lay.n_aisles)
        self.pools = np.array([[where[f"pool[{p}].{f}"] for f in _POOL_FIELDS] for p in lay.pool_names],
                              dtype=np.int64).reshape(-1, len(_POOL_FIELDS))
        self.row = {f: idx("row[{}]." + f, rows) for f in _ROW_FIELDS}
        self.aisle = {f: idx("aisle[{}]." + f, aisles) for f in _AISLE_FIELDS}
        self.rows = np.stack([self.row[f] for f in _ROW_FIELDS])  # (6, n_rows): one gather
        self.aisles = np.stack([self.aisle[f] for f in _AISLE_FIELDS])  # (4, n_aisles)
        self.passthrough_head = idx("{}", ("time_of_day.sin", "time_of_day.cos", "fault.cooling",
                                           "fault.power", "fault.load_spike"))
        self.passthrough_tail = idx("{}", ("slo.attainment", "slo.ttft_p99", "slo.tbt_p99", "gpu.throttled"))
        extra = sorted((n for n in names if n.startswith("vm.pending_power[")),
                       key=lambda n: int(n[len("vm.pending_power["):-1]))
        self.vms = np.array([where["vm.pending_power"]] + [where[n] for n in extra], dtype=np.int64)
        # Everything the summary reads, in one gather: pools, rows, aisles, head, tail, VMs.
        blocks = (self.pools, self.rows, self.aisles, self.passthrough_head, self.passthrough_tail, self.vms)
        self.gather = np.concatenate([b.ravel() for b in blocks])
        self.splits = np.cumsum([b.size for b in blocks])[:-1]


def _order_stats(values: np.ndarray) -> np.ndarray:
    """`STATS` of each row of a (..., k, n) array: (..., k, 5), quantiles interpolated linearly."""
    s = np.sort(values, axis=-1)
    lo, hi, w = _quantile_points(values.shape[-1])
    out = np.empty((*values.shape[:-1], len(STATS)))
    out[..., 0] = s[..., 0]
    out[..., 2] = s.sum(axis=-1) / values.shape[-1]
    out[..., 4] = s[..., -1]
    out[..., 1::2] = s[..., lo] * (1.0 - w) + s[..., hi] * w
    return out


@lru_cache(maxsize=64)
def _quantile_points(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper sorted index and weight of each of `_QUANTILES` over n values."""
    pos = np.asarray(_QUANTILES) * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n - 1), pos - lo


class LayoutFreeSpaces(gym.Wrapper):
    """A `ClusterEnv` (any task, scenario or backend) seen through layout-independent spaces.

    See the module docstring for the observation names, the action layout and the mapping onto
    the wrapped env's choices. `observation_names` and `action_names` name every index;
    `cluster_action` (fixed action -> `ClusterAction`), `row_groups`, `place` and `pool_block`
    (scenario pools -> fixed pool block) expose each step of the mapping.

    Args:
        env: A `ClusterEnv`, or a Gymnasium wrapper of one.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        inner = env.unwrapped
        self.layout: ClusterLayout = inner.layout
        self.codec: ActionCodec = inner.codec
        self.task: str = inner.task
        lay = self.layout
        if lay.n_pools > MAX_POOLS:
            raise ValueError(f"LayoutFreeSpaces: {lay.n_pools} pools, at most {MAX_POOLS} slots")
        self.fixed = FixedActionLayout(self.task)
        self.action_names = self.fixed.names()
        self.observation_names = FIXED_OBSERVATION_NAMES
        self._nvec = self.fixed.nvec()
        self.action_space = spaces.MultiDiscrete(self._nvec)
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (len(FIXED_OBSERVATION_NAMES),), np.float32)
        self._ix = _ObsIndex(tuple(inner.observation_names), lay)
        # Fixed index -> scenario index, per block.
        self.share_map = np.floor(np.arange(SHARE_LEVELS + 1) * self.codec.share_levels / SHARE_LEVELS
                                  + 0.5).astype(np.int64)
        self.tp_map = position_map(TP_LEVELS, len(lay.tp_choices))
        self.freq_map = position_map(FREQ_LEVELS, len(lay.freq_choices_mhz))
        self.batch_map = position_map(BATCH_LEVELS, len(lay.batch_choices))
        first_server = np.array([np.flatnonzero(lay.server_row == r)[0] for r in range(lay.n_rows)])
        self.row_aisle = np.asarray(lay.server_aisle)[first_server]
        self._temp_span_c = lay.slowdown_temp_c - 40.0
        self._arange_rows = np.arange(lay.n_rows)
        self._group_of_rank = np.floor((self._arange_rows + 0.5) * ROW_GROUPS / lay.n_rows).astype(np.int64)
        self._onehot = np.eye(ROW_GROUPS)
        n_saas = int(np.sum(lay.server_is_saas))
        self._static = np.array([n_saas / lay.n_servers, np.log2(lay.n_servers) / 10.0])
        self._inner_obs: np.ndarray | None = None
        self._legal: np.ndarray | None = None
        self._encoded: dict[bytes, np.ndarray] = {}

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset the wrapped env; the fixed observation of its first reading."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._inner_obs = np.asarray(obs)
        self._legal = None
        return self.observation(self._inner_obs), info

    def step(self, action):
        """Map the fixed action onto the wrapped env's vector and step it (None holds every setting).

        Raises:
            InvalidActionError: An action outside the fixed space.
        """
        inner = None if action is None else self.inner_action(action)
        obs, reward, terminated, truncated, info = self.env.step(inner)
        self._inner_obs = np.asarray(obs)
        self._legal = None
        return self.observation(self._inner_obs), reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """Legal fixed choices, flattened over the dimensions (MaskablePPO format).

        Pool slots without a pool offer only 0; the placement rule offers "none" alone when no
        server is legal for a waiting VM and the other rules alone when one is (the wrapped
        env's mask does the same with its servers).
        """
        mask = np.ones(int(self._nvec.sum()), dtype=bool)
        starts = np.concatenate(([0], np.cumsum(self._nvec)[:-1]))
        if self.fixed.has_pools:
            for d in range(4 * self.layout.n_pools, 4 * MAX_POOLS):
                mask[starts[d] + 1: starts[d] + self._nvec[d]] = False
        if self.fixed.has_rows:
            any_legal = bool(self._legal_servers().any())
            start = starts[-1]
            mask[start] = not any_legal
            mask[start + 1: start + len(PLACEMENT_RULES)] = any_legal
        return mask

    # ------------------------------------------------------------------ observation
    def observation(self, inner_obs: np.ndarray) -> np.ndarray:
        """The fixed-size observation of the wrapped env's latest observation (float32, clipped).

        `inner_obs` is the wrapped env's observation vector; ``vm.legal_servers`` is read from
        its action mask now (so pass the observation it just returned).
        """
        ix, lay, n_rows = self._ix, self.layout, self.layout.n_rows
        pool_v, row_v, aisle_v, head, tail, vms = np.split(
            np.asarray(inner_obs, dtype=float)[ix.gather], ix.splits)
        power, headroom, capped, route, cap, quant = row_v.reshape(len(_ROW_FIELDS), n_rows)
        aisles = aisle_v.reshape(len(_AISLE_FIELDS), lay.n_aisles)
        load = power / np.maximum(power + headroom, 1e-6)
        margin = 1.0 - aisles[1]
        slack = np.minimum(1.0 - load, (margin * self._temp_span_c / 40.0)[self.row_aisle])
        onehot = self._onehot[self._groups_of(slack)]  # (n_rows, groups)
        count = onehot.sum(axis=0)
        settings = np.stack((slack, route, cap, quant))
        groups = np.empty((ROW_GROUPS, len(_GROUP_FIELDS)))
        groups[:, 0] = count / n_rows
        groups[:, 1:] = (settings @ onehot).T / np.maximum(count, 1.0)[:, None]
        pools = np.zeros((MAX_POOLS, 1 + len(_POOL_FIELDS)))
        pools[: lay.n_pools, 0] = 1.0
        pools[: lay.n_pools, 1:] = pool_v.reshape(lay.n_pools, len(_POOL_FIELDS))
        out = np.concatenate((
            self._static, pools.ravel(), _order_stats(np.stack((load, headroom))).ravel(),
            (capped.sum() / n_rows,), settings[1:].sum(axis=1) / n_rows, groups.ravel(),
            _order_stats(np.stack((aisles[0], margin, aisles[2]))).ravel(),
            (aisles[3].min(), aisles[3].sum() / lay.n_aisles), head,
            (vms[0], np.count_nonzero(vms > 0) / len(vms),
             np.count_nonzero(self._legal_servers()) / lay.n_servers), tail)).astype(np.float32)
        np.clip(out, -OBS_CLIP, OBS_CLIP, out=out)
        out[np.isnan(out)] = 0.0
        return out

    def observations(self, inner_obs: np.ndarray) -> np.ndarray:
        """`observation` of N observations of the wrapped env's scenario at once: (N, dim) -> (N, 87).

        For the batched copies of one scenario (`agents.batched_residual`): every row is summarized
        as `observation` summarizes it, with the same operations along a leading axis (the same
        float32 values). Pool actions only: a task with row actions reads ``vm.legal_servers`` from
        one env's action mask, which N copies do not share.

        Raises:
            ValueError: The task has row actions.
        """
        if self.codec.has_rows:
            raise ValueError(f"observations: task {self.task!r} has row actions; use observation per env")
        ix, lay, n_rows = self._ix, self.layout, self.layout.n_rows
        o = np.asarray(inner_obs, dtype=float)[:, ix.gather]
        n = o.shape[0]
        pool_v, row_v, aisle_v, head, tail, vms = np.split(o, ix.splits, axis=1)
        rows = np.ascontiguousarray(row_v).reshape(n, len(_ROW_FIELDS), n_rows)
        power, headroom, capped, route, cap, quant = (rows[:, k] for k in range(len(_ROW_FIELDS)))
        aisles = np.ascontiguousarray(aisle_v).reshape(n, len(_AISLE_FIELDS), lay.n_aisles)
        load = power / np.maximum(power + headroom, 1e-6)
        margin = 1.0 - aisles[:, 1]
        slack = np.minimum(1.0 - load, (margin * self._temp_span_c / 40.0)[:, self.row_aisle])
        rank = np.empty((n, n_rows), dtype=np.int64)
        rank[np.arange(n)[:, None], np.argsort(slack, axis=1, kind="stable")] = self._arange_rows
        onehot = self._onehot[self._group_of_rank[rank]]  # (n, n_rows, groups)
        count = onehot.sum(axis=1)
        settings = np.stack((slack, route, cap, quant), axis=1)  # (n, 4, n_rows)
        groups = np.empty((n, ROW_GROUPS, len(_GROUP_FIELDS)))
        groups[:, :, 0] = count / n_rows
        groups[:, :, 1:] = np.matmul(settings, onehot).transpose(0, 2, 1) / np.maximum(count, 1.0)[:, :, None]
        pools = np.zeros((n, MAX_POOLS, 1 + len(_POOL_FIELDS)))
        pools[:, : lay.n_pools, 0] = 1.0
        pools[:, : lay.n_pools, 1:] = pool_v.reshape(n, lay.n_pools, len(_POOL_FIELDS))
        out = np.concatenate((
            np.broadcast_to(self._static, (n, len(self._static))), pools.reshape(n, -1),
            _order_stats(np.stack((load, headroom), axis=1)).reshape(n, -1),
            (capped.sum(axis=1) / n_rows)[:, None], settings[:, 1:].sum(axis=2) / n_rows,
            groups.reshape(n, -1),
            _order_stats(np.stack((aisles[:, 0], margin, aisles[:, 2]), axis=1)).reshape(n, -1),
            aisles[:, 3].min(axis=1)[:, None], (aisles[:, 3].sum(axis=1) / lay.n_aisles)[:, None], head,
            vms[:, :1], (np.count_nonzero(vms > 0, axis=1) / vms.shape[1])[:, None], np.zeros((n, 1)),
            tail), axis=1).astype(np.float32)
        np.clip(out, -OBS_CLIP, OBS_CLIP, out=out)
        out[np.isnan(out)] = 0.0
        return out

    def _row_load(self, o: np.ndarray) -> np.ndarray:
        power = o[self._ix.row["power"]]
        return power / np.maximum(power + o[self._ix.row["headroom"]], 1e-6)

    def row_slack(self, inner_obs: np.ndarray) -> np.ndarray:
        """Per row, min(power slack, thermal slack) (the TAPAS-style controller's measure).

        Power slack: 1 - power / the limit in force; thermal slack: (slowdown C - hottest GPU C
        of the row's aisle) / 40 C.
        """
        o = np.asarray(inner_obs, dtype=float)
        thermal = (1.0 - o[self._ix.aisle["max_gpu_temp"]]) * self._temp_span_c / 40.0
        return np.minimum(1.0 - self._row_load(o), thermal[self.row_aisle])

    def _groups_of(self, slack: np.ndarray) -> np.ndarray:
        rank = np.empty(len(slack), dtype=np.int64)
        rank[np.argsort(slack, kind="stable")] = self._arange_rows
        return self._group_of_rank[rank]

    def row_groups(self, inner_obs: np.ndarray) -> np.ndarray:
        """Rank group of each row (0: tightest third by slack ... `ROW_GROUPS` - 1: loosest)."""
        return self._groups_of(self.row_slack(inner_obs))

    # ------------------------------------------------------------------ action
    def validate(self, action: np.ndarray) -> np.ndarray:
        """Check shape, integrality and range of a fixed action; returns it as int64."""
        a = np.asarray(action)
        if a.shape != self._nvec.shape:
            raise InvalidActionError(f"fixed action must have shape {self._nvec.shape}, got {a.shape}")
        if a.dtype.kind == "f" and not (np.isfinite(a).all() and np.array_equal(a, np.round(a))):
            raise InvalidActionError(f"fixed action must be finite integers, got {a}")
        if a.dtype.kind not in "iubf":
            raise InvalidActionError(f"fixed action must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        bad = (a < 0) | (a >= self._nvec)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidActionError(f"fixed action[{i}] ({self.action_names[i]}) = {a[i]} is outside "
                                     f"[0, {self._nvec[i] - 1}]")
        return a

    def inner_action(self, action: np.ndarray) -> np.ndarray:
        """The wrapped env's action vector for a fixed action, at the last observation.

        `codec.encode_action` of `cluster_action`, memoized on what decides it (the fixed action,
        the rows' rank groups and the placements): a policy repeats its choices.
        """
        a = self.validate(action)
        row_group, servers = self._decisions(a, None, None)
        key = a.tobytes() + (b"" if row_group is None else row_group.tobytes()) + repr(servers).encode()
        hit = self._encoded.get(key)
        if hit is None:
            if len(self._encoded) > 4096:
                self._encoded.clear()
            hit = self.codec.encode_action(self._build(a, row_group, servers))
            hit.flags.writeable = False
            self._encoded[key] = hit
        return hit

    def cluster_action(self, action: np.ndarray, inner_obs: np.ndarray | None = None,
                       legal_servers: np.ndarray | None = None) -> ClusterAction:
        """The `ClusterAction` a fixed action stands for.

        Args:
            action: The fixed action.
            inner_obs: The wrapped env's observation the row ranks and placement read (default:
                the last one).
            legal_servers: Servers a waiting VM may go to (default: read from the wrapped env's
                action mask).
        """
        a = self.validate(action)
        return self._build(a, *self._decisions(a, inner_obs, legal_servers))

    def _decisions(self, a: np.ndarray, inner_obs: np.ndarray | None, legal_servers: np.ndarray | None
                   ) -> tuple[np.ndarray | None, tuple[int, ...]]:
        """The rows' rank groups and the placements of a (validated) fixed action."""
        if not self.fixed.has_rows:
            return None, ()
        o = self._inner_obs if inner_obs is None else np.asarray(inner_obs, dtype=float)
        if o is None:
            raise gym.error.ResetNeeded("LayoutFreeSpaces: call reset() before acting")
        legal = self._legal_servers() if legal_servers is None else np.asarray(legal_servers, dtype=bool)
        return self.row_groups(o), self.place(PLACEMENT_RULES[int(a[-1])], o, legal)

    def _build(self, a: np.ndarray, row_group: np.ndarray | None, servers: tuple[int, ...]) -> ClusterAction:
        """The `ClusterAction` of a fixed action, given the rows' rank groups and the placements."""
        pools = self.pools_of(a[: 4 * MAX_POOLS]) if self.fixed.has_pools else None
        if row_group is None:
            return ClusterAction(pools=pools)
        groups = a[self.fixed.rows_at: self.fixed.rows_at + 3 * ROW_GROUPS].reshape(ROW_GROUPS, 3)
        weight = _ROUTE_LEVELS[groups[row_group, 0]]
        if not weight.any():
            weight = np.ones(self.layout.n_rows)  # all 0 means equal weight (the codec's reading)
        freqs = np.asarray(self.layout.freq_choices_mhz, dtype=float)
        cap = freqs[self.freq_map[groups[row_group, 1]]]
        quant = groups[row_group, 2].astype(bool)
        return ClusterAction(pools=pools, row_route_weight=weight, row_freq_cap_mhz=cap,
                             row_quantized=quant, server_route_weight=self._even_servers(),
                             **_placement_kwargs(servers))

    def _even_servers(self) -> np.ndarray | None:
        """Every SaaS server at full weight; None without the per-server block.

        The fixed spaces summarize rows by rank group and carry no per-server choice, so routing
        inside a row stays even.
        """
        return np.ones(self.codec.route_servers) if self.codec.route_servers else None

    def pools_of(self, block: np.ndarray) -> tuple[PoolConfig, ...]:
        """The pool configurations of a fixed pool block (`MAX_POOLS` x 4; absent slots ignored)."""
        lay = self.layout
        b = np.asarray(block, dtype=np.int64).reshape(MAX_POOLS, 4)[: lay.n_pools]
        return self.codec.pool_configs(
            self.share_map[b[:, 0]], [lay.tp_choices[i] for i in self.tp_map[b[:, 1]]],
            [lay.freq_choices_mhz[i] for i in self.freq_map[b[:, 2]]],
            [lay.batch_choices[i] for i in self.batch_map[b[:, 3]]])

    def pool_block(self, pools: tuple[PoolConfig, ...]) -> np.ndarray:
        """The fixed pool block (`MAX_POOLS` x 4, flat) that `pools_of` turns into `pools`.

        For configurations the codec represents (``pools_of(pool_block(p)) == p``); absent
        slots are 0.

        Raises:
            InvalidActionError: A configuration the codec cannot express.
        """
        lay = self.layout
        vec = self.codec.encode_action(ClusterAction(pools=tuple(pools))) if self.task == "energy" else \
            self._pool_part(pools)
        scn = vec[: 4 * lay.n_pools].reshape(lay.n_pools, 4)
        out = np.zeros((MAX_POOLS, 4), dtype=np.int64)
        out[: lay.n_pools, 0] = np.floor(scn[:, 0] * SHARE_LEVELS / self.codec.share_levels + 0.5)
        out[: lay.n_pools, 1] = position_inverse(TP_LEVELS, len(lay.tp_choices))[scn[:, 1]]
        out[: lay.n_pools, 2] = position_inverse(FREQ_LEVELS, len(lay.freq_choices_mhz))[scn[:, 2]]
        out[: lay.n_pools, 3] = position_inverse(BATCH_LEVELS, len(lay.batch_choices))[scn[:, 3]]
        return out.ravel()

    def _pool_part(self, pools: tuple[PoolConfig, ...]) -> np.ndarray:
        """The codec's pool block for `pools` (combined task: rows at full weight, no placement)."""
        if not self.codec.has_pools:
            raise InvalidActionError(f"the {self.task} task has no pool dimensions")
        r = self.layout.n_rows
        full = ClusterAction(pools=tuple(pools), row_route_weight=np.ones(r),
                             row_freq_cap_mhz=np.full(r, float(self.layout.freq_choices_mhz[-1])),
                             row_quantized=np.zeros(r, dtype=bool),
                             server_route_weight=self._even_servers())
        return self.codec.encode_action(full)

    # ------------------------------------------------------------------ placement
    def place(self, rule: str, inner_obs: np.ndarray, legal_servers: np.ndarray) -> tuple[int | None, ...]:
        """Servers for the waiting VMs (queue order) by a `PLACEMENT_RULES` rule.

        One per waiting VM shown in the observation (head first), at most one per placement
        slot, on distinct legal servers; empty for "none" or when no server is legal.
        """
        legal = np.asarray(legal_servers, dtype=bool).copy()
        o = np.asarray(inner_obs, dtype=float)
        vm_w = o[self._ix.vms] * self.layout.gpu_power_limit_w
        if rule == "none" or not legal.any():
            return ()
        lay, ix = self.layout, self._ix
        row_used_w = (o[ix.row["power"]]) * lay.row_limit_w
        row_limit_w = np.maximum((o[ix.row["power"]] + o[ix.row["headroom"]]) * lay.row_limit_w, 1.0)
        cap_w = np.maximum(o[ix.aisle["capacity"]] * lay.aisle_capacity_w, 1.0)
        aisle_used_w = o[ix.aisle["heat_over_capacity"]] * cap_w
        margin = 1.0 - o[ix.aisle["max_gpu_temp"]]
        server_row, server_aisle = np.asarray(lay.server_row), np.asarray(lay.server_aisle)
        out: list[int | None] = []
        for slot in range(len(vm_w)):
            cand = np.flatnonzero(legal)
            if len(cand) == 0 or (slot > 0 and vm_w[slot] <= 0.0):
                break
            if rule == "first_fit":
                best = int(cand[0])
            elif rule == "coolest_aisle":
                best = int(cand[np.argmax(margin[server_aisle[cand]])])
            elif rule == "most_headroom":
                add_w = lay.gpus_per_server * vm_w[slot]
                r, a = server_row[cand], server_aisle[cand]
                room = np.minimum(1.0 - (row_used_w[r] + add_w) / row_limit_w[r],
                                  1.0 - (aisle_used_w[a] + add_w) / cap_w[a])
                best = int(cand[np.argmax(room)])
                row_used_w = row_used_w.copy()
                aisle_used_w = aisle_used_w.copy()
                row_used_w[server_row[best]] += add_w
                aisle_used_w[server_aisle[best]] += add_w
            else:
                raise ValueError(f"unknown placement rule {rule!r}; known: {PLACEMENT_RULES}")
            out.append(best)
            legal[best] = False
        return tuple(out)

    def _legal_servers(self) -> np.ndarray:
        """Servers the head waiting VM may go to, from the wrapped env's action mask (once per step)."""
        if self._legal is None:
            if not self.codec.has_rows:
                self._legal = np.zeros(self.layout.n_servers, dtype=bool)
            else:
                self._legal = self.codec.legal_servers(self.env.unwrapped.action_masks())
        return self._legal


def _placement_kwargs(servers: tuple[int, ...]) -> dict[str, Any]:
    """`ClusterAction` keyword for these placements (one per slot, in queue order)."""
    return {"vm_servers": tuple(servers)}
