"""The model maths of the worker: a Llama decoder, its static KV cache and its two passes.

The model is a plain PyTorch Llama (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP) whose parameter names match Hugging Face ``LlamaForCausalLM``, so a local
checkpoint (``config.json`` + ``*.safetensors``) loads as is; without one the weights are
random of the real shapes (no weights can be downloaded on the lent machines, and speed and
power do not depend on the values).

:class:`LlamaPasses` holds the model, one preallocated ``[slots, kv_heads, max_ctx, head_dim]``
K and V tensor per layer, and the fixed device buffers the passes read (token and position of
every slot, the chunk table), so that a pass can be captured as a CUDA graph and replayed
(``envs/real/graphs.py`` does that). It computes; it does not schedule, time or capture.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real.worker_config import ModelShape, WorkerConfig, WorkerError


def build_model(shape: ModelShape, device: str, dtype: Any, seed: int) -> Any:
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


def load_hf_weights(model: Any, weights_dir: Path) -> None:
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


class LlamaPasses:
    """A Llama decoder over a static KV cache: the prefill pass and the decode pass.

    Running sequences live in KV slots; a decode pass reads its inputs from the fixed buffers
    ``tok`` (last token of every slot) and ``pos`` (the cache position each slot writes next)
    and, for chunked attention, the chunk table ``ch_meta``, so the same pass can be replayed
    as a CUDA graph. Decode attention is chunked or padded (see
    :class:`~llm_cluster_gym.envs.real.worker_config.WorkerConfig` ``decode_attention``).

    Args:
        config: Model, device and cache sizes.
        shape: The model shape (``config.shape()``, read once by the caller).
        device: The torch device.
        dtype: Weights' and cache's dtype.

    Raises:
        WorkerError: ``decode_attention`` or ``kv_chunk_tokens`` is invalid.
    """

    def __init__(self, config: WorkerConfig, shape: ModelShape, device: Any, dtype: Any) -> None:
        import torch

        self.torch = torch
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.max_slots = config.max_slots
        self.max_ctx = config.max_ctx
        self.model = build_model(shape, str(device), dtype, config.seed)
        if config.weights_path:
            load_hf_weights(self.model, Path(config.weights_path))
        self.layers = list(self.model.model.layers)
        s, kv, t, hd = config.max_slots, shape.n_kv_heads, config.max_ctx, shape.head_dim
        self.k_cache = [torch.zeros(s, kv, t, hd, device=device, dtype=dtype)
                        for _ in range(shape.n_layers)]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        emb = torch.cat([ang, ang], dim=-1)
        self.cos = emb.cos().to(device, dtype)
        self.sin = emb.sin().to(device, dtype)
        self.tok = torch.zeros(s, dtype=torch.long, device=device)
        self.pos = torch.zeros(s, dtype=torch.long, device=device)
        self.slot_ar = torch.arange(s, device=device)
        self.ctx_ar = torch.arange(t, device=device)
        mode = config.decode_attention or ("chunked" if device.type == "cuda" else "padded")
        if mode not in ("chunked", "padded"):
            raise WorkerError(f"WorkerConfig: field 'decode_attention' = {config.decode_attention!r}"
                              " must be 'chunked' or 'padded'")
        ch = min(int(config.kv_chunk_tokens), t)
        if ch < 1 or t % ch:
            raise WorkerError(f"WorkerConfig: field 'kv_chunk_tokens' = {ch} must be >= 1 and "
                              f"divide max_ctx={t}")
        self.chunked = mode == "chunked"
        self.chunk = ch
        self.chunks_per_slot = t // ch
        self.max_chunks = s * self.chunks_per_slot
        # Chunk table of the chunked decode: slot, chunk index, live tokens (0: padding).
        self.ch_meta = torch.zeros(3, self.max_chunks, dtype=torch.long, device=device)
        self.ch_ar = torch.arange(ch, device=device)

    # ------------------------------------------------------------------ layer pieces
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

    # ------------------------------------------------------------------ prefill
    def prefill_pass(self, ids: Any, slot_t: Any, last_t: Any) -> Any:
        """Prefill pass over ``ids`` into the slot in ``slot_t``; next token after ``last_t``."""
        torch, sh = self.torch, self.shape
        n = int(ids.shape[0])
        h_, kv, hd = sh.n_heads, sh.n_kv_heads, sh.head_dim
        grp = h_ // kv
        cos, sin = self.cos[:n, None, :], self.sin[:n, None, :]
        x = self.model.model.embed_tokens(ids)
        for li, layer in enumerate(self.layers):
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

    # ------------------------------------------------------------------ decode
    def attend_padded(self, q: Any, li: int, b: int, c: int, keep: Any) -> Any:
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

    def attend_chunked(self, q: Any, li: int, b: int, nc: int) -> Any:
        """Attention over the live chunks of the chunk table only (split-K, log-sum-exp merge).

        Row ``i`` of the chunk table names a slot, a chunk of ``kv_chunk_tokens`` positions and
        how many of them are live; the table lists only the chunks that hold each sequence's
        context, so the K/V read is the summed context rounded up to chunks, not
        ``batch x longest context``. Padding rows (0 live tokens) contribute nothing.
        """
        torch, sh = self.torch, self.shape
        kv, hd = sh.n_kv_heads, sh.head_dim
        grp = sh.n_heads // kv
        ch, cps = self.chunk, self.chunks_per_slot
        cs, ci, cl = self.ch_meta[0, :nc], self.ch_meta[1, :nc], self.ch_meta[2, :nc]
        s_ = self.max_slots
        kg = self.k_cache[li].view(s_, kv, cps, ch, hd)[cs, :, ci]  # [nc, kv, ch, hd]
        vg = self.v_cache[li].view(s_, kv, cps, ch, hd)[cs, :, ci]
        qc = q.view(b, kv, grp, hd).index_select(0, cs)  # [nc, kv, grp, hd]
        scores = torch.matmul(qc, kg.transpose(-1, -2)).float() * (1.0 / math.sqrt(hd))
        live = (self.ch_ar[None, :] < cl[:, None])[:, None, None, :]
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

    def decode_pass(self, b: int, c: int) -> Any:
        """One decode iteration over slots ``0..b-1``; returns the next token of every slot.

        ``c`` is the context bucket (padded attention) or the number of chunk-table rows
        (chunked attention).
        """
        pos = self.pos[:b]
        ar = self.slot_ar[:b]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        keep = None if self.chunked else (self.ctx_ar[:c][None, :] <= pos[:, None])[:, None,
                                                                                     None, :]
        x = self.model.model.embed_tokens(self.tok[:b])
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[li][ar, :, pos] = k
            self.v_cache[li][ar, :, pos] = v
            if self.chunked:
                o = self.attend_chunked(q, li, b, c)
            else:
                o = self.attend_padded(q, li, b, c, keep)
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

    # ------------------------------------------------------------------ slots
    def copy_slot(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` cached positions, the token and the position of slot ``src`` to ``dst``."""
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[dst, :, :n].copy_(kc[src, :, :n])
            vc[dst, :, :n].copy_(vc[src, :, :n])
        self.tok[dst] = self.tok[src]
        self.pos[dst] = self.pos[src]
