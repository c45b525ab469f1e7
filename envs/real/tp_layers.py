"""Megatron-style tensor-parallel pieces for a Llama decoder (used by ``envs/real/tp_worker.py``).

Tensor parallelism over ``tp`` ranks (Shoeybi et al., "Megatron-LM", 2019, section 3):

* column-parallel linears (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) keep
  the rows of their weight that produce the rank's slice of the output features: each rank
  owns ``n_heads/tp`` query heads, ``n_kv_heads/tp`` KV heads and ``d_ffn/tp`` MLP features,
  and computes attention and the SwiGLU activation on them with no communication;
* row-parallel linears (``o_proj``, ``down_proj``) keep the matching columns of their weight,
  so each rank produces a partial sum of the full output, added up by one all-reduce.

Two all-reduces per layer, as in Megatron. The embedding, the norms and ``lm_head`` are
replicated (every rank computes the same argmax, so no gather is needed; the 70B embedding and
head are 0.5 GB each in bf16, small next to the 17 GB shard a rank of TP8 holds).

Random weights are defined so that the full (unsharded) model does not depend on ``tp``: a
split weight is cut into ``n_kv_heads`` equal blocks along its split dimension (block ``j`` =
KV head ``j`` with its query-head group, or the ``j``-th slice of the MLP features) and each
block is drawn from its own seeded generator. A rank draws only the blocks it owns, so TP1 and
TP2 models hold the same numbers and no rank ever materializes the whole model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm_cluster_gym.envs.real.worker import ModelShape, WorkerError, finish_weight_load

# Parameter-name suffix -> dimension it is split along (0: output features, 1: input features).
COLUMN_PARALLEL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                   "up_proj.weight")
ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")


class TPShardError(WorkerError):
    """A shape cannot be split over the requested tensor-parallel degree (names the field)."""


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a model one rank holds.

    Attributes:
        full: Shape of the whole model.
        tp: Tensor-parallel degree (ranks).
        rank: This rank, ``0 <= rank < tp``.
    """

    full: ModelShape
    tp: int
    rank: int

    def __post_init__(self) -> None:
        """Check that heads, KV heads and MLP features split evenly."""
        s, tp = self.full, self.tp
        if tp < 1 or not 0 <= self.rank < tp:
            raise TPShardError(f"ShardSpec: field 'rank'={self.rank} must be in [0, tp={tp})")
        for name, n in (("n_kv_heads", s.n_kv_heads), ("n_heads", s.n_heads)):
            if n % tp:
                raise TPShardError(f"ShardSpec: model {s.name!r} field '{name}'={n} is not "
                                   f"divisible by tp={tp}")
        if s.d_ffn % s.n_kv_heads:
            raise TPShardError(f"ShardSpec: model {s.name!r} field 'd_ffn'={s.d_ffn} is not "
                               f"divisible by n_kv_heads={s.n_kv_heads} (weight blocks)")

    @property
    def local(self) -> ModelShape:
        """The shape one rank computes with: its heads, KV heads and MLP features."""
        s = self.full
        return replace(s, n_heads=s.n_heads // self.tp, n_kv_heads=s.n_kv_heads // self.tp,
                       d_ffn=s.d_ffn // self.tp)

    @property
    def blocks(self) -> range:
        """Indices of the weight blocks (out of ``full.n_kv_heads``) this rank owns."""
        per = self.full.n_kv_heads // self.tp
        return range(self.rank * per, (self.rank + 1) * per)

    def split_dim(self, name: str) -> int | None:
        """Dimension along which parameter ``name`` is split (None: replicated)."""
        if name.endswith(COLUMN_PARALLEL):
            return 0
        if name.endswith(ROW_PARALLEL):
            return 1
        return None

    def local_slice(self, name: str, full_size: int) -> slice:
        """Slice of the split dimension of ``name`` (whole-model size ``full_size``) held here."""
        per = full_size // self.tp
        return slice(self.rank * per, (self.rank + 1) * per)


def _block_seed(seed: int, name: str, block: int) -> int:
    """A stable 63-bit seed per (weights seed, parameter name, block)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 4099 + block) % (2 ** 63 - 1)


def init_random_sharded_(model: Any, spec: ShardSpec, seed: int, std: float = 0.02) -> None:
    """Fill ``model`` (a rank's shard) with random weights that do not depend on ``tp``.

    Norm weights are ones (as in :func:`envs.real.llama.build_model`); every other weight is
    normal(0, ``std``), drawn block by block (see the module docstring).
    """
    import torch

    n_blocks = spec.full.n_kv_heads
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                prm.fill_(1.0)
                continue
            dim = spec.split_dim(name)
            dev = prm.device
            if dim is None:
                gen = torch.Generator(device=dev).manual_seed(_block_seed(seed, name, 0))
                prm.normal_(0.0, std, generator=gen)
                continue
            local_blocks = list(spec.blocks)
            per = prm.shape[dim] // len(local_blocks)
            assert per * len(local_blocks) == prm.shape[dim] and n_blocks % spec.tp == 0
            for i, blk in enumerate(local_blocks):
                gen = torch.Generator(device=dev).manual_seed(_block_seed(seed, name, blk))
                view = prm.narrow(dim, i * per, per)
                # Draw contiguously, then copy: an in-place normal_ on a strided view fills in
                # an order that depends on the strides, i.e. on tp.
                block = torch.empty(view.shape, dtype=prm.dtype, device=dev)
                view.copy_(block.normal_(0.0, std, generator=gen))


def row_parallel_linear(weight: Any, group: Any | None) -> Any:
    """A row-parallel linear module: ``y = all_reduce(x_local @ W_local.T)`` over ``group``.

    Args:
        weight: This rank's ``[d_out, d_in/tp]`` weight (a Parameter is kept as is, so the
            module keeps the HF parameter name ``...o_proj.weight``).
        group: Process group of the TP ranks; None for TP1 (no communication).
    """
    import torch
    from torch import nn

    class RowParallelLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(
                weight, requires_grad=False)
            self.group = group

        def forward(self, x: Any) -> Any:
            y = torch.nn.functional.linear(x, self.weight)
            if self.group is not None:
                torch.distributed.all_reduce(y, group=self.group)
            return y

    return RowParallelLinear()


def make_row_parallel_(model: Any, group: Any | None) -> int:
    """Swap every ``o_proj``/``down_proj`` of ``model`` for a row-parallel linear (same weight).

    Returns:
        Number of layers swapped.
    """
    n = 0
    for layer in model.model.layers:
        layer.self_attn.o_proj = row_parallel_linear(layer.self_attn.o_proj.weight, group)
        layer.mlp.down_proj = row_parallel_linear(layer.mlp.down_proj.weight, group)
        n += 2
    return n


def load_hf_weights_sharded_(model: Any, weights_dir: Path, spec: ShardSpec) -> None:
    """Load this rank's slices of an HF Llama checkpoint (``*.safetensors``) into ``model``.

    Reads only the slices the rank holds (safetensors ``get_slice``), so a rank of a 70B model
    never holds the whole weight.

    Raises:
        WorkerError: No shards, a missing parameter or a shape that does not match.
    """
    from safetensors import safe_open

    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise WorkerError(f"{weights_dir}: field 'weights_path' has no *.safetensors files")
    own = dict(model.named_parameters())
    seen: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if key not in own:
                    continue
                dim = spec.split_dim(key)
                sl = fh.get_slice(key)
                if dim is None:
                    t = sl[:]
                else:
                    full = sl.get_shape()[dim]
                    s = spec.local_slice(key, full)
                    t = sl[s] if dim == 0 else sl[:, s]
                if tuple(t.shape) != tuple(own[key].shape):
                    raise WorkerError(f"{f}: parameter {key!r} slice has shape {tuple(t.shape)}, "
                                      f"rank {spec.rank}/{spec.tp} expects {tuple(own[key].shape)}")
                own[key].data.copy_(t.to(own[key].dtype))
                seen.add(key)
    finish_weight_load(own, seen, weights_dir)
