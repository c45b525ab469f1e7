"""Model shapes read from Hugging Face ``config.json`` files.

A `ModelShape` is what the step-time and power model needs to know about a model: how many
layers of each kind (full or windowed attention, multi-head latent attention, Mamba-2 mixers,
dense FFNs, mixture-of-experts FFNs), their widths, the vocabulary, and how many bytes a weight
takes. `parse_config` builds it from a config dict in the spelling the model's own repository
uses (Llama, Qwen3 and Qwen3-MoE, Gemma-3, Nemotron-H, gpt-oss, Llama-4, DeepSeek-V3), so a
user's ``config.json`` and the shipped ones (``envs/data/models/*.json``, each with its source)
go through the same code. A missing or malformed field raises `ShapeError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

MODELS_DIR = Path(str(resources.files("llm_cluster_gym.envs") / "data" / "models"))
"""The shipped model configurations (one JSON per model, with its source)."""

MXFP4_BYTES = 4.25 / 8
"""Bytes per MXFP4 weight: 4-bit values plus one 8-bit scale per 32-value block."""


class ShapeError(ValueError):
    """A model configuration is missing a field or holds a value the model cannot use."""


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts the performance model uses (all counts per model, not per GPU).

    Layer counts: every layer has one token mixer (``n_attn_full + n_attn_window + n_mla +
    n_mamba`` of them, or none for Nemotron-H's MLP-only layers) and/or one feed-forward block
    (``n_ffn_dense + n_ffn_moe``). Widths are in elements; ``*_bytes`` are bytes per weight.
    """

    name: str
    n_layers: int
    hidden: int
    vocab: int
    tie_embeddings: bool
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_attn_full: int
    n_attn_window: int
    window: int
    n_ffn_dense: int
    ffn_dense: int
    ffn_gated: bool
    n_ffn_moe: int = 0
    n_experts: int = 0
    top_k: int = 0
    ffn_expert: int = 0
    ffn_shared: int = 0
    n_mla: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    n_mamba: int = 0
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state: int = 0
    mamba_groups: int = 0
    conv_kernel: int = 4
    weight_bytes: float = 2.0
    ffn_weight_bytes: float = 2.0
    expert_weight_bytes: float = 2.0
    gemm_precision: str = "bf16"
    expert_precision: str = "bf16"
    kv_bytes: float = 2.0
    notes: tuple[str, ...] = field(default=(), compare=False)

    # ---- parameter counts (elements) ----
    @property
    def attn_params_per_layer(self) -> int:
        """Weights of one GQA attention layer (Q, K, V, O projections)."""
        return (
            self.hidden * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
            + self.n_heads * self.head_dim * self.hidden
        )

    @property
    def mla_params_per_layer(self) -> int:
        """Weights of one multi-head latent attention layer (DeepSeek-V3)."""
        qk = self.qk_nope_dim + self.qk_rope_dim
        q = (
            (self.hidden * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk)
            if self.q_lora_rank
            else self.hidden * self.n_heads * qk
        )
        kv = self.hidden * (self.kv_lora_rank + self.qk_rope_dim) + self.kv_lora_rank * self.n_heads * (
            self.qk_nope_dim + self.v_head_dim
        )
        return q + kv + self.n_heads * self.v_head_dim * self.hidden

    @property
    def mamba_inner(self) -> int:
        """Mamba-2 inner width (heads x head dim)."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mamba_params_per_layer(self) -> int:
        """Weights of one Mamba-2 mixer (in/out projections, depthwise convolution)."""
        conv_dim = self.mamba_inner + 2 * self.mamba_groups * self.ssm_state
        return (
            self.hidden * (2 * self.mamba_inner + 2 * self.mamba_groups * self.ssm_state + self.mamba_heads)
            + conv_dim * self.conv_kernel
            + self.mamba_inner * self.hidden
        )

    @property
    def ffn_mats(self) -> int:
        """Weight matrices per FFN (3 for gated SwiGLU/GeGLU, 2 for plain MLPs)."""
        return 3 if self.ffn_gated else 2

    @property
    def dense_ffn_params_per_layer(self) -> int:
        """Weights of one dense FFN."""
        return self.ffn_mats * self.hidden * self.ffn_dense

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert."""
        return 3 * self.hidden * self.ffn_expert

    @property
    def shared_params_per_layer(self) -> int:
        """Weights of the shared expert(s) of one MoE layer, plus its router."""
        return 3 * self.hidden * self.ffn_shared + self.hidden * self.n_experts

    @property
    def mixer_params(self) -> int:
        """Weights of every token mixer (attention, MLA, Mamba) of the model."""
        return (
            (self.n_attn_full + self.n_attn_window) * self.attn_params_per_layer
            + self.n_mla * self.mla_params_per_layer
            + self.n_mamba * self.mamba_params_per_layer
        )

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def total_params(self) -> int:
        """Every weight of the (text) model."""
        return (
            self.mixer_params
            + self.n_ffn_dense * self.dense_ffn_params_per_layer
            + self.n_ffn_moe * (self.n_experts * self.expert_params + self.shared_params_per_layer)
            + self.embedding_params
        )

    @property
    def active_params(self) -> int:
        """Weights one token uses (embedding lookup excluded, output head included)."""
        return (
            self.mixer_params
            + self.n_ffn_dense * self.dense_ffn_params_per_layer
            + self.n_ffn_moe * (self.top_k * self.expert_params + self.shared_params_per_layer)
            + self.vocab * self.hidden
        )

    @property
    def mixer_precision(self) -> str:
        """Precision of the token mixers' GEMMs (FP8 only when their weights are FP8)."""
        return "fp8" if self.weight_bytes == 1.0 else "bf16"

    @property
    def is_moe(self) -> bool:
        """Whether the model routes tokens to experts."""
        return self.n_ffn_moe > 0

    # ---- bytes ----
    @property
    def dense_weight_bytes(self) -> float:
        """Bytes of every weight a step reads in full (all but the routed experts), whole model."""
        ffn = (
            self.n_ffn_dense * self.dense_ffn_params_per_layer
            + self.n_ffn_moe * 3 * self.hidden * self.ffn_shared
        )
        router = self.n_ffn_moe * self.hidden * self.n_experts
        return (
            self.mixer_params * self.weight_bytes
            + ffn * self.ffn_weight_bytes
            + (router + self.embedding_params) * 2.0
        )

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert."""
        return self.expert_params * self.expert_weight_bytes

    @property
    def total_weight_bytes(self) -> float:
        """Bytes of the whole model's weights."""
        return self.dense_weight_bytes + self.n_ffn_moe * self.n_experts * self.expert_bytes

    def kv_bytes_per_token_layer(self, tp: int = 1) -> float:
        """KV-cache bytes one token takes in one GQA attention layer on one GPU of a ``tp``-way instance."""
        kv_heads = max(1.0, self.n_kv_heads / tp)  # heads are replicated when tp > n_kv_heads
        return 2 * kv_heads * self.head_dim * self.kv_bytes

    @property
    def mla_bytes_per_token_layer(self) -> float:
        """Latent KV-cache bytes per token of one MLA layer (replicated on every rank)."""
        return (self.kv_lora_rank + self.qk_rope_dim) * self.kv_bytes

    def kv_bytes_per_token(self, tp: int = 1) -> float:
        """KV-cache bytes one token takes on one GPU of a ``tp``-way instance, all layers (no window)."""
        return (self.n_attn_full + self.n_attn_window) * self.kv_bytes_per_token_layer(
            tp
        ) + self.n_mla * self.mla_bytes_per_token_layer

    def kv_bytes_for_context(self, ctx: float, tp: int = 1) -> float:
        """KV-cache bytes of one sequence of ``ctx`` tokens on one GPU (windowed layers keep their window)."""
        per_layer = self.kv_bytes_per_token_layer(tp)
        return (
            self.n_attn_full * ctx + self.n_attn_window * min(ctx, self.window)
        ) * per_layer + self.n_mla * self.mla_bytes_per_token_layer * ctx

    def mamba_state_bytes(self, tp: int = 1) -> float:
        """Mamba-2 state (SSM state and convolution window) one sequence holds on one GPU."""
        if not self.n_mamba:
            return 0.0
        ssm = self.mamba_heads * self.mamba_head_dim * self.ssm_state
        conv = (self.mamba_inner + 2 * self.mamba_groups * self.ssm_state) * (self.conv_kernel - 1)
        return self.n_mamba * (ssm + conv) * self.kv_bytes / tp


def _get(cfg: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ShapeError(f"config field {key!r} is missing")
    return default


def _positive_int(cfg: dict[str, Any], key: str, default: Any = None, *, required: bool = True) -> int:
    value = _get(cfg, key, default, required=required and default is None)
    if value is None:
        raise ShapeError(f"config field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise ShapeError(f"config field {key!r} must be a positive integer, got {value!r}")
    return int(value)


def _precision(cfg: dict[str, Any]) -> tuple[float, float, float, str, str]:
    """(mixer, FFN, expert) bytes per weight and the GEMM precision of dense and expert layers."""
    dtype = str(_get(cfg, "torch_dtype", _get(cfg, "dtype", "bfloat16")))
    base = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}.get(dtype)
    if base is None:
        raise ShapeError(f"config field 'torch_dtype' must be bfloat16, float16 or float32, got {dtype!r}")
    quant = _get(cfg, "quantization_config")
    if not quant:
        return base, base, base, "bf16", "bf16"
    if not isinstance(quant, dict):
        raise ShapeError("config field 'quantization_config' must be an object")
    method = str(quant.get("quant_method", "")).lower()
    keep = [str(m) for m in quant.get("modules_to_not_convert") or []]
    if method in ("fp8", "fbgemm_fp8", "compressed-tensors", "modelopt"):
        attn_fp8 = not any("self_attn" in m for m in keep)
        return (1.0 if attn_fp8 else base), 1.0, 1.0, "fp8", "fp8"
    if method == "mxfp4":
        return base, base, MXFP4_BYTES, "bf16", "mxfp4"
    raise ShapeError(
        f"config field 'quantization_config.quant_method' {method!r} is not supported "
        "(fp8, fbgemm_fp8, compressed-tensors, modelopt, mxfp4)"
    )


def _hybrid_pattern(cfg: dict[str, Any], n_layers: int) -> tuple[int, int, int, int]:
    """(mamba, attention, MLP, MoE) layer counts of a Nemotron-H ``hybrid_override_pattern``."""
    pattern = _get(cfg, "hybrid_override_pattern", required=True)
    if not isinstance(pattern, str) or set(pattern) - set("M*-E"):
        raise ShapeError(
            f"config field 'hybrid_override_pattern' must use only M, *, - and E, got {pattern!r}"
        )
    if len(pattern) != n_layers:
        raise ShapeError(
            f"config field 'hybrid_override_pattern' has {len(pattern)} layers, "
            f"num_hidden_layers says {n_layers}"
        )
    return pattern.count("M"), pattern.count("*"), pattern.count("-"), pattern.count("E")


def parse_config(config: dict[str, Any], name: str | None = None) -> ModelShape:
    """A `ModelShape` from a Hugging Face ``config.json`` dict (or a shipped wrapper with ``config``).

    Raises:
        ShapeError: A field the model needs is missing or out of range (the message names it).
    """
    if not isinstance(config, dict):
        raise ShapeError("a model configuration must be a JSON object")
    if "config" in config and isinstance(config["config"], dict):
        name = name or config.get("hf_repo")
        config = config["config"]
    top = config
    cfg = dict(config)
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers (Gemma-3, Llama-4)
        cfg = {**{k: v for k, v in config.items() if k != "text_config"}, **config["text_config"]}
    model_type = str(_get(cfg, "model_type", ""))
    name = name or str(_get(cfg, "_name_or_path", model_type or "model"))
    n_layers = _positive_int(cfg, "num_hidden_layers")
    hidden = _positive_int(cfg, "hidden_size")
    vocab = _positive_int(cfg, "vocab_size")
    n_heads = _positive_int(cfg, "num_attention_heads")
    n_kv = _positive_int(cfg, "num_key_value_heads", n_heads)
    head_dim = _positive_int(cfg, "head_dim", hidden // n_heads if hidden % n_heads == 0 else None)
    tie = bool(_get(cfg, "tie_word_embeddings", _get(top, "tie_word_embeddings", False)))
    act = str(_get(cfg, "mlp_hidden_act", _get(cfg, "hidden_act", _get(cfg, "hidden_activation", "silu"))))
    gated = act not in ("relu2", "relu")
    wb, fb, eb, gemm_prec, expert_prec = _precision(
        {**cfg, **{k: top[k] for k in ("quantization_config", "torch_dtype") if k in top}}
    )
    notes: list[str] = []

    n_experts = int(
        _get(cfg, "num_experts", _get(cfg, "num_local_experts", _get(cfg, "n_routed_experts", 0))) or 0
    )
    top_k = int(_get(cfg, "num_experts_per_tok", _get(cfg, "experts_per_token", 0)) or 0)
    n_mamba = 0
    mla = "kv_lora_rank" in cfg and cfg.get("kv_lora_rank")

    if model_type == "nemotron_h" or "hybrid_override_pattern" in cfg:
        n_mamba, n_attn, n_mlp, n_moe_layers = _hybrid_pattern(cfg, n_layers)
        if n_moe_layers:
            raise ShapeError(
                "config field 'hybrid_override_pattern': MoE layers (E) in a hybrid model are not supported"
            )
        gated = False
        ffn_dense = _positive_int(cfg, "intermediate_size")
        n_ffn_dense, n_ffn_moe = n_mlp, 0
    else:
        n_attn = n_layers
        if n_experts:
            if top_k <= 0 or top_k > n_experts:
                raise ShapeError(
                    f"config field 'num_experts_per_tok' must be between 1 and {n_experts}, got {top_k}"
                )
            step = int(_get(cfg, "interleave_moe_layer_step", _get(cfg, "decoder_sparse_step", 1)) or 1)
            dense_layers = set(_get(cfg, "mlp_only_layers", []) or [])
            first_dense = int(_get(cfg, "first_k_dense_replace", 0) or 0)
            moe_layers = [
                i
                for i in range(n_layers)
                if i >= first_dense and i not in dense_layers and (i + 1) % step == 0
            ]
            n_ffn_moe = len(moe_layers)
            n_ffn_dense = n_layers - n_ffn_moe
            if model_type.startswith("llama4"):
                ffn_expert = _positive_int(cfg, "intermediate_size")
                ffn_shared = ffn_expert
                ffn_dense = _positive_int(cfg, "intermediate_size_mlp", ffn_expert)
            elif model_type == "gpt_oss" or model_type == "mixtral":
                ffn_expert = _positive_int(cfg, "intermediate_size")
                ffn_shared, ffn_dense = 0, ffn_expert
            else:
                ffn_expert = _positive_int(cfg, "moe_intermediate_size")
                ffn_shared = int(_get(cfg, "n_shared_experts", 0) or 0) * ffn_expert + int(
                    _get(cfg, "shared_expert_intermediate_size", 0) or 0
                )
                ffn_dense = int(_get(cfg, "intermediate_size", ffn_expert) or ffn_expert)
        else:
            n_ffn_dense, n_ffn_moe = n_layers, 0
            ffn_dense = _positive_int(cfg, "intermediate_size")
            ffn_expert = ffn_shared = 0

    # attention: full vs windowed layers
    window = 0
    n_window = 0
    if n_attn and not mla:
        layer_types = _get(cfg, "layer_types")
        sliding = _get(cfg, "sliding_window")
        chunk = _get(cfg, "attention_chunk_size")
        if isinstance(layer_types, list) and sliding:
            n_window = sum(1 for t in layer_types if "sliding" in str(t))
            window = int(sliding)
        elif sliding and _get(cfg, "sliding_window_pattern", _get(cfg, "_sliding_window_pattern")):
            pattern = int(_get(cfg, "sliding_window_pattern", _get(cfg, "_sliding_window_pattern")))
            n_window = sum(1 for i in range(n_layers) if (i + 1) % pattern != 0)
            window = int(sliding)
        elif chunk and model_type.startswith("llama4"):
            n_window = sum(1 for i in range(n_layers) if (i + 1) % 4 != 0)  # NoPE layers attend globally
            window = int(chunk)
            notes.append("chunked local attention modelled as a sliding window of attention_chunk_size")
        elif sliding and bool(_get(cfg, "use_sliding_window", False)):
            n_window, window = n_attn, int(sliding)
    n_full = n_attn - n_window if not mla else 0

    shape = dict(
        name=name,
        n_layers=n_layers,
        hidden=hidden,
        vocab=vocab,
        tie_embeddings=tie,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        n_attn_full=n_full,
        n_attn_window=n_window,
        window=window,
        n_ffn_dense=n_ffn_dense,
        ffn_dense=ffn_dense,
        ffn_gated=gated,
        n_ffn_moe=n_ffn_moe,
        n_experts=n_experts if n_ffn_moe else 0,
        top_k=top_k if n_ffn_moe else 0,
        ffn_expert=ffn_expert if n_ffn_moe else 0,
        ffn_shared=ffn_shared if n_ffn_moe else 0,
        weight_bytes=wb,
        ffn_weight_bytes=fb,
        expert_weight_bytes=eb,
        gemm_precision=gemm_prec,
        expert_precision=expert_prec,
        notes=tuple(notes),
    )
    if mla:
        shape.update(
            n_mla=n_attn,
            q_lora_rank=int(_get(cfg, "q_lora_rank", 0) or 0),
            kv_lora_rank=_positive_int(cfg, "kv_lora_rank"),
            qk_nope_dim=_positive_int(cfg, "qk_nope_head_dim"),
            qk_rope_dim=_positive_int(cfg, "qk_rope_head_dim"),
            v_head_dim=_positive_int(cfg, "v_head_dim"),
        )
    if n_mamba:
        shape.update(
            n_mamba=n_mamba,
            mamba_heads=_positive_int(cfg, "mamba_num_heads"),
            mamba_head_dim=_positive_int(cfg, "mamba_head_dim"),
            ssm_state=_positive_int(cfg, "ssm_state_size"),
            mamba_groups=_positive_int(cfg, "n_groups", _get(cfg, "mamba_n_groups", 8)),
            conv_kernel=_positive_int(cfg, "conv_kernel", 4),
        )
    return ModelShape(**shape)


def load_config_file(path: Path | str) -> ModelShape:
    """A `ModelShape` from a ``config.json`` file (raises `ShapeError` or `FileNotFoundError`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model configuration file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShapeError(f"{path}: not a JSON file ({exc})") from exc
    try:
        return parse_config(data, name=data.get("hf_repo") if isinstance(data, dict) else None)
    except ShapeError as exc:
        raise ShapeError(f"{path}: {exc}") from exc


def shipped_models() -> dict[str, Path]:
    """Name -> file of every shipped model configuration."""
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.json"))}


def load_shipped(name: str) -> ModelShape:
    """The shape of a shipped model (``qwen3-8b``, ...)."""
    files = shipped_models()
    if name not in files:
        raise ShapeError(f"unknown model {name!r}; shipped: {', '.join(files)}")
    return load_config_file(files[name])
