"""Tests of the online check of the GPU thermal fit (issue 19): offset from the first minute only."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.thermal import DEFAULT_FIT_PATH, ThermalParams
from llm_cluster_gym.scripts import cli
from llm_cluster_gym.scripts.fit_thermal import (
    FIT_RECORDINGS,
    GOAL_RMSE_C,
    ONLINE_OFFSET_S,
    RECORDINGS_DIR,
    WINDOW_S,
    check_recording,
    fit_model,
    fit_of_params,
    load_recording,
    online_check,
)

STEPS = "h100_steps_20261125.json.gz"
PROBE = "h100_probe.json"


@pytest.fixture(scope="module")
def online_json() -> dict:
    return json.loads(DEFAULT_FIT_PATH.read_text())["online_transfer"]


@pytest.fixture(scope="module")
def shipped():
    return fit_of_params(ThermalParams.load())


def test_online_offset_uses_only_the_first_minute(shipped):
    rec = load_recording(RECORDINGS_DIR / STEPS)
    base = online_check(rec, shipped)
    later = rec.t_s + WINDOW_S > ONLINE_OFFSET_S
    assert later.any() and not later.all()
    changed = dataclasses.replace(
        rec,
        temp_end_c=np.where(later, rec.temp_end_c + 7.0, rec.temp_end_c),
        power_w=np.where(later, rec.power_w * 0.5, rec.power_w),
    )
    after = online_check(changed, shipped)
    assert after.inlet_offset_c == pytest.approx(base.inlet_offset_c, abs=1e-12)
    assert after.rmse_c != pytest.approx(base.rmse_c, abs=0.1)  # the remainder is what is scored
    # and the first minute does move it: one degree more there, one degree more offset.
    warmer = dataclasses.replace(rec, temp_end_c=np.where(later, rec.temp_end_c, rec.temp_end_c + 1.0))
    assert online_check(warmer, shipped).inlet_offset_c == pytest.approx(base.inlet_offset_c + 1.0)
    # A longer window does use the later data.
    assert online_check(changed, shipped, 120.0).inlet_offset_c != pytest.approx(
        online_check(rec, shipped, 120.0).inlet_offset_c, abs=0.1)


def test_online_offset_of_a_file_ignores_samples_after_the_first_minute(tmp_path):
    path = RECORDINGS_DIR / STEPS
    with gzip.open(path, "rt") as fh:
        raw = json.load(fh)
    cols = raw["columns"]
    it, ip, itemp = cols.index("t"), cols.index("power_w"), cols.index("gpu_temp_c")
    t0 = raw["samples"][0][it]
    for row in raw["samples"]:
        if row[it] - t0 > ONLINE_OFFSET_S + 1.5:  # past the last window the offset reads
            row[itemp] += 12
            row[ip] *= 1.3
    edited = tmp_path / "edited.json.gz"
    with gzip.open(edited, "wt") as fh:
        json.dump(raw, fh)
    a, b = check_recording(path), check_recording(edited)
    assert b["inlet_offset_c"] == pytest.approx(a["inlet_offset_c"], abs=1e-9)
    assert b["rmse_c"] > a["rmse_c"] + 3.0


@pytest.mark.parametrize("name", [*FIT_RECORDINGS, PROBE])
def test_held_out_rmse_is_what_the_json_says(online_json, shipped, name):
    row = online_json["recordings"][name]
    assert name not in row["fit_on"] and row["fit_on"]
    rec = load_recording(RECORDINGS_DIR / name)
    if name in FIT_RECORDINGS:  # leave one out: refit on the others, as the fit command does
        fit = fit_model([load_recording(RECORDINGS_DIR / n) for n in row["fit_on"]], 2)
        assert list(fit.taus_s) == pytest.approx(row["fit_tau_s"], rel=1e-4)
    else:  # never fitted: the shipped joint fit (parameters rounded to 5 digits in the file)
        fit = shipped
    res = online_check(rec, fit, online_json["online_offset_s"])
    tol = 2e-4 if name in FIT_RECORDINGS else 2e-3
    assert res.rmse_c == pytest.approx(row["rmse_c"], rel=tol)
    assert res.max_abs_err_c == pytest.approx(row["max_abs_err_c"], rel=tol)
    assert res.inlet_offset_c == pytest.approx(row["inlet_offset_c"], rel=tol)
    assert online_json["meets_goal"][name] == (row["rmse_c"] <= GOAL_RMSE_C)
    assert res.scored_s == pytest.approx(rec.t_s[-1] + WINDOW_S - ONLINE_OFFSET_S)


def test_cli_check_prints_json_and_exits_0(online_json, capsys):
    assert cli.main(["fit-thermal", "--check", str(RECORDINGS_DIR / PROBE)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["online_offset_s"] == ONLINE_OFFSET_S and res["goal_rmse_c"] == GOAL_RMSE_C
    # h100_probe.json never entered the fit: the check is the JSON's held-out figure.
    assert res["rmse_c"] == pytest.approx(online_json["recordings"][PROBE]["rmse_c"], rel=1e-3)
    assert res["meets_goal"] == (res["rmse_c"] <= GOAL_RMSE_C)


def _recording(tmp_path, name, **edit):
    raw = json.loads((RECORDINGS_DIR / PROBE).read_text())
    raw.update(edit)
    p = tmp_path / name
    p.write_text(json.dumps(raw))
    return p


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        ({"columns": ["t", "power_w", "temp"]}, "field 'columns' lacks 'gpu_temp_c'"),
        ({"samples": "none"}, "field 'samples' must be a list"),
        ({"samples": [[i * 0.02, 120.0, "hot", 1980, 0] for i in range(200)]}, "column 'gpu_temp_c'"),
        ({"samples": [[i * 0.02, 120.0, 40, 1980, 0] for i in range(200)]}, "field 't' spans"),
    ],
)
def test_cli_check_of_a_bad_file_exits_2_with_one_line(tmp_path, capsys, edit, expect):
    path = _recording(tmp_path, "bad.json", **edit)
    assert cli.main(["fit-thermal", "--check", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-cluster fit-thermal: error: ")
    assert str(path) in lines[0] and expect in lines[0]
    assert captured.out == ""


def test_cli_check_of_a_file_that_is_not_json_exits_2(tmp_path, capsys):
    path = tmp_path / "broken.json.gz"
    path.write_text("not gzip")
    assert cli.main(["fit-thermal", "--check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]
    assert cli.main(["fit-thermal", "--check", str(RECORDINGS_DIR / PROBE), "--online-offset-s", "0"]) == 2
    assert "--online-offset-s" in capsys.readouterr().err
