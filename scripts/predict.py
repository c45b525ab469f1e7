r"""`llm-cluster predict`: steady-state serving figures of one vLLM instance from a model's shape.

Usage::

    llm-cluster predict --model-config CONFIG.json --gpu h100 --tp 4 --max-num-seqs 64 \
                        --input-tokens 200 --output-tokens 350 [--freq-mhz F]

Reads a Hugging Face style ``config.json`` (or one of the shipped ones in
``envs/data/models``), runs vLLM's default scheduler in a closed loop at ``--max-num-seqs``
concurrent requests of fixed lengths (every finished request replaced at once) through the
shape-based step-time and power model (`llm_cluster_gym.envs.perf`) with the GPU type's calibrated
coefficients, and prints a short report and, as its last line, a JSON object with
``avg_batch_size``, ``energy_per_output_token_j``, ``avg_power_w`` (summed over the instance's
GPUs, as ML.ENERGY reports it), ``median_itl_ms`` and ``output_tokens_per_s``. A bad
configuration or option exits with status 2 and one line naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm_cluster_gym.scripts.usage import UsageError, check_number, check_seed


@dataclass
class PredictArgs:
    """Predict steady-state throughput, latency, power and energy of one vLLM instance."""

    model_config: Path
    """Hugging Face style config.json of the model (shipped ones: envs/data/models/*.json)."""
    gpu: str = "h100"
    """GPU type: h100, h200 or b200."""
    tp: int = 1
    """GPUs of the instance (tensor parallel; MoE experts are spread over them)."""
    max_num_seqs: int = 256
    """Concurrent requests (vLLM --max-num-seqs); the closed loop keeps this many in flight."""
    input_tokens: int = 200
    """Prompt length of every request (tokens)."""
    output_tokens: int = 350
    """Output length of every request (tokens)."""
    freq_mhz: float | None = None
    """Lock the SM clock at this frequency (default: boost clock, pulled down only at the power limit)."""
    max_num_batched_tokens: int = 8192
    """vLLM's per-step token budget for chunked prefill."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may use for weights, activations and KV cache."""
    coefficients: Path | None = None
    """Calibrated coefficients file (default: the shipped envs/data/perf/coefficients.json)."""
    seed: int = 0
    """Seed of the simulation's draws (fixed lengths: no effect on the result)."""

    def __post_init__(self) -> None:
        for option, value in (
            ("--tp", self.tp),
            ("--max-num-seqs", self.max_num_seqs),
            ("--input-tokens", self.input_tokens),
            ("--output-tokens", self.output_tokens),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
        ):
            if value < 1:
                raise UsageError(f"{option} must be >= 1, got {value}")
        if self.tp > 64:
            raise UsageError(f"--tp must be <= 64, got {self.tp}")
        if self.max_num_seqs > 16384:
            raise UsageError(f"--max-num-seqs must be <= 16384, got {self.max_num_seqs}")
        if self.input_tokens + self.output_tokens > 1_048_576:
            raise UsageError("--input-tokens + --output-tokens must be <= 1048576")
        check_number("--freq-mhz", self.freq_mhz, above=0)
        check_number("--gpu-memory-utilization", self.gpu_memory_utilization, above=0, at_most=1)
        check_seed("--seed", self.seed)
        if self.gpu.lower() not in ("h100", "h200", "b200"):
            raise UsageError(f"--gpu must be h100, h200 or b200, got {self.gpu!r}")


def run(args: PredictArgs, command: str = "llm-cluster predict") -> int:
    """Run the steady-state model and print the figures (last line: JSON); returns the exit status.

    Raises:
        UsageError: The configuration is malformed, the model does not fit, or an option does not
            suit the model or GPU (the message names the field or option).
        FileNotFoundError: The configuration file does not exist.
    """
    from llm_cluster_gym.envs.perf.calibration import COEFFICIENTS_FILE, load_coefficients
    from llm_cluster_gym.envs.perf.hardware import gpu as gpu_spec
    from llm_cluster_gym.envs.perf.scheduler import CapacityError, Workload
    from llm_cluster_gym.envs.perf.serving import steady_state
    from llm_cluster_gym.envs.perf.shapes import ShapeError, load_config_file

    try:
        shape = load_config_file(args.model_config)
    except ShapeError as exc:
        raise UsageError(f"--model-config {exc}") from exc
    spec = gpu_spec(args.gpu)
    if shape.n_heads % args.tp and args.tp % shape.n_heads:
        raise UsageError(
            f"--tp {args.tp} does not divide the model's {shape.n_heads} attention heads "
            f"(num_attention_heads)"
        )
    if args.freq_mhz is not None and not spec.min_sm_clock_mhz <= args.freq_mhz <= spec.max_sm_clock_mhz:
        raise UsageError(
            f"--freq-mhz must be within {spec.min_sm_clock_mhz:g}-{spec.max_sm_clock_mhz:g} MHz "
            f"on {args.gpu}, got {args.freq_mhz:g}"
        )
    coeff_file = args.coefficients or COEFFICIENTS_FILE
    if not Path(coeff_file).is_file():
        raise FileNotFoundError(f"{coeff_file}: no such coefficients file")
    try:
        coeffs = load_coefficients(coeff_file)[spec.key]
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"--coefficients {coeff_file}: no usable coefficients for {spec.key} ({exc})"
        ) from exc
    workload = Workload.fixed(args.input_tokens, args.output_tokens)
    try:
        res = steady_state(
            shape,
            spec,
            args.tp,
            args.max_num_seqs,
            workload,
            coeffs,
            clock_mhz=args.freq_mhz,
            token_budget=args.max_num_batched_tokens,
            memory_utilization=args.gpu_memory_utilization,
            seed=args.seed,
        )
    except CapacityError as exc:
        raise UsageError(f"--tp {args.tp}: {exc}") from exc
    clock = (
        f"locked at {args.freq_mhz:g} MHz"
        if args.freq_mhz is not None
        else f"boost ({spec.max_sm_clock_mhz:g} MHz max)"
    )
    print(
        f"{shape.name} on {args.tp}x {spec.name}, max_num_seqs {args.max_num_seqs}, "
        f"{args.input_tokens} in / {args.output_tokens} out tokens, clock {clock}"
    )
    print(
        f"  weights {shape.total_weight_bytes / 1e9:.1f} GB ({shape.total_params / 1e9:.1f}B params, "
        f"{shape.active_params / 1e9:.1f}B active), KV capacity {res.kv_capacity_tokens:,.0f} tokens, "
        f"preemptions per request {res.preemptions_per_request:.2f}"
    )
    print(
        f"  mean clock {res.mean_clock_ratio * spec.max_sm_clock_mhz:.0f} MHz, "
        f"at the power limit {res.capped_time_fraction:.0%} of the time"
    )
    print(json.dumps({k: round(v, 6) for k, v in res.headline().items()}))
    return 0
