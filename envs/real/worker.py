"""An LLM inference worker for one GPU: a Llama-architecture model with continuous batching.

The model is a plain PyTorch Llama (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP) whose parameter names match Hugging Face ``LlamaForCausalLM``, so a local
checkpoint (``config.json`` + ``*.safetensors``) loads as is; without one the weights are
random of the real shapes (no weights can be downloaded on the lent machines, and speed and
power do not depend on the values).

Serving (:class:`InferenceEngine`): requests wait in a FIFO queue; each scheduler step admits
waiting requests while the running batch is below the batch cap the controller sets (and the
prefill-token budget of the step allows), runs their prefill passes one after another (the
first token comes out of the prefill: TTFT), then runs one decode iteration for every running
sequence. The KV cache is static: one preallocated ``[slots, kv_heads, max_ctx, head_dim]``
tensor per layer, with running sequences kept packed in slots ``0..n-1`` (a finished
sequence's slot is refilled by moving the last one). Decode attention is chunked by default:
a chunk table lists, for every running sequence, the ``kv_chunk_tokens``-long cache chunks its
live context occupies, and attention runs over those chunks only (split-K with a log-sum-exp
merge), so an iteration costs the batch's summed context, as the simulator's decode model
assumes; ``decode_attention="padded"`` attends over the longest context rounded up to a power
of two instead. On CUDA each (batch bucket, chunk-count bucket) decode iteration and each
prompt-length bucket of prefill (up to ``prefill_graph_max_tokens``) is captured once as a
CUDA graph and replayed: an eager prefill pass is Python-launch bound. Timing conventions match the
simulator (``envs/sim/serving_request.py``): TTFT from arrival to the end of prefill, TBT =
(last token time - first token time) / (tokens - 1).

:class:`WorkerProcess` runs one engine in its own process per GPU (spawned, talking over a
pipe); :class:`InlineWorker` runs it in the caller's thread (CPU tests, one-GPU runs).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STEP_LOG_COLUMNS = ("t_start_s", "t_end_s", "prefill_passes", "prefill_tokens", "prefill_s",
                    "decode_batch", "decode_ctx_tokens", "decode_s")
"""Columns of ``InferenceEngine.step_log`` (wall-clock times from the engine's clock)."""


class WorkerError(ValueError):
    """Bad worker configuration or request (the message names the field and value)."""


@dataclass(frozen=True)
class ModelShape:
    """Shape of a Llama-architecture decoder (the numbers that set speed and memory)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    vocab: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5

    @property
    def n_params(self) -> int:
        """Parameter count (untied embeddings)."""
        d, h, kv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        per_layer = d * h * hd * 2 + 2 * d * kv * hd + 3 * d * self.d_ffn + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab * d + d

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV-cache bytes per token of context."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value


SHAPES: dict[str, ModelShape] = {
    # meta-llama/Meta-Llama-3-8B config.json (also envs/data/profiles/llama3-8b_h100_tp1.json).
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 500000.0, 1e-5),
    # A few-layer model of the same architecture for CPU tests (not a real model).
    "tiny": ModelShape("tiny", 2, 64, 4, 2, 16, 128, 512, 10000.0, 1e-5),
}


def shape_from_hf_config(path: str | Path) -> ModelShape:
    """Read a Hugging Face Llama ``config.json`` into a :class:`ModelShape`.

    Raises:
        WorkerError: Missing file or field.
    """
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkerError(f"{p}: cannot read a Llama config.json ({exc})") from exc
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            name=str(cfg.get("_name_or_path") or p.parent.name),
            n_layers=int(cfg["num_hidden_layers"]),
            d_model=int(cfg["hidden_size"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            d_ffn=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        )
    except KeyError as exc:
        raise WorkerError(f"{p}: field {exc.args[0]!r} is missing") from exc


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _build_model(shape: ModelShape, device: str, dtype: Any, seed: int) -> Any:
    """A Llama decoder with HF parameter names, random normal weights (std 0.02)."""
    import torch
    from torch import nn

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, h, kv, hd = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim
            self.q_proj = nn.Linear(d, h * hd, bias=False)
            self.k_proj = nn.Linear(d, kv * hd, bias=False)
            self.v_proj = nn.Linear(d, kv * hd, bias=False)
            self.o_proj = nn.Linear(h * hd, d, bias=False)

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(shape.d_model, shape.d_ffn, bias=False)
            self.up_proj = nn.Linear(shape.d_model, shape.d_ffn, bias=False)
            self.down_proj = nn.Linear(shape.d_ffn, shape.d_model, bias=False)

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(shape.d_model))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()
            self.mlp = Mlp()
            self.input_layernorm = Norm()
            self.post_attention_layernorm = Norm()

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(shape.vocab, shape.d_model)
            self.layers = nn.ModuleList(Layer() for _ in range(shape.n_layers))
            self.norm = Norm()

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Body()
            self.lm_head = nn.Linear(shape.d_model, shape.vocab, bias=False)

    with torch.device("meta"):
        m = Llama()
    m = m.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                prm.fill_(1.0)
            else:
                prm.normal_(0.0, 0.02, generator=gen)
    return m.eval().requires_grad_(False)


def _load_hf_weights(model: Any, weights_dir: Path) -> None:
    """Load ``*.safetensors`` shards of an HF Llama checkpoint into ``model`` (names match)."""
    from safetensors.torch import load_file

    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise WorkerError(f"{weights_dir}: field 'weights_path' has no *.safetensors files")
    own = dict(model.named_parameters())
    seen = set()
    for f in files:
        for k, v in load_file(str(f)).items():
            if k in own:
                own[k].data.copy_(v.to(own[k].dtype))
                seen.add(k)
    finish_weight_load(own, seen, weights_dir)


def finish_weight_load(own: dict[str, Any], seen: set[str], weights_dir: Any) -> None:
    """Tie `lm_head` to the embeddings when the checkpoint has no head; refuse missing weights."""
    if "lm_head.weight" not in seen and "model.embed_tokens.weight" in seen:  # tied embeddings
        own["lm_head.weight"].data.copy_(own["model.embed_tokens.weight"].data)
        seen.add("lm_head.weight")
    missing = sorted(set(own) - seen)
    if missing:
        raise WorkerError(f"{weights_dir}: checkpoint lacks {len(missing)} parameters, "
                          f"e.g. {missing[:3]}")


# ---------------------------------------------------------------------------------------------
# Requests and results
# ---------------------------------------------------------------------------------------------


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
class _Seq:
    req: Request
    prompt_tokens: int
    out_tokens: int
    first_token_s: float
    generated: int


@dataclass
class EngineStats:
    """Cumulative work counters of an engine (monotone; diff two snapshots for a window).

    ``step_busy_s`` is the wall time inside :meth:`InferenceEngine.step` (prefill and decode
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


@dataclass(frozen=True)
class WorkerConfig:
    """How to build one worker's engine.

    Attributes:
        model: Key of :data:`SHAPES` ("llama3-8b", "tiny"); ignored with ``weights_path``.
        device: Torch device ("cuda:0", "cpu").
        max_slots: KV-cache slots: the most sequences that can run at once.
        max_ctx: Context length each slot holds (prompt + output tokens).
        max_prefill_tokens: Prompt tokens prefilled per scheduler step (at least one prompt).
        drop_after_s: A request still waiting this long after arrival is dropped.
        cuda_graphs: Capture decode iterations as CUDA graphs (None: on CUDA only).
        weights_path: Folder with an HF Llama checkpoint (config.json + safetensors) or None.
        seed: Seed of the random weights.
        decode_attention: None: "chunked" on CUDA, "padded" on CPU (where the chunk
            bookkeeping costs more than it saves on tiny test shapes). "chunked": each
            sequence's attention reads only the
            ``kv_chunk_tokens`` chunks its live context occupies, so a decode iteration
            costs in proportion to the batch's summed context (what the simulator models);
            "padded": every sequence attends over the batch's longest context rounded up
            to a power of two (the first version of this worker, kept to measure against).
        kv_chunk_tokens: Chunk length of the chunked attention (divides ``max_ctx``; a
            shorter ``max_ctx`` is one chunk).
        prefill_graphs: Capture prefill passes as CUDA graphs for prompt-length buckets up
            to ``prefill_graph_max_tokens`` (None: on CUDA only). An eager pass of the 8B
            model is Python-launch bound (~43 ms for any prompt up to 1024 tokens).
        prefill_graph_max_tokens: Longest bucket; longer prompts run eagerly (exact length).
        record_steps: Keep a log of every scheduler step (:data:`STEP_LOG_COLUMNS`) in
            ``InferenceEngine.step_log`` (for calibration recordings).
    """

    model: str = "llama3-8b"
    device: str = "cuda:0"
    max_slots: int = 64
    max_ctx: int = 4096
    max_prefill_tokens: int = 8192
    drop_after_s: float = 60.0
    cuda_graphs: bool | None = None
    weights_path: str | None = None
    seed: int = 0
    decode_attention: str | None = None
    kv_chunk_tokens: int = 256
    prefill_graphs: bool | None = None
    prefill_graph_max_tokens: int = 2048
    record_steps: bool = False

    def shape(self) -> ModelShape:
        """The model shape this config names."""
        if self.weights_path:
            return shape_from_hf_config(Path(self.weights_path) / "config.json")
        if self.model not in SHAPES:
            raise WorkerError(f"WorkerConfig: field 'model' = {self.model!r} unknown; "
                              f"known: {sorted(SHAPES)}")
        return SHAPES[self.model]


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


def _chunk_buckets(max_chunks: int) -> list[int]:
    """Chunk-count buckets of the chunked decode graphs: steps of 8 to 64, 32 to 256, then 64."""
    out = [n for n in range(8, 65, 8)] + list(range(96, 257, 32)) + list(range(320, 100000, 64))
    out = [n for n in out if n < max_chunks]
    return [*out, max_chunks]


def _prefill_buckets(max_tokens: int) -> list[int]:
    """Prompt-length buckets of the prefill graphs (at most ~25 % padding above 128 tokens)."""
    out = [32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
           2560, 3072, 3584, 4096]
    return [n for n in out if n <= max_tokens]


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
        self.shape = shape = config.shape()
        if config.max_slots < 1 or config.max_ctx < 16:
            raise WorkerError(f"WorkerConfig: max_slots={config.max_slots} must be >= 1 and "
                              f"max_ctx={config.max_ctx} >= 16")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise WorkerError(f"WorkerConfig: field 'device' = {config.device!r} but torch sees no "
                              "CUDA device")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.clock = clock
        self.model = _build_model(shape, str(self.device), self.dtype, config.seed)
        if config.weights_path:
            _load_hf_weights(self.model, Path(config.weights_path))
        self._layers = list(self.model.model.layers)
        s, kv, t, hd = config.max_slots, shape.n_kv_heads, config.max_ctx, shape.head_dim
        self.k_cache = [torch.zeros(s, kv, t, hd, device=self.device, dtype=self.dtype)
                        for _ in range(shape.n_layers)]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        emb = torch.cat([ang, ang], dim=-1)
        self._cos = emb.cos().to(self.device, self.dtype)
        self._sin = emb.sin().to(self.device, self.dtype)
        self._tok = torch.zeros(s, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(s, dtype=torch.long, device=self.device)
        self._ar = torch.arange(s, device=self.device)
        self._ctx_ar = torch.arange(t, device=self.device)
        self.use_graphs = (self.device.type == "cuda") if config.cuda_graphs is None else bool(
            config.cuda_graphs)
        mode = config.decode_attention or ("chunked" if self.device.type == "cuda" else "padded")
        if mode not in ("chunked", "padded"):
            raise WorkerError(f"WorkerConfig: field 'decode_attention' = {config.decode_attention!r}"
                              " must be 'chunked' or 'padded'")
        ch = min(int(config.kv_chunk_tokens), t)
        if ch < 1 or t % ch:
            raise WorkerError(f"WorkerConfig: field 'kv_chunk_tokens' = {ch} must be >= 1 and "
                              f"divide max_ctx={t}")
        self.chunked = mode == "chunked"
        self.chunk = ch
        self._chunks_per_slot = t // ch
        self._max_chunks = s * self._chunks_per_slot
        # Chunk table of the chunked decode: slot, chunk index, live tokens (0: padding).
        self._ch_meta = torch.zeros(3, self._max_chunks, dtype=torch.long, device=self.device)
        self._ch_ar = torch.arange(ch, device=self.device)
        self._nc_buckets = _chunk_buckets(self._max_chunks)
        self.use_prefill_graphs = (self.device.type == "cuda") if config.prefill_graphs is None \
            else bool(config.prefill_graphs)
        self._pre_buckets = _prefill_buckets(min(int(config.prefill_graph_max_tokens), t))
        nb = max(self._pre_buckets, default=1)
        self._pre_ids = torch.zeros(nb, dtype=torch.long, device=self.device)
        self._pre_slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pre_last = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pre_graphs: dict[int, tuple[Any, Any]] = {}
        self._graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.max_batch = s
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
    def _rms(self, x: Any, w: Any) -> Any:
        x32 = x.float()
        x32 = x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.shape.rms_eps)
        return x32.to(x.dtype) * w

    def _rot(self, x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _qkv(self, layer: Any, x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """Rotated queries and keys and the values of one layer for the rows of ``x``."""
        sh, a, rows = self.shape, layer.self_attn, x.shape[0]
        h = self._rms(x, layer.input_layernorm.weight)
        q = self._rot(a.q_proj(h).view(rows, sh.n_heads, sh.head_dim), cos, sin)
        k = self._rot(a.k_proj(h).view(rows, sh.n_kv_heads, sh.head_dim), cos, sin)
        return q, k, a.v_proj(h).view(rows, sh.n_kv_heads, sh.head_dim)

    def _mlp(self, layer: Any, x: Any) -> Any:
        m = layer.mlp
        h = self._rms(x, layer.post_attention_layernorm.weight)
        g = self.torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h)
        return x + m.down_proj(g)

    def prefill(self, tokens: Any, slot: int) -> Any:
        """Run one prompt through the model into KV slot ``slot``; returns the next token id.

        With prefill graphs the prompt is padded at its end to a length bucket and the pass
        replays a captured CUDA graph (causal attention keeps the padding out of the real
        tokens; the padding's K/V land past the prompt, where decode overwrites them before
        any read). Longer prompts, or no graphs, run eagerly at their exact length.
        """
        torch = self.torch
        n = int(tokens.shape[0])
        nb = next((b for b in self._pre_buckets if b >= n), None) if self.use_prefill_graphs \
            else None
        if nb is None:
            slot_t = torch.full((1,), int(slot), dtype=torch.long, device=self.device)
            last_t = torch.full((1,), n - 1, dtype=torch.long, device=self.device)
            return self._prefill_impl(tokens, slot_t, last_t)[0]
        self._pre_ids[:n].copy_(tokens)
        self._pre_slot.fill_(int(slot))
        self._pre_last.fill_(n - 1)
        if nb not in self._pre_graphs:
            self._capture_prefill(nb)
        graph, out = self._pre_graphs[nb]
        graph.replay()
        return out[0]

    def _prefill_impl(self, ids: Any, slot_t: Any, last_t: Any) -> Any:
        """Prefill pass over ``ids`` into the slot in ``slot_t``; next token after ``last_t``."""
        torch, sh = self.torch, self.shape
        n = int(ids.shape[0])
        h_, kv, hd = sh.n_heads, sh.n_kv_heads, sh.head_dim
        grp = h_ // kv
        cos, sin = self._cos[:n, None, :], self._sin[:n, None, :]
        x = self.model.model.embed_tokens(ids)
        for li, layer in enumerate(self._layers):
            a = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            kt, vt = k.transpose(0, 1), v.transpose(0, 1)
            self.k_cache[li][:, :, :n].index_copy_(0, slot_t, kt[None])
            self.v_cache[li][:, :, :n].index_copy_(0, slot_t, vt[None])
            qh = q.transpose(0, 1)[None]
            kh = kt[None].repeat_interleave(grp, dim=1)
            vh = vt[None].repeat_interleave(grp, dim=1)
            o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            x = x + a.o_proj(o[0].transpose(0, 1).reshape(n, h_ * hd))
            x = self._mlp(layer, x)
        last = self._rms(x.index_select(0, last_t), self.model.model.norm.weight)
        return self.model.lm_head(last).argmax(-1)

    def _capture_prefill(self, nb: int) -> None:
        torch = self.torch
        ids, slot_t, last_t = self._pre_ids[:nb], self._pre_slot, self._pre_last
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._prefill_impl(ids, slot_t, last_t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._prefill_impl(ids, slot_t, last_t)
        self._pre_graphs[nb] = (graph, out)

    def _attend_padded(self, q: Any, li: int, b: int, c: int, keep: Any) -> Any:
        """Attention of ``b`` query rows over the first ``c`` cache positions of their slots."""
        torch, sh = self.torch, self.shape
        kv, hd = sh.n_kv_heads, sh.head_dim
        grp = sh.n_heads // kv
        kk, vv = self.k_cache[li][:b, :, :c], self.v_cache[li][:b, :, :c]  # views, no copy
        qg = q.view(b, kv, grp, hd)
        scores = torch.matmul(qg, kk.transpose(-1, -2)).float() * (1.0 / math.sqrt(hd))
        scores = scores.masked_fill(~keep, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(self.dtype)
        return torch.matmul(p, vv).reshape(b, sh.n_heads * hd)

    def _attend_chunked(self, q: Any, li: int, b: int, nc: int) -> Any:
        """Attention over the live chunks of the chunk table only (split-K, log-sum-exp merge).

        Row ``i`` of the chunk table names a slot, a chunk of ``kv_chunk_tokens`` positions and
        how many of them are live; the table lists only the chunks that hold each sequence's
        context, so the K/V read is the summed context rounded up to chunks, not
        ``batch x longest context``. Padding rows (0 live tokens) contribute nothing.
        """
        torch, sh = self.torch, self.shape
        kv, hd = sh.n_kv_heads, sh.head_dim
        grp = sh.n_heads // kv
        ch, cps = self.chunk, self._chunks_per_slot
        cs, ci, cl = self._ch_meta[0, :nc], self._ch_meta[1, :nc], self._ch_meta[2, :nc]
        s_ = self.cfg.max_slots
        kg = self.k_cache[li].view(s_, kv, cps, ch, hd)[cs, :, ci]  # [nc, kv, ch, hd]
        vg = self.v_cache[li].view(s_, kv, cps, ch, hd)[cs, :, ci]
        qc = q.view(b, kv, grp, hd).index_select(0, cs)  # [nc, kv, grp, hd]
        scores = torch.matmul(qc, kg.transpose(-1, -2)).float() * (1.0 / math.sqrt(hd))
        live = (self._ch_ar[None, :] < cl[:, None])[:, None, None, :]
        scores = scores.masked_fill(~live, float("-inf"))
        m = scores.amax(-1).clamp_min(-1e30)  # [nc, kv, grp]
        p = torch.exp(scores - m[..., None])
        part_l = p.sum(-1)
        part_o = torch.matmul(p.to(self.dtype), vg).float()  # [nc, kv, grp, hd]
        big_m = torch.full((b, kv, grp), -1e30, device=q.device, dtype=torch.float32)
        big_m = big_m.scatter_reduce(0, cs[:, None, None].expand(nc, kv, grp), m, "amax")
        w = torch.exp(m - big_m.index_select(0, cs))
        num = torch.zeros(b, kv, grp, hd, device=q.device, dtype=torch.float32)
        num = num.index_add(0, cs, part_o * w[..., None])
        den = torch.zeros(b, kv, grp, device=q.device, dtype=torch.float32)
        den = den.index_add(0, cs, part_l * w)
        return (num / den.clamp_min(1e-30)[..., None]).to(self.dtype).reshape(b, sh.n_heads * hd)

    def _decode_impl(self, b: int, c: int) -> Any:
        """One decode iteration over slots ``0..b-1``.

        ``c`` is the context bucket (padded attention) or the number of chunk-table rows
        (chunked attention).
        """
        pos = self._pos[:b]
        ar = self._ar[:b]
        cos, sin = self._cos[pos][:, None, :], self._sin[pos][:, None, :]
        keep = None if self.chunked else (self._ctx_ar[:c][None, :] <= pos[:, None])[:, None,
                                                                                      None, :]
        x = self.model.model.embed_tokens(self._tok[:b])
        for li, layer in enumerate(self._layers):
            a = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[li][ar, :, pos] = k
            self.v_cache[li][ar, :, pos] = v
            if self.chunked:
                o = self._attend_chunked(q, li, b, c)
            else:
                o = self._attend_padded(q, li, b, c, keep)
            x = x + a.o_proj(o)
            x = self._mlp(layer, x)
        x = self._rms(x, self.model.model.norm.weight)
        return self.model.lm_head(x).argmax(-1)

    def chunk_table(self, positions: Any) -> np.ndarray:
        """The chunk table (3 x rows: slot, chunk, live tokens) of sequences at ``positions``.

        ``positions[i]`` is the cache position slot ``i`` writes this iteration, so it attends
        over ``positions[i] + 1`` tokens.
        """
        live = np.asarray(positions, dtype=np.int64) + 1
        n_ch = -(-live // self.chunk)
        slot = np.repeat(np.arange(live.size), n_ch)
        first = np.repeat(np.cumsum(n_ch) - n_ch, n_ch)
        idx = np.arange(slot.size) - first
        return np.stack([slot, idx, np.minimum(self.chunk, live[slot] - idx * self.chunk)])

    def decode_buckets(self, n: int, max_pos: int, n_chunks: int | None = None
                       ) -> tuple[int, int]:
        """(batch bucket, context bucket or chunk-row bucket) a decode of ``n`` sequences uses."""
        b = min(_pow2_at_least(n, 1), self.cfg.max_slots)
        if self.chunked:
            if n_chunks is None:
                n_chunks = n * (max_pos // self.chunk + 1)
            return b, next(x for x in self._nc_buckets if x >= n_chunks)
        c = min(_pow2_at_least(max_pos + 1, 128), self.cfg.max_ctx)
        return b, c

    def decode_step(self, n: int, max_pos: int | None = None, positions: Any = None) -> None:
        """Run one decode iteration for slots ``0..n-1`` (inputs already in the buffers).

        Args:
            n: Running sequences (slots ``0..n-1``).
            max_pos: Largest cache position written (padded attention); derived if None.
            positions: Host copy of ``_pos[:n]`` (read from the device if None).
        """
        torch = self.torch
        if positions is None and (self.chunked or max_pos is None):
            positions = self._pos[:n].cpu().numpy()
        if max_pos is None:
            max_pos = int(np.max(positions))
        n_chunks = None
        if self.chunked:
            table = self.chunk_table(positions)
            n_chunks = table.shape[1]
        b, c = self.decode_buckets(n, max_pos, n_chunks)
        with torch.inference_mode():
            if self.chunked:
                pad = np.zeros((3, c - n_chunks), dtype=np.int64)
                self._ch_meta[:, :c].copy_(torch.from_numpy(np.concatenate([table, pad], 1)))
            if not self.use_graphs:
                out = self._decode_impl(b, c)
            else:
                key = (b, c)
                if key not in self._graphs:
                    self._capture(b, c)
                graph, out = self._graphs[key]
                graph.replay()
            self._tok[:n].copy_(out[:n])
            self._pos[:n] += 1

    def _capture(self, b: int, c: int) -> None:
        torch = self.torch
        # The warm-up writes the same K/V the replay will write (same inputs), so it is harmless.
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_impl(b, c)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._decode_impl(b, c)
        self._graphs[(b, c)] = (graph, out)

    def warmup(self) -> int:
        """Capture every decode bucket and prefill bucket now, so serving never pauses for it.

        Returns:
            Number of graphs captured (0 without CUDA graphs).
        """
        n = 0
        if self.use_prefill_graphs:
            with self.torch.inference_mode():
                for nb in self._pre_buckets:
                    if nb not in self._pre_graphs:
                        self._pre_slot.zero_()
                        self._pre_last.fill_(nb - 1)
                        self._capture_prefill(nb)
                        n += 1
        if not self.use_graphs:
            self.sync()
            return n
        b = 1
        batches = []
        while b < self.cfg.max_slots:
            batches.append(b)
            b *= 2
        batches.append(self.cfg.max_slots)
        keys: list[tuple[int, int]] = []
        if self.chunked:
            def bucket(rows: int) -> int:
                return next(x for x in self._nc_buckets if x >= rows)

            for i, bb in enumerate(batches):
                lo = batches[i - 1] + 1 if i else 1  # fewest sequences that use this bucket
                keys += [(bb, x) for x in self._nc_buckets
                         if bucket(lo) <= x <= bucket(bb * self._chunks_per_slot)]
        else:
            c = 128
            ctxs = []
            while c < self.cfg.max_ctx:
                ctxs.append(c)
                c *= 2
            ctxs.append(self.cfg.max_ctx)
            keys = [(bb, cc) for bb in batches for cc in ctxs]
        with self.torch.inference_mode():
            for key in keys:
                if key not in self._graphs:
                    self._pos[: key[0]] = 0
                    self._ch_meta.zero_()
                    self._capture(*key)
                    n += 1
        self._pos.zero_()
        self.sync()
        return n

    def sync(self) -> None:
        """Wait for the device (makes wall-clock timestamps mean "done")."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ scheduling
    def _move_slot(self, src: int, dst: int) -> None:
        n = self.running[src].prompt_tokens + self.running[src].generated
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[dst, :, :n].copy_(kc[src, :, :n])
            vc[dst, :, :n].copy_(vc[src, :, :n])
        self._tok[dst] = self._tok[src]
        self._pos[dst] = self._pos[src]

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
                self._tok[slot] = first
                self._pos[slot] = prompt
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

    # ------------------------------------------------------------------ measurement helpers
    def time_prefill_s(self, tokens: int, repeats: int = 3) -> float:
        """Median wall time of a prefill pass of ``tokens`` tokens (slot 0, nothing running)."""
        if self.running:
            raise WorkerError("time_prefill_s: the engine is serving; measure on an idle engine")
        torch = self.torch
        ids = torch.randint(0, self.shape.vocab, (int(tokens),), device=self.device)
        times = []
        with torch.inference_mode():
            self.prefill(ids, 0)
            for _ in range(repeats):
                self.sync()
                t0 = time.perf_counter()
                self.prefill(ids, 0)
                self.sync()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def time_decode_s(self, batch: int, ctx_tokens: int | Any, repeats: int = 10) -> float:
        """Median wall time of one decode iteration of ``batch`` sequences.

        Args:
            batch: Sequences in the iteration.
            ctx_tokens: Context length of every sequence, or one length per sequence (a
                mixed batch; the chunked attention's cost follows their sum).
            repeats: Timed iterations (after one untimed).

        The cache contents are whatever is there (speed does not depend on the values).
        """
        if self.running:
            raise WorkerError("time_decode_s: the engine is serving; measure on an idle engine")
        ctx = np.broadcast_to(np.asarray(ctx_tokens, dtype=np.int64), (int(batch),))
        if not 1 <= batch <= self.cfg.max_slots or ctx.min() < 1 or ctx.max() >= self.cfg.max_ctx:
            raise WorkerError(f"time_decode_s: batch={batch} must be in [1, {self.cfg.max_slots}] "
                              f"and ctx_tokens={ctx_tokens} in [1, {self.cfg.max_ctx})")
        pos_t = self.torch.as_tensor(ctx - 1, device=self.device)
        times = []
        for _ in range(repeats + 1):
            self._pos[:batch] = pos_t
            self.sync()
            t0 = time.perf_counter()
            self.decode_step(batch, int(ctx.max()) - 1, ctx - 1)
            self.sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))


def _dropped(req: Request) -> Completed:
    return Completed(req.req_id, req.pool, req.arrival_s, req.input_tokens, req.output_tokens,
                     dropped=True)


def _finished(seq: _Seq, now: float) -> Completed:
    r = seq.req
    tbt = (now - seq.first_token_s) / (seq.generated - 1) if seq.generated > 1 else 0.0
    return Completed(r.req_id, r.pool, r.arrival_s, seq.prompt_tokens, seq.generated,
                     first_token_s=seq.first_token_s, finish_s=now,
                     ttft_s=seq.first_token_s - r.arrival_s, tbt_s=tbt)


# ---------------------------------------------------------------------------------------------
# Workers: the same interface in-process or in a process of its own
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerReport:
    """What a worker returns on :meth:`poll`: completions and its cumulative counters."""

    completed: list[Completed] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    waiting: int = 0
    running: int = 0


class InlineWorker:
    """An engine driven from the caller's thread: call :meth:`pump` to make progress."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine = InferenceEngine(config)
        self.engine.warmup()
        self._done: list[Completed] = []

    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (refusals are reported by the next poll)."""
        for r in reqs:
            c = self.engine.submit(r)
            if c is not None:
                self._done.append(c)

    def set_control(self, **kwargs: Any) -> None:
        """Forward to :meth:`InferenceEngine.set_control`."""
        self.engine.set_control(**kwargs)

    def pump(self, until_s: float) -> None:
        """Step the engine until wall time ``until_s`` or until it has nothing to do."""
        while self.engine.busy and time.time() < until_s:
            self._done.extend(self.engine.step())

    def poll(self) -> WorkerReport:
        """Completions since the last poll and the counters."""
        done, self._done = self._done, []
        e = self.engine
        return WorkerReport(done, EngineStats(**asdict(e.stats)), len(e.waiting), len(e.running))

    def close(self) -> None:
        """Nothing to stop in-process."""


def _worker_main(conn: Any, config: WorkerConfig) -> None:  # pragma: no cover - child process
    try:
        engine = InferenceEngine(config)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    engine.warmup()
    conn.send(("ready", engine.shape.name))
    serve_pipe(engine, conn, on_stop=lambda: None)


def serve_pipe(engine: Any, conn: Any, on_stop: Any) -> None:
    """Serve the driver's pipe until "stop": submit, control, poll; step while busy.

    Shared by the single-GPU worker process and the tensor-parallel leader; `on_stop` runs
    before the "stopped" answer (the TP leader shuts its followers down there).
    """
    done: list[Completed] = []
    while True:
        while conn.poll(0 if engine.busy else 0.002):
            kind, payload = conn.recv()
            if kind == "submit":
                for r in payload:
                    c = engine.submit(r)
                    if c is not None:
                        done.append(c)
            elif kind == "control":
                engine.set_control(**payload)
            elif kind == "poll":
                conn.send(("report", WorkerReport(done, EngineStats(**asdict(engine.stats)),
                                                  len(engine.waiting), len(engine.running))))
                done = []
            elif kind == "stop":
                on_stop()
                conn.send(("stopped", None))
                return
        if engine.busy:
            done.extend(engine.step())


class PipeWorkerClient:
    """The driver's side of a worker that runs in its own process(es) behind a pipe.

    Shared by `WorkerProcess` and the tensor-parallel worker: subclasses open `self._conn`.
    """

    _conn: Any

    def submit(self, reqs: list[Request]) -> None:
        """Send requests to the worker."""
        if reqs:
            self._conn.send(("submit", reqs))

    def set_control(self, **kwargs: Any) -> None:
        """Send a control change (batch cap, admission, queue cap)."""
        self._conn.send(("control", kwargs))

    def pump(self, until_s: float) -> None:
        """The process runs by itself: just wait."""
        time.sleep(max(0.0, until_s - time.time()))

    def poll(self) -> WorkerReport:
        """Ask for completions and counters."""
        self._conn.send(("poll", None))
        while True:
            kind, rep = self._conn.recv()
            if kind == "report":
                return rep


class WorkerProcess(PipeWorkerClient):
    """One engine in a spawned process (one per GPU), driven over a pipe.

    Raises:
        WorkerError: The child failed to build its engine (message from the child).
    """

    def __init__(self, config: WorkerConfig, start_timeout_s: float = 600.0) -> None:
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, config), daemon=True)
        self._proc.start()
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise WorkerError(f"worker on {config.device} did not start in {start_timeout_s} s")
        kind, msg = self._conn.recv()
        if kind != "ready":
            self.close()
            raise WorkerError(f"worker on {config.device} failed to start: {msg}")

    def close(self) -> None:
        """Stop the process."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
                self._proc.join(timeout=10)
            except (BrokenPipeError, OSError):
                pass
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
