"""Isolated timings of an idle engine's passes (what the profiles and the calibration measure).

``scripts/profile_gpu.py`` and ``scripts/profile_tp.py`` call them through the engine's
``time_prefill_s`` / ``time_decode_s``.

Each function drives the engine's own :meth:`prefill` / :meth:`decode_step` (so a
tensor-parallel leader announces the passes to its followers as when serving), synchronizes
the device around every timed pass and returns the median wall time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_cluster_gym.envs.real.worker_config import WorkerError

if TYPE_CHECKING:
    from llm_cluster_gym.envs.real.engine import InferenceEngine


def time_prefill_s(engine: InferenceEngine, tokens: int, repeats: int = 3) -> float:
    """Median wall time of a prefill pass of ``tokens`` tokens (slot 0, nothing running).

    Raises:
        WorkerError: The engine is serving.
    """
    if engine.running:
        raise WorkerError("time_prefill_s: the engine is serving; measure on an idle engine")
    torch = engine.torch
    ids = torch.randint(0, engine.shape.vocab, (int(tokens),), device=engine.device)
    times = []
    with torch.inference_mode():
        engine.prefill(ids, 0)
        for _ in range(repeats):
            engine.sync()
            t0 = time.perf_counter()
            engine.prefill(ids, 0)
            engine.sync()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_decode_s(engine: InferenceEngine, batch: int, ctx_tokens: int | Any,
                  repeats: int = 10) -> float:
    """Median wall time of one decode iteration of ``batch`` sequences.

    Args:
        engine: An idle engine.
        batch: Sequences in the iteration.
        ctx_tokens: Context length of every sequence, or one length per sequence (a
            mixed batch; the chunked attention's cost follows their sum).
        repeats: Timed iterations (after one untimed).

    The cache contents are whatever is there (speed does not depend on the values).

    Raises:
        WorkerError: The engine is serving, or ``batch``/``ctx_tokens`` are out of range.
    """
    if engine.running:
        raise WorkerError("time_decode_s: the engine is serving; measure on an idle engine")
    cfg = engine.cfg
    ctx = np.broadcast_to(np.asarray(ctx_tokens, dtype=np.int64), (int(batch),))
    if not 1 <= batch <= cfg.max_slots or ctx.min() < 1 or ctx.max() >= cfg.max_ctx:
        raise WorkerError(f"time_decode_s: batch={batch} must be in [1, {cfg.max_slots}] "
                          f"and ctx_tokens={ctx_tokens} in [1, {cfg.max_ctx})")
    pos_t = engine.torch.as_tensor(ctx - 1, device=engine.device)
    times = []
    for _ in range(repeats + 1):
        engine.passes.pos[:batch] = pos_t
        engine.sync()
        t0 = time.perf_counter()
        engine.decode_step(batch, int(ctx.max()) - 1, ctx - 1)
        engine.sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))
