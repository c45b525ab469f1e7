"""The worker's engine: continuous-batching scheduling of requests over one device.

Requests wait in a FIFO queue; each scheduler step (:meth:`InferenceEngine.step`) drops
waiters older than ``drop_after_s``, admits waiting requests while the running batch is below
the batch cap the controller sets (and the prefill-token budget of the step allows), runs
their prefill passes one after another (the first token comes out of the prefill: TTFT), then
runs one decode iteration for every running sequence. Running sequences are kept packed in KV
slots ``0..n-1``: a finished sequence's slot is refilled by moving the last one. Timing
conventions match the simulator (``envs/sim/serving_request.py``): TTFT from arrival to the
end of prefill, TBT = (last token time - first token time) / (tokens - 1).

The model maths is :class:`~llm_cluster_gym.envs.real.llama.LlamaPasses` (``passes``), the
bucketing and CUDA graphs :class:`~llm_cluster_gym.envs.real.graphs.GraphedPasses`
(``runner``). The engine reaches the model through four methods only, :meth:`prefill`,
:meth:`decode_step`, :meth:`_move_slot` and :meth:`warmup`, which the tensor-parallel engine
(``envs/real/tp_worker.py``) overrides to announce each pass to its followers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real import step_timing
from llm_cluster_gym.envs.real.graphs import GraphedPasses
from llm_cluster_gym.envs.real.llama import LlamaPasses
from llm_cluster_gym.envs.real.records import Completed, EngineStats, Request
from llm_cluster_gym.envs.real.worker_config import WorkerConfig, WorkerError


@dataclass
class _Seq:
    req: Request
    prompt_tokens: int
    out_tokens: int
    first_token_s: float
    generated: int


def _dropped(req: Request) -> Completed:
    return Completed(req.req_id, req.pool, req.arrival_s, req.input_tokens, req.output_tokens,
                     dropped=True)


def _finished(seq: _Seq, now: float) -> Completed:
    r = seq.req
    tbt = (now - seq.first_token_s) / (seq.generated - 1) if seq.generated > 1 else 0.0
    return Completed(r.req_id, r.pool, r.arrival_s, seq.prompt_tokens, seq.generated,
                     first_token_s=seq.first_token_s, finish_s=now,
                     ttft_s=seq.first_token_s - r.arrival_s, tbt_s=tbt)


class InferenceEngine:
    """Continuous-batching inference over one device with a static KV cache.

    Args:
        config: Model, device and cache sizes.
        clock: Time source in seconds (``time.time`` so arrival stamps from other processes
            compare).
    """

    def __init__(self, config: WorkerConfig, clock: Callable[[], float] = time.time) -> None:
        import torch

        self.torch = torch
        self.cfg = config
        self.shape = config.shape()
        if config.max_slots < 1 or config.max_ctx < 16:
            raise WorkerError(f"WorkerConfig: max_slots={config.max_slots} must be >= 1 and "
                              f"max_ctx={config.max_ctx} >= 16")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise WorkerError(f"WorkerConfig: field 'device' = {config.device!r} but torch sees no "
                              "CUDA device")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.clock = clock
        self.passes = LlamaPasses(config, self.shape, self.device, self.dtype)
        self.runner = GraphedPasses(self.passes, config)
        self.max_batch = config.max_slots
        self.accepting = True
        self.max_waiting: int | None = None
        self.waiting: deque[Request] = deque()
        self.running: list[_Seq] = []
        self.stats = EngineStats()
        self.step_log: list[tuple[float, ...]] = []

    # ------------------------------------------------------------------ control
    def set_control(self, max_batch: int | None = None, accepting: bool | None = None,
                    max_waiting: int | None = None) -> None:
        """Set the batch cap (clipped to the slots), admission on/off and the queue cap.

        Raises:
            WorkerError: ``max_batch`` < 1 or ``max_waiting`` < 0.
        """
        if max_batch is not None:
            if int(max_batch) < 1:
                raise WorkerError(f"set_control: field 'max_batch' must be >= 1, got {max_batch}")
            self.max_batch = min(int(max_batch), self.cfg.max_slots)
        if accepting is not None:
            self.accepting = bool(accepting)
        if max_waiting is not None:
            if int(max_waiting) < 0:
                raise WorkerError(f"set_control: field 'max_waiting' must be >= 0, got {max_waiting}")
            self.max_waiting = int(max_waiting)

    def submit(self, req: Request) -> Completed | None:
        """Queue a request; returns its dropped record when admission refuses it."""
        if req.input_tokens < 1 or req.output_tokens < 1:
            raise WorkerError(f"Request {req.req_id}: input_tokens={req.input_tokens} and "
                              f"output_tokens={req.output_tokens} must be >= 1")
        full = self.max_waiting is not None and len(self.waiting) >= self.max_waiting
        if not self.accepting or full:
            self.stats.dropped += 1
            return _dropped(req)
        self.waiting.append(req)
        return None

    @property
    def busy(self) -> bool:
        """True while requests wait or run."""
        return bool(self.waiting) or bool(self.running)

    # ------------------------------------------------------------------ model passes
    def prefill(self, tokens: Any, slot: int) -> Any:
        """Run one prompt into KV slot ``slot``; returns the next token id (see GraphedPasses)."""
        return self.runner.prefill(tokens, slot)

    def decode_step(self, n: int, max_pos: int | None = None, positions: Any = None) -> None:
        """Run one decode iteration for slots ``0..n-1`` (see GraphedPasses.decode_step)."""
        self.runner.decode_step(n, max_pos, positions)

    def warmup(self) -> int:
        """Capture every CUDA graph now; returns how many (see GraphedPasses.warmup)."""
        return self.runner.warmup()

    def sync(self) -> None:
        """Wait for the device (makes wall-clock timestamps mean "done")."""
        self.runner.sync()

    def _move_slot(self, src: int, dst: int) -> None:
        n = self.running[src].prompt_tokens + self.running[src].generated
        self.passes.copy_slot(src, dst, n)

    # ------------------------------------------------------------------ scheduling
    def _retire(self, done_slots: list[int], out: list[Completed], now: float) -> None:
        for i in sorted(done_slots, reverse=True):
            seq = self.running[i]
            out.append(_finished(seq, now))
            last = len(self.running) - 1
            if i != last:
                self._move_slot(last, i)
                self.running[i] = self.running[last]
            self.running.pop()
        self.stats.finished += len(done_slots)

    def step(self) -> list[Completed]:
        """One scheduler iteration: drop stale waiters, admit and prefill, one decode.

        Returns:
            Requests that finished or were dropped during the step.
        """
        torch = self.torch
        out: list[Completed] = []
        now = t_step = self.clock()
        while self.waiting and now - self.waiting[0].arrival_s > self.cfg.drop_after_s:
            out.append(_dropped(self.waiting.popleft()))
            self.stats.dropped += 1
        budget = self.cfg.max_prefill_tokens
        t_pre = self.clock()
        n_pre = 0
        pre_tokens = self.stats.prefill_tokens
        with torch.inference_mode():
            while self.waiting and len(self.running) < self.max_batch:
                req = self.waiting[0]
                out_tok = min(req.output_tokens, self.cfg.max_ctx // 2)
                prompt = min(req.input_tokens, self.cfg.max_ctx - out_tok)
                if n_pre > 0 and prompt > budget:
                    break
                self.waiting.popleft()
                if prompt < req.input_tokens or out_tok < req.output_tokens:
                    self.stats.clipped_prompts += 1
                slot = len(self.running)
                ids = torch.randint(0, self.shape.vocab, (prompt,), device=self.device)
                first = self.prefill(ids, slot)
                self.passes.tok[slot] = first
                self.passes.pos[slot] = prompt
                self.sync()
                t_first = self.clock()
                seq = _Seq(req, prompt, out_tok, t_first, 1)
                self.running.append(seq)
                budget -= prompt
                n_pre += 1
                self.stats.prefill_passes += 1
                self.stats.prefill_tokens += prompt
        pre_s = dec_s = 0.0
        if n_pre:
            now = self.clock()
            pre_s = now - t_pre
            self.stats.prefill_busy_s += pre_s
            self._retire([i for i, s in enumerate(self.running) if s.generated >= s.out_tokens],
                         out, now)
        n = len(self.running)
        ctx_sum = 0
        if n:
            t0 = self.clock()
            positions = np.array([s.prompt_tokens + s.generated - 1 for s in self.running])
            self.decode_step(n, int(positions.max()), positions)
            self.sync()
            now = self.clock()
            dec_s = now - t0
            ctx_sum = int(positions.sum()) + n
            self.stats.decode_iters += 1
            self.stats.decode_tokens += n
            self.stats.decode_busy_s += dec_s
            self.stats.decode_ctx_tokens += ctx_sum
            done = []
            for i, s in enumerate(self.running):
                s.generated += 1
                if s.generated >= s.out_tokens:
                    done.append(i)
            if done:
                self._retire(done, out, now)
        t_end = self.clock()
        self.stats.steps += 1
        self.stats.step_busy_s += t_end - t_step
        if self.cfg.record_steps:
            self.step_log.append((t_step, t_end, n_pre, self.stats.prefill_tokens - pre_tokens,
                                  pre_s, n, ctx_sum, dec_s))
        return out

    # ------------------------------------------------------------------ measurement
    def time_prefill_s(self, tokens: int, repeats: int = 3) -> float:
        """Median wall time of a prefill pass (see :func:`step_timing.time_prefill_s`)."""
        return step_timing.time_prefill_s(self, tokens, repeats)

    def time_decode_s(self, batch: int, ctx_tokens: int | Any, repeats: int = 10) -> float:
        """Median wall time of one decode iteration (see :func:`step_timing.time_decode_s`)."""
        return step_timing.time_decode_s(self, batch, ctx_tokens, repeats)
