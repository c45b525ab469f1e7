from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.profiles import (
    DEFAULT_PROFILE_DIR,
    Profile,
    ProfileArrays,
    ProfileError,
    ProfileLibrary,
    load_profile,
)

REQUIRED = [
    ("llama2-70b", "h100", 2),
    ("llama2-70b", "h100", 4),
    ("llama2-70b", "h100", 8),
    ("llama3-8b", "h100", 1),
]


@pytest.fixture(scope="module")
def lib() -> ProfileLibrary:
    return ProfileLibrary.load()


def _doc(model: str, tp: int) -> dict:
    return json.loads((DEFAULT_PROFILE_DIR / f"{model}_h100_tp{tp}.json").read_text())


def _pct(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    return np.abs(pred - obs) / obs * 100.0


def test_required_profiles_present(lib: ProfileLibrary) -> None:
    for key in REQUIRED:
        p = lib.get(*key)
        assert p.min_freq_mhz == 800 and p.max_freq_mhz == 1980
        assert p.gpu_power_limit_w == 700
        assert p.kv_capacity_tokens > 0 and p.load_time_s > 0
    assert lib.tps("llama2-70b", "h100") == [2, 4, 8]
    assert set(lib.models()) >= {"llama2-70b", "llama3-8b"}


def test_missing_key_names_it_and_lists_available(lib: ProfileLibrary) -> None:
    with pytest.raises(ProfileError, match=r"tp=3.*llama2-70b/h100/tp2"):
        lib.get("llama2-70b", "h100", 3)


@pytest.mark.parametrize("model,gpu,tp", REQUIRED)
def test_fit_reproduces_committed_grids_within_recorded_error(lib, model, gpu, tp) -> None:
    p = lib.get(model, gpu, tp)
    d = _doc(model, tp)
    err, g = d["fit_error"], d["grids"]
    slack = 1e-6  # the recorded error is rounded to 3 decimals

    pf = g["prefill"]
    tokens = np.array(pf["tokens"])
    rel = _pct(p.prefill_time_s(tokens, p.max_freq_mhz), np.array(pf["time_s_at_max_freq"]))
    assert rel.mean() <= err["prefill_time"]["mape_pct"] + 1e-3 + slack
    assert rel.max() <= err["prefill_time"]["max_abs_pct"] + 1e-3 + slack
    # The same model at the (power-capped) clock of each point reproduces the raw measurement.
    rel = _pct(p.prefill_time_s(tokens, np.array(pf["freq_mhz"])), np.array(pf["time_s_measured"]))
    assert rel.max() <= err["prefill_time_capped_vs_measured"]["max_abs_pct"] + 1e-3

    dc = g["decode"]
    rel = _pct(
        p.decode_iter_time_s(np.array(dc["batch"]), np.array(dc["ctx_tokens"]), p.max_freq_mhz),
        np.array(dc["time_s"]),
    )
    assert rel.mean() <= err["decode_time"]["mape_pct"] + 1e-3
    assert rel.max() <= err["decode_time"]["max_abs_pct"] + 1e-3

    pp = g["prefill_power"]
    rel = _pct(
        p.prefill_power_w(np.array(pp["tokens"]), np.array(pp["freq_mhz"])), np.array(pp["power_w"])
    )
    assert rel.max() <= err["prefill_power"]["max_abs_pct"] + 0.05  # coefficients rounded to 2 dp

    dp = g["decode_power"]
    rel = _pct(p.decode_power_w(np.array(dp["batch"]), p.max_freq_mhz), np.array(dp["power_w"]))
    assert rel.max() <= err["decode_power"]["max_abs_pct"] + 0.05

    # Sanity bounds on the recorded errors themselves, so a bad refit is noticed.
    assert err["decode_time"]["mape_pct"] < 10
    assert err["prefill_time"]["mape_pct"] < 15


@pytest.mark.parametrize("model,gpu,tp", REQUIRED)
def test_decode_time_grows_with_batch_and_context(lib, model, gpu, tp) -> None:
    p = lib.get(model, gpu, tp)
    batch = np.array([1, 2, 8, 32, 128])
    t = p.decode_iter_time_s(batch, 1024, 1980)
    assert np.all(np.diff(t) > 0)
    ctx = np.array([128, 1024, 4096, 16384])
    t = p.decode_iter_time_s(16, ctx, 1980)
    assert np.all(np.diff(t) > 0)


@pytest.mark.parametrize("model,gpu,tp", REQUIRED)
def test_prefill_scales_with_clock_decode_barely(lib, model, gpu, tp) -> None:
    p = lib.get(model, gpu, tp)
    # Halving the clock at the low end: prefill (compute bound) close to 2x, decode far less.
    pf = p.prefill_time_s(4096, 800) / p.prefill_time_s(4096, 1600)
    dc = p.decode_iter_time_s(32, 1024, 800) / p.decode_iter_time_s(32, 1024, 1600)
    assert 1.8 < pf <= 2.0
    assert 1.0 < dc < 1.15
    full = p.prefill_time_s(4096, 800) / p.prefill_time_s(4096, 1980)
    assert full == pytest.approx(p.prefill_phi * 1980 / 800 + 1 - p.prefill_phi)


@pytest.mark.parametrize("model,gpu,tp", REQUIRED)
def test_power_monotone_in_frequency_and_load(lib, model, gpu, tp) -> None:
    p = lib.get(model, gpu, tp)
    f = np.linspace(800, 1980, 12)
    for fn, load in ((p.prefill_power_w, 2048), (p.decode_power_w, 64)):
        assert np.all(np.diff(fn(load, f)) > 0)
        loads = np.array([0, 1, 16, 256, 4096, 65536])
        w = fn(loads, 1980)
        assert np.all(np.diff(w) > 0)
        assert w[0] == pytest.approx(p.idle_power_w)
    # Measured anchors: idle ~122 W; prefill of >= 2k tokens would exceed the 700 W limit at max
    # clock (the probe saw it pinned at 700 W with the clock pulled down); decode stays below.
    assert 110 < p.idle_power_w < 135
    assert p.prefill_power_w(2048, 1980) > p.gpu_power_limit_w
    assert p.decode_power_w(1024, 1980) < p.gpu_power_limit_w


def test_power_limit_clock_matches_probe(lib) -> None:
    p = lib.get("llama3-8b", "h100", 1)
    f = p.prefill_freq_at_limit_mhz(np.array([512, 4096, 16384, 32768]))
    assert f[0] == 1980  # 512 tokens: probe ran unthrottled at 1980 MHz
    assert np.all(np.diff(f) <= 0)
    # probe: 4096 tokens ~1650-1690 MHz, 16384 ~1500-1530, 32768 ~1500
    assert np.all(np.abs(f[1:] - np.array([1670, 1515, 1500])) < 60)
    assert p.prefill_power_w(16384, f[2]) == pytest.approx(700.0)


def test_tp8_prefill_faster_than_tp2_for_70b(lib) -> None:
    tp2, tp8 = lib.get("llama2-70b", "h100", 2), lib.get("llama2-70b", "h100", 8)
    tokens = np.array([512, 1024, 2048, 4096, 8192])
    for f in (1980, 1200):
        assert np.all(tp8.prefill_time_s(tokens, f) < tp2.prefill_time_s(tokens, f))
    assert tp8.kv_capacity_tokens > tp2.kv_capacity_tokens


def test_kv_capacity_arithmetic(lib) -> None:
    p = lib.get("llama2-70b", "h100", 4)
    kv_bytes = 2 * p.n_layers * p.n_kv_heads * p.head_dim * 2
    assert kv_bytes == 327_680
    expect = math.floor((0.9 * 4 * 85_899_345_920 - 2 * p.n_params) / kv_bytes)
    assert p.kv_capacity_tokens == expect
    assert p.weights_gb == pytest.approx(2 * p.n_params / 1e9, rel=1e-4)


def test_stack_matches_per_profile_calls(lib) -> None:
    profiles = [lib.get(*k) for k in REQUIRED]
    idx = np.array([0, 3, 1, 2, 3, 0, 2])
    arrays = ProfileArrays.stack(profiles).take(idx)
    assert len(arrays) == idx.size
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 8192, idx.size)
    batch = rng.integers(1, 256, idx.size)
    ctx = rng.integers(1, 8192, idx.size)
    freq = rng.uniform(800, 1980, idx.size)
    got = {
        "prefill_time_s": arrays.prefill_time_s(tokens, freq),
        "decode_iter_time_s": arrays.decode_iter_time_s(batch, ctx, freq),
        "prefill_power_w": arrays.prefill_power_w(tokens, freq),
        "decode_power_w": arrays.decode_power_w(batch, freq),
        "prefill_freq_at_limit_mhz": arrays.prefill_freq_at_limit_mhz(tokens),
    }
    for i, j in enumerate(idx):
        p = profiles[j]
        assert got["prefill_time_s"][i] == p.prefill_time_s(tokens[i], freq[i])
        assert got["decode_iter_time_s"][i] == p.decode_iter_time_s(batch[i], ctx[i], freq[i])
        assert got["prefill_power_w"][i] == p.prefill_power_w(tokens[i], freq[i])
        assert got["decode_power_w"][i] == p.decode_power_w(batch[i], freq[i])
        assert got["prefill_freq_at_limit_mhz"][i] == p.prefill_freq_at_limit_mhz(tokens[i])
        assert arrays.kv_capacity_tokens[i] == p.kv_capacity_tokens
        assert arrays.model[i] == p.model and arrays.tp[i] == p.tp


def test_bad_frequency_rejected(lib) -> None:
    p = lib.get("llama3-8b", "h100", 1)
    with pytest.raises(ValueError, match="freq_mhz"):
        p.prefill_time_s(100, 0.0)


# ---- validation of profile files -----------------------------------------------------------


def _write(tmp_path: Path, doc: dict, name: str = "bad_h100_tp1.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_loaded_file_round_trips(tmp_path: Path) -> None:
    doc = _doc("llama3-8b", 1)
    p = load_profile(_write(tmp_path, doc, "copy.json"))
    assert isinstance(p, Profile) and p.model == "llama3-8b" and p.source == "copy.json"


@pytest.mark.parametrize(
    "mutate,field",
    [
        (
            lambda d: d["coefficients"].pop("decode_d1_s_per_seq"),
            "coefficients.decode_d1_s_per_seq",
        ),
        (lambda d: d["model_shape"].pop("n_layers"), "model_shape.n_layers"),
        (lambda d: d.pop("grids"), "grids"),
        (lambda d: d["fit_error"].pop("decode_power"), "fit_error.decode_power"),
        (lambda d: d["grids"]["decode"].pop("ctx_tokens"), "grids.decode.ctx_tokens"),
    ],
)
def test_missing_field_raises_naming_it(tmp_path: Path, mutate, field) -> None:
    doc = copy.deepcopy(_doc("llama3-8b", 1))
    mutate(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")) as exc:
        load_profile(path)
    assert str(path) in str(exc.value)


def test_nan_coefficient_raises(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama2-70b", 4))
    doc["coefficients"]["prefill_p1_s_per_token"] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(doc))  # json writes NaN literally
    with pytest.raises(ProfileError, match=r"coefficients\.prefill_p1_s_per_token.*nan"):
        load_profile(path)


def test_negative_value_raises(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama2-70b", 4))
    doc["coefficients"]["idle_power_w"] = -5.0
    with pytest.raises(ProfileError, match=r"coefficients\.idle_power_w.*-5\.0"):
        load_profile(_write(tmp_path, doc))


def test_phi_above_one_raises(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama2-70b", 4))
    doc["coefficients"]["decode_phi"] = 1.5
    with pytest.raises(ProfileError, match=r"coefficients\.decode_phi"):
        load_profile(_write(tmp_path, doc))


def test_grid_hole_nan_raises(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama2-70b", 2))
    doc["grids"]["decode"]["time_s"][3] = float("nan")
    path = tmp_path / "hole.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"grids\.decode\.time_s\[3\]"):
        load_profile(path)


def test_grid_hole_null_raises(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama2-70b", 2))
    doc["grids"]["prefill"]["time_s_at_max_freq"][0] = None
    with pytest.raises(ProfileError, match=r"grids\.prefill\.time_s_at_max_freq\[0\]"):
        load_profile(_write(tmp_path, doc))


def test_grid_missing_point_raises(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama2-70b", 2))
    doc["grids"]["prefill_power"]["power_w"].pop()
    with pytest.raises(ProfileError, match=r"grids\.prefill_power\.power_w.*hole"):
        load_profile(_write(tmp_path, doc))


def test_library_rejects_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no profile"):
        ProfileLibrary.load(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ProfileError, match="broken.json"):
        ProfileLibrary.load(tmp_path)


def test_serial_power_ratio_is_optional_and_must_be_positive(tmp_path: Path) -> None:
    doc = copy.deepcopy(_doc("llama3-8b", 1))
    assert load_profile(_write(tmp_path, doc, "plain.json")).prefill_serial_power_ratio == 1.0
    doc["coefficients"]["prefill_serial_power_ratio"] = 0.6
    assert load_profile(_write(tmp_path, doc, "share.json")).prefill_serial_power_ratio == 0.6
    doc["coefficients"]["prefill_serial_power_ratio"] = 0.0
    with pytest.raises(ProfileError, match=r"coefficients\.prefill_serial_power_ratio.*> 0"):
        load_profile(_write(tmp_path, doc))
