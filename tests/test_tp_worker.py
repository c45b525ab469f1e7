"""Tensor-parallel workers on CPU (gloo, tiny shapes) and the TP measurement scripts.

What is checked: a TP2/TP4 model computes what the TP1 model of the same seed computes (the
serving passes, logits compared), continuous batching under TP2 through the worker-process
interface RealCluster uses, clean start/stop, the dry-run and tiny modes of `llm-cluster profile-tp`
and `llm-cluster measure-reconfig`, and `llm-cluster compare-profiles` on a synthetic table.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.envs.real.tp_layers import ShardSpec, TPShardError
from llm_cluster_gym.envs.real.tp_worker import (
    TP_SHAPES,
    TPInferenceEngine,
    TPWorkerConfig,
    TPWorkerError,
    TPWorkerProcess,
    reference_logits,
)
from llm_cluster_gym.envs.real.worker import Request, WorkerConfig, WorkerError
from llm_cluster_gym.envs.sim.profiles import DEFAULT_PROFILE_DIR, ProfileLibrary, load_profile
from llm_cluster_gym.scripts import compare_profiles, profile_tp, tp_campaign
from llm_cluster_gym.scripts.cli import main as cli_main

TINY = WorkerConfig(model="tiny-tp", device="cpu", max_slots=4, max_ctx=64, cuda_graphs=False)


def _tcfg(tp: int) -> TPWorkerConfig:
    return TPWorkerConfig(worker=TINY, tp=tp, start_method="forkserver")


# ------------------------------------------------------------------ configuration
def test_shard_spec_splits_heads_and_rejects_uneven_splits():
    spec = ShardSpec(TP_SHAPES["llama2-70b"], 8, 3)
    assert (spec.local.n_heads, spec.local.n_kv_heads, spec.local.d_ffn) == (8, 1, 3584)
    assert list(spec.blocks) == [3]
    with pytest.raises(TPShardError, match="n_kv_heads"):
        ShardSpec(TP_SHAPES["tiny-tp"], 3, 0)
    with pytest.raises(TPShardError, match="rank"):
        ShardSpec(TP_SHAPES["tiny-tp"], 2, 2)


def test_config_validation_names_the_field():
    with pytest.raises(TPWorkerError, match="'tp'"):
        TPWorkerConfig(worker=TINY, tp=0).validate()
    with pytest.raises(TPWorkerError, match="'backend'"):
        TPWorkerConfig(worker=TINY, tp=2, backend="mpi").validate()
    with pytest.raises(TPWorkerError, match="'devices'"):
        TPWorkerConfig(worker=TINY, tp=2, devices=("cpu",)).validate()
    with pytest.raises(TPWorkerError, match="'start_method'"):
        TPWorkerConfig(worker=TINY, tp=2, start_method="fork").validate()
    with pytest.raises(WorkerError, match="'model'"):
        TPWorkerConfig(worker=WorkerConfig(model="nope", device="cpu"), tp=1).validate()
    cfg = TPWorkerConfig(worker=WorkerConfig(device="cuda:2"), tp=4)
    assert cfg.rank_devices() == ("cuda:2", "cuda:3", "cuda:4", "cuda:5")
    assert cfg.dist_backend() == "nccl"


def test_random_weights_do_not_depend_on_tp():
    full = dict(TPInferenceEngine(TINY).passes.model.named_parameters())
    for tp in (2, 4):
        for rank in range(tp):
            eng = TPInferenceEngine(TINY, rank=rank, tp=tp)
            for name, prm in eng.passes.model.named_parameters():
                dim = eng.spec.split_dim(name)
                want = full[name] if dim is None else full[name].narrow(
                    dim, rank * prm.shape[dim], prm.shape[dim])
                assert np.array_equal(prm.numpy(), want.numpy()), (tp, rank, name)


# ------------------------------------------------------------------ numerics and serving
@pytest.mark.slow
def test_tp2_and_tp4_compute_what_tp1_computes():
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    ref = reference_logits(_tcfg(1), prompts, decode_steps=3)
    assert len(ref["prefill_logits"]) == 2 and len(ref["decode_logits"]) == 3
    for tp in (2, 4):
        got = reference_logits(_tcfg(tp), prompts, decode_steps=3)
        assert got["tp"] == tp
        for a, b in zip(ref["prefill_logits"] + ref["decode_logits"],
                        got["prefill_logits"] + got["decode_logits"], strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
            assert np.abs(a).max() > 0.1  # real logits, not zeros
        for ta, tb in zip(ref["tokens"], got["tokens"], strict=True):
            np.testing.assert_array_equal(ta, tb)


@pytest.mark.slow
def test_tp2_worker_continuous_batching_and_clean_stop():
    w = TPWorkerProcess(_tcfg(2))
    try:
        assert {"dist_init_s", "build_s", "warmup_s", "spawn_to_ready_s"} <= set(w.start_info)
        assert w.alive
        w.set_control(max_batch=2)
        now = time.time()
        outs = [2 + 2 * i for i in range(6)]
        w.submit([Request(i, now, 3 + i, o) for i, o in enumerate(outs)])
        done = []
        while len(done) < 6 and time.time() - now < 30:
            time.sleep(0.02)
            rep = w.poll()
            done += rep.completed
    finally:
        stop_s = w.close()
    assert not w.alive and stop_s < 15
    assert w.stop_info["followers_reported"] and w.stop_info["exitcodes"] == [0, 0]
    assert sorted(c.req_id for c in done) == list(range(6))
    assert all(not c.dropped and c.ttft_s > 0 and c.tbt_s > 0 for c in done)
    assert [c.output_tokens for c in sorted(done, key=lambda c: c.req_id)] == outs
    st = rep.stats
    assert st.prefill_passes == 6 and st.finished == 6
    assert st.decode_tokens == sum(o - 1 for o in outs)  # the first token comes from prefill
    # Batch cap 2: at most 2 sequences per decode iteration.
    assert st.decode_iters >= math.ceil(st.decode_tokens / 2)


_SHUTDOWN_SCRIPT = """
import json, sys, time
from llm_cluster_gym.envs.real.tp_worker import TPWorkerConfig, TPWorkerProcess
from llm_cluster_gym.envs.real.worker import Request, WorkerConfig

if __name__ == "__main__":
    wc = WorkerConfig(model="tiny-tp", device="cpu", max_slots=2, max_ctx=32, cuda_graphs=False)
    w = TPWorkerProcess(TPWorkerConfig(worker=wc, tp=2, backend="gloo",
                                       start_method="forkserver"))
    t0 = time.time()
    w.submit([Request(0, t0, 4, 3)])
    done = []
    while not done and time.time() - t0 < 30:
        time.sleep(0.02)
        done = w.poll().completed
    w.close()
    print(json.dumps({"done": len(done), **w.stop_info}))
"""


@pytest.mark.slow
def test_tp2_gloo_group_shuts_down_in_order_without_store_warnings(tmp_path):
    """Every rank destroys its group before rank 0 drops the TCPStore it hosts.

    On two H200s the follower logged c10d "TCPStore ... recvValue failed" warnings when rank 0
    exited first; the ranks' own stderr (children of a fresh interpreter) must hold no such line.
    """
    script = tmp_path / "tp_shutdown.py"
    script.write_text(_SHUTDOWN_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["done"] == 1
    assert info["followers_reported"] is True and info["exitcodes"] == [0, 0]
    for bad in ("TCPStore", "recvValue", "c10d", "Traceback", "tp_worker rank"):
        assert bad not in res.stderr, res.stderr


# ------------------------------------------------------------------ scripts
def test_profile_tp_dry_run_prints_the_plan(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert cli_main(["profile-tp", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RUN   llama2-70b tp=8" in text and "RUN    llama3-8b tp=1" in text
    assert "SKIP  llama2-70b tp=1" in text  # 128.5 GiB of weights do not fit one GPU
    assert "never set" in text and not out.exists()


@pytest.mark.slow
def test_profile_tp_tiny_writes_a_table(tmp_path):
    out = tmp_path / "tiny.json"
    assert cli_main(["profile-tp", "--tiny", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["schema"] == profile_tp.SCHEMA
    assert [e["tp"] for e in table["entries"]] == [1, 2]
    for e in table["entries"]:
        assert e["model"] == "tiny-tp" and e["gpu"] == "cpu"
        assert len(e["prefill"]["time_s"]) == 2 and min(e["prefill"]["time_s"]) > 0
        assert len(e["decode"]["time_s"]) == 4 and min(e["decode"]["time_s"]) > 0
        assert [p["kind"] for p in e["power"]["phases"]] == ["idle", "prefill", "decode"]
    assert table["provenance"]["mode"] == "tiny-cpu-gloo"
    assert compare_profiles.load_table(out)["entries"]


H200_DIR = Path(__file__).resolve().parents[1] / "envs" / "data" / "real" / "h200"


def test_tp_campaign_tables_from_the_h200_results(tmp_path):
    calls = [H200_DIR / "call1_results.json", H200_DIR / "call2_results.json"]
    table = tp_campaign.write_tables(calls, tmp_path)
    assert [(e["model"], e["tp"], e["gpu"]) for e in table["entries"]] == [
        ("llama3-8b", 1, "h200"), ("llama3-8b", 2, "h200"), ("llama2-70b", 2, "h200")]
    assert [(s["model"], s["tp"]) for s in table["skipped"]] == [("llama2-70b", 1)]
    assert compare_profiles.load_table(tmp_path / "tp_profile.json")["entries"]
    rows = {p.name: p.read_text().splitlines() for p in tmp_path.glob("*.csv")}
    assert len(rows["prefill.csv"]) == 1 + 3 * 6 and len(rows["decode.csv"]) == 1 + 3 * 21
    assert len(rows["power.csv"]) == 1 + 3 * 6
    recon = [dict(zip(rows["reconfig.csv"][0].split(","), r.split(","), strict=True))
             for r in rows["reconfig.csv"][1:]]
    links = [r for r in recon if r["from_tp"]]
    assert [(r["model"], r["from_tp"], r["to_tp"], r["valid"]) for r in links] == [
        ("llama3-8b", "1", "2", "True"), ("llama3-8b", "2", "1", "False"),
        ("llama3-8b", "2", "1", "True"), ("llama2-70b", "2", "2", "True"),
        ("llama3-8b", "1", "2", "True")]
    for r in links:
        parts = float(r["stop_s"]) + float(r["start_s"]) + float(r["first_token_s"])
        assert float(r["downtime_s"]) == pytest.approx(parts, rel=1e-4)
    # The committed tables are the ones these results give.
    for name, lines in rows.items():
        assert (H200_DIR / name).read_text().splitlines() == lines, name


def test_tp_campaign_task_names_are_checked():
    est, _ = tp_campaign.plan_task("reconfig:llama2-70b:2,2")
    assert est == 2 * tp_campaign.START_EST_S["llama2-70b"] + 30.0
    with pytest.raises(ValueError, match="unknown shape"):
        tp_campaign.plan_task("profile:llama9:1")
    with pytest.raises(ValueError, match="unknown kind"):
        tp_campaign.plan_task("warp:llama3-8b:1")


@pytest.mark.slow
def test_measure_reconfig_tiny_and_dry_run(tmp_path, capsys):
    assert cli_main(["measure-reconfig", "--dry-run"]) == 0
    assert "TP4 on GPUs 0..3 -> TP8 on GPUs 0..7" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert cli_main(["measure-reconfig", "--tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (rep,) = res["repeats"]
    assert rep["downtime_s"] == pytest.approx(rep["stop_s"] + rep["start_s"]
                                              + rep["first_token_s"])
    assert rep["start_s"] >= rep["new_start_info"]["build_s"] > 0
    assert res["from_tp"] == 1 and res["to_tp"] == 2


def _synthetic_table(lib: ProfileLibrary) -> dict:
    """llama2-70b TP4 prefill 1.5x slower than the shipped profile, the rest equal; 8B TP2 new."""
    p = lib.get("llama2-70b", "h100", 4)
    tok = [256, 1024, 2048, 4000]
    clk = [1980.0, 1900.0, 1800.0, 1700.0]
    bat, ctx = [1, 8, 32, 1, 8, 32], [512, 512, 512, 2048, 2048, 2048]
    phases = [{"kind": "idle", "load": 0, "power_w_mean": p.idle_power_w}]
    phases += [{"kind": "decode", "load": b, "power_w_mean": float(p.decode_power_w(b, 1980.0)),
                "sm_clock_mhz_median": 1980.0} for b in (8, 64)]

    def entry(model: str, tp: int, prof) -> dict:
        return {"model": model, "gpu": "h100", "tp": tp,
                "prefill": {"tokens": tok, "sm_clock_mhz": clk,
                            "time_s": (1.5 * prof.prefill_time_s(tok, clk)).tolist()},
                "decode": {"batch": bat, "ctx_tokens": ctx,
                           "time_s": prof.decode_iter_time_s(bat, ctx, 1980.0).tolist()},
                "power": {"idle_w_per_gpu": p.idle_power_w, "phases": phases}}

    return {"schema": compare_profiles.TABLE_SCHEMA,
            "provenance": {"command": "synthetic", "date_utc": "2026-11-25", "gpu_name": "test",
                           "driver": "none"},
            "entries": [entry("llama2-70b", 4, p),
                        entry("llama3-8b", 2, lib.get("llama3-8b", "h100", 1))]}


def test_compare_profiles_prints_differences_and_refits(tmp_path, capsys):
    pdir = tmp_path / "profiles"
    shutil.copytree(DEFAULT_PROFILE_DIR, pdir)
    lib = ProfileLibrary.load(pdir)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(_synthetic_table(lib)))
    assert cli_main(["compare-profiles", str(table), "--profile-dir", str(pdir)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    s70 = summary[0]
    assert s70["profile"] == "llama2-70b/h100/tp4"
    assert s70["prefill_time"] == pytest.approx(100 / 3, rel=1e-6)  # sim is 1/1.5 of measured
    assert s70["decode_time"] < 1e-6 and s70["decode_power"] < 1e-6
    assert s70["refit"] == ["prefill_time"]
    assert not (pdir / "llama3-8b_h100_tp2.json").exists()  # no --write: nothing written

    assert cli_main(["compare-profiles", str(table), "--profile-dir", str(pdir), "--write"]) == 0
    new = load_profile(pdir / "llama2-70b_h100_tp4.json")
    old = lib.get("llama2-70b", "h100", 4)
    tok = np.array([256, 1024, 2048, 4000])
    clk = np.array([1980.0, 1900.0, 1800.0, 1700.0])
    np.testing.assert_allclose(new.prefill_time_s(tok, clk), 1.5 * old.prefill_time_s(tok, clk),
                               rtol=1e-6)
    assert new.decode_d0_s == old.decode_d0_s  # agreeing quantities are left alone
    data = json.loads((pdir / "llama2-70b_h100_tp4.json").read_text())
    assert data["fit_error"]["prefill_time"]["mape_pct"] < 1e-4
    assert data["provenance"]["sources"][-1]["measured_here"]["command"] == "synthetic"
    # A measured TP with no shipped profile gets a new, valid one.
    p8 = load_profile(pdir / "llama3-8b_h100_tp2.json")
    assert p8.tp == 2 and p8.kv_capacity_tokens > lib.get("llama3-8b", "h100", 1).kv_capacity_tokens
    assert len(ProfileLibrary.load(pdir)) == len(lib) + 1


def test_compare_profiles_rejects_a_bad_table(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other", "entries": []}))
    assert cli_main(["compare-profiles", str(bad)]) == 2
    assert "field 'schema'" in capsys.readouterr().err
