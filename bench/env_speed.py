"""Env steps per second for each training variant, and the env's overhead over the bare simulator.

One process, one core (torch is not involved); rates are per second of this process's CPU
time (`time.process_time`), so other load on the machine distorts them less. Each env runs
whole episodes with the action that keeps the scenario's initial configuration (placements
where legal), after one warm-up episode. The bare-simulator figure runs the same backend
with `advance()` alone.

Last line: one JSON object mapping each env id to its steps per second.
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


def main() -> None:
    out = {}
    for env_id in llm_cluster_gym.TASK_IDS:
        if "-small-" not in env_id:
            continue
        env_rate, bare_rate = env_steps_per_s(env_id)
        overhead = bare_rate / env_rate - 1.0
        print(f"{env_id:32s} env {env_rate:8.0f} steps/s   bare simulator {bare_rate:8.0f} "
              f"intervals/s   env overhead {100 * overhead:5.1f}%")
        out[env_id] = round(env_rate, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
