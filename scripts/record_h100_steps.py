"""`llm-cluster record-h100-steps`: a real GPU's power and temperature under a scripted LLM load.

The recording calibrates the simulator's two-node GPU thermal model and its phase power
levels (see ``envs/sim/thermal.py`` and ``llm-cluster fit-thermal``). NVML is only read. A Llama-3-8B-shaped
model with random bf16 weights (HF ``transformers``) runs through a fixed step pattern of
idle, sustained prefill, decode, duty-cycled prefill and a mid-power prefill, while a
background thread samples NVML at ``--sample-hz``.

Safety: this script only *reads* NVML. It never changes clocks, power limits, persistence
mode, and never resets the GPU; the shared accelerator machines forbid it (DESIGN.md).

Usage (on a GPU machine; ``$OUT`` is where the file goes)::

    PYTHONUNBUFFERED=1 llm-cluster record-h100-steps --out $OUT/h100_steps.json.gz

Output: JSON (gzipped if the name ends in ``.gz``) with ``static`` (GPU name, driver, power
limits, thermal thresholds, date, the exact command), ``columns``, ``samples`` (one row per
NVML sample) and ``marks`` (each phase's start, end, iteration count and tokens per
iteration, i.e. throughput).
"""

from __future__ import annotations

import gzip
import json
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llm_cluster_gym.scripts.usage import UsageError

COLUMNS = [
    "t",
    "phase",
    "power_w",
    "gpu_temp_c",
    "mem_temp_c",
    "sm_clock_mhz",
    "throttle_reasons",
    "energy_mj",
    "util_pct",
]


class RecordingError(RuntimeError):
    """Raised when the recording cannot run here (no NVML, no CUDA GPU, missing packages)."""


@dataclass
class RecordStepsArgs:
    """Record a GPU's power and temperature under a scripted LLM load (read-only NVML; needs a GPU)."""

    out: Path = Path("h100_steps.json.gz")
    """Output file; ``.gz`` suffix means gzip-compressed JSON."""
    gpu_index: int = 0
    """NVML/CUDA index of the GPU to load and read."""
    sample_hz: float = 25.0
    """NVML sampling rate of the background thread (>= 20 Hz wanted)."""
    time_scale: float = 1.0
    """Multiplies every phase duration (1.0 = the full ~6 minute pattern)."""

    def __post_init__(self) -> None:
        if not (self.sample_hz > 0 and self.time_scale > 0):
            raise UsageError(f"--sample-hz and --time-scale must be > 0, got {self.sample_hz} and "
                             f"{self.time_scale}")


def _import_nvml() -> Any:
    """Import and initialise NVML, or raise :class:`RecordingError` saying why not."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RecordingError("pynvml (package nvidia-ml-py) is not installed") from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        msg = f"NVML could not be initialised (no NVIDIA driver/GPU?): {exc}"
        raise RecordingError(msg) from exc
    return pynvml


def _safe(fn: Callable[[], Any]) -> Any:
    """Call one NVML reader; ``None`` when this GPU/driver does not support it."""
    try:
        return fn()
    except Exception:
        return None


class NvmlSampler:
    """Background thread that reads one GPU's NVML telemetry at a fixed rate (read-only)."""

    def __init__(self, nvml: Any, handle: Any, sample_hz: float) -> None:
        self._n = nvml
        self._h = handle
        self._period_s = 1.0 / sample_hz
        self.phase = "init"
        self.samples: list[list[Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # Newer NVML names throttle reasons "clock event reasons"; use whichever exists.
        self._reasons = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )

    def _mem_temp_c(self) -> int | None:
        fv = self._n.nvmlDeviceGetFieldValues(self._h, [self._n.NVML_FI_DEV_MEMORY_TEMP])[0]
        return int(fv.value.uiVal) if fv.nvmlReturn == 0 else None

    def read(self) -> list[Any]:
        """Read one sample row in :data:`COLUMNS` order."""
        n, h = self._n, self._h
        t = time.time()
        pw = _safe(lambda: n.nvmlDeviceGetPowerUsage(h))
        return [
            round(t, 4),
            self.phase,
            None if pw is None else pw / 1000.0,
            _safe(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            _safe(self._mem_temp_c),
            _safe(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            _safe(lambda: self._reasons(h)),
            _safe(lambda: n.nvmlDeviceGetTotalEnergyConsumption(h)),
            _safe(lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
        ]

    def _run(self) -> None:
        next_t = time.time()
        while not self._stop.is_set():
            self.samples.append(self.read())
            next_t += self._period_s
            delay = next_t - time.time()
            if delay > 0:
                time.sleep(delay)
            else:  # fell behind (slow NVML call): resynchronise instead of bursting
                next_t = time.time()

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()


def static_info(nvml: Any, handle: Any) -> dict[str, Any]:
    """Read the GPU's static facts (name, driver, limits, thresholds); read-only."""
    n, h = nvml, handle

    def thr(name: str) -> int | None:
        c = getattr(n, f"NVML_TEMPERATURE_THRESHOLD_{name}", None)
        return None if c is None else _safe(lambda: n.nvmlDeviceGetTemperatureThreshold(h, c))

    name = _safe(lambda: n.nvmlDeviceGetName(h))
    driver = _safe(lambda: n.nvmlSystemGetDriverVersion())
    constraints = _safe(lambda: list(n.nvmlDeviceGetPowerManagementLimitConstraints(h)))
    return {
        "name": name.decode() if isinstance(name, bytes) else name,
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "power_limit_mw": _safe(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h)),
        "power_default_limit_mw": _safe(lambda: n.nvmlDeviceGetPowerManagementDefaultLimit(h)),
        "power_limit_constraints_mw": constraints,
        "slowdown_c": thr("SLOWDOWN"),
        "shutdown_c": thr("SHUTDOWN"),
        "gpu_max_c": thr("GPU_MAX"),
        "mem_max_c": thr("MEM_MAX"),
        "max_sm_clock_mhz": _safe(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM)),
        "persistence_mode": _safe(lambda: n.nvmlDeviceGetPersistenceMode(h)),
    }


def build_plan(torch: Any, model: Any, vocab: int, dev: str) -> list[tuple[str, float, Callable]]:
    """Return the step pattern as (phase name, seconds, one-iteration callable).

    The pattern differs from the shared recording (calibration_steps.py) on purpose so that
    fitting on one and testing on the other is a real cross-check.
    """
    from transformers import DynamicCache

    def prefill_fn(bs: int, seq: int) -> Callable[[], None]:
        ids = torch.randint(0, vocab, (bs, seq), device=dev)

        @torch.inference_mode()
        def f() -> None:
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()

        return f

    def decode_fn(bs: int, ctx: int, steps_per_ctx: int = 256) -> Callable[[], None]:
        ctx_ids = torch.randint(0, vocab, (bs, ctx), device=dev)
        state: dict[str, Any] = {}

        @torch.inference_mode()
        def f() -> None:
            if "cache" not in state or state["steps"] >= steps_per_ctx:
                state["cache"] = DynamicCache()
                model(ctx_ids, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
                state["steps"] = 0
            nxt = torch.randint(0, vocab, (bs, 1), device=dev)
            model(nxt, past_key_values=state["cache"], use_cache=True)
            torch.cuda.synchronize()
            state["steps"] += 1

        return f

    def idle() -> None:
        time.sleep(0.2)

    pf4 = prefill_fn(4, 2048)

    def duty() -> None:
        # 2 s of back-to-back bs4 x 2048 prefill, then 2 s idle: one iteration = one period.
        t0 = time.time()
        while time.time() - t0 < 2.0:
            pf4()
        time.sleep(2.0)

    return [
        ("idle", 20, idle),
        ("prefill_bs4_L2048", 60, pf4),
        ("idle", 60, idle),
        ("decode_bs64_ctx1024", 60, decode_fn(64, 1024)),
        ("prefill_duty_2on_2off_bs4_L2048", 60, duty),
        ("prefill_bs1_L512", 40, prefill_fn(1, 512)),
        ("idle", 50, idle),
    ]


TOKENS_PER_ITER = {
    "prefill_bs4_L2048": 4 * 2048,
    "decode_bs64_ctx1024": 64,
    "prefill_bs1_L512": 512,
}


def run(args: RecordStepsArgs, command: str = "llm-cluster record-h100-steps") -> int:
    """Run the step pattern, sample NVML, write the recording.

    Args:
        args: The options.
        command: The command line (the recording keeps ``sys.argv`` as run).

    Returns:
        Process exit code (0 on success).

    Raises:
        RecordingError: No NVML, no CUDA device or a missing package.
    """
    nvml = _import_nvml()
    handle = nvml.nvmlDeviceGetHandleByIndex(args.gpu_index)
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise RecordingError(f"torch and transformers are needed: {exc}") from exc
    if not torch.cuda.is_available():
        raise RecordingError("torch sees no CUDA device")

    static = static_info(nvml, handle)
    static.update(
        date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([sys.executable, *sys.argv]),
        torch=torch.__version__,
        model="Llama-3-8B-shaped LlamaForCausalLM, random bf16 weights, eager transformers",
        sample_hz=args.sample_hz,
    )
    print(json.dumps(static), flush=True)

    sampler = NvmlSampler(nvml, handle, args.sample_hz)
    sampler.start()
    marks: list[dict[str, Any]] = []
    try:
        dev = f"cuda:{args.gpu_index}"
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
        )
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).eval()
        torch.cuda.synchronize()
        plan = build_plan(torch, model, cfg.vocab_size, dev)
        # Warm-up (kernels, allocator) while still in "init" so phases start clean.
        for name, _, fn in plan:
            if name != "idle" and not name.startswith("prefill_duty"):
                fn()
        torch.cuda.synchronize()
        time.sleep(5.0)
        for name, seconds, fn in plan:
            sampler.phase = name
            t0 = time.time()
            iters = 0
            while time.time() - t0 < seconds * args.time_scale:
                fn()
                iters += 1
            torch.cuda.synchronize()
            mark = {
                "phase": name,
                "t0": t0,
                "t1": time.time(),
                "iters": iters,
                "tokens_per_iter": TOKENS_PER_ITER.get(name),
            }
            marks.append(mark)
            print(mark, flush=True)
    finally:
        sampler.stop()
        payload = {"static": static, "columns": COLUMNS, "marks": marks, "samples": sampler.samples}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if args.out.suffix == ".gz" else open
        with opener(args.out, "wt") as fh:
            json.dump(payload, fh)
        span = sampler.samples[-1][0] - sampler.samples[0][0] if sampler.samples else 0.0
        rate = len(sampler.samples) / span if span > 0 else 0.0
        print(f"wrote {args.out}: {len(sampler.samples)} samples, {rate:.1f} Hz", flush=True)
    return 0
