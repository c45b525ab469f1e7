"""Simulator profiles derived from the shape-based performance model (envs/sim/shape_profiles.py)."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from llm_cluster_gym.envs.perf.scheduler import kv_layout
from llm_cluster_gym.envs.perf.shapes import load_shipped
from llm_cluster_gym.envs.sim import shape_profiles as sp
from llm_cluster_gym.envs.sim.profiles import ProfileArrays, ProfileError, ProfileLibrary
from llm_cluster_gym.scripts import cli

MODELS = ("llama-3.1-8b-instruct", "llama-3.1-70b-instruct", "qwen3-30b-a3b")
GPUS = ("h100", "h200", "b200")
CONFIGS = [(m, g, tp) for m in MODELS for g in GPUS for tp in sp.fitting_tps(m, g)]

# Bounds on the surrogate's |relative error| against envs/perf on its grids, percent (median, max).
# What the fits reach (all CONFIGS): prefill time 7.0 / 14.6, dense decode time 2.2 / 12.9, MoE
# decode time 2.7 / 8.5 since 2026-12-01 with the experts-touched term (18.6 / 42.5 without it:
# d0 + d1 B + d2 B C alone cannot follow expert loading), prefill power
# 11.9 / 31.5 (B200's fitted attention efficiency), decode power 2.2 / 12.1 (over the batch and
# the context since 2026-12-01; by the batch alone 4.2 / 21.2), prefill time with the power limit
# applied on both sides 8.3 / 15.2.
BOUNDS = {
    "prefill_time": (8.0, 16.0),
    "decode_time": (3.0, 15.0),
    "prefill_power": (13.0, 33.0),
    "decode_power": (3.0, 13.0),
    "prefill_time_capped": (9.0, 16.0),
}
MOE_DECODE_TIME = (3.0, 10.0)


def _rel_pct(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(pred) / np.asarray(ref) - 1.0) * 100.0


@pytest.mark.parametrize(("model", "gpu", "tp"), CONFIGS, ids=[f"{m}-{g}-tp{t}" for m, g, t in CONFIGS])
def test_fit_error_within_bounds(model: str, gpu: str, tp: int) -> None:
    p = sp.derive_profile(model, gpu, tp)
    assert set(sp.FIT_QUANTITIES) <= set(p.fit_error)
    for q, (med, mx) in BOUNDS.items():
        if q == "decode_time" and load_shipped(model).is_moe:
            med, mx = MOE_DECODE_TIME
        e = p.fit_error[q]
        assert e["n"] >= 10, (q, e)
        assert e["median_abs_pct"] <= med and e["max_abs_pct"] <= mx, (q, e)
    assert 0.0 <= p.prefill_phi <= 1.0 and 0.0 <= p.decode_phi <= 1.0
    if not load_shipped(model).is_moe:  # prefill compute-bound, decode memory- and host-bound
        assert p.prefill_phi > p.decode_phi  # (MoE on one B200: 0.40 against 0.41, perf's B200 fit)


@pytest.mark.parametrize(("model", "gpu", "tp"), [
    ("llama-3.1-8b-instruct", "h100", 1), ("llama-3.1-70b-instruct", "h200", 4),
    ("qwen3-30b-a3b", "b200", 2), ("llama-3.1-70b-instruct", "h100", 2),
])
def test_surrogate_follows_perf_off_the_grid(model: str, gpu: str, tp: int) -> None:
    p = sp.derive_profile(model, gpu, tp)
    f = p.max_freq_mhz
    tok = np.array([100.0, 777.0, 3000.0, 6000.0])  # between the grid's points
    ref = sp.prefill_step(model, gpu, tp, tok)
    e = p.fit_error
    assert _rel_pct(p.prefill_time_s(tok, f), ref.step_s).max() <= e["prefill_time"]["max_abs_pct"] + 2
    assert _rel_pct(p.prefill_power_w(tok, f), ref.power_w).max() <= e["prefill_power"]["max_abs_pct"] + 2
    capped = sp.prefill_step(model, gpu, tp, tok, capped=True)
    t_cap = p.prefill_time_s(tok, p.prefill_freq_at_limit_mhz(tok))
    assert _rel_pct(t_cap, capped.step_s).max() <= e["prefill_time_capped"]["max_abs_pct"] + 2
    b = np.array([2.0, 5.0, 10.0, 20.0, 48.0, 60.0, 200.0, 300.0])
    c = np.array([4000.0, 300.0, 1000.0, 1500.0, 3000.0, 300.0, 700.0, 5000.0])
    fits = b * c <= p.kv_capacity_tokens
    b, c = b[fits], c[fits]
    assert b.size >= 3
    ref = sp.decode_step(model, gpu, tp, b, c)
    assert _rel_pct(p.decode_iter_time_s(b, c, f), ref.step_s).max() <= e["decode_time"]["max_abs_pct"] + 2
    assert _rel_pct(p.decode_power_w(b, f, c), ref.power_w).max() <= e["decode_power"]["max_abs_pct"] + 2


def _decode_s(model: str, gpu: str, tp: int, batch: float, ctx: float) -> float:
    p = sp.derive_profile(model, gpu, tp)
    return float(p.decode_iter_time_s(batch, ctx, p.max_freq_mhz))


def _energy_per_token_j(model: str, gpu: str, tp: int, batch: float, ctx: float) -> float:
    p = sp.derive_profile(model, gpu, tp)
    power = float(p.decode_power_w(batch, p.max_freq_mhz, ctx))
    return tp * power * _decode_s(model, gpu, tp, batch, ctx) / batch


@pytest.mark.parametrize("gpu", GPUS)
def test_more_tp_gives_a_shorter_decode_step(gpu: str) -> None:
    for model in MODELS:  # a large batch: every model's step is GPU-bound there
        t = [_decode_s(model, gpu, tp, 256, 2048) for tp in sp.fitting_tps(model, gpu)]
        assert all(a > b for a, b in zip(t, t[1:], strict=False)), (model, t)
    for batch in (8, 64):  # the 70B dense model at any batch (small ones are host-bound for 8B)
        t = [_decode_s("llama-3.1-70b-instruct", gpu, tp, batch, 1024)
             for tp in sp.fitting_tps("llama-3.1-70b-instruct", gpu)]
        assert all(a > b for a, b in zip(t, t[1:], strict=False)), (batch, t)


def test_newer_gpus_decode_faster_at_equal_batch() -> None:
    for model, tp in (("llama-3.1-8b-instruct", 1), ("llama-3.1-70b-instruct", 4), ("qwen3-30b-a3b", 2)):
        for batch, ctx in ((64, 1024), (256, 2048)):
            h100, h200, b200 = (_decode_s(model, g, tp, batch, ctx) for g in GPUS)
            assert h100 > h200 > b200, (model, batch, h100, h200, b200)


def test_70b_energy_per_token_tp8_vs_tp4_not_twice() -> None:
    for gpu in GPUS:
        for batch in (8, 64, 256):
            r = (_energy_per_token_j("llama-3.1-70b-instruct", gpu, 8, batch, 1024)
                 / _energy_per_token_j("llama-3.1-70b-instruct", gpu, 4, batch, 1024))
            assert 1.0 < r < 1.6, (gpu, batch, r)  # more GPUs cost more per token, far from 2x


def test_moe_decode_step_cheaper_than_70b_dense() -> None:
    for gpu in GPUS:
        for batch in (8, 64, 256):
            assert _decode_s("qwen3-30b-a3b", gpu, 4, batch, 1024) < _decode_s(
                "llama-3.1-70b-instruct", gpu, 4, batch, 1024)
            assert _energy_per_token_j("qwen3-30b-a3b", gpu, 4, batch, 1024) < _energy_per_token_j(
                "llama-3.1-70b-instruct", gpu, 4, batch, 1024)


def test_70b_does_not_fit_one_h100() -> None:
    assert sp.fitting_tps("llama-3.1-70b-instruct", "h100") == [2, 4, 8]
    with pytest.raises(ProfileError, match=r"llama-3\.1-70b-instruct.*'h100'.*tp=1.*\[2, 4, 8\]"):
        sp.derive_profile("llama-3.1-70b-instruct", "h100", 1)
    with pytest.raises(ProfileError, match=r"tp=3.*64 attention heads"):
        sp.derive_profile("llama-3.1-70b-instruct", "h100", 3)
    assert sp.fitting_tps("llama-3.1-70b-instruct", "b200") == [1, 2, 4, 8]  # 180 GB fits 141 GB


def test_inputs_taken_from_the_gpu_and_the_shape() -> None:
    h100 = sp.derive_profile("llama-3.1-8b-instruct", "h100", 2)
    assert h100.idle_power_w == 122.0 and h100.gpu_power_limit_w == 700.0  # gpus.json, with context
    assert (h100.min_freq_mhz, h100.max_freq_mhz) == (345.0, 1980.0)
    coeffs = json.loads(sp.COEFFICIENTS_FILE.read_text())["gpus"]
    b200 = sp.derive_profile("llama-3.1-8b-instruct", "b200", 2)
    assert b200.idle_power_w == pytest.approx(coeffs["b200"]["coefficients"]["idle_w"])  # fitted
    h200 = sp.derive_profile("llama-3.1-8b-instruct", "h200", 2)
    assert coeffs["h200"]["coefficients"] == coeffs["h100"]["coefficients"]
    assert "H100 coefficients" in h200.source and "gpus.json h200" in h200.source
    assert "assumption" in h100.source and "assumption" not in h200.source
    shape = load_shipped("llama-3.1-8b-instruct")
    kv = kv_layout(shape, 2, sp._gpus()["h100"].memory_bytes, memory_utilization=0.9)
    assert h100.kv_capacity_tokens == int(kv.capacity_bytes / kv.full_bytes_per_token)
    assert h200.kv_capacity_tokens > h100.kv_capacity_tokens  # 141 GB against 80 GB
    assert h100.weights_gb == pytest.approx(shape.total_weight_bytes / 1e9)
    assert h100.power_freq_exponent == 2.0


def test_reconfiguration_law_fits_the_h200_measurements() -> None:
    doc = json.loads(sp.RECONFIG_FILE.read_text())
    fixed, per_layer = sp.fit_reconfig_law()
    law = sp.reconfig_law()
    assert (law.fixed_s, law.per_layer_s) == pytest.approx((fixed, per_layer), abs=1e-3)
    with sp.RECONFIG_CSV.open() as f:
        rows = {(r["call"], r["model"], r["weights"], r["from_tp"], r["to_tp"]): float(r["downtime_s"])
                for r in csv.DictReader(f) if r["what"] == "reconfiguration" and r["valid"] == "True"}
    assert len(rows) == len(doc["points"]) == 4
    weights = {"llama3-8b": 16_060_522_496, "llama2-70b": 137_953_296_384}  # bf16 bytes of the shapes
    for pt in doc["points"]:
        key = (pt["call"], pt["model"], pt["weights"], str(pt["from_tp"]), str(pt["to_tp"]))
        assert rows[key] == pytest.approx(pt["downtime_s"], abs=1e-4)
        law_s = law.fixed_s + law.per_layer_s * doc["fit"]["n_layers"][pt["model"]]
        if pt["weights"] != "random":  # the held-out checkpoint row reads its weights
            law_s += weights[pt["model"]] / pt["to_tp"] / law.load_bytes_per_s
        assert law_s == pytest.approx(pt["law_s"], abs=0.01)
        assert abs(law_s / pt["downtime_s"] - 1.0) < 0.03
    p = sp.derive_profile("llama-3.1-70b-instruct", "h200", 2)
    shape = load_shipped("llama-3.1-70b-instruct")
    assert p.load_time_s == pytest.approx(
        law.fixed_s + law.per_layer_s * 80 + shape.total_weight_bytes / 2 / law.load_bytes_per_s)
    assert 60.0 < p.load_time_s < 80.0  # 63.1 s measured with random weights, plus reading 70 GB


def test_deterministic_cached_and_fast() -> None:
    sp.derive_profile.cache_clear()
    t0 = time.perf_counter()
    a = sp.derive_profile("qwen3-30b-a3b", "h100", 2)
    elapsed = time.perf_counter() - t0
    assert sp.derive_profile("qwen3-30b-a3b", "h100", 2) is a  # cached
    sp.derive_profile.cache_clear()
    b = sp.derive_profile("qwen3-30b-a3b", "h100", 2)
    assert a is not b and a == b and a.fit_error == b.fit_error
    assert elapsed < 1.0, elapsed


def test_library_serves_json_and_derived_profiles() -> None:
    lib = ProfileLibrary.load()
    assert lib.get("llama3-8b", "h100", 1).source == "llama3-8b_h100_tp1.json"  # the JSON table
    assert lib.get("llama3-8b", "h100", 1).fit_error == {}
    derived = lib.get("qwen3-30b-a3b", "b200", 2)
    assert derived is sp.derive_profile("qwen3-30b-a3b", "b200", 2)
    assert derived.source.startswith("derived from envs/perf")
    assert lib.tps("llama-3.1-70b-instruct", "h100") == [2, 4, 8]
    assert lib.tps("llama2-70b", "h100") == [2, 4, 8]
    assert lib.tps("nope", "h100") == [] and lib.tps("qwen3-8b", "a100") == []
    assert {"llama3-8b", "llama2-70b", *MODELS} <= set(lib.models())
    assert lib.gpus("qwen3-8b") == ["b200", "h100", "h200"]
    with pytest.raises(ProfileError, match=r"unknown model 'nope'.*llama3-8b.*qwen3-30b-a3b"):
        lib.get("nope", "h100", 1)
    with pytest.raises(ProfileError, match=r"unknown GPU 'a100'.*b200, h100, h200"):
        lib.get("qwen3-8b", "a100", 1)
    with pytest.raises(ProfileError, match=r"tp=3.*llama2-70b/h100/tp2"):
        lib.get("llama2-70b", "h100", 3)
    mixed = [lib.get("llama3-8b", "h100", 1), derived, lib.get("llama-3.1-70b-instruct", "h100", 4)]
    arrays = ProfileArrays.stack(mixed).take(np.array([2, 0, 1, 2]))
    assert list(arrays.model) == ["llama-3.1-70b-instruct", "llama3-8b", "qwen3-30b-a3b",
                                  "llama-3.1-70b-instruct"]
    batch, ctx = np.array([4.0, 8.0, 16.0, 32.0]), np.array([512.0, 1024.0, 256.0, 2048.0])
    rows = zip([2, 0, 1, 2], batch, ctx, strict=True)
    want = [mixed[i].decode_iter_time_s(b, c, 1400.0) for i, b, c in rows]
    np.testing.assert_allclose(arrays.decode_iter_time_s(batch, ctx, 1400.0), want)


def test_cli_prints_the_profile_and_exits_2_on_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sim-profile", "--model", "llama-3.1-70b-instruct", "--gpu", "h100", "--tp", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert (last["model"], last["gpu"], last["tp"]) == ("llama-3.1-70b-instruct", "h100", 4)
    assert set(sp.FIT_QUANTITIES) <= set(last["fit_error"])
    assert last["decode_d0_s"] == sp.derive_profile("llama-3.1-70b-instruct", "h100", 4).decode_d0_s
    assert any("decode_power" in line for line in out[:-1])
    for argv, needle in (
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "qwen3-8b", "--gpu", "a100"], "unknown GPU 'a100'"),
        (["--model", "llama-3.1-70b-instruct", "--gpu", "h100", "--tp", "1"], "does not fit"),
        (["--model", "llama-3.1-70b-instruct", "--tp", "3"], "tp=3"),
        (["--model", "qwen3-8b", "--tp", "0"], "--tp must be >= 1"),
    ):
        assert cli.main(["sim-profile", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)


@pytest.mark.parametrize(("model", "gpu", "tp"), [
    ("llama-3.1-8b-instruct", "h100", 1), ("llama-3.1-70b-instruct", "h100", 4), ("qwen3-30b-a3b", "h200", 2),
])
def test_decode_power_follows_the_context_as_perf_does(model: str, gpu: str, tp: int) -> None:
    """At one batch, a longer context reads more KV cache per step: perf's decode power rises with
    it, and so does the derived profile's (within its fit error), where by the batch alone it
    could not move."""
    p = sp.derive_profile(model, gpu, tp)
    assert p.decode_power_ctx_per_ktok > 0.0
    ctx = np.array([256.0, 1024.0, 4096.0])
    b = np.full(3, 32.0)
    ref = sp.decode_step(model, gpu, tp, b, ctx).power_w
    got = p.decode_power_w(b, p.max_freq_mhz, ctx)
    assert np.all(np.diff(ref) > 0) and np.all(np.diff(got) > 0)
    assert _rel_pct(got, ref).max() <= p.fit_error["decode_power"]["max_abs_pct"] + 1.0
    # Without the context (0 tokens) the load is the batch alone.
    assert p.decode_power_w(32.0, p.max_freq_mhz) == pytest.approx(
        p.decode_power_w(32.0, p.max_freq_mhz, 0.0))


def test_json_table_profiles_keep_power_by_batch_alone() -> None:
    """The JSON tables measured decode power by batch only: their context coefficient is 0."""
    p = ProfileLibrary.load().get("llama2-70b", "h100", 4)
    assert p.decode_power_ctx_per_ktok == 0.0
    assert p.decode_power_w(16.0, 1980.0, 4000.0) == p.decode_power_w(16.0, 1980.0)
