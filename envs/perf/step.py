"""Time and power of one engine step from the work it does (a roofline with fitted efficiencies).

A step runs a batch that mixes decode tokens (one per running request) and prefill chunks. Its
work on each GPU of an instance of ``n_gpus`` (tensor parallel for attention and dense layers,
experts spread over the GPUs) is counted from the model's shape (`StepWork`):

* GEMM FLOPs: 2 x tokens x active weights of the shard (dense layers, shared experts, router), the
  routed experts' FLOPs (``top_k`` experts per token), the output head for each scheduled request;
  each at the peak of its weight precision (BF16, FP8; MXFP4 at the GPU's MXFP4 GEMM rate);
* weight bytes: the dense shard read once per step, and the routed experts the step touches:
  with ``T`` tokens routed uniformly, a layer touches ``E (1 - (1 - k/E)^T)`` of its ``E`` experts
  (MoE expert loading: decode steps read few experts, prefill chunks read them all);
* attention: FLOPs over (query, key) pairs and KV-cache bytes read (decode: each request's whole
  context; sliding-window layers at most the window; MLA reads its compressed latent), Mamba-2
  state read and written per decoding request;
* activations and logits bytes;
* tensor-parallel all-reduces: one per mixer and one per FFN layer of ``tokens x hidden`` BF16
  values, timed from the measured H100 DGX table (`collectives`), scaled by a fitted factor.

Time (`step_time_power`): each kind of work is a smooth maximum of its compute time (peak x
efficiency ``e_c``/``e_a``) and its memory time (bandwidth x ``e_m``), plus a fixed GPU time per
layer (kernel boundaries) and the all-reduces; the host's time per step (scheduling, sampling)
overlaps it (asynchronous scheduling, as the ML.ENERGY runs use), so the GPU idles only when the
host is the slower of the two. Power per GPU: the measured idle power with a CUDA context, plus a busy
term for the fraction of the step the GPU runs kernels, plus terms proportional to the achieved
fraction of peak compute and of peak memory bandwidth. When that exceeds the power limit the
SM clock is pulled down until it does not: compute-bound times stretch by 1/s and the clock-driven
power scales by s^gamma (memory-bound time and power do not move; see `CLOCK_NOTE`). The same
scaling applies to a clock set by the user.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from llm_cluster_gym.envs.perf.collectives import all_reduce_s, latency_floor_s
from llm_cluster_gym.envs.perf.hardware import GpuSpec
from llm_cluster_gym.envs.perf.scheduler import TRACE_FIELDS
from llm_cluster_gym.envs.perf.shapes import ModelShape

GAMMA = 2.0
"""Exponent of the clock-driven power in the SM clock ratio (P_dyn ~ f^gamma); see `CLOCK_NOTE`."""

SMOOTH_P = 3.0
"""Exponent of the smooth roofline maximum (t_c^p + t_m^p)^(1/p): near the ridge both limits cost."""

CLOCK_NOTE = (
    "How time and power move with the SM clock, where nothing is measured here (no clock sweep is "
    "allowed on the lent machines; the public data run at default clocks): compute-bound kernels slow "
    "down as 1/f, memory-bound ones barely move (decode is 'largely insensitive to GPU frequency': "
    "Maliakel et al., 'Characterizing LLM Inference Energy-Performance Tradeoffs across Workloads and GPU "
    "Scaling', arXiv:2501.08219; prompt phases scale with frequency, token phases do not: Patel et al., "
    "'Characterizing Power Management Opportunities for LLMs in the Cloud', ASPLOS 2024; memory-bound "
    "decode on H200 draws 137-300 W and a power cap never binds while clock locking saves energy: Ma et "
    "al., 'The Illusion of Power Capping in LLM Decode', arXiv:2605.11999). Clock-driven power ~ f^gamma "
    "with gamma = 2 (CMOS f V^2 between the voltage floor, gamma ~ 1, and V ~ f, gamma ~ 3; the H100 "
    "probe here, prefill pinned at 700 W with the clock pulled to ~1500-1725 MHz, does not pin it down: "
    "envs/data/profiles/*.json sensitivity)."
)


@dataclass(frozen=True)
class Coefficients:
    """Fitted constants of one GPU type (not of a model). Times in seconds, powers in W."""

    e_c: float = 0.6
    """GEMM efficiency: achieved fraction of the dense peak FLOP/s."""
    e_e: float = 0.4
    """Routed-expert (grouped GEMM) compute efficiency."""
    e_a: float = 0.4
    """Attention (and Mamba scan) compute efficiency."""
    e_m: float = 0.8
    """Achieved fraction of the memory bandwidth."""
    e_s: float = 0.5
    """Achieved fraction of the memory bandwidth of the Mamba-2 state update (read and write per decode)."""
    e_kv: float | None = None
    """Achieved fraction of the memory bandwidth reading the KV cache in attention; None: ``e_m`` (the
    public calibration). A node whose engine has its own attention kernels (the real worker's chunked
    split-K decode attention) fits its own (`envs/real/node_calibration.py`)."""
    tau_layer_s: float = 30e-6
    """GPU time per layer per step not explained by FLOPs or bytes (kernel boundaries, small kernels)."""
    tau_moe_s: float = 30e-6
    """Extra GPU time per MoE layer per step (routing, token permutation, grouped-GEMM launches)."""
    tau_seq_s: float = 0.3e-6
    """GPU time per scheduled request per mixer layer (paged-attention bookkeeping, per-sequence work)."""
    step_s: float = 0.0
    """Fixed GPU time per step (embedding, sampling, input and output copies); not fitted (the per-layer
    and host terms absorb it on the published runs)."""
    host_s: float = 1.5e-3
    """Host time per step (scheduler, input preparation, sampling, detokenization); with vLLM's
    asynchronous scheduling it overlaps the GPU's work, so a step lasts the smooth maximum of the two
    and the GPU idles only when the host is slower."""
    host_per_seq_s: float = 5e-6
    """Host time per scheduled request per step."""
    comm_scale: float = 0.5
    """Factor on the size-dependent part of the measured all-reduce times."""
    comm_latency_scale: float = 0.5
    """Factor on the measured all-reduce latency floor (vLLM's custom all-reduce under CUDA graphs is
    far quicker on small messages than NCCL launched from Python, which the table measured)."""
    p_busy_w: float = 150.0
    """Power while kernels run, beyond idle, before counting compute or memory activity."""
    p_fixed_w: float | None = None
    """Power, beyond idle, during the fixed GPU time (``step_s``, ``tau_*``: kernel boundaries, launch
    gaps, small kernels); None: ``p_busy_w`` (the public calibration). A node whose engine spends much
    of a step there (the real worker: about half of a batch-1 decode step) fits its own."""
    p_compute_w: float = 500.0
    """Power at 100% of peak FLOP/s (scaled by the achieved fraction)."""
    p_memory_w: float = 150.0
    """Power at 100% of the memory bandwidth (scaled by the achieved fraction)."""
    p_comm_w: float = 50.0
    """Power while all-reduces run (NVLink traffic, polling), per unit of the step they take."""
    p_quant_w: float = 100.0
    """Power per unit rate of reading sub-16-bit weights (FP8 scaling, MXFP4 dequantization ALU work)."""
    idle_w: float | None = None
    """Idle power with a CUDA context; None: the GPU specification's measured value."""
    serial_prefill_power_ratio: float = 1.0
    """Power above idle of a prefill pass that runs alone between decode iterations (an engine that
    prefills one prompt per pass, as the real worker), over the same work's sustained power. The GPU
    enforces its power limit on averaged power (NVML's reading is a trailing average of about a
    second on the H100s recorded here, ``envs/data/thermal/README.md``), so such passes run near the
    maximum clock where sustained prefill is pulled down; the served H100 runs draw 510-720 W per
    second of prefill passes against 700 W (capped) sustained. 1: engines that mix prefill into
    decode steps (vLLM; the public calibration). Used by a node's fit (`envs/real/node_calibration.py`)
    and the simulator's serial prefill (`Profile.prefill_serial_power_ratio`); `step_time_power`
    itself models sustained steps."""

    def to_dict(self) -> dict[str, float | None]:
        """The coefficients as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, float | None]) -> Coefficients:
        """Coefficients from `to_dict`'s output (unknown keys rejected)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown coefficient(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class StepWork:
    """Work of a batch of steps on one GPU, as seconds at peak rates (arrays over steps).

    ``*_c`` are compute seconds at 100% of peak, ``*_m`` memory seconds at 100% of bandwidth.
    """

    dense_c: np.ndarray
    dense_m: np.ndarray
    expert_c: np.ndarray
    expert_m: np.ndarray
    attn_c: np.ndarray
    attn_m: np.ndarray
    other_m: np.ndarray
    state_m: np.ndarray
    quant_m: np.ndarray
    allreduce_s: np.ndarray
    allreduce_floor_s: np.ndarray
    n_sched: np.ndarray
    n_layers: np.ndarray
    n_moe: np.ndarray
    n_mixers: np.ndarray

    @property
    def compute_s(self) -> np.ndarray:
        """Compute seconds at peak (all kinds)."""
        return self.dense_c + self.expert_c + self.attn_c

    @property
    def memory_s(self) -> np.ndarray:
        """Memory seconds at full bandwidth (all kinds)."""
        return self.dense_m + self.expert_m + self.attn_m + self.other_m + self.state_m


def step_work(shape: ModelShape, n_gpus: int, gpu: GpuSpec, records: np.ndarray) -> StepWork:
    """The per-GPU work of trace records (columns `scheduler.TRACE_FIELDS`, one row per step kind)."""
    col = {name: records[:, i] for i, name in enumerate(TRACE_FIELDS)}
    g = float(n_gpus)
    s = shape
    n_dec, n_pre, n_sched = col["n_dec"], col["n_pre"], col["n_sched"]
    tokens = n_dec + n_pre
    bw = gpu.memory_bytes_per_s
    p_bf16 = gpu.peak("bf16")
    p_mix = gpu.peak(s.mixer_precision)
    p_ffn = gpu.peak("fp8" if s.ffn_weight_bytes == 1.0 else "bf16")
    p_exp = gpu.peak(s.expert_precision)

    # dense GEMMs: mixers, dense FFNs, shared experts + router, output head (one row per scheduled request)
    mixer = s.mixer_params / g
    ffn = (s.n_ffn_dense * s.dense_ffn_params_per_layer + s.n_ffn_moe * 3 * s.hidden * s.ffn_shared) / g
    router = s.n_ffn_moe * s.hidden * s.n_experts
    head = s.vocab * s.hidden / g
    dense_c = 2 * tokens * (mixer / p_mix + ffn / p_ffn + router / p_bf16) + 2 * n_sched * head / p_bf16
    dense_bytes = (
        mixer * s.weight_bytes
        + ffn * s.ffn_weight_bytes
        + router * 2.0
        + head * 2.0
        + tokens * s.hidden * 2.0 / g
    )  # embedding rows
    dense_m = np.full_like(tokens, dense_bytes / bw)

    # routed experts: FLOPs of top_k experts per token; bytes of the experts the step touches
    if s.n_ffn_moe:
        e, k = float(s.n_experts), float(s.top_k)
        touched = e * (1.0 - np.power(1.0 - k / e, tokens))
        expert_c = 2 * tokens * s.n_ffn_moe * k * s.expert_params / g / p_exp
        expert_m = s.n_ffn_moe * touched / g * s.expert_bytes / bw
    else:
        expert_c = np.zeros_like(tokens)
        expert_m = np.zeros_like(tokens)

    # attention: (query, key) pairs and KV bytes; sliding-window layers read at most their window
    heads = s.n_heads / g
    kv_layer = s.kv_bytes_per_token_layer(n_gpus)
    pairs_full = col["ctx_full"] + col["pairs_full"]
    pairs_win = col["ctx_win"] + col["pairs_win"]
    attn_flops = 4 * heads * s.head_dim * (s.n_attn_full * pairs_full + s.n_attn_window * pairs_win)
    kv_bytes = kv_layer * (
        s.n_attn_full * (col["ctx_full"] + col["kvpre_full"])
        + s.n_attn_window * (col["ctx_win"] + col["kvpre_win"])
    )
    if s.n_mla:  # absorbed MLA: scores over the latent + rope part, values over the latent
        attn_flops = attn_flops + 2 * heads * (2 * s.kv_lora_rank + s.qk_rope_dim) * s.n_mla * pairs_full
        kv_bytes = kv_bytes + s.mla_bytes_per_token_layer * s.n_mla * (col["ctx_full"] + col["kvpre_full"])
    if s.n_mamba:  # SSM state read and written by every decoding request; scan FLOPs per token
        state_bytes = 2 * n_dec * s.mamba_state_bytes(n_gpus)
        attn_flops = attn_flops + 6 * tokens * s.n_mamba * s.mamba_inner * s.ssm_state / g
    attn_c = attn_flops / p_bf16
    attn_m = kv_bytes / bw
    state_m = (state_bytes if s.n_mamba else np.zeros_like(tokens)) / bw

    # activations (residual stream, projections' inputs/outputs, FFN intermediates) and logits
    ffn_act = (s.n_ffn_dense * s.ffn_dense + s.n_ffn_moe * (s.top_k * s.ffn_expert + s.ffn_shared)) / g
    mixer_act = (s.n_attn_full + s.n_attn_window + s.n_mla) * (
        s.n_heads + 2 * s.n_kv_heads
    ) * s.head_dim / g + s.n_mamba * 2 * s.mamba_inner / g
    act_bytes = (
        tokens * 2.0 * (8 * s.n_layers * s.hidden + 3 * ffn_act + 3 * mixer_act)
        + n_sched * s.vocab / g * 4.0 * 2
    )
    other_m = act_bytes / bw

    # all-reduces: one per mixer and one per FFN layer, tokens x hidden BF16
    n_ar = s.n_attn_full + s.n_attn_window + s.n_mla + s.n_mamba + s.n_ffn_dense + s.n_ffn_moe
    # split into the table's latency floor (per all-reduce) and the size-dependent rest: vLLM's custom
    # all-reduce under CUDA graphs has a much lower floor than NCCL launched from Python, and the two
    # parts are scaled by separate fitted factors
    ar = (
        n_ar * all_reduce_s(tokens * s.hidden * 2.0, n_gpus, gpu.nvlink_bytes_per_s)
        if n_gpus > 1
        else np.zeros_like(tokens)
    )
    ar_floor = np.full_like(tokens, n_ar * latency_floor_s(n_gpus))
    ar = np.maximum(ar - ar_floor, 0.0)
    # weights stored below 16 bits (FP8, MXFP4): their scaling/dequantization is extra ALU work per byte
    quant_bytes = (mixer * s.weight_bytes if s.weight_bytes < 2 else 0.0) + (
        ffn * s.ffn_weight_bytes if s.ffn_weight_bytes < 2 else 0.0
    )
    quant_m = quant_bytes / bw + (expert_m if s.expert_weight_bytes < 2 else 0.0)
    return StepWork(
        dense_c,
        dense_m,
        expert_c,
        expert_m,
        attn_c,
        attn_m,
        other_m,
        state_m,
        np.broadcast_to(np.asarray(quant_m, dtype=float), tokens.shape).copy(),
        ar,
        ar_floor,
        n_sched,
        np.full_like(tokens, float(s.n_layers)),
        np.full_like(tokens, float(s.n_ffn_moe)),
        np.full_like(tokens, float(s.n_attn_full + s.n_attn_window + s.n_mla + s.n_mamba)),
    )


def stack_work(works: list[StepWork]) -> StepWork:
    """Several traces' work as one (steps concatenated), to evaluate them in one pass."""
    return StepWork(*(np.concatenate([getattr(w, f.name) for w in works]) for f in fields(StepWork)))


def _smax(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = np.maximum(a, b)
    safe = np.where(m > 0, m, 1.0)
    return np.where(
        m > 0,
        safe * np.power(np.power(a / safe, SMOOTH_P) + np.power(b / safe, SMOOTH_P), 1.0 / SMOOTH_P),
        0.0,
    )


def _fixed(w: StepWork, c: Coefficients) -> np.ndarray:
    """GPU seconds per step not explained by FLOPs or bytes, at the maximum clock."""
    return (
        c.step_s + c.tau_layer_s * w.n_layers + c.tau_moe_s * w.n_moe + c.tau_seq_s * w.n_sched * w.n_mixers
    )


def _times(w: StepWork, c: Coefficients, s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(GPU-busy seconds, step seconds, all-reduce seconds) at clock ratio ``s``."""
    fixed = _fixed(w, c)
    gpu_t = (
        _smax(w.dense_c / (c.e_c * s), w.dense_m / c.e_m)
        + _smax(w.expert_c / (c.e_e * s), w.expert_m / c.e_m)
        + _smax(w.attn_c / (c.e_a * s), w.attn_m / (c.e_m if c.e_kv is None else c.e_kv))
        + w.other_m / c.e_m
        + w.state_m / c.e_s
        + fixed / s
    )
    comm = c.comm_scale * w.allreduce_s + c.comm_latency_scale * w.allreduce_floor_s
    gpu_t = gpu_t + comm
    host = c.host_s + c.host_per_seq_s * w.n_sched  # overlapped with the GPU (async scheduling)
    return gpu_t, _smax(gpu_t, host), comm


def _power(
    w: StepWork,
    c: Coefficients,
    idle: float,
    s: np.ndarray | float,
    gpu_t: np.ndarray,
    step_t: np.ndarray,
    comm_t: np.ndarray,
) -> np.ndarray:
    clocked = (c.p_busy_w * (gpu_t - comm_t) + c.p_compute_w * w.compute_s + c.p_quant_w * w.quant_m) / step_t
    if c.p_fixed_w is not None:  # the fixed GPU time draws its own power (a node's fit)
        clocked = clocked + (c.p_fixed_w - c.p_busy_w) * (_fixed(w, c) / s) / step_t
    return idle + np.power(s, GAMMA) * clocked + (c.p_memory_w * w.memory_s + c.p_comm_w * comm_t) / step_t


@dataclass(frozen=True)
class StepResult:
    """Per-step results on one GPU: seconds, watts, the SM clock ratio, and whether the cap bound."""

    step_s: np.ndarray
    power_w: np.ndarray
    clock_ratio: np.ndarray
    capped: np.ndarray


def step_time_power(w: StepWork, gpu: GpuSpec, c: Coefficients, clock_ratio: float = 1.0) -> StepResult:
    """Time and per-GPU power of each step, with the clock pulled down where the power limit binds.

    Args:
        w: The steps' work.
        gpu: The GPU (power limit, idle power).
        c: The GPU type's coefficients.
        clock_ratio: A locked SM clock as a fraction of the maximum (1.0: default boost behaviour).
    """
    idle = gpu.idle_power_with_context_w if c.idle_w is None else c.idle_w
    s = np.full_like(w.n_sched, float(clock_ratio))
    gpu_t, step_t, comm_t = _times(w, c, s)
    p = _power(w, c, idle, s, gpu_t, step_t, comm_t)
    capped = p > gpu.power_limit_w
    if capped.any():
        lo = np.full(int(capped.sum()), gpu.min_sm_clock_mhz / gpu.max_sm_clock_mhz)
        hi = s[capped].copy()
        sub = StepWork(*(getattr(w, f.name)[capped] for f in fields(StepWork)))
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            gt, st, ct = _times(sub, c, mid)
            over = _power(sub, c, idle, mid, gt, st, ct) > gpu.power_limit_w
            hi = np.where(over, mid, hi)
            lo = np.where(over, lo, mid)
        s[capped] = lo
        gpu_t, step_t, comm_t = _times(w, c, s)
        p = np.minimum(_power(w, c, idle, s, gpu_t, step_t, comm_t), gpu.power_limit_w)
    return StepResult(step_t, p, s, capped)
