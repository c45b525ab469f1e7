"""Decision latency of the live loop: telemetry read to action applied, and the policy alone.

Runs the live control loop (``controllers/live``) against the simulated backend as fast as
possible (the simulation's interval is not counted: only the time from the telemetry
snapshot to the backend's ``apply`` returning), with a shielded rule-based policy and the
power governor, for ``--steps`` decisions after ``--warmup``. Prints P50/P99 of the decision
latency, of the policy's ``act`` (shield included) and the loop's overhead per interval.

Then, on ``--scrape-scenario`` (``medium``: 1,024 GPUs), the same loop with its Prometheus
endpoint on, twice: alone, and while a scraper process fetches ``/metrics`` back to back over
one keep-alive connection (far harder than any Prometheus scrape interval). Scraping must not
slow decisions: the goal is a scraped decision P99 within 1.5x of the unscraped one.

The last line is one JSON object; ``p50_ms``/``p99_ms`` are the decision latency on
``--scenario``; ``scrape`` holds the scraped/unscraped figures.

Usage: ``python bench/decision_latency.py [--scenario small] [--policy dynamo] [--steps 300]
[--scrape-scenario medium] [--scrape-steps 300]`` (``--scrape-scenario none`` skips it)
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing as mp
import platform
import time
from typing import Any

import numpy as np


def scrape_forever(port: int, stop: Any, count: Any, nbytes: Any) -> None:
    """Fetch /metrics back to back (one keep-alive connection) until `stop` is set."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    n = size = 0
    while not stop.is_set():
        try:
            conn.request("GET", "/metrics")
            size = len(conn.getresponse().read())
            n += 1
        except (OSError, http.client.HTTPException):  # the endpoint closed (episode end)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            time.sleep(0.01)
    count.value, nbytes.value = n, size


def measure(scenario: str, task: str, policy_spec: str, serving: str, steps: int, warmup: int,
            exporter: Any = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Decision and policy latencies (ms, after the warm-up) and the wall time (s).

    ``exporter`` (a callable) makes each episode's metrics exporter: the loop closes its
    exporter when its episode ends.
    """
    from llm_cluster_gym.controllers.live import (
        DecisionLog,
        LiveLoop,
        PowerGovernor,
        build_policy,
        guarded_env,
    )
    from llm_cluster_gym.envs.cluster_env import ClusterEnv

    env = guarded_env(ClusterEnv(task=task, scenario=scenario, serving_model=serving))
    policy, fallback = build_policy(policy_spec, env, shield=True)
    dec_s: list[float] = []
    pol_s: list[float] = []
    t = time.perf_counter()
    seed = 0
    while len(dec_s) < steps + warmup:  # episodes until enough decisions
        loop = LiveLoop(env, policy, fallback, governor=PowerGovernor(), log=DecisionLog(None),
                        exporter=exporter() if exporter is not None else None, speed=math.inf)
        s = loop.run(seed=seed, max_steps=steps + warmup - len(dec_s))
        dec_s += s.decision_latency_s
        pol_s += s.policy_latency_s
        seed += 1
    return (np.array(dec_s[warmup:]) * 1e3, np.array(pol_s[warmup:]) * 1e3,
            time.perf_counter() - t)


def scraped(a: argparse.Namespace) -> dict[str, Any]:
    """Decision latency on `a.scrape_scenario` with the endpoint on, unscraped and scraped."""
    from llm_cluster_gym.controllers.live import MetricsExporter

    out: dict[str, Any] = {"scenario": a.scrape_scenario}
    port = MetricsExporter(port=0)
    port.close()
    port = port.port  # each episode's endpoint binds this port again (the scraper reconnects)
    for scrape in (False, True):
        made: list[Any] = []

        def exporter(made: list[Any] = made) -> Any:
            made.append(MetricsExporter(port=port))
            return made[-1]

        ctx = mp.get_context("spawn")
        stop, count, nbytes = ctx.Event(), ctx.Value("l", 0), ctx.Value("l", 0)
        proc = None
        if scrape:
            proc = ctx.Process(target=scrape_forever, args=(port, stop, count, nbytes),
                               daemon=True)
            proc.start()
        try:
            dec, _, wall = measure(a.scrape_scenario, a.task, a.policy, a.serving_model,
                                   a.scrape_steps, a.warmup, exporter=exporter)
        finally:
            stop.set()
            if proc is not None:
                proc.join(timeout=30)
        body = made[-1].publish()
        key = "scraped" if scrape else "unscraped"
        out[f"{key}_p50_ms"] = round(float(np.percentile(dec, 50)), 3)
        out[f"{key}_p99_ms"] = round(float(np.percentile(dec, 99)), 3)
        if scrape:
            out["scrapes"] = int(count.value)
            out["scrapes_per_s"] = round(count.value / wall, 1)
        out["scrape_bytes"] = int(nbytes.value) or len(body)
        out["series"] = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
    out["p99_ratio"] = round(out["scraped_p99_ms"] / out["unscraped_p99_ms"], 3)
    out["goal_met"] = out["p99_ratio"] <= 1.5
    return out


def main() -> None:
    """Run and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="small")
    p.add_argument("--task", default="energy")
    p.add_argument("--policy", default="dynamo")
    p.add_argument("--serving-model", default="aggregate")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--scrape-scenario", default="medium")
    p.add_argument("--scrape-steps", type=int, default=300)
    a = p.parse_args()
    dec, pol, wall = measure(a.scenario, a.task, a.policy, a.serving_model, a.steps, a.warmup)
    print(f"{a.scenario}/{a.task}, shield({a.policy}) + governor, {len(dec)} decisions, "
          f"{platform.processor() or platform.machine()}; wall {wall:.1f} s incl. simulation")
    out: dict[str, Any] = {"policy_p50_ms": round(float(np.percentile(pol, 50)), 3),
                           "policy_p99_ms": round(float(np.percentile(pol, 99)), 3),
                           "p50_ms": round(float(np.percentile(dec, 50)), 3),
                           "p99_ms": round(float(np.percentile(dec, 99)), 3)}
    if a.scrape_scenario != "none":
        out["scrape"] = scraped(a)
        s = out["scrape"]
        print(f"{a.scrape_scenario}: decision P99 {s['unscraped_p99_ms']} ms unscraped, "
              f"{s['scraped_p99_ms']} ms under {s['scrapes_per_s']} scrapes/s of "
              f"{s['scrape_bytes']} B ({s['series']} series): {s['p99_ratio']}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
