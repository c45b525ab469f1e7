"""ClusterEnv: the Gymnasium environment over any ClusterBackend, and the registered task ids."""

# ruff: noqa: E501  (the docstring's observation table is wider than the code)

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from operator import attrgetter
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from llm_cluster_gym.envs.actions import TASKS, ActionCodec
from llm_cluster_gym.envs.backend import ClusterBackend, ClusterLayout, PoolConfig, ServiceMetrics, Telemetry
from llm_cluster_gym.envs.observation import OBS_CLIP, ObservationBuilder, observation_spec
from llm_cluster_gym.envs.render import render_ansi, render_rgb
from llm_cluster_gym.envs.reward import TASK_WEIGHTS, TERMS, RewardWeights, compute_reward

INFO_METRICS = (
    "energy_j", "gpu_energy_j", "arrived", "finished", "dropped", "in_flight", "tokens_generated",
    "ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "slo_ttft_violations",
    "slo_tbt_violations", "slo_violations", "slo_attainment", "thermal_throttle_events",
    "power_throttle_events", "thermal_throttled_gpu_s", "power_capped_gpu_s",
    "saas_throttled_gpu_s", "iaas_throttled_gpu_s", "saas_capped_gpu_s", "iaas_capped_gpu_s",
    "clock_lost_mhz_s", "saas_clock_lost_mhz_s", "iaas_clock_lost_mhz_s", "saas_tokens_lost", "quality_loss",
    "reconfigurations", "peak_row_power_w", "max_gpu_temp_c", "carbon_g", "gpu_hours",
    "facility_energy_j", "vm_wait_s", "vm_running_s",
)
FAULT_NAMES = ("cooling_failure", "power_failure", "load_spike")
RESET_OPTIONS = ("backend_seed",)
"""Keys `ClusterEnv.reset` accepts in ``options`` (any other key is refused)."""


class ClusterEnv(gym.Env):
    """Control an LLM inference cluster for energy, power and temperature under latency SLOs.

    ## Description
    Each step is one control interval (5 s of cluster time in the shipped scenarios) of a
    datacenter serving LLM requests from real Azure traces. Three tasks share this class:

    * `energy` (DynamoLLM): per request-length pool, choose the share of servers, the TP degree,
      the GPU frequency and the batch cap. Reconfiguring instances costs their model-load
      downtime. Rewarded for low energy at few SLO violations.
    * `thermal` (TAPAS): in an oversubscribed datacenter with IaaS VMs, place arriving VMs
      (masked), weight request routing across rows, and cap clocks or quantize SaaS instances per
      row during spikes and faults. Rewarded for few thermal/power throttling events, SLO
      violations, little quality loss and energy.
    * `combined`: both sets of knobs.

    ## Action Space
    `MultiDiscrete` (see `envs.actions`): per pool [server share 0..K, TP index, frequency index,
    batch index] — frequency and batch cap take effect every interval, server share and TP only
    every `reconfig_every` intervals (DynamoLLM's slower time scales; they cost downtime); per row [routing level 0..3, clock-ceiling index, quantized 0/1]; one
    placement choice per slot (server index, or `n_servers` for "none"): one slot, or the
    scenario's `vms.placements_per_interval`, slot i for the i-th waiting VM. `action_masks()`
    marks the legal placements (sb3-contrib MaskablePPO); a masked placement, or a server an
    earlier slot took, is never executed (the VM keeps waiting; `info["placement_masked"]`
    counts them). An out-of-space, NaN or non-integer action raises `InvalidActionError`.

    ## Observation Space
    `Box(-10, 10, (n,), float32)`; `self.observation_names` and `self.observation_units` give
    every index. Blocks, in order:

    | index | meaning | unit / normalization |
    |---|---|---|
    | 8 per pool | arrival rate, trend, queued, running, server share, TP, frequency, batch cap | req/s over nominal cluster rate; counts over nominal rate x interval; TP/8; MHz/max MHz; batch/max batch |
    | 6 per row | power, headroom, capped flag, routing weight, clock ceiling, quantized flag | W over nominal row limit; flags 0/1; MHz/max MHz |
    | 4 per aisle | inlet temperature, max GPU temperature, heat over capacity, capacity | (C-20)/20; (C-40)/(slowdown C-40); W/W; W over nominal capacity |
    | 2 | time of day | sin, cos of 2 pi t / 1 day |
    | 3 | active faults: cooling, power feed, load spike | 0/1 |
    | 1 | waiting VM's expected GPU power (P95 of its type's past readings) | W over GPU power limit |
    | 3 | SLO attainment, TTFT P99, TBT P99 | fraction; s over largest SLO |
    | 1 | thermally throttled GPUs | fraction |
    | P - 1 | only when `vms.placements_per_interval` = P > 1: expected GPU power of waiting VMs 2..P | W over GPU power limit |

    ## Rewards
    Minus the weighted sum of the terms in `envs.reward.RewardWeights` (energy as a fraction of
    peak, SLO miss fraction, thermal events, power events, quality loss). Every term is in
    `info` as `cost_<term>` and `reward_<term>`. The SLO miss fraction counts every request:
    dropped requests are misses, and in the last interval so are the requests still in flight
    (`envs.backend.slo_attainment`).

    ## Starting State
    The scenario's initial configuration, temperatures at the idle steady state, a workload
    trace drawn from the seed (trace offsets, random faults, VM arrivals).

    ## Episode End
    Never terminated; truncated when the scenario's duration (the trace window) is simulated.
    Stepping a truncated episode (or before the first `reset`) raises
    `gymnasium.error.ResetNeeded`: call `reset()` first (stable-baselines3's vector envs do).
    `reset(options=...)` accepts only ``backend_seed`` (`RESET_OPTIONS`).

    ## Arguments
    `task` ("energy" | "thermal" | "combined"), `scenario` (name or path), `serving_model`
    ("aggregate" for training, "request" for evaluation), `reward_weights` (RewardWeights or
    dict), `render_mode` ("ansi" | "rgb_array"), `backend` (any ClusterBackend; overrides
    scenario/serving_model, e.g. the real node), `reconfig_every` (intervals between instance
    count / TP changes, default 12 = one minute), `trace_window_s` ((start_s, window_s): the
    stretch of the scenario's source trace episodes draw from; overrides the scenario's
    `workload.start_s`/`window_s`, so training and held-out evaluation windows never overlap).

    ## Version History
    * v0: initial release.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        task: str = "energy",
        scenario: str = "small",
        serving_model: str = "aggregate",
        reward_weights: RewardWeights | dict[str, float] | None = None,
        render_mode: str | None = None,
        backend: ClusterBackend | None = None,
        reconfig_every: int = 12,
        trace_window_s: tuple[float, float] | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}")
        if backend is not None and trace_window_s is not None:
            raise ValueError("trace_window_s applies to the simulated backend; do not pass a backend too")
        self.trace_window_s = None if trace_window_s is None else tuple(float(v) for v in trace_window_s)
        if backend is None:
            from llm_cluster_gym.envs.sim.cluster import SimCluster
            from llm_cluster_gym.envs.sim.scenario import load_scenario

            if self.trace_window_s is not None:
                if len(self.trace_window_s) != 2:
                    raise ValueError(f"trace_window_s must be (start_s, window_s), got {trace_window_s!r}")
                sc = load_scenario(scenario)
                start_s, window_s = self.trace_window_s
                scenario = sc.with_overrides(
                    workload=replace(sc.workload, start_s=start_s, window_s=window_s))
            backend = SimCluster(scenario, serving_model=serving_model,
                                 auto_place_vms=task == "energy")
        self.backend = backend
        self.task = task
        if reconfig_every < 1:
            raise ValueError(f"reconfig_every must be >= 1, got {reconfig_every}")
        self.reconfig_every = reconfig_every
        self.render_mode = render_mode
        if isinstance(reward_weights, dict):
            reward_weights = RewardWeights(**reward_weights)
        self.reward_weights = reward_weights or TASK_WEIGHTS[task]
        lay: ClusterLayout = backend.layout
        self.layout = lay
        n_saas = int(np.sum(lay.server_is_saas))
        self.codec = ActionCodec(task, lay, n_saas)
        self.action_space = self.codec.space()
        spec = observation_spec(lay)
        self.observation_names, self.observation_units = spec.names, spec.units
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (spec.size,), np.float32)
        self._obs = ObservationBuilder(lay, lay.row_limit_w, lay.aisle_capacity_w, n_saas)
        self.energy_ref_j = lay.n_gpus * lay.gpu_power_limit_w * lay.control_interval_s
        self._reset_settings()
        self._tel: Telemetry | None = None
        self._metrics: ServiceMetrics | None = None
        self._truncated = False

    def _reset_settings(self) -> None:
        lay = self.layout
        self.pools = lay.initial_pools
        self.route_weight = np.ones(lay.n_rows)
        self.freq_cap_mhz = np.full(lay.n_rows, lay.max_freq_mhz)
        self.quantized = np.zeros(lay.n_rows)
        self.server_route_weight = np.ones(len(lay.saas_servers))

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode; the backend's randomness is seeded from `self.np_random`.

        ``options={"backend_seed": n}`` seeds the backend with `n` itself instead (what a run
        seeded at the backend, such as `llm-cluster simulate`, reproduces).

        Raises:
            ValueError: An option other than ``backend_seed`` (`RESET_OPTIONS`), or a
                ``backend_seed`` that is not an integer >= 0.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"ClusterEnv.reset: unknown option(s) {unknown}; known: {list(RESET_OPTIONS)}")
        backend_seed = options.get("backend_seed")
        if backend_seed is not None and (isinstance(backend_seed, bool) or not isinstance(
                backend_seed, int | np.integer) or backend_seed < 0):
            raise ValueError(f"ClusterEnv.reset: option 'backend_seed' must be an integer >= 0, "
                             f"got {backend_seed!r}")
        super().reset(seed=seed)
        drawn = int(self.np_random.integers(2**31 - 1))
        backend_seed = drawn if backend_seed is None else int(backend_seed)
        self._tel = self.backend.reset(seed=backend_seed)
        self._metrics = None
        self._reset_settings()
        self._obs.reset()
        self._step_count = 0
        self._truncated = False
        obs = self._observe()
        info = self._info(None, {f"{k}_{t}": 0.0 for t in TERMS for k in ("cost", "reward")})
        info["placement_masked"] = 0.0
        return obs, info

    def step(self, action):
        """Apply the action for one control interval (None: hold every setting, apply nothing).

        Raises:
            gymnasium.error.ResetNeeded: Before the first `reset`, or after the episode was
                truncated (the backend has simulated its whole duration).
            InvalidActionError: An action outside the action space.
        """
        if self._tel is None:
            raise ResetNeeded("ClusterEnv.step: call reset() before step()")
        if self._truncated:
            raise ResetNeeded(f"ClusterEnv.step: the episode was truncated after {self._step_count} "
                              "steps (its whole duration); call reset() to start another")
        masked = False
        if action is not None:
            masked = self._apply(action)
        self._step_count += 1
        m = self.backend.advance()
        self._tel = self.backend.telemetry()
        self._metrics = m
        truncated = bool(self.backend.done)
        self._truncated = truncated
        reward, terms = compute_reward(m, self.reward_weights, self.energy_ref_j,
                                       episode_end=truncated)
        obs = self._observe()
        info = self._info(m, terms)
        info["placement_masked"] = float(masked)
        return obs, float(reward), False, truncated, info

    def _apply(self, action) -> int:
        """Decode and apply an action; the number of its VM placements not executed (masked)."""
        cluster_action, masked = self.codec.decode(action, self._slot_legality())
        if cluster_action.pools is not None:
            scaled = self._time_scaled(cluster_action.pools)
            if scaled is not cluster_action.pools:
                cluster_action = replace(cluster_action, pools=scaled)
        self.backend.apply(cluster_action)
        if cluster_action.pools is not None:
            self.pools = cluster_action.pools
        if cluster_action.row_route_weight is not None:
            self.route_weight = cluster_action.row_route_weight
            self.freq_cap_mhz = cluster_action.row_freq_cap_mhz
            self.quantized = cluster_action.row_quantized.astype(float)
        if cluster_action.server_route_weight is not None:
            self.server_route_weight = cluster_action.server_route_weight
        return masked

    @property
    def last_metrics(self) -> ServiceMetrics | None:
        """Service metrics of the last interval (None before the first step of an episode)."""
        return self._metrics

    @property
    def last_telemetry(self) -> Telemetry | None:
        """Telemetry at the end of the last interval (after `reset`: the first reading)."""
        return self._tel

    def close(self) -> None:
        """Close the backend (a real node stops its sampler and workers, restores GPU settings)."""
        self.backend.close()
        super().close()

    def action_masks(self) -> np.ndarray:
        """Legal choices, flattened over the MultiDiscrete dimensions (MaskablePPO format)."""
        return self.codec.masks(self._slot_legality())

    def render(self):
        """ANSI status line block, or an RGB picture of rows and aisles."""
        if self.render_mode is None or self._tel is None:
            return None
        if self.render_mode == "ansi":
            return render_ansi(self.layout, self._tel, self._metrics)
        return render_rgb(self.layout, self._tel)

    # ------------------------------------------------------------------ helpers
    def _time_scaled(self, wanted: tuple[PoolConfig, ...]) -> tuple[PoolConfig, ...]:
        """Apply DynamoLLM's time scales to a wanted pool configuration.

        Frequency and batch cap change every interval; instance counts and TP only every
        `reconfig_every` intervals (they cost model-load downtime).
        """
        if wanted is self.pools or self._step_count % self.reconfig_every == 0 or wanted == self.pools:
            return wanted
        return tuple(
            replace(cur, freq_mhz=w.freq_mhz, max_batch=w.max_batch)
            for cur, w in zip(self.pools, wanted, strict=True)
        )

    def _legal_servers(self) -> np.ndarray:
        tel = self._tel
        if tel is None or len(tel.legal_vm_servers) != self.layout.n_servers:
            return np.zeros(self.layout.n_servers, dtype=bool)
        return tel.legal_vm_servers

    def _slot_legality(self) -> np.ndarray:
        """Servers each placement slot may take now (`ActionCodec.slot_legality`).

        The VMs waiting are those the telemetry lists (at least one where it marks a legal
        server: a backend that lists none still has the head VM).
        """
        legal = self._legal_servers()
        if self.codec.placement_slots <= 1:
            return legal
        waiting = len(self._tel.pending_vms_expected_gpu_w) if self._tel is not None else 0
        return self.codec.slot_legality(legal, max(waiting, int(legal.any())))

    def _observe(self) -> np.ndarray:
        return self._obs.build(self._tel, self._metrics, self.pools, self.route_weight,
                               self.freq_cap_mhz, self.quantized, _fault_kinds(tuple(self._tel.active_faults)),
                               self.server_route_weight)

    def _info(self, m: ServiceMetrics | None, terms: dict[str, float]) -> dict[str, Any]:
        info: dict[str, Any] = dict(terms)
        if m is None:
            info.update(_NO_METRICS_INFO)
        else:
            info.update(zip(INFO_METRICS, map(float, _info_metrics(m)), strict=True))
        info["time_s"] = float(self._tel.time_s)
        info["active_faults"] = ",".join(self._tel.active_faults)
        return info


_info_metrics = attrgetter(*INFO_METRICS)
"""The INFO_METRICS values of a ServiceMetrics, as a tuple."""

_NO_METRICS_INFO = {k: 1.0 if k == "slo_attainment" else 0.0 for k in INFO_METRICS}
"""The metric part of `info` before the first step."""


@lru_cache(maxsize=256)
def _fault_kinds(active_faults: tuple[str, ...]) -> np.ndarray:
    """Flags per FAULT_NAMES kind (cached: the set of active faults rarely changes)."""
    kinds = np.array([any(n.startswith(k) for n in active_faults) for k in FAULT_NAMES])
    kinds.flags.writeable = False
    return kinds
