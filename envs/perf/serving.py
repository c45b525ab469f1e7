"""Steady-state serving metrics of one instance: the scheduler trace timed by the step model.

`steady_state` answers what ML.ENERGY's benchmark measures for one configuration (model, GPU,
GPUs per instance, ``max_num_seqs``, request lengths): the average batch, energy per output token,
average power summed over the instance's GPUs, median inter-token latency and output throughput.
The trace (`scheduler.simulate`) depends only on the configuration, so calibration reuses it for
any coefficients (`evaluate_trace`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from llm_cluster_gym.envs.perf.hardware import GpuSpec
from llm_cluster_gym.envs.perf.scheduler import (
    DEFAULT_TOKEN_BUDGET,
    GPU_MEMORY_UTILIZATION,
    Benchmark,
    Trace,
    Workload,
    simulate,
)
from llm_cluster_gym.envs.perf.shapes import ModelShape
from llm_cluster_gym.envs.perf.step import Coefficients, StepWork, step_time_power, step_work


@dataclass(frozen=True)
class ServingResult:
    """Steady-state metrics of one instance (power and energy summed over its GPUs)."""

    avg_batch_size: float
    energy_per_output_token_j: float
    avg_power_w: float
    median_itl_ms: float
    output_tokens_per_s: float
    mean_clock_ratio: float
    capped_time_fraction: float
    kv_capacity_tokens: float
    preemptions_per_request: float

    def headline(self) -> dict[str, float]:
        """The five figures ``llm-cluster predict`` prints."""
        d = asdict(self)
        return {
            k: d[k]
            for k in (
                "avg_batch_size",
                "energy_per_output_token_j",
                "avg_power_w",
                "median_itl_ms",
                "output_tokens_per_s",
            )
        }


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of ``values`` where each counts ``weights`` times."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    if cum[-1] <= 0:
        return float("nan")
    return float(v[np.searchsorted(cum, 0.5 * cum[-1])])


@dataclass(frozen=True)
class TimedTrace:
    """A trace with its per-GPU work precomputed (what calibration evaluates many times)."""

    trace: Trace
    work: StepWork
    n_gpus: int


def prepare(
    shape: ModelShape,
    gpu: GpuSpec,
    n_gpus: int,
    max_num_seqs: int,
    workload: Workload,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    memory_utilization: float = GPU_MEMORY_UTILIZATION,
    benchmark: Benchmark | None = None,
    seed: int = 0,
) -> TimedTrace:
    """Simulate the scheduler and count each step's work (independent of the coefficients)."""
    trace = simulate(
        shape,
        n_gpus,
        gpu.memory_bytes,
        max_num_seqs,
        workload,
        token_budget=token_budget,
        memory_utilization=memory_utilization,
        benchmark=benchmark,
        seed=seed,
    ).compressed()
    return TimedTrace(trace, step_work(shape, n_gpus, gpu, trace.records), n_gpus)


def evaluate_trace(
    tt: TimedTrace, gpu: GpuSpec, coeffs: Coefficients, clock_ratio: float = 1.0
) -> ServingResult:
    """The steady-state metrics of a prepared trace under ``coeffs``."""
    tr = tt.trace
    count = tr.column("count")
    res = step_time_power(tt.work, gpu, coeffs, clock_ratio)
    itl = weighted_median(res.step_s, tr.column("n_dec") * count) * 1e3  # every step, as clients see it
    count = count * tr.column("in_window")  # energy, power, throughput, batch: the measurement window
    t = res.step_s * count
    total_t = float(t.sum())
    out = float((tr.column("n_out") * count).sum())
    energy = float((res.power_w * t).sum()) * tt.n_gpus
    avg_batch = float((tr.column("n_running") * t).sum() / total_t)
    kv_tokens = tr.kv.capacity_bytes / max(tr.kv.full_bytes_per_token + tr.kv.window_bytes_per_token, 1e-9)
    return ServingResult(
        avg_batch_size=avg_batch,
        energy_per_output_token_j=energy / out,
        avg_power_w=energy / total_t,
        median_itl_ms=itl,
        output_tokens_per_s=out / total_t,
        mean_clock_ratio=float((res.clock_ratio * t).sum() / total_t),
        capped_time_fraction=float((res.capped * t).sum() / total_t),
        kv_capacity_tokens=kv_tokens,
        preemptions_per_request=tr.preemptions / max(tr.completions, 1),
    )


def steady_state(
    shape: ModelShape,
    gpu: GpuSpec,
    n_gpus: int,
    max_num_seqs: int,
    workload: Workload,
    coeffs: Coefficients,
    *,
    clock_mhz: float | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    memory_utilization: float = GPU_MEMORY_UTILIZATION,
    seed: int = 0,
) -> ServingResult:
    """Steady-state metrics of one instance at a fixed concurrency.

    Args:
        shape: The model.
        gpu: The GPU type.
        n_gpus: GPUs of the instance (tensor parallel degree; experts spread over them).
        max_num_seqs: Concurrency (vLLM ``max_num_seqs``; the closed loop keeps it full).
        workload: Prompt length and output-length law.
        coeffs: The GPU type's fitted coefficients.
        clock_mhz: A locked SM clock (default: boost, pulled down only by the power limit).
        token_budget: vLLM ``max_num_batched_tokens``.
        memory_utilization: vLLM ``gpu_memory_utilization``.
        seed: Seed of the output-length draws.
    """
    ratio = 1.0 if clock_mhz is None else float(clock_mhz) / gpu.max_sm_clock_mhz
    tt = prepare(
        shape,
        gpu,
        n_gpus,
        max_num_seqs,
        workload,
        token_budget=token_budget,
        memory_utilization=memory_utilization,
        seed=seed,
    )
    return evaluate_trace(tt, gpu, coeffs, ratio)
