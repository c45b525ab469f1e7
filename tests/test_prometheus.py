"""The live controller scraped by a real Prometheus server: dashboard queries, alert rules, values.

Needs Debian's ``prometheus`` package (``prometheus`` and ``promtool`` on PATH; ``.ci/run``
installs it). The server runs on 127.0.0.1 on a free port with a generated configuration and a
temporary storage folder; the controller is ``llm-cluster deploy`` on ``small`` in a subprocess
with a policy-error drill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LIVE = ROOT / "controllers" / "live"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the prometheus and promtool binaries are not installed (Debian: apt-get install "
           "prometheus; .ci/run installs them)")
pytestmark = [pytest.mark.integration, needs_prometheus]

INTERVAL_S = 0.4
"""Wall seconds per control interval of the deployed controller (scrapes every second)."""
DRILL = (12, 10)
"""The policy-error drill: first decision and length."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_exprs() -> list[str]:
    dash = json.loads((LIVE / "grafana_dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((LIVE / "alerts.yaml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


def test_promtool_accepts_the_alert_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(LIVE / "alerts.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout + out.stderr
    names = {r["alert"] for r in alert_rules()}
    assert {"LLMGymRowOverLimit", "LLMGymGPUPastSlowdown", "LLMGymSLOAttainmentLow",
            "LLMGymShieldFallback"} <= names


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping one target every second."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        self.started = time.time()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(LIVE / "alerts.yaml")],
            "scrape_configs": [{"job_name": "llmgym",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.wait_for(lambda: self.get("/-/ready", raw=True) is not None, 30, "Prometheus ready")

    def get(self, path: str, raw: bool = False, **params: object) -> object:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query; asserts that it parsed and ran."""
        params: dict[str, object] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        res = self.get("/api/v1/query", **params)
        assert res is not None and res["status"] == "success", (expr, res)
        return res["data"]["result"]

    def wait_for(self, cond, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Prometheus exited: {Path(self.log.name).read_text()}")
            if cond():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def samples(result: list[dict], label: str | None = None) -> dict[str, dict[float, float]]:
    """Raw samples of a range-selector query: {label value: {timestamp: value}}."""
    return {(r["metric"].get(label, "") if label else ""): {float(t): float(v) for t, v in r["values"]}
            for r in result}


@pytest.mark.slow
def test_dashboard_and_alerts_on_a_real_prometheus(tmp_path):
    metrics_port = free_port()
    prom = Prometheus(tmp_path, metrics_port)
    log = tmp_path / "decisions.jsonl"
    first, n = DRILL
    deploy = subprocess.Popen(
        [sys.executable, "-m", "llm_cluster_gym", "deploy", "--scenario", "small",
         "--serving-model", "aggregate", "--policy", "dynamo", "--interval-s", str(INTERVAL_S),
         "--metrics-port", str(metrics_port), "--log", str(log),
         "--drill", f"policy_error@{first}+{n}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # The fault drill fires the shield-fallback alert (rules evaluated every second).
        def fallback_firing() -> bool:
            res = prom.get("/api/v1/alerts")
            return res is not None and any(
                a["labels"]["alertname"] == "LLMGymShieldFallback" and a["state"] == "firing"
                and a["labels"].get("cause") == "policy_error" for a in res["data"]["alerts"])

        prom.wait_for(fallback_firing, 60, "the LLMGymShieldFallback alert")
        # A few more scrapes after the drill, so that rates over 1 min span several samples.
        prom.wait_for(lambda: any(float(r["value"][1]) >= first + n + 6
                                  for r in prom.query("llmgym_decisions_total")), 30,
                      "decisions after the drill")
        # Every dashboard expression parses and returns data.
        for expr in dashboard_exprs():
            assert prom.query(expr), f"dashboard query returned no data: {expr}"
        # Every alert rule was loaded and evaluates without error; each expression parses.
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == {r["alert"] for r in alert_rules()}
        assert all(r["health"] == "ok" for r in loaded.values()), loaded
        for r in alert_rules():
            prom.query(r["expr"])
        deploy.send_signal(signal.SIGTERM)
        out, _ = deploy.communicate(timeout=30)
        assert deploy.returncode == 0, out
        now = time.time()
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        dec = [r for r in recs if r["event"] == "decision"]
        assert recs[-1]["event"] == "stop" and recs[-1]["reason"] == "SIGTERM"

        # Each scrape is one decision's snapshot: llmgym_decisions_total = k says decision k - 1.
        window = f"[{int(now - prom.started) + 5}s]"
        decided = samples(prom.query(f"llmgym_decisions_total{window}", at=now))[""]
        assert len(decided) >= 6
        power = samples(prom.query(f"llmgym_row_power_watts{window}", at=now), "row")
        overrides = samples(prom.query(f"llmgym_shield_overrides_total{window}", at=now), "reason")
        fallback = samples(prom.query(f'llmgym_fallback_active{{cause="policy_error"}}{window}',
                                      at=now))[""]
        checked = 0
        for ts, k in decided.items():
            if k < 1:
                continue
            rec = dec[int(k) - 1]
            assert rec["step"] == int(k) - 1
            for row, series in power.items():  # row power: the telemetry that decision used
                assert series[ts] == pytest.approx(rec["row_power_w"][int(row)], rel=1e-6)
            for reason, series in overrides.items():  # overrides: counted over the same decisions
                assert series[ts] == sum(reason in r["shield_override"] for r in dec[:int(k)])
            assert fallback[ts] == float(rec["fallback_used"])
            checked += 1
        assert checked >= 6
        # The drill shows in the log, in the scrapes, and as the firing alert over that interval.
        assert [r["step"] for r in dec if r["fallback_used"]] == list(range(first, first + n))
        assert any(v == 1.0 for v in fallback.values())
        firing = samples(prom.query(
            f'ALERTS{{alertname="LLMGymShieldFallback",alertstate="firing"}}{window}', at=now))
        assert firing and all(t >= min(t for t, v in fallback.items() if v == 1.0)
                              for s in firing.values() for t in s)
        # The dashboard's row power at a scrape is the decision log's.
        ts = max(decided)
        rec = dec[int(decided[ts]) - 1]
        got = {r["metric"]["row"]: float(r["value"][1])
               for r in prom.query("llmgym_row_power_watts", at=ts)}
        assert got == {str(i): pytest.approx(w, rel=1e-6) for i, w in enumerate(rec["row_power_w"])}
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        prom.stop()

