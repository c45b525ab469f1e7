"""Env steps per second for each training variant, and the env's overhead over the bare simulator.

One process, one core (torch is not involved); rates are per second of this process's CPU
time (`time.process_time`), so other load on the machine distorts them less. Each env runs
whole episodes with the action that keeps the scenario's initial configuration (placements
where legal), after one warm-up episode. The bare-simulator figure runs the same backend
with `advance()` alone.

Then `gymnasium.make_vec` on ``LLMCluster/Energy-small-v0``: the batched copies (its vector entry
point, `envs.vector_env`) at 16, 64 and 256 copies, against Gymnasium's sync vector env of 8
`ClusterEnv`s measured in the same process, all with uniformly random actions (a new layout in
every copy every 12 steps: the batched env's slowest case) and per CPU-second as above.

Last line: one JSON object mapping each env id to its steps per second, plus
``vector_env_steps_per_s`` (64 batched copies), ``vector_env_steps_per_s_by_copies``,
``sync_vector_env_steps_per_s`` (8 copies) and ``batched_over_sync``.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import llm_cluster_gym  # noqa: E402

MIN_SECONDS = 3.0


def hold_action(env) -> np.ndarray:
    """Initial pools; routing/cap/quantize neutral; first legal placement."""
    parts = []
    if env.codec.has_pools:
        parts.append(env.codec.encode(env.layout.initial_pools))
    if env.codec.has_rows:
        n_freq = len(env.layout.freq_choices_mhz)
        parts.append(np.tile([3, n_freq - 1, 0], env.layout.n_rows))
        parts.append([env.layout.n_servers])
    return np.concatenate(parts).astype(np.int64)


def env_steps_per_s(env_id: str) -> tuple[float, float]:
    env = gym.make(env_id).unwrapped
    base = hold_action(env)

    def episode(seed: int) -> int:
        env.reset(seed=seed)
        n = 0
        while True:
            a = base.copy()
            if env.codec.has_rows:
                mask = env.action_masks()[-(env.layout.n_servers + 1):]
                a[-1] = int(np.flatnonzero(mask)[0])
            *_, trunc, _ = env.step(a)
            n += 1
            if trunc:
                return n

    episode(0)
    steps, t0, seed = 0, time.process_time(), 1
    while time.process_time() - t0 < MIN_SECONDS:
        steps += episode(seed)
        seed += 1
    env_rate = steps / (time.process_time() - t0)

    backend = env.backend
    backend.reset(seed=0)
    steps, t0, seed = 0, time.process_time(), 1
    while time.process_time() - t0 < MIN_SECONDS:
        backend.reset(seed=seed)
        while not backend.done:
            backend.advance()
            steps += 1
        seed += 1
    return env_rate, steps / (time.process_time() - t0)


def vector_steps_per_s(num_envs: int, mode: str) -> float:
    """Env steps (all copies) per CPU-second of `gymnasium.make_vec` under random actions."""
    envs = gym.make_vec(VECTOR_ID, num_envs=num_envs, vectorization_mode=mode)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    nvec = envs.single_action_space.nvec
    actions = [rng.integers(0, nvec, size=(num_envs, len(nvec))) for _ in range(64)]
    for k in range(12):  # warm-up: the first layouts, caches
        envs.step(actions[k])
    steps, k, t0 = 0, 0, time.process_time()
    while time.process_time() - t0 < MIN_SECONDS:
        envs.step(actions[k % len(actions)])
        steps += num_envs
        k += 1
    rate = steps / (time.process_time() - t0)
    envs.close()
    return rate


VECTOR_ID = "LLMCluster/Energy-small-v0"
BATCHED_COPIES = (16, 64, 256)
SYNC_COPIES = 8


def main() -> None:
    out: dict[str, object] = {}
    for env_id in llm_cluster_gym.TASK_IDS:
        if "-small-" not in env_id:
            continue
        env_rate, bare_rate = env_steps_per_s(env_id)
        overhead = bare_rate / env_rate - 1.0
        print(f"{env_id:32s} env {env_rate:8.0f} steps/s   bare simulator {bare_rate:8.0f} "
              f"intervals/s   env overhead {100 * overhead:5.1f}%")
        out[env_id] = round(env_rate, 1)
    by_copies = {}
    for n in BATCHED_COPIES:
        by_copies[n] = vector_steps_per_s(n, "vector_entry_point")
        print(f"make_vec {VECTOR_ID}, {n:3d} batched copies: {by_copies[n]:9.0f} steps/s")
    sync = vector_steps_per_s(SYNC_COPIES, "sync")
    print(f"make_vec {VECTOR_ID}, {SYNC_COPIES} sync copies:      {sync:9.0f} steps/s")
    out["vector_env_steps_per_s"] = round(by_copies[64], 1)
    out["vector_env_steps_per_s_by_copies"] = {str(n): round(v, 1) for n, v in by_copies.items()}
    out["sync_vector_env_steps_per_s"] = round(sync, 1)
    out["batched_over_sync"] = round(by_copies[64] / sync, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
