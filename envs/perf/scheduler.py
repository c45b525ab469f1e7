"""vLLM's default (V1) scheduler in a closed loop, as a trace of step compositions.

`simulate` runs one serving instance at a fixed concurrency: ``max_num_seqs`` requests are kept
in the engine and every finished request is replaced at once (the closed loop of a benchmark
client holding that many requests in flight; ML.ENERGY's runs keep the queue full). Each step
follows vLLM's V1 scheduler with chunked prefill (the default):

* running requests first, in admission order: a decoding request takes one token of the step's
  token budget (``max_num_batched_tokens``), a request still prefilling takes the next chunk of
  its prompt, up to what is left of the budget;
* paged KV cache: blocks of 16 tokens are allocated as tokens are computed, not reserved for the
  whole output at admission; when a running request's next block does not fit, the most recently
  admitted running request is preempted (its blocks freed, its tokens recomputed when it is
  admitted again, ahead of new requests);
* new requests are admitted only in steps without preemption, while fewer than
  ``max_num_seqs`` run, the budget lasts and their first chunk's blocks fit.

What a step contains does not depend on how long steps take (the client never waits), so the
trace is computed once per configuration and timed afterwards by `llm_cluster_gym.envs.perf.step`.
Runs of identical pure-decode steps (no admission, completion or preemption possible) are
skipped over in one record carrying their count, which keeps long outputs cheap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.perf.shapes import ModelShape

BLOCK_TOKENS = 16
"""vLLM's default KV-cache block size (tokens)."""

DEFAULT_TOKEN_BUDGET = 8192
"""vLLM V1's default ``max_num_batched_tokens`` for the OpenAI server on GPUs with >= 70 GiB."""

GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default fraction of GPU memory for weights, activations and KV cache."""

TRACE_FIELDS = (
    "count",
    "n_dec",
    "ctx_full",
    "ctx_win",
    "n_pre",
    "pairs_full",
    "pairs_win",
    "kvpre_full",
    "kvpre_win",
    "n_sched",
    "n_running",
    "n_out",
    "n_prefill_seqs",
    "in_window",
)
"""Columns of a trace record: how many identical steps, and per step: decoding requests, their
summed context (full and windowed layers), prefill tokens, prefill attention pairs (full, windowed),
KV tokens the prefill chunks read (full, windowed), scheduled requests, running requests, output
tokens produced, requests with a prefill chunk, and whether the step is inside the measurement
window (energy, power, throughput and batch are measured there; ITL over every step)."""


class CapacityError(ValueError):
    """The model does not fit on the instance (weights and activations exceed GPU memory)."""


@dataclass(frozen=True)
class Workload:
    """Request lengths of a closed-loop run: a fixed prompt length and an output-length law.

    ``output_values`` with ``output_probs`` is a discrete distribution (one value: fixed length).
    """

    input_tokens: int
    output_values: tuple[int, ...]
    output_probs: tuple[float, ...]

    @classmethod
    def fixed(cls, input_tokens: int, output_tokens: int) -> Workload:
        """Every request has the same prompt and output length."""
        return cls(int(input_tokens), (int(output_tokens),), (1.0,))

    @classmethod
    def from_histogram(cls, input_tokens: int, bins: list[float], counts: list[float]) -> Workload:
        """Output lengths spread evenly inside each histogram bin (``bins`` are edges)."""
        values: list[int] = []
        probs: list[float] = []
        total = float(sum(counts))
        for lo, hi, c in zip(bins[:-1], bins[1:], counts, strict=True):
            if c <= 0:
                continue
            pts = np.unique(np.linspace(max(1, round(lo)), max(1, round(hi)), 8).round().astype(int))
            values.extend(int(p) for p in pts)
            probs.extend([c / total / len(pts)] * len(pts))
        return cls(int(input_tokens), tuple(values), tuple(probs))

    @property
    def mean_output(self) -> float:
        """Mean output length (tokens)."""
        return float(np.dot(self.output_values, self.output_probs))


@dataclass(frozen=True)
class KvLayout:
    """KV-cache memory of one instance: bytes per token per layer kind and the free capacity."""

    full_bytes_per_token: float
    window_bytes_per_token: float
    window: int
    state_bytes_per_seq: float
    capacity_bytes: float
    weights_bytes_per_gpu: float
    reserve_bytes_per_gpu: float

    def seq_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes the sequences of ``tokens`` computed tokens hold (whole blocks)."""
        t = -(-np.asarray(tokens) // BLOCK_TOKENS) * BLOCK_TOKENS
        out = self.full_bytes_per_token * t
        if self.window:
            out = out + self.window_bytes_per_token * np.minimum(t, self.window + BLOCK_TOKENS)
        if self.state_bytes_per_seq:
            out = out + np.where(t > 0, self.state_bytes_per_seq, 0.0)
        return out

    def one_seq_bytes(self, tokens: int) -> float:
        """`seq_bytes` of one sequence (plain Python, for the admission loop)."""
        t = -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS
        out = self.full_bytes_per_token * t
        if self.window:
            out += self.window_bytes_per_token * min(t, self.window + BLOCK_TOKENS)
        if self.state_bytes_per_seq and t > 0:
            out += self.state_bytes_per_seq
        return out


def kv_layout(
    shape: ModelShape,
    n_gpus: int,
    memory_bytes: float,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    memory_utilization: float = GPU_MEMORY_UTILIZATION,
) -> KvLayout:
    """The KV-cache layout of ``shape`` on ``n_gpus`` GPUs of ``memory_bytes`` each.

    Per GPU: ``memory_utilization x memory`` minus the weight shard minus a reserve for the
    profiled activation peak (a ``token_budget``-token forward pass: residual, attention and
    FFN intermediates in BF16) and 1.5 GB for CUDA graphs, NCCL buffers and the allocator. The
    instance's capacity is that free memory on one GPU (every GPU holds the same share of every
    sequence's cache).

    Raises:
        CapacityError: The weights and the reserve do not fit.
    """
    g = n_gpus
    per_layer = shape.kv_bytes_per_token_layer(g)
    full = shape.n_attn_full * per_layer + shape.n_mla * shape.mla_bytes_per_token_layer
    window = shape.n_attn_window * per_layer
    weights = shape.total_weight_bytes / g
    ffn_local = max(
        shape.ffn_dense / g if shape.n_ffn_dense else 0.0,
        (shape.top_k * shape.ffn_expert + shape.ffn_shared) / g if shape.n_ffn_moe else 0.0,
        2 * shape.mamba_inner / g,
    )
    qkv_local = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim / g
    reserve = 1.5e9 + token_budget * (4 * shape.hidden + 3 * ffn_local + qkv_local) * 2.0
    free = memory_utilization * memory_bytes - weights - reserve
    if free <= 0:
        raise CapacityError(
            f"{shape.name} does not fit on {g} GPU(s): {weights / 1e9:.1f} GB of weights and "
            f"{reserve / 1e9:.1f} GB of activations per GPU against "
            f"{memory_utilization * memory_bytes / 1e9:.1f} GB usable"
        )
    return KvLayout(
        full,
        window,
        shape.window if shape.n_attn_window else 0,
        shape.mamba_state_bytes(g),
        free,
        weights,
        reserve,
    )


@dataclass
class Trace:
    """Step records of a steady-state run (columns `TRACE_FIELDS`) and its bookkeeping."""

    records: np.ndarray
    kv: KvLayout
    max_num_seqs: int
    completions: int
    preemptions: int

    def column(self, name: str) -> np.ndarray:
        """One column of the records."""
        return self.records[:, TRACE_FIELDS.index(name)]

    def compressed(self, rel: float = 0.03) -> Trace:
        """The same trace with steps of nearly the same composition merged into one record.

        Steps fall in one group when they share the window flag and their decode count, prefill
        tokens and mean decode context agree within ``rel`` (log-spaced bins); a group's record
        holds the count-weighted mean of each column and the summed count, so every total (time,
        tokens, energy) is kept up to the step model's curvature within a bin.
        """
        r = self.records
        col = {n: r[:, i] for i, n in enumerate(TRACE_FIELDS)}
        step = np.log1p(rel)

        def q(x: np.ndarray) -> np.ndarray:
            return np.floor(np.log1p(np.maximum(x, 0.0)) / step).astype(np.int64)

        mean_ctx = col["ctx_full"] / np.maximum(col["n_dec"], 1.0)
        key = np.stack(
            [
                col["in_window"].astype(np.int64),
                q(col["n_dec"]),
                q(col["n_pre"]),
                q(mean_ctx),
                q(col["n_prefill_seqs"]),
            ],
            axis=1,
        )
        _, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.ravel()
        n = int(inv.max()) + 1
        count = np.bincount(inv, col["count"], n)
        out = np.empty((n, r.shape[1]))
        for i, name in enumerate(TRACE_FIELDS):
            out[:, i] = count if name == "count" else np.bincount(inv, r[:, i] * col["count"], n) / count
        return Trace(out, self.kv, self.max_num_seqs, self.completions, self.preemptions)


def _pairs(c: np.ndarray, m: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention (query, key) pairs of prefill chunks of ``m`` tokens after ``c`` cached ones."""
    full = m * c + m * (m + 1) / 2.0
    if not window:
        return full, np.zeros_like(full)
    lo, hi = c + 1, c + m  # positions of the chunk's tokens; each attends min(pos, window) keys
    below = np.clip(np.minimum(hi, window) - lo + 1, 0, None)
    first = lo
    last = np.minimum(hi, window)
    tri = np.where(below > 0, (first + last) * below / 2.0, 0.0)
    return full, tri + (m - below) * window


class _Engine:
    """Running requests in admission order (parallel arrays) and the waiting queue."""

    def __init__(
        self, workload: Workload, kv: KvLayout, max_num_seqs: int, token_budget: int, rng: np.random.Generator
    ) -> None:
        self.w, self.kv, self.n_max, self.budget, self.rng = workload, kv, max_num_seqs, token_budget, rng
        self.values = np.asarray(workload.output_values, dtype=np.int64)
        self.probs = np.asarray(workload.output_probs, dtype=float)
        self.inp = np.zeros(0, np.int64)  # prompt tokens
        self.out = np.zeros(0, np.int64)  # target output tokens
        self.gen = np.zeros(0, np.int64)  # output tokens generated so far
        self.comp = np.zeros(0, np.int64)  # tokens whose KV is computed (held blocks)
        self.waiting: deque[tuple[int, int, int]] = deque()  # preempted: (prompt, target, generated)
        self.used = 0.0
        self.completions = 0
        self.preemptions = 0
        self.records: list[tuple[float, ...]] = []
        self._pool: list[int] = []
        self.limit: int | None = None  # benchmark mode: requests in the whole run
        self.issued = 0
        self.first_tokens = 0
        self.in_window = 1.0

    def fresh_output(self) -> int:
        """Output length of a new request (drawn in blocks of 4096)."""
        if not self._pool:
            self._pool = self.rng.choice(self.values, size=4096, p=self.probs).tolist()
        return self._pool.pop()

    def start_stationary(self) -> None:
        """Fill the engine as a long-running closed loop would look (length-biased ages)."""
        n = self.n_max
        biased = self.probs * self.values
        outs = self.rng.choice(self.values, size=n, p=biased / biased.sum())
        gen = np.minimum(np.floor(self.rng.random(n) * outs).astype(np.int64) + 1, outs - 1)
        gen = np.maximum(gen, 1)
        inp = np.full(n, self.w.input_tokens, np.int64)
        comp = inp + gen - 1
        order = np.argsort(-gen, kind="stable")  # oldest first
        inp, outs, gen, comp = inp[order], outs[order], gen[order], comp[order]
        sizes = self.kv.seq_bytes(comp)
        keep = np.cumsum(sizes) <= self.kv.capacity_bytes
        self.inp, self.out, self.gen, self.comp = inp[keep], outs[keep], gen[keep], comp[keep]
        self.used = float(sizes[keep].sum())

    def _remove(self, mask: np.ndarray) -> None:
        keep = ~mask
        self.inp, self.out, self.gen, self.comp = (
            self.inp[keep],
            self.out[keep],
            self.gen[keep],
            self.comp[keep],
        )

    def can_issue(self) -> bool:
        """Whether a new request can still enter (benchmark runs have a fixed number)."""
        return self.limit is None or self.issued < self.limit

    def step(self, record: bool) -> None:
        """One scheduler step and its execution (token accounting only)."""
        kv = self.kv
        need = self.inp + self.gen - self.comp  # tokens still to compute (1 while decoding)
        cum = np.cumsum(need) - need
        sched = np.clip(self.budget - cum, 0, need)
        grow = kv.seq_bytes(self.comp + sched) - kv.seq_bytes(self.comp)
        free = kv.capacity_bytes - self.used
        preempted = False
        if grow.sum() > free and len(self.inp):
            held = kv.seq_bytes(self.comp)
            # preempt the newest requests until the rest fit (freed: their blocks and their growth)
            rel = np.cumsum((held + grow)[::-1])
            over = grow.sum() - free
            m = int(np.searchsorted(rel, over) + 1)
            m = min(m, len(self.inp))
            drop = np.zeros(len(self.inp), bool)
            drop[len(self.inp) - m :] = True
            for i in np.nonzero(drop)[0][::-1]:
                self.waiting.appendleft((int(self.inp[i]), int(self.out[i]), int(self.gen[i])))
            self.used -= float(held[drop].sum())
            self.preemptions += m
            self._remove(drop)
            sched, grow, need = sched[~drop], grow[~drop], need[~drop]
            preempted = True
        budget_left = self.budget - int(sched.sum())
        c_before = self.comp.copy()
        n_old = len(self.inp)
        # admissions (only in steps without preemption)
        if not preempted:
            new_inp, new_out, new_gen, new_sched = [], [], [], []
            free = kv.capacity_bytes - self.used - float(grow.sum())
            while n_old + len(new_inp) < self.n_max and budget_left > 0:
                if not self.waiting:
                    if not self.can_issue():
                        break
                    self.waiting.append((self.w.input_tokens, self.fresh_output(), 0))
                    self.issued += 1
                p, o, g = self.waiting[0]
                chunk = min(p + g, budget_left)
                cost = kv.one_seq_bytes(chunk)
                if cost > free:
                    break
                self.waiting.popleft()
                free -= cost
                budget_left -= chunk
                new_inp.append(p)
                new_out.append(o)
                new_gen.append(g)
                new_sched.append(chunk)
            if new_inp:
                k = len(new_inp)
                self.inp = np.concatenate([self.inp, new_inp])
                self.out = np.concatenate([self.out, new_out])
                self.gen = np.concatenate([self.gen, new_gen])
                self.comp = np.concatenate([self.comp, np.zeros(k, np.int64)])
                c_before = np.concatenate([c_before, np.zeros(k, np.int64)])
                new_need = np.asarray(new_inp) + np.asarray(new_gen)
                need = np.concatenate([need, new_need])
                sched = np.concatenate([sched, new_sched])
                grow = np.concatenate([grow, kv.seq_bytes(np.asarray(new_sched))])
        self.used += float(grow.sum())
        # execute
        active = sched > 0
        decode = active & (need == 1)
        pre = active & (need > 1)
        self.comp = self.comp + sched
        sampled = active & (self.comp == self.inp + self.gen)
        self.first_tokens += int((sampled & (self.gen == 0)).sum())
        self.gen = self.gen + sampled
        if record:
            ctx = c_before[decode] + 1
            win = kv.window
            c, m = c_before[pre].astype(float), sched[pre].astype(float)
            pf, pw = _pairs(c, m, win)
            self.records.append(
                (
                    1.0,
                    float(decode.sum()),
                    float(ctx.sum()),
                    float(np.minimum(ctx, win).sum()) if win else 0.0,
                    float(m.sum()),
                    float(pf.sum()),
                    float(pw.sum()),
                    float((c + m).sum()),
                    float(np.minimum(c + m, win + m).sum()) if win else 0.0,
                    float(active.sum()),
                    float(len(self.inp)),
                    float(sampled.sum()),
                    float(pre.sum()),
                    self.in_window,
                )
            )
        done = self.gen >= self.out
        if done.any():
            self.used -= float(kv.seq_bytes(self.comp[done]).sum())
            self.completions += int(done.sum())
            self._remove(done)

    def steady_run(self, record: bool) -> int:
        """Skip a run of identical pure-decode steps; returns how many were skipped."""
        if len(self.inp) == 0 or np.any(self.inp + self.gen - self.comp != 1):
            return 0
        if len(self.inp) < self.n_max and (self.waiting or self.can_issue()):
            # admission must be impossible for the whole run: the next request's first chunk must not fit
            p, _, g = self.waiting[0] if self.waiting else (self.w.input_tokens, 0, 0)
            chunk = min(p + g, self.budget - len(self.inp))
            if chunk > 0 and self.kv.one_seq_bytes(chunk) <= self.kv.capacity_bytes - self.used:
                return 0
        d_done = int((self.out - self.gen).min()) - 1
        if d_done < 1:
            return 0
        free = self.kv.capacity_bytes - self.used
        base = self.kv.seq_bytes(self.comp)
        lo, hi = 0, d_done
        if float((self.kv.seq_bytes(self.comp + hi) - base).sum()) > free:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if float((self.kv.seq_bytes(self.comp + mid) - base).sum()) <= free:
                    lo = mid
                else:
                    hi = mid
            d = lo
        else:
            d = hi
        if d < 1:
            return 0
        if record:
            win = self.kv.window
            c0 = self.comp + 1
            c1 = self.comp + d
            full = (c0.sum() + c1.sum()) / 2.0
            wsum = (np.minimum(c0, win).sum() + np.minimum(c1, win).sum()) / 2.0 if win else 0.0
            n = float(len(self.inp))
            self.records.append(
                (float(d), n, float(full), float(wsum), 0.0, 0.0, 0.0, 0.0, 0.0, n, n, n, 0.0, self.in_window)
            )
        grow = self.kv.seq_bytes(self.comp + d) - base
        self.used += float(grow.sum())
        self.comp = self.comp + d
        self.gen = self.gen + d
        return d


@dataclass(frozen=True)
class Benchmark:
    """ML.ENERGY's measurement procedure (ml-energy/benchmark ``mlenergy/llm/benchmark.py``).

    ``num_requests`` requests are all sent at time 0 to an empty engine; the steady-state window
    runs from the moment ``max_num_seqs`` requests have received their first token to the moment
    ``num_requests - max_num_seqs`` have (energy, power, throughput and batch are measured there),
    and the median ITL is taken over every request of the whole run. When ``num_requests <
    2 x max_num_seqs + max_num_seqs / 4`` the window is taken to end ``max_num_seqs / 4`` first
    tokens after it starts (an ASSUMPTION: the published procedure would give an empty window).
    """

    num_requests: int

    def window_end(self, max_num_seqs: int) -> int:
        """First-token count that closes the window."""
        return max(self.num_requests - max_num_seqs, max_num_seqs + max(1, max_num_seqs // 4))


def simulate(
    shape: ModelShape,
    n_gpus: int,
    memory_bytes: float,
    max_num_seqs: int,
    workload: Workload,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    memory_utilization: float = GPU_MEMORY_UTILIZATION,
    benchmark: Benchmark | None = None,
    seed: int = 0,
    warmup_completions: int | None = None,
    measure_completions: int | None = None,
    max_exact_steps: int = 100_000,
) -> Trace:
    """The step trace of one instance at a fixed concurrency.

    Without ``benchmark``: the renewal steady state of a closed loop (every finished request is
    replaced at once), started from its stationary state and recorded after a warm-up. With it:
    ML.ENERGY's run of a fixed number of requests from an empty engine, every step recorded and
    flagged in or out of the measurement window.

    Args:
        shape: The model.
        n_gpus: GPUs of the instance (tensor/expert parallel degree).
        memory_bytes: Memory of one GPU.
        max_num_seqs: The engine's concurrency limit; the closed loop keeps this many requests.
        workload: Prompt length and output-length law.
        token_budget: ``max_num_batched_tokens`` (chunked-prefill token budget per step).
        memory_utilization: vLLM ``gpu_memory_utilization``.
        benchmark: Replay ML.ENERGY's measurement procedure instead of the renewal steady state.
        seed: Seed of the output-length draws.
        warmup_completions: Renewal mode: completions before recording starts (default:
            max_num_seqs / 2 within 32-300; the stationary start is already close to the steady state).
        measure_completions: Renewal mode: completions recorded (default: 2 x max_num_seqs within 200-800).
        max_exact_steps: Safety bound on simulated (non-skipped) steps.

    Raises:
        CapacityError: The model does not fit, or a single request cannot fit in the KV cache.
    """
    if max_num_seqs < 1:
        raise ValueError("max_num_seqs must be >= 1")
    kv = kv_layout(shape, n_gpus, memory_bytes, token_budget, memory_utilization)
    longest = workload.input_tokens + max(workload.output_values)
    if kv.one_seq_bytes(longest) > kv.capacity_bytes:
        raise CapacityError(
            f"one request of {longest} tokens needs more KV cache than the "
            f"{kv.capacity_bytes / 1e9:.1f} GB free per GPU"
        )
    rng = np.random.default_rng(seed)
    eng = _Engine(workload, kv, max_num_seqs, token_budget, rng)
    steps = 0
    if benchmark is not None:
        eng.limit = benchmark.num_requests
        end = benchmark.window_end(max_num_seqs)
        eng.in_window = 0.0
        while (eng.completions < benchmark.num_requests) and steps < max_exact_steps:
            eng.steady_run(record=True)
            eng.step(record=True)
            steps += 1
            eng.in_window = 1.0 if max_num_seqs <= eng.first_tokens < end else 0.0
        return Trace(np.asarray(eng.records, dtype=float), kv, max_num_seqs, eng.completions, eng.preemptions)
    eng.start_stationary()
    warm = warmup_completions if warmup_completions is not None else int(np.clip(max_num_seqs // 2, 32, 300))
    measure = (
        measure_completions if measure_completions is not None else int(np.clip(2 * max_num_seqs, 200, 800))
    )
    while eng.completions < warm and steps < max_exact_steps:
        eng.steady_run(record=False)
        eng.step(record=False)
        steps += 1
    start, pre0 = eng.completions, eng.preemptions
    steps = 0
    while eng.completions - start < measure and steps < max_exact_steps:
        eng.steady_run(record=True)
        eng.step(record=True)
        steps += 1
    return Trace(
        np.asarray(eng.records, dtype=float),
        kv,
        max_num_seqs,
        eng.completions - start,
        eng.preemptions - pre0,
    )
