"""Digests of reference trajectories: every registered env id and every rule-based controller.

Shared by `record.py` (writes them) and `tests/test_golden.py` (compares them). A digest is a
SHA-256 over the exact bytes of the float64 arrays, so any change of behaviour, however small,
changes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

ENV_STEPS = 40
CONTROLLER_CELLS = (
    ("energy", "small", ("static", "dynamo", "oracle", "shield:dynamo", "random")),
    ("thermal", "small_tapas", ("unaware", "tapas", "shield:unaware", "shield:tapas")),
    ("thermal", "small_faults", ("unaware", "shield:tapas")),
    ("combined", "small_tapas", ("tapas", "shield:tapas")),
)
CONTROLLER_DURATION_S = 150.0
ENGINE_TICKS = 300
ENGINE_MODES = ("chunked", "serial")


class _Digest:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                self._h.update(str(key).encode())
                self.add(value[key])
        elif isinstance(value, str):
            self._h.update(value.encode())
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, tuple)):
            self._h.update(repr(value).encode())
        else:
            self._h.update(np.ascontiguousarray(np.asarray(value, dtype=np.float64)).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def env_digest(env_id: str, seed: int = 0) -> str:
    """Digest of `ENV_STEPS` seeded random steps of a registered id (obs, reward, info scalars)."""
    import gymnasium as gym

    import llm_cluster_gym  # noqa: F401  (registers the ids: the digest must not rely on another test's import)

    env = gym.make(env_id)
    digest = _Digest()
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    digest.add(obs)
    digest.add({k: v for k, v in info.items() if np.isscalar(v)})
    for _ in range(ENV_STEPS):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        digest.add(obs)
        digest.add(reward)
        digest.add({k: v for k, v in info.items() if np.isscalar(v)})
        if terminated or truncated:
            break
    env.close()
    return digest.hexdigest()


def controller_digest(task: str, scenario_name: str, controller: str, seed: int = 0) -> str:
    """Digest of one short simulated episode of a rule-based controller (every interval metric)."""
    from llm_cluster_gym.controllers.registry import policy_maker
    from llm_cluster_gym.envs.rollout import run_measured
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    scenario = load_scenario(scenario_name).with_overrides(duration_s=CONTROLLER_DURATION_S)
    result, summary = run_measured(task, scenario, "request", policy_maker(controller, seed), seed, 0)
    digest = _Digest()
    digest.add(result.metrics)
    digest.add(result.row_power_w)
    digest.add(result.aisle_max_gpu_temp_c)
    digest.add(summary)
    return digest.hexdigest()


FIXED_CELLS = (("small", "request"), ("small_faults", "request"), ("small_tapas", "aggregate"))


def fixed_digest(scenario_name: str, serving: str, seed: int = 0) -> str:
    """Digest of a short episode under the scenario's fixed configuration (`llm-cluster simulate`)."""
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.rollout import run_episode
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    scenario = load_scenario(scenario_name).with_overrides(duration_s=CONTROLLER_DURATION_S)
    env = ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model=serving,
                                                        record_ticks=True))
    result = run_episode(env, None, seed, seed_backend=True)
    digest = _Digest()
    digest.add(result.metrics)
    digest.add(result.row_power_w)
    digest.add(result.aisle_inlet_c)
    digest.add(result.aisle_max_gpu_temp_c)
    digest.add(result.tick_row_power_w)
    digest.add(result.summary())
    return digest.hexdigest()


def engine_digest(prefill_mode: str, seed: int = 0) -> str:
    """Digest of `RequestLevelServing` driven hard by hand, every tick's load and request state.

    Six instances of three pools with little KV memory (requests are preempted and recomputed),
    random prompts and outputs, one instance stopped and restarted (its requests requeued): the
    paths the scenario rollouts seldom reach, for both prefill modes.
    """
    from llm_cluster_gym.envs.sim.instances import InstanceTable
    from llm_cluster_gym.envs.sim.serving import ServiceAccumulator
    from llm_cluster_gym.envs.sim.serving_request import RequestLevelServing, SlotModel

    rng = np.random.default_rng(seed)
    n = 6
    inst = InstanceTable.empty(np.arange(n), gpus_per_server=1)
    inst.active[:] = True
    inst.pool[:] = [0, 0, 1, 1, 2, 2]
    inst.max_batch[:] = [8, 16, 32, 8, 64, 4]
    model = SlotModel(
        prefill_time_s=lambda tok, i: (0.01 + 1e-4 * (1 + 0.1 * i) * np.asarray(tok, float)
                                       + 1e-9 * np.asarray(tok, float) ** 2),
        decode_iter_time_s=lambda b, c, i: 0.01 + 2e-4 * b + 1e-7 * c * b,
        kv_capacity_tokens=np.array([3000.0, 6000.0, 20000.0, 2500.0, 50000.0, 1500.0]))
    serving = RequestLevelServing(n, 3, 2048, 30.0, prefill_mode)
    acc = ServiceAccumulator(3)
    live = np.ones(n, dtype=bool)
    digest = _Digest()
    t_s, dt_s = 0.0, 0.5
    for tick in range(ENGINE_TICKS):
        if tick == 100:
            live[3] = False
            serving.requeue(~live)
        if tick == 180:
            live[3] = True
        k = rng.poisson(6)
        serving.add_arrivals(np.sort(t_s + rng.random(k) * dt_s), rng.integers(10, 3000, k),
                             rng.integers(1, 800, k), rng.integers(0, 3, k))
        load = serving.tick(t_s, dt_s, inst, live, model, np.ones(n), np.array([0.5, 1.0, 2.0]),
                            np.array([0.05, 0.08, 0.1]), np.zeros(n), acc)
        t_s += dt_s
        digest.add([load.prefill_busy_s, load.prefill_tokens, load.decode_busy_s,
                    load.decode_batch, load.decode_ctx_tokens, load.decode_tokens])
        digest.add([load.tokens_generated, serving.preemptions, serving.in_flight])
        digest.add(serving.req)
    digest.add([acc.finished, acc.violations, acc.ttft_violations, acc.tbt_violations,
                acc.dropped])
    digest.add(np.concatenate(acc.ttft_s))
    digest.add(np.concatenate(acc.tbt_s))
    return digest.hexdigest()


def all_digests() -> dict[str, str]:
    """Every digest, keyed by what was rolled out.

    Keys: `env:<id>`, `controller:<task>:<scenario>:<name>`, `fixed:<scenario>:<serving>` or
    `engine:<prefill mode>`.
    The values are SHA-256 digests (see `_Digest`).
    """
    import llm_cluster_gym

    out = {f"env:{env_id}": env_digest(env_id) for env_id in llm_cluster_gym.TASK_IDS}
    for task, scenario, names in CONTROLLER_CELLS:
        for name in names:
            out[f"controller:{task}:{scenario}:{name}"] = controller_digest(task, scenario, name)
    for scenario, serving in FIXED_CELLS:
        out[f"fixed:{scenario}:{serving}"] = fixed_digest(scenario, serving)
    for mode in ENGINE_MODES:
        out[f"engine:{mode}"] = engine_digest(mode)
    return out
