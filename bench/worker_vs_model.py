"""Our TP worker on two H200s against the shape-based model's prediction for the same shapes.

The worker (`envs/real`, HF-style PyTorch with CUDA graphs, random weights) is not vLLM, and the
shape-based model (`envs/perf`) is calibrated on vLLM: the comparison reports their ratio per
measured point (measured / predicted), not an error to minimize. Shapes: Llama-3-8B and
Llama-2-70B as the worker ran them (their published dimensions, below); GPU: the H200 entry of
``envs/data/gpus.json`` with the H100 calibration (no public H200 vLLM runs). Measured tables:
``envs/data/real/h200/{prefill,decode,power}.csv`` (command, date, GPUs and driver in that
folder's README). Prefill is predicted at the measured median SM clock (the power limit pulls
it down), decode at the maximum clock, as measured.

Usage::

    python bench/worker_vs_model.py

Last line: one JSON object with the median ratio per quantity and its range.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from llm_cluster_gym.envs.perf.calibration import load_coefficients
from llm_cluster_gym.envs.perf.hardware import gpu as gpu_spec
from llm_cluster_gym.envs.perf.shapes import parse_config
from llm_cluster_gym.envs.perf.step import step_time_power, step_work
from llm_cluster_gym.envs.sim.shape_profiles import decode_records, prefill_records

TABLES = Path(__file__).resolve().parent.parent / "envs" / "data" / "real" / "h200"

# The worker's model shapes (envs/real/worker_config.py), in Hugging Face config terms. Published
# dimensions: meta-llama/Meta-Llama-3-8B and meta-llama/Llama-2-70b-hf config.json.
WORKER_SHAPES = {
    "llama3-8b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "vocab_size": 128256, "torch_dtype": "bfloat16"},
    "llama2-70b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                   "vocab_size": 32000, "torch_dtype": "bfloat16"},
}


def _rows(name: str) -> list[dict[str, str]]:
    with (TABLES / name).open() as f:
        return list(csv.DictReader(f))


def compare() -> dict[str, list[dict[str, float]]]:
    """Measured and predicted prefill time, decode time and busy power, point by point."""
    spec = gpu_spec("h200")
    coeffs = load_coefficients()["h200"]
    out: dict[str, list[dict[str, float]]] = {"prefill_time": [], "decode_time": [], "power": []}

    def predict(model: str, tp: int, records: np.ndarray, clock_ratio: float):
        shape = parse_config(WORKER_SHAPES[model], name=model)
        return step_time_power(step_work(shape, tp, spec, records), spec, coeffs, clock_ratio)

    for r in _rows("prefill.csv"):
        shape = parse_config(WORKER_SHAPES[r["model"]], name=r["model"])
        ratio = float(r["sm_clock_mhz_median"]) / spec.max_sm_clock_mhz
        tokens = float(r["prompt_tokens"])
        res = predict(r["model"], int(r["tp"]), prefill_records(shape, np.array([tokens])), ratio)
        out["prefill_time"].append({"model": r["model"], "tp": int(r["tp"]), "load": tokens,
                                    "measured": float(r["time_ms"]) / 1e3, "predicted": float(res.step_s[0])})
    for r in _rows("decode.csv"):
        shape = parse_config(WORKER_SHAPES[r["model"]], name=r["model"])
        res = predict(r["model"], int(r["tp"]), decode_records(
            shape, np.array([float(r["batch"])]), np.array([float(r["ctx_tokens"])])), 1.0)
        out["decode_time"].append({"model": r["model"], "tp": int(r["tp"]), "load": float(r["batch"]),
                                   "measured": float(r["time_ms"]) / 1e3, "predicted": float(res.step_s[0])})
    for r in _rows("power.csv"):
        if r["kind"] not in ("prefill", "decode"):
            continue
        shape = parse_config(WORKER_SHAPES[r["model"]], name=r["model"])
        load = float(r["load"])
        if r["kind"] == "prefill":
            rec = prefill_records(shape, np.array([load]))
        else:
            rec = decode_records(shape, np.array([load]), np.array([float(r["ctx_tokens"])]))
        res = predict(r["model"], int(r["tp"]), rec, 1.0)  # the limit pulls the clock as measured
        out["power"].append({"model": r["model"], "tp": int(r["tp"]), "load": load,
                             "measured": float(r["power_w_mean"]), "predicted": float(res.power_w[0])})
    return out


def main() -> None:
    """Print each point and, last, the median ratio (measured / predicted) per quantity."""
    points = compare()
    summary = {}
    for q, rows in points.items():
        ratios = np.array([r["measured"] / r["predicted"] for r in rows])
        for r, x in zip(rows, ratios, strict=True):
            print(f"{q:13s} {r['model']:10s} TP{r['tp']} load {r['load']:7.0f}: measured "
                  f"{r['measured']:.4g}, model {r['predicted']:.4g}, ratio {x:.2f}")
        summary[f"{q}_ratio_median"] = round(float(np.median(ratios)), 3)
        summary[f"{q}_ratio_min"] = round(float(ratios.min()), 3)
        summary[f"{q}_ratio_max"] = round(float(ratios.max()), 3)
        summary[f"{q}_n"] = int(ratios.size)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
