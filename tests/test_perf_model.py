"""The shape-based performance model (llm_cluster_gym.envs.perf) and `llm-cluster predict`."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.envs.perf.calibration import COEFFICIENTS_FILE, load_coefficients
from llm_cluster_gym.envs.perf.collectives import TABLE_FILE, all_reduce_s, latency_floor_s
from llm_cluster_gym.envs.perf.hardware import gpu
from llm_cluster_gym.envs.perf.scheduler import TRACE_FIELDS, Workload, simulate
from llm_cluster_gym.envs.perf.serving import steady_state
from llm_cluster_gym.envs.perf.shapes import ShapeError, load_shipped, parse_config, shipped_models
from llm_cluster_gym.envs.perf.step import Coefficients, step_time_power, step_work

H100 = gpu("h100")
COEFFS = load_coefficients()


def _records(**cols: float) -> np.ndarray:
    row = {name: 0.0 for name in TRACE_FIELDS}
    row.update(count=1.0, in_window=1.0, **cols)
    return np.array([[row[n] for n in TRACE_FIELDS]])


def _decode(n: int, ctx: int = 1000) -> np.ndarray:
    return _records(n_dec=n, ctx_full=n * ctx, n_sched=n, n_running=n, n_out=n)


def test_shipped_shapes_match_the_published_parameter_counts():
    checked = 0
    for name, path in shipped_models().items():
        data = json.loads(path.read_text())
        shape = load_shipped(name)
        assert data["source"]["config_url"].startswith("https://huggingface.co/")
        if data.get("ml_energy_params_b"):
            assert shape.total_params / 1e9 == pytest.approx(data["ml_energy_params_b"], rel=0.06), name
            checked += 1
    assert checked >= 15


def test_config_errors_name_the_field():
    with pytest.raises(ShapeError, match="hidden_size"):
        parse_config({"num_hidden_layers": 2})
    good = json.loads(shipped_models()["qwen3-8b"].read_text())["config"]
    with pytest.raises(ShapeError, match="num_attention_heads"):
        parse_config({**good, "num_attention_heads": -4})
    with pytest.raises(ShapeError, match="quant_method"):
        parse_config({**good, "quantization_config": {"quant_method": "gptq"}})


def test_step_time_and_power_increase_with_batch():
    shape = load_shipped("qwen3-8b")
    c = COEFFS["h100"]
    prev_t, prev_p = 0.0, 0.0
    for b in (1, 8, 32, 128, 512):
        res = step_time_power(step_work(shape, 1, H100, _decode(b)), H100, c)
        assert res.step_s[0] > prev_t and res.power_w[0] > prev_p
        prev_t, prev_p = res.step_s[0], res.power_w[0]


def test_serving_itl_power_and_throughput_increase_with_concurrency():
    shape = load_shipped("qwen3-8b")
    wl = Workload.fixed(200, 300)
    results = [steady_state(shape, H100, 1, b, wl, COEFFS["h100"]) for b in (8, 64, 256)]
    for lo, hi in zip(results, results[1:], strict=False):
        assert hi.median_itl_ms > lo.median_itl_ms
        assert hi.avg_power_w > lo.avg_power_w
        assert hi.output_tokens_per_s > lo.output_tokens_per_s
        assert hi.energy_per_output_token_j < lo.energy_per_output_token_j
    assert results[0].avg_batch_size == pytest.approx(8, rel=0.02)


def test_power_never_exceeds_the_limit_and_the_clock_drops_at_the_cap():
    shape = load_shipped("llama-3.1-70b-instruct")
    heavy = _records(n_pre=8192, pairs_full=8192 * 4096, kvpre_full=8192, n_sched=4, n_prefill_seqs=4)
    hot = Coefficients(p_compute_w=3000.0, p_busy_w=400.0)
    res = step_time_power(step_work(shape, 4, H100, heavy), H100, hot)
    assert res.capped[0] and res.power_w[0] <= H100.power_limit_w + 1e-6
    assert res.clock_ratio[0] < 1.0
    uncapped = step_time_power(step_work(shape, 4, H100, heavy), H100, replace(hot, p_compute_w=0.0))
    assert res.step_s[0] > uncapped.step_s[0]  # the pulled-down clock stretches the compute-bound step
    out = steady_state(shape, H100, 4, 256, Workload.fixed(2000, 100), hot)
    assert out.avg_power_w <= 4 * H100.power_limit_w + 1e-6


def test_a_lower_locked_clock_is_slower_and_draws_less_power():
    shape = load_shipped("qwen3-8b")
    w = step_work(shape, 1, H100, _decode(256))
    fast = step_time_power(w, H100, COEFFS["h100"])
    slow = step_time_power(w, H100, COEFFS["h100"], clock_ratio=1000 / 1980)
    assert slow.step_s[0] > fast.step_s[0] and slow.power_w[0] < fast.power_w[0]


def test_tensor_parallel_all_reduce_comes_from_the_measured_table():
    rows = [r for r in csv.DictReader(TABLE_FILE.open()) if r["num_workers"] == "4"]
    size = np.array([float(r["size_bytes"]) for r in rows])
    ms = np.array([float(r["median_ms"]) for r in rows])
    big = size >= 16 << 20  # bandwidth-bound sizes: smoothing barely moves them
    pred = all_reduce_s(size[big], 4) * 1e3
    assert np.median(np.abs(pred / ms[big] - 1)) < 0.05
    assert all_reduce_s(1 << 20, 1) == 0.0
    assert all_reduce_s(64 << 20, 8) > all_reduce_s(1 << 20, 8) > 0
    shape = load_shipped("llama-3.1-70b-instruct")
    w = step_work(shape, 4, H100, _decode(64))
    per_ar = all_reduce_s(64 * shape.hidden * 2.0, 4)
    # the table's time, split into its latency floor and the size-dependent rest (scaled apart)
    assert w.allreduce_s[0] + w.allreduce_floor_s[0] == pytest.approx(2 * shape.n_layers * per_ar)
    assert w.allreduce_floor_s[0] == pytest.approx(2 * shape.n_layers * latency_floor_s(4))
    one = step_work(shape, 1, H100, _decode(64))
    assert one.allreduce_s[0] == 0.0 and one.allreduce_floor_s[0] == 0.0


def test_moe_is_cheaper_than_a_dense_model_of_equal_total_parameters():
    moe = load_shipped("qwen3-30b-a3b")
    dense_cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 60,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "torch_dtype": "bfloat16",
    }
    dense = parse_config(dense_cfg)
    assert dense.total_params == pytest.approx(moe.total_params, rel=0.05)
    c = COEFFS["h100"]
    for b in (8, 64):
        t_moe = step_time_power(step_work(moe, 1, H100, _decode(b, 500)), H100, c).step_s[0]
        t_dense = step_time_power(step_work(dense, 1, H100, _decode(b, 500)), H100, c).step_s[0]
        assert t_moe < t_dense
    # expert loading: a small batch touches few experts, a prefill chunk all of them
    small = step_work(moe, 1, H100, _decode(1)).expert_m[0]
    full = step_work(moe, 1, H100, _records(n_pre=4096, n_sched=1, n_prefill_seqs=1)).expert_m[0]
    assert small < 0.1 * full


def test_chunked_prefill_respects_the_token_budget_and_kv_grows_as_tokens_are_generated():
    shape = load_shipped("qwen3-8b")
    wl = Workload.fixed(3000, 400)
    tr = simulate(shape, 1, H100.memory_bytes, 64, wl, token_budget=2048, measure_completions=200)
    tokens = tr.column("n_dec") + tr.column("n_pre")
    assert tokens.max() <= 2048
    assert (tr.column("n_pre") > 0).any() and (tr.column("n_dec") > 0).any()
    # little memory: paged allocation admits more requests than full reservation would, and preempts
    small = 0.9 * H100.memory_bytes - shape.total_weight_bytes
    mem = (shape.total_weight_bytes + 1.5e9 + 0.4 * small) / 0.9
    tight = simulate(shape, 1, mem, 256, Workload.fixed(200, 2000), measure_completions=300)
    per_token = shape.kv_bytes_per_token()
    reserved_fit = tight.kv.capacity_bytes / ((200 + 2000) * per_token)
    batch = tight.column("n_running")
    assert batch.max() > reserved_fit
    assert tight.preemptions > 0 and batch.mean() < 256


def test_predict_console_script_prints_the_figures_as_its_last_line():
    exe = shutil.which("llm-cluster") or str(Path(sys.executable).parent / "llm-cluster")
    config = shipped_models()["llama-3.1-70b-instruct"]
    out = subprocess.run(
        [
            exe,
            "predict",
            "--model-config",
            str(config),
            "--gpu",
            "h100",
            "--tp",
            "4",
            "--max-num-seqs",
            "64",
            "--input-tokens",
            "200",
            "--output-tokens",
            "350",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(last) == {
        "avg_batch_size",
        "energy_per_output_token_j",
        "avg_power_w",
        "median_itl_ms",
        "output_tokens_per_s",
    }
    assert 60 <= last["avg_batch_size"] <= 64
    assert 0 < last["avg_power_w"] <= 4 * 700
    assert last["energy_per_output_token_j"] == pytest.approx(
        last["avg_power_w"] / last["output_tokens_per_s"], rel=1e-3
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tp", "3"], "--tp"),
        (["--gpu", "a100"], "--gpu"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--freq-mhz", "5000"], "--freq-mhz"),
    ],
)
def test_predict_bad_options_exit_2_with_one_line(extra, needle, capsys):
    from llm_cluster_gym.scripts.cli import main

    config = str(shipped_models()["llama-3.1-70b-instruct"])
    assert main(["predict", "--model-config", config, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_predict_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    from llm_cluster_gym.scripts.cli import main

    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"num_hidden_layers": 4, "hidden_size": 512}))
    assert main(["predict", "--model-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0]
    assert main(["predict", "--model-config", str(tmp_path / "missing.json")]) == 2
    assert (
        main(["predict", "--model-config", str(shipped_models()["llama-3.1-405b-instruct"]), "--tp", "1"])
        == 2
    )


def test_shipped_coefficients_cover_every_gpu():
    data = json.loads(COEFFICIENTS_FILE.read_text())
    assert set(load_coefficients()) == {"h100", "h200", "b200"}
    assert "built_by" in data


@pytest.mark.slow
def test_shipped_coefficients_reproduce_a_sample_of_the_calibration_runs():
    """Every 4th ML.ENERGY v3 run (122, both GPUs) predicted with the shipped coefficients:
    each metric's median |error| within the 15% bar. The full in-sample and leave-one-model-out
    figures (all 488 runs, a refit per model family: about 15 minutes) are the job of
    ``bench/fidelity_public.py``, whose last line reports them."""
    from llm_cluster_gym.envs.perf import calibration as cal

    sample = cal.load_setups("v3")[::4]
    ev = cal.predict_with(sample, cal.load_coefficients())
    assert len(ev.runs) >= 115
    assert {r.gpu_key for r in ev.runs} == {"h100", "b200"}
    med = ev.median_abs("in_sample")
    for metric in cal.METRICS:
        assert med[metric] <= 0.15, (metric, med[metric])
