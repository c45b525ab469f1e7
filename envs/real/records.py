"""The records that cross the worker's boundary: requests in, completions and counters out.

They travel over the worker pipe (pickled) and into :class:`envs.real.cluster.RealCluster`;
times are in the engine's clock (Unix seconds by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STEP_LOG_COLUMNS = ("t_start_s", "t_end_s", "prefill_passes", "prefill_tokens", "prefill_s",
                    "decode_batch", "decode_ctx_tokens", "decode_s")
"""Columns of ``InferenceEngine.step_log`` (wall-clock times from the engine's clock)."""


@dataclass
class Request:
    """One inference request (times in the engine's clock, Unix seconds by default)."""

    req_id: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    pool: int = 0


@dataclass
class Completed:
    """Outcome of one request: finished (TTFT/TBT set) or dropped (``dropped`` True)."""

    req_id: int
    pool: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    first_token_s: float = math.nan
    finish_s: float = math.nan
    ttft_s: float = math.nan
    tbt_s: float = math.nan
    dropped: bool = False


@dataclass
class EngineStats:
    """Cumulative work counters of an engine (monotone; diff two snapshots for a window).

    ``step_busy_s`` is the wall time inside ``InferenceEngine.step`` (prefill and decode
    plus the scheduler's host work between them), so ``step_busy_s - prefill_busy_s -
    decode_busy_s`` is the host overhead the profile's isolated timings do not see.
    ``decode_ctx_tokens`` sums, over decode iterations, the tokens the batch attended to
    (divide by ``decode_tokens`` for the mean context).
    """

    prefill_passes: int = 0
    prefill_tokens: int = 0
    prefill_busy_s: float = 0.0
    decode_iters: int = 0
    decode_tokens: int = 0
    decode_busy_s: float = 0.0
    finished: int = 0
    dropped: int = 0
    clipped_prompts: int = 0
    steps: int = 0
    step_busy_s: float = 0.0
    decode_ctx_tokens: int = 0


@dataclass
class WorkerReport:
    """What a worker returns on ``poll()``: completions and its cumulative counters."""

    completed: list[Completed] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    waiting: int = 0
    running: int = 0
