"""What a worker builds: the model's shape and the engine's settings, validated.

:class:`WorkerConfig` names a model (a key of :data:`SHAPES`, or a local Hugging Face
checkpoint whose ``config.json`` :func:`shape_from_hf_config` reads), the device and the sizes
of the static KV cache; :class:`WorkerError` is the one error every part of the worker raises
for a bad configuration or request (its message names the field and the value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
