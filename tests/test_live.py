"""The live control loop against the simulated backend (accelerated) and replayed recordings."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.controllers.live import (
    DecisionLog,
    Drill,
    LiveLoop,
    LiveLoopError,
    MetricsExporter,
    PowerGovernor,
    SupervisedWorker,
    build_policy,
    guarded_env,
)
from llm_cluster_gym.controllers.live.governor import GovernorError
from llm_cluster_gym.controllers.live.loop import TELEMETRY_LOST
from llm_cluster_gym.envs.backend import Telemetry
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.real.cluster import RealCluster, RealClusterConfig
from llm_cluster_gym.envs.real.fidelity import pre_history_s
from llm_cluster_gym.envs.real.telemetry import ReplayGpuDevice, load_recording
from llm_cluster_gym.envs.real.worker import InlineWorker, Request, WorkerConfig, WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
STEPS = ROOT / "envs" / "data" / "thermal" / "recordings" / "h100_steps_20261125.json.gz"
FIDELITY = ROOT / "envs" / "data" / "real" / "h100_fidelity_run.json.gz"
TINY = WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=256)


def sim_loop(tmp_path: Path, policy: str = "dynamo", drills=(), exporter=None,
             governor: PowerGovernor | None = None) -> tuple[LiveLoop, Path]:
    env = guarded_env(ClusterEnv(task="energy", scenario="small", serving_model="aggregate"))
    pol, fb = build_policy(policy, env, shield=True)
    log = tmp_path / "decisions.jsonl"
    return LiveLoop(env, pol, fb, governor=governor or PowerGovernor(), log=DecisionLog(log),
                    exporter=exporter, speed=math.inf, drills=drills), log


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sim_loop_logs_every_decision_and_exports_metrics(tmp_path):
    from prometheus_client import generate_latest

    ex = MetricsExporter(port=None)
    loop, log = sim_loop(tmp_path, exporter=ex)
    s = loop.run(seed=1, max_steps=25)
    recs = read_log(log)
    assert s.steps == 25 and len(recs) == 26 and recs[-1]["event"] == "stop"
    dec = recs[:-1]
    assert [r["step"] for r in dec] == list(range(25))
    assert all(r["latency_ms"]["decision"] >= r["latency_ms"]["policy"] >= 0 for r in dec)
    assert all(len(r["action"]) == len(loop.env.action_space.nvec) for r in dec)
    text = generate_latest(ex.registry).decode()
    for name in ("llmgym_row_gpu_power_watts", "llmgym_row_power_watts",
                 "llmgym_row_gpu_temperature_max_celsius", "llmgym_pool_queued_requests",
                 "llmgym_slo_attainment_ratio", "llmgym_decisions_total 25.0",
                 "llmgym_power_throttle_events_total", "llmgym_decision_latency_seconds_bucket"):
        assert name in text
    assert "llmgym_gpu_power_watts" not in text  # per-GPU series only on request
    # The exported row power is the telemetry the last decision saw.
    got = ex.registry.get_sample_value("llmgym_row_power_watts", {"row": "0"})
    assert got == pytest.approx(dec[-1]["row_power_w"][0], rel=1e-5)
    assert ex.registry.get_sample_value("llmgym_requests_total", {"outcome": "arrived"}) == sum(
        r["interval"]["arrived"] for r in dec)
    totals = recs[-1]["totals"]
    assert totals["arrived"] == sum(r["interval"]["arrived"] for r in dec)
    # The loop records its episode like every offline run (EpisodeResult and its summary).
    assert s.episode is not None and s.episode.n_intervals == 25
    assert s.episode.metrics["arrived"].tolist() == [r["interval"]["arrived"] for r in dec]
    assert recs[-1]["summary"]["requests_arrived"] == totals["arrived"]
    # The totals carry the episode's SLO attainment (every arrival counted).
    assert totals["slo_attainment"] == pytest.approx(recs[-1]["summary"]["slo_attainment"])
    assert 0.0 <= totals["slo_attainment"] <= totals["finished"] / totals["arrived"]
    assert recs[-1]["backend_closed"] is True and recs[-1]["gpu_settings_changed"] is None


def test_telemetry_loss_holds_the_shield_fallback(tmp_path):
    loop, log = sim_loop(tmp_path, drills=[Drill.parse("telemetry_loss@5+3")])
    s = loop.run(seed=0, max_steps=12)
    dec = read_log(log)[:-1]
    stale = [r["step"] for r in dec if r["telemetry_stale"]]
    assert stale == [5, 6, 7] and s.telemetry_errors == 3
    for r in dec[5:8]:
        assert TELEMETRY_LOST in r["faults"]
        assert any(o.startswith("emergency:power_failure") for o in r["shield_override"])
        assert r["governor"] in ("hold", "near_limit", "over_limit")
    assert not dec[8]["telemetry_stale"] and TELEMETRY_LOST not in dec[8]["faults"]


def test_policy_error_uses_logged_fallback(tmp_path):
    loop, log = sim_loop(tmp_path, drills=[Drill.parse("policy_error@3+2")])
    s = loop.run(seed=0, max_steps=8)
    dec = read_log(log)[:-1]
    assert s.policy_errors == 2 and s.steps == 8
    assert [r["fallback_used"] for r in dec] == [False] * 3 + [True] * 2 + [False] * 3
    assert "fault drill" in dec[3]["policy_error"]


class Exploding:
    """A policy that raises on every call (as a broken checkpoint would)."""

    name = "exploding"

    def reset(self) -> None:
        pass

    def act(self, observation, action_mask=None):
        raise RuntimeError("boom")


def test_policy_that_always_raises_still_acts(tmp_path):
    env = guarded_env(ClusterEnv(task="energy", scenario="small", serving_model="aggregate"))
    _, fb = build_policy("static", env, shield=True)
    loop = LiveLoop(env, Exploding(), fb, log=DecisionLog(tmp_path / "d.jsonl"))
    s = loop.run(seed=0, max_steps=4)
    assert s.steps == 4 and s.policy_errors == 4
    assert "RuntimeError: boom" in read_log(tmp_path / "d.jsonl")[0]["policy_error"]


def test_drill_parsing():
    assert Drill.parse("worker_kill@4:1") == Drill("worker_kill", 4, 1, 1)
    assert Drill.parse("telemetry_loss@2+5").active(6) and not Drill.parse("telemetry_loss@2+5").active(7)
    for bad in ("telemetry_loss", "nope@1", "policy_error@x", "policy_error@1+0"):
        with pytest.raises(LiveLoopError):
            Drill.parse(bad)
    env = guarded_env(ClusterEnv(task="energy", scenario="small", serving_model="aggregate"))
    pol, fb = build_policy("static", env)
    with pytest.raises(LiveLoopError, match="worker_kill"):
        LiveLoop(env, pol, fb, drills=[Drill.parse("worker_kill@1")])


def tel(row_w: float, limit_w: float) -> Telemetry:
    z = np.zeros(1)
    return Telemetry(0.0, z, z, z, z.astype(bool), z.astype(bool), np.array([row_w]),
                     np.array([limit_w]), z, z, z, 20.0)


def test_governor_aimd():
    g = PowerGovernor(margin=0.9, decrease=0.5, increase=0.25, floor=0.05, smoothing=1.0)
    assert g.decide(tel(100, 500)).reason == "hold" and g.admit_fraction == 1.0
    d = g.decide(tel(470, 500))
    assert d.reason == "near_limit" and d.admit_fraction == 0.5 and d.power_ratio == pytest.approx(0.94)
    assert g.decide(tel(510, 500)).admit_fraction == 0.0
    assert g.decide(tel(470, 500)).admit_fraction == 0.0  # stays shut until under the target
    assert g.decide(tel(100, 500), stale=True).reason == "hold"
    assert [g.decide(tel(100, 500)).admit_fraction for _ in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(GovernorError, match="margin"):
        PowerGovernor(margin=1.5)
    # Smoothed: one burst near the limit does not shed load; a reading over the limit does.
    s = PowerGovernor(margin=0.9, smoothing=0.5)
    assert s.decide(tel(400, 500)).reason == "hold"
    assert s.decide(tel(490, 500)).reason == "hold"  # smoothed ratio 0.89
    assert s.decide(tel(490, 500)).reason == "near_limit"  # 0.935
    assert s.decide(tel(501, 500)).admit_fraction == 0.0


def replay_cluster(duration_s: float = 2.0, drills=(), factory=None) -> RealCluster:
    factory = factory or (lambda: InlineWorker(TINY))
    w = SupervisedWorker(factory, name="gpu0")
    w.siblings = [w]
    cfg = RealClusterConfig(worker=TINY, duration_s=duration_s, control_interval_s=0.25,
                            rate_rps=20.0, power_budget_w=550.0, budget_drills=drills,
                            trace_start_s=1200.0)
    # 40 s into the recorded H100 run's replay (its telemetry starts before, at idle).
    offset_s = pre_history_s(load_recording(FIDELITY)) + 40.0
    return RealCluster(cfg, devices=[ReplayGpuDevice(FIDELITY, start_offset_s=offset_s)],
                       workers=[w])


@pytest.mark.slow
def test_real_backend_replay_budget_drill_worker_kill(tmp_path):
    cl = replay_cluster(2.0, drills=((0.5, 1.0, 300.0),))
    env = guarded_env(ClusterEnv(task="energy", backend=cl))
    pol, fb = build_policy("static", env)
    loop = LiveLoop(env, pol, fb, governor=PowerGovernor(), log=DecisionLog(tmp_path / "d.jsonl"),
                    drills=[Drill.parse("worker_kill@3"), Drill.parse("telemetry_loss@5")],
                    node=cl)
    s = loop.run(seed=0)
    recs = read_log(tmp_path / "d.jsonl")
    dec = recs[:-1]
    assert s.stop_reason == "episode_end" and s.steps == 8
    # The budget drill is visible to the loop as the row limit and a power emergency.
    limits = [r["row_limit_w"][0] for r in dec]
    assert 300.0 in limits and 550.0 in limits
    assert any("power_failure" in f for r in dec for f in r["faults"])
    # Replayed H100 power (~400 W serving) is over the 300 W drill budget: admission stops.
    in_drill = [r for r in dec if r["row_limit_w"][0] == 300.0 and not r["telemetry_stale"]]
    assert in_drill and all(r["admit_fraction"] == 0.0 for r in in_drill)
    kinds = [e["kind"] for e in s.worker_events]
    assert kinds[:3] == ["killed", "failed", "restarted"]
    # No request lost without a record: every id is finished, dropped or still outstanding.
    w = cl.workers[0]
    seen = {c.req_id for c in cl.log.requests if c.req_id >= 0} | set(w.outstanding)
    assert seen == set(range(cl._next_id))
    assert recs[-1]["backend_closed"] is True and recs[-1]["gpu_settings_changed"] == 0


@pytest.mark.slow
def test_supervised_process_worker_restarts_and_finishes_requests():
    w = SupervisedWorker(lambda: WorkerProcess(TINY, start_timeout_s=60), name="p0")
    try:
        now = time.time()
        w.submit([Request(i, now, 16, 8) for i in range(4)])
        w.kill()
        w.poll()  # notices the dead process: restart + resubmission
        assert [e.kind for e in w.events] == ["killed", "failed", "restarted"]
        assert w.events[-1].requests == 4
        done: list = []
        deadline = time.time() + 30
        while len(done) < 4 and time.time() < deadline:
            time.sleep(0.05)
            done += w.poll().completed
        assert sorted(c.req_id for c in done) == [0, 1, 2, 3]
        assert not any(c.dropped for c in done) and not w.outstanding
    finally:
        w.close()


def test_given_up_worker_reports_drops():
    calls = {"n": 0}

    def factory():
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("no GPU")
        return InlineWorker(TINY)

    w = SupervisedWorker(factory, name="g", max_restarts=1)
    w.submit([Request(7, time.time(), 8, 4)])
    w.kill()
    rep = w.poll()
    assert [c.req_id for c in rep.completed] == [7] and rep.completed[0].dropped
    assert [e.kind for e in w.events] == ["killed", "failed", "restart_failed", "dropped"]
    assert not w.alive


@pytest.mark.slow
def test_sigterm_stops_flushes_and_serves_metrics(tmp_path):
    log = tmp_path / "d.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "llm_cluster_gym", "deploy", "--scenario",
                          "small", "--serving-model", "aggregate", "--policy", "static",
                          "--interval-s", "0.1", "--metrics-port", "0", "--log", str(log)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         cwd=ROOT)
    try:
        line = p.stdout.readline()
        assert line.startswith("metrics on http://127.0.0.1:"), line
        url = line.split()[-1]
        deadline = time.time() + 15
        while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
            time.sleep(0.05)
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "llmgym_decisions_total" in body
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    recs = read_log(log)
    assert recs[-1]["event"] == "stop" and recs[-1]["reason"] == "SIGTERM"
    assert recs[-1]["steps"] == len(recs) - 1 >= 2
    assert json.loads(out.strip().splitlines()[-1])["stop_reason"] == "SIGTERM"


def test_dashboard_plots_only_exported_metrics():
    import re

    from prometheus_client import generate_latest

    dash = json.loads((ROOT / "controllers" / "live" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"llmgym_[a-z_]+", e)}
    ex = MetricsExporter(port=None)
    env = guarded_env(ClusterEnv(task="energy", scenario="small", serving_model="aggregate"))
    pol, fb = build_policy("static", env)
    LiveLoop(env, pol, fb, governor=PowerGovernor(), exporter=ex).run(seed=0, max_steps=2)
    text = generate_latest(ex.registry).decode()
    missing = [n for n in names if n not in text]
    assert len(names) >= 20 and not missing
    # The alert rules too (tests/test_prometheus.py evaluates both on a real server).
    import yaml

    rules = yaml.safe_load((ROOT / "controllers" / "live" / "alerts.yaml").read_text())
    alert_names = {n for g in rules["groups"] for r in g["rules"]
                   for n in re.findall(r"llmgym_[a-z_]+", r["expr"])}
    assert not [n for n in alert_names if n not in text]


@pytest.mark.slow
def test_exporter_cardinality_is_bounded_by_rows_and_pools():
    """Default: no series grows with the GPUs (medium: 1,024 GPUs); per-GPU series on request."""
    from llm_cluster_gym.controllers.live.exporter import MetricsExporter

    env = guarded_env(ClusterEnv(task="thermal", scenario="medium", serving_model="aggregate"))
    lay = env.unwrapped.layout
    sizes = {}
    for per_gpu in (False, True):
        ex = MetricsExporter(port=None, per_gpu=per_gpu)
        pol, fb = build_policy("static", env)
        LiveLoop(env, pol, fb, exporter=ex).run(seed=0, max_steps=2)
        series = [line for line in ex.publish().decode().splitlines()
                  if line and not line.startswith("#")]
        sizes[per_gpu] = len(series)
        gpu_series = [line for line in series if line.startswith("llmgym_gpu_")
                      and "slowdown" not in line]
        assert len(gpu_series) == (4 * lay.n_gpus if per_gpu else 0)
        env = guarded_env(ClusterEnv(task="thermal", scenario="medium", serving_model="aggregate"))
    assert lay.n_gpus == 1024 and sizes[False] < 400 < 4 * lay.n_gpus < sizes[True]
    # Row aggregates agree with the telemetry they summarize.
    ex = MetricsExporter(port=None)
    ex.bind(lay, 89.0)
    tel = env.unwrapped.backend.reset(seed=0)
    ex.observe_telemetry(tel)
    rows = np.repeat(lay.server_row, lay.gpus_per_server)
    for r in range(lay.n_rows):
        got = ex.registry.get_sample_value("llmgym_row_gpu_temperature_max_celsius", {"row": str(r)})
        assert got == pytest.approx(float(tel.gpu_temp_c[rows == r].max()))
        got = ex.registry.get_sample_value("llmgym_row_gpu_power_watts", {"row": str(r)})
        assert got == pytest.approx(float(tel.gpu_power_w[rows == r].sum()))
        assert ex.registry.get_sample_value("llmgym_row_gpus", {"row": str(r)}) == (rows == r).sum()


@pytest.mark.slow
def test_metrics_endpoint_serves_the_last_published_snapshot(tmp_path):
    """The endpoint is a process of its own serving whole renderings (scrapes never render)."""
    ex = MetricsExporter(port=0)
    try:
        url = f"http://127.0.0.1:{ex.port}/metrics"
        ex.decisions.inc(3)
        first = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "llmgym_decisions_total 0.0" in first  # not published yet
        body = ex.publish()
        deadline = time.time() + 5
        while urllib.request.urlopen(url, timeout=5).read() != body and time.time() < deadline:
            time.sleep(0.02)
        assert urllib.request.urlopen(url, timeout=5).read() == body
        assert b"llmgym_decisions_total 3.0" in body
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{ex.port}/other", timeout=5)
        server = ex._server
    finally:
        ex.close()
    assert server.poll() is not None  # the endpoint's process ended with the exporter
    # A port in use is the user's error: deploy exits 2 with one line, before any decision.
    from llm_cluster_gym.controllers.live.exporter import MetricsPortError

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(MetricsPortError, match=f"127.0.0.1:{port} .Address already in use"):
            MetricsExporter(port=port)
        out = subprocess.run([sys.executable, "-m", "llm_cluster_gym", "deploy", "--metrics-port",
                              str(port), "--log", str(tmp_path / "d.jsonl")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "d.jsonl").exists() or not (tmp_path / "d.jsonl").read_text()


def test_drill_analysis_of_the_committed_h100_recording():
    from llm_cluster_gym.controllers.live.report import analyse

    res, series = analyse(ROOT / "envs" / "data" / "real" / "drill" / "h100_budget_drill.json.gz")
    assert res.budget_drill_w == 300.0 and res.drill_start_s == 50.0
    assert 0 < res.time_to_under_budget_s <= 20
    assert res.mean_power_in_drill_w < res.budget_drill_w < res.power_before_w
    # Most requests were shed by admission control in the drill; drops are SLO misses (the
    # recording's own per-interval figure, from before that rule, read 1.0 here).
    assert res.dropped_fraction_in_drill > 0.5
    iv = load_recording(ROOT / "envs" / "data" / "real" / "drill" /
                        "h100_budget_drill.json.gz").extra["intervals"]
    drill = [r for r in iv if 50.0 <= r["t_rel_s"] < 110.0]
    met = sum(r["finished"] - r["slo_violations"] for r in drill)
    assert res.slo_attainment_in_drill == pytest.approx(
        met / sum(r["finished"] + r["dropped"] for r in drill))
    assert 0.0 < res.slo_attainment_in_drill < 0.5
    a = series["slo_attainment"]
    assert len(a) == len(series["interval_t_s"])
    assert np.all(np.isnan(a) | ((a >= 0.0) & (a <= 1.0))) and np.nanmin(a) == 0.0
    assert len(series["t_s"]) == len(series["power_w"]) >= 140
