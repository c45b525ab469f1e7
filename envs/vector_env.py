"""BatchedClusterEnv: N copies of the energy task stepped as arrays (`gymnasium.make_vec`).

The vector twin of `ClusterEnv` for training: one `BatchedSimCluster` (N copies of the
scenario's aggregate model as arrays) behind Gymnasium's `VectorEnv` API, with the observation,
the reward and the action decoding of `ClusterEnv` computed for all copies at once. Copy ``i``
gives exactly (to floating-point summation order) what ``gymnasium.make_vec(id, N,
vectorization_mode="sync")``'s i-th `ClusterEnv` gives for the same seeds and actions:
observations, rewards, truncations and autoreset (`tests/test_vector_env.py`). Registered as
the ``vector_entry_point`` of ``LLMCluster/Energy-small-v0``, so
``gymnasium.make_vec("LLMCluster/Energy-small-v0", num_envs=64)`` builds it; any other scenario
the batched simulator runs can be passed (``scenario="dynamo_week"``,
``trace_window_s=(start, window)``).

Scope: the energy task (DynamoLLM's pool knobs) under the aggregate serving model, on the
scenarios `envs.sim.batched` supports (`batch_support_error`). Every copy runs the same
episode length, so all truncate together and restart on the next step (Gymnasium's default
next-step autoreset). ``info`` holds, per copy, the reward terms (``cost_<term>``,
``reward_<term>``), the interval's metrics that `BatchedMetrics` carries and ``time_s``; not
the string-valued ``active_faults`` (the supported scenarios have none).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from llm_cluster_gym.envs.actions import ActionCodec, InvalidActionError
from llm_cluster_gym.envs.observation import OBS_CLIP, observation_spec
from llm_cluster_gym.envs.reward import TASK_WEIGHTS, TERMS, RewardWeights, weights_dict
from llm_cluster_gym.envs.sim.batched import BatchedMetrics, BatchedSimCluster

INFO_KEYS = (
    "energy_j", "gpu_energy_j", "facility_energy_j", "arrived", "finished", "dropped", "in_flight",
    "tokens_generated", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "slo_violations",
    "slo_ttft_violations", "slo_tbt_violations", "slo_attainment", "thermal_throttle_events",
    "power_throttle_events", "thermal_throttled_gpu_s", "power_capped_gpu_s", "clock_lost_mhz_s",
    "saas_tokens_lost", "quality_loss", "reconfigurations", "peak_row_power_w", "max_gpu_temp_c",
    "carbon_g", "gpu_hours",
)
"""The per-copy metrics in `info` (those of `ClusterEnv`'s that `BatchedMetrics` carries)."""


class BatchedClusterEnv(VectorEnv):
    """N copies of `ClusterEnv(task="energy", serving_model="aggregate")` as one vector env.

    Args:
        num_envs: Copies N.
        task: "energy" (the only task the batched simulator runs).
        scenario: Scenario name or path (`envs.sim.batched.batch_support_error` says which run).
        serving_model: "aggregate" (the only one batched).
        reward_weights: As `ClusterEnv`.
        reconfig_every: As `ClusterEnv`: instance counts and TP change only every that many steps.
        trace_window_s: As `ClusterEnv`: the stretch of the source trace episodes draw from.
        max_episode_steps: Truncate after this many steps (default, and at most: the scenario's
            duration over its control interval).
        render_mode: None (nothing is rendered).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, task: str = "energy", scenario: str = "small",
                 serving_model: str = "aggregate",
                 reward_weights: RewardWeights | dict[str, float] | None = None,
                 reconfig_every: int = 12, trace_window_s: tuple[float, float] | None = None,
                 max_episode_steps: int | None = None, render_mode: str | None = None) -> None:
        if task != "energy":
            raise ValueError(f"BatchedClusterEnv runs the energy task only, got task={task!r} "
                             "(use vectorization_mode='sync' for the others)")
        if serving_model != "aggregate":
            raise ValueError(f"BatchedClusterEnv batches the aggregate model only, got "
                             f"serving_model={serving_model!r}")
        if render_mode is not None:
            raise ValueError(f"BatchedClusterEnv renders nothing, got render_mode={render_mode!r}")
        if reconfig_every < 1:
            raise ValueError(f"reconfig_every must be >= 1, got {reconfig_every}")
        if trace_window_s is not None:
            from llm_cluster_gym.envs.sim.scenario import load_scenario

            if len(trace_window_s) != 2:
                raise ValueError(f"trace_window_s must be (start_s, window_s), got {trace_window_s!r}")
            sc = load_scenario(scenario)
            start_s, window_s = (float(v) for v in trace_window_s)
            scenario = sc.with_overrides(workload=replace(sc.workload, start_s=start_s,
                                                          window_s=window_s))
        self.sim = BatchedSimCluster(scenario, int(num_envs))
        self.num_envs = int(num_envs)
        self.task, self.render_mode = task, None
        self.reconfig_every = reconfig_every
        if isinstance(reward_weights, dict):
            reward_weights = RewardWeights(**reward_weights)
        self.reward_weights = reward_weights or TASK_WEIGHTS[task]
        lay = self.sim.layout
        self.layout = lay
        n_saas = int(np.sum(lay.server_is_saas))
        self.codec = ActionCodec(task, lay, n_saas)
        self.single_action_space = self.codec.space()
        spec = observation_spec(lay)
        self.observation_names = spec.names
        self.single_observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (spec.size,), np.float32)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        horizon = self.sim.n_intervals
        self.max_episode_steps = horizon if max_episode_steps is None else min(int(max_episode_steps),
                                                                               horizon)
        self.energy_ref_j = lay.n_gpus * lay.gpu_power_limit_w * lay.control_interval_s
        self._obs = _BatchedObservation(self.sim, n_saas)
        self._nvec = self.codec.nvec()
        self._freq_choices = np.asarray(lay.freq_choices_mhz, dtype=float)
        self._batch_choices = np.asarray(lay.batch_choices, dtype=np.int64)
        self._layouts: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self._started = False
        self._autoreset = False

    # ------------------------------------------------------------------ vector API
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None):
        """Start an episode in every copy; copy i is seeded as `ClusterEnv.reset(seed=seed + i)`.

        `seed` is an int (copy i gets ``seed + i``, as Gymnasium's sync vector env seeds its
        copies), a list with one seed (or None) per copy, or None (each copy's generator goes on).

        Raises:
            ValueError: Options (none are accepted) or a seed list of the wrong length.
        """
        if options:
            raise ValueError(f"BatchedClusterEnv.reset takes no options, got {sorted(options)}")
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int | np.integer):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset: {len(seeds)} seeds for {self.num_envs} copies")
        return self._reset(seeds)

    def _reset(self, seeds: list[int | None]):
        backend_seeds = []
        for i, s in enumerate(seeds):
            if s is not None or self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(s)
            backend_seeds.append(int(self._rngs[i].integers(2**31 - 1)))
        self.sim.reset(backend_seeds)
        n = self.num_envs
        init = self.layout.initial_pools
        self._n_instances = np.tile([c.n_instances for c in init], (n, 1)).astype(np.int64)
        self._tp = np.tile([c.tp for c in init], (n, 1)).astype(np.int64)
        self._freq = np.tile([c.freq_mhz for c in init], (n, 1)).astype(float)
        self._batch = np.tile([c.max_batch for c in init], (n, 1)).astype(np.int64)
        self._step_count = 0
        self._started, self._autoreset = True, False
        self._obs.reset()
        obs = self._obs.build(None, self._n_instances, self._tp, self._freq, self._batch)
        info = {f"{k}_{t}": np.zeros(n) for t in TERMS for k in ("cost", "reward")}
        info.update({k: np.full(n, 1.0 if k == "slo_attainment" else 0.0) for k in INFO_KEYS})
        info["time_s"] = np.full(n, self.sim.time_s)
        return obs, _with_masks(info, n)

    def step(self, actions):
        """Apply one action per copy for one control interval; see `ClusterEnv.step`.

        After the step that truncates the episode, the next call resets every copy (its actions
        are ignored) and returns the first observations with reward 0 (next-step autoreset).

        Raises:
            gymnasium.error.ResetNeeded: Before the first `reset`.
            InvalidActionError: Actions of the wrong shape, not integers, or out of range
                (naming the copy).
        """
        if not self._started:
            raise ResetNeeded("BatchedClusterEnv.step: call reset() before step()")
        n = self.num_envs
        if self._autoreset:
            obs, info = self._reset([None] * n)
            return obs, np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), info
        self._apply(self._validate(actions))
        self._step_count += 1
        m = self.sim.advance()
        truncated = self.sim.done or self._step_count >= self.max_episode_steps
        reward, terms = _reward(m, self.reward_weights, self.energy_ref_j, truncated)
        obs = self._obs.build(m, self._n_instances, self._tp, self._freq, self._batch)
        info = dict(terms)
        info.update({k: np.asarray(getattr(m, k), dtype=float) for k in INFO_KEYS})
        info["time_s"] = np.full(n, self.sim.time_s)
        self._autoreset = truncated
        return (obs, reward, np.zeros(n, dtype=bool), np.full(n, truncated, dtype=bool),
                _with_masks(info, n))

    def close_extras(self, **kwargs: Any) -> None:
        """Nothing to release (the simulator holds no process, device or file)."""

    # ------------------------------------------------------------------ actions
    def _validate(self, actions) -> np.ndarray:
        a = np.asarray(actions)
        want = (self.num_envs, len(self._nvec))
        if a.shape != want:
            raise InvalidActionError(f"actions must have shape {want}, got {a.shape}")
        if a.dtype.kind == "f":
            if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
                raise InvalidActionError("actions must be finite integers")
        elif a.dtype.kind not in "iub":
            raise InvalidActionError(f"actions must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        bad = (a < 0) | (a >= self._nvec)
        if bad.any():
            i, j = (int(v[0]) for v in np.nonzero(bad))
            raise InvalidActionError(f"actions[{i}][{j}] = {a[i, j]} is outside [0, "
                                     f"{self._nvec[j] - 1}] (space nvec={self._nvec.tolist()})")
        return a

    def _apply(self, a: np.ndarray) -> None:
        """Decode the pool blocks as `ActionCodec.decode`, with `ClusterEnv`'s time scales."""
        p = self.sim.n_pools
        block = a[:, : 4 * p].reshape(self.num_envs, p, 4)
        self._freq = self._freq_choices[block[:, :, 2]]
        self._batch = self._batch_choices[block[:, :, 3]]
        if self._step_count % self.reconfig_every == 0:  # instance counts and TP may change now
            for i in range(self.num_envs):
                key = block[i, :, :2].tobytes()
                hit = self._layouts.get(key)
                if hit is None:
                    pools = self.codec.pool_configs(block[i, :, 0],
                                                    [self.layout.tp_choices[t] for t in block[i, :, 1]],
                                                    [1.0] * p, [1] * p)
                    hit = (np.array([c.n_instances for c in pools]), np.array([c.tp for c in pools]))
                    self._layouts[key] = hit
                self._n_instances[i], self._tp[i] = hit
        self.sim.apply_pools(self._n_instances, self._tp, self._freq, self._batch)


def _with_masks(info: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Gymnasium's vector-info layout: each key's array, and ``_key`` marking the copies it holds."""
    present = np.ones(n, dtype=bool)
    out: dict[str, np.ndarray] = {}
    for k, v in info.items():
        out[k] = v
        out[f"_{k}"] = present
    return out


def _reward(m: BatchedMetrics, weights: RewardWeights, energy_ref_j: float,
            episode_end: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`reward.compute_reward` per copy (the same terms, weights and order of the sum)."""
    unserved = m.in_flight if episode_end else 0.0
    judged = m.finished + m.dropped + unserved
    some = judged > 0
    fin = m.finished > 0
    terms = {
        "energy": m.energy_j / energy_ref_j,
        "slo": np.where(some, (m.slo_violations + m.dropped + unserved) / np.where(some, judged, 1.0),
                        0.0),
        "thermal": np.asarray(m.thermal_throttle_events, dtype=float),
        "power": np.asarray(m.power_throttle_events, dtype=float),
        "quality": np.where(fin, m.quality_loss / np.where(fin, m.finished, 1.0), 0.0),
    }
    w = weights_dict(weights)
    out: dict[str, np.ndarray] = {}
    total = np.zeros(len(m.energy_j))
    for name in TERMS:
        r = -w[name] * terms[name]
        out[f"cost_{name}"] = terms[name]
        out[f"reward_{name}"] = r
        total = total + r
    return total, out


class _BatchedObservation:
    """`ObservationBuilder` for every copy at once (the energy task's blocks; no VMs, no faults)."""

    def __init__(self, sim: BatchedSimCluster, n_saas: int) -> None:
        lay = sim.layout
        self.sim, self.layout = sim, lay
        self.size = observation_spec(lay).size
        self.n, self.p, self.r, self.a = sim.n_copies, lay.n_pools, lay.n_rows, lay.n_aisles
        self._rows_at = 8 * self.p
        self._aisles_at = self._rows_at + 6 * self.r
        self._tail_at = self._aisles_at + 4 * self.a
        self._rate_scale = lay.nominal_rps * lay.control_interval_s
        self._temp_span_c = lay.slowdown_temp_c - 40.0
        self._max_ttft_slo = float(np.max(lay.slo_ttft_s))
        self._max_tbt_slo = float(np.max(lay.slo_tbt_s))
        self._gpus_per_server, self._n_saas = lay.gpus_per_server, max(n_saas, 1)
        self._max_batch = float(max(lay.batch_choices))
        self._nominal_row_w = np.asarray(lay.row_limit_w, dtype=float)
        self._nominal_aisle_w = np.asarray(lay.aisle_capacity_w, dtype=float)
        topo = sim.topo
        # GPUs are laid out server by server; the GPU max per aisle is one reduceat when each
        # aisle's servers are contiguous (the shipped layouts), else a scatter maximum.
        aisle = topo.server_aisle
        contiguous = bool(np.all(np.diff(aisle) >= 0))
        self._aisle_starts = (np.searchsorted(aisle, np.arange(topo.n_aisles)) * topo.gpus_per_server
                              if contiguous else None)
        self.reset()

    def reset(self) -> None:
        self.prev_rate = np.zeros((self.n, self.p))

    def build(self, m: BatchedMetrics | None, n_instances: np.ndarray, tp: np.ndarray,
              freq_mhz: np.ndarray, max_batch: np.ndarray) -> np.ndarray:
        sim, lay, n = self.sim, self.layout, self.n
        obs = np.empty((n, self.size), dtype=np.float32)
        pools = obs[:, : self._rows_at].reshape(n, self.p, 8)
        if m is not None:
            rate = m.arrivals_per_pool / self._rate_scale
            pools[:, :, 2] = m.queued_per_pool / self._rate_scale
            pools[:, :, 3] = m.running_per_pool / self._rate_scale
        else:
            rate = np.zeros((n, self.p))
            pools[:, :, 2:4] = 0.0
        pools[:, :, 0] = rate
        pools[:, :, 1] = rate - self.prev_rate
        self.prev_rate = rate
        pools[:, :, 4] = n_instances * tp / self._gpus_per_server / self._n_saas  # as ClusterEnv
        pools[:, :, 5] = tp / 8.0
        pools[:, :, 6] = freq_mhz / lay.max_freq_mhz
        pools[:, :, 7] = max_batch / self._max_batch
        rows = obs[:, self._rows_at: self._aisles_at].reshape(n, self.r, 6)
        row_w = sim.per_copy(sim.row_power_w)
        limit = self._nominal_row_w
        rows[:, :, 0] = row_w / limit
        rows[:, :, 1] = (limit - row_w) / limit  # no faults: the limit in force is the nominal one
        rows[:, :, 2] = sim.row_capped()
        rows[:, :, 3] = 1.0  # the energy task keeps every row's routing weight,
        rows[:, :, 4] = 1.0  # clock ceiling (the maximum clock)
        rows[:, :, 5] = 0.0  # and full-precision serving
        aisles = obs[:, self._aisles_at: self._tail_at].reshape(n, self.a, 4)
        aisles[:, :, 0] = (sim.per_copy(sim.inlet_c) - 20.0) / 20.0
        aisles[:, :, 1] = (self._max_per_aisle(sim.gpu_temp_c) - 40.0) / self._temp_span_c
        cap = self._nominal_aisle_w
        aisles[:, :, 2] = sim.per_copy(sim.aisle_heat_w) / np.maximum(cap, 1.0)
        aisles[:, :, 3] = 1.0  # capacity in force over nominal (no cooling faults)
        tail = obs[:, self._tail_at:]
        phase = 2 * np.pi * sim.time_s / 86400.0
        tail[:, 0] = np.sin(phase)
        tail[:, 1] = np.cos(phase)
        tail[:, 2:6] = 0.0  # no fault is active, no VM waits
        if m is not None:
            tail[:, 6] = m.slo_attainment
            tail[:, 7] = m.ttft_p99_s / self._max_ttft_slo
            tail[:, 8] = m.tbt_p99_s / self._max_tbt_slo
        else:
            tail[:, 6:9] = (1.0, 0.0, 0.0)
        tail[:, 9] = sim.throttled_fraction()
        np.minimum(obs, OBS_CLIP, out=obs)
        np.maximum(obs, -OBS_CLIP, out=obs)
        obs[np.isnan(obs)] = 0.0
        return obs

    def _max_per_aisle(self, gpu_temp_c: np.ndarray) -> np.ndarray:
        topo = self.sim.topo
        if self._aisle_starts is not None:
            return np.maximum.reduceat(gpu_temp_c, self._aisle_starts).reshape(self.n, self.a)
        out = np.full(topo.n_aisles, -np.inf)
        np.maximum.at(out, topo.gpu_aisle, gpu_temp_c)
        return out.reshape(self.n, self.a)
