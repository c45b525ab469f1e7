"""What each SaaS reconfiguration rung buys in an emergency on the TAPAS floor (issue 19).

TAPAS reconfigures SaaS instances under power and thermal emergencies, cheapest first. This
bench measures, on `tapas_dc` with the calibrated physics, what each rung does to the SaaS
servers' GPU power, SLO attainment and throughput when held for an hour, against the floor's
own configuration (Llama-3.1-70B at TP 8, 1,980 MHz):

* clock ceilings of 1,600, 1,200 and 800 MHz on every row (no one-off cost);
* TP 4 and TP 2 on the same GPUs (one-off cost: every SaaS GPU reloads its model shard, the
  profile's measured-or-estimated load time);
* the quantized model on every row (FP8; lasting cost: the scenario's cited quality loss).

Protocol: Tuesday of the 2024 week from 14:00 (the afternoon peak), 10 minutes of burn-in then
one measured hour, at the scenario's load and at twice it (a load spike), seeds 0-2 (arrivals),
aggregate serving model, VMs and cooling failures off so that only the SaaS servers draw; the
change of each rung is paired with the floor's own configuration on the same seed (mean and 95%
t-interval over seeds).

Last line, one JSON object: ``<rung>_<load>x_saas_power_change`` (fraction, negative saves) and
``<rung>_<load>x_slo_attainment`` for every rung and load, and ``cheapest_power_rung_1x``: the
rung with the lowest SaaS power at the scenario's load among those that keep SLO attainment at
least 0.99.

Usage::

    python bench/emergency_knobs.py [--seeds 0 1 2] [--hours 1]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import tyro  # noqa: E402

from llm_cluster_gym.controllers.context import ControllerContext  # noqa: E402
from llm_cluster_gym.envs.cluster_env import ClusterEnv  # noqa: E402
from llm_cluster_gym.envs.sim.cluster import SimCluster  # noqa: E402
from llm_cluster_gym.envs.sim.scenario import Scenario, load_scenario  # noqa: E402
from llm_cluster_gym.scripts.dynamo_week import DAY_S, fmt_ci, mean_ci95, window_scenario  # noqa: E402

RUNGS = ("none", "clock_1600", "clock_1200", "clock_800", "tp4", "tp2", "quantized")
"""The floor's own configuration, then each rung held alone."""


@dataclass(frozen=True)
class KnobArgs:
    """Emergency rungs on the TAPAS floor."""

    scenario: str = "tapas_dc"
    """Datacenter scenario (one SaaS pool)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (request arrivals) per rung and load."""
    hours: float = 1.0
    """Measured hours from Tuesday 14:00 (after 10 minutes of burn-in)."""
    loads: tuple[float, ...] = (1.0, 2.0)
    """Load multipliers of the scenario's request rate (2: a load spike)."""


BURN_IN_S = 600.0


def rung_scenario(base: Scenario, rung: str, load: float, hours: float) -> Scenario:
    """`base` over the measured window, SaaS only, at `load` x its rate, at the rung's TP."""
    s = window_scenario(base, 2 * DAY_S + 14 * 3600.0, BURN_IN_S, hours * 3600.0)
    pools = s.serving.pools
    if rung.startswith("tp"):
        tp, gpus = int(rung[2:]), s.datacenter.server.gpus
        servers = pools[0].n_instances * pools[0].tp // gpus
        pools = (dataclasses.replace(pools[0], tp=tp, n_instances=servers * (gpus // tp)),)
    return dataclasses.replace(
        s,
        workload=dataclasses.replace(s.workload, rps_per_gpu=s.workload.rps_per_gpu * load),
        serving=dataclasses.replace(s.serving, pools=pools),
        vms=dataclasses.replace(s.vms, arrivals_per_hour=0.0, initial_fraction=0.0),
        random_faults=dataclasses.replace(s.random_faults, per_hour=0.0))


def run_rung(base: Scenario, rung: str, load: float, hours: float, seed: int) -> dict[str, float]:
    """Hold the rung for the window; SaaS GPU power, SLO attainment and throughput measured."""
    s = rung_scenario(base, rung, load, hours)
    env = ClusterEnv(task="thermal", backend=SimCluster(s, serving_model="aggregate"))
    ctx = ControllerContext.from_env(env)
    lay = env.layout
    freqs = np.asarray(lay.freq_choices_mhz)
    cap = len(freqs) - 1
    if rung.startswith("clock_"):
        cap = int(np.flatnonzero(freqs == float(rung.split("_")[1]))[0])
    r = lay.n_rows
    action = env.codec.encode_action(ctx.action(
        None, route_level=np.full(r, 3), cap_idx=np.full(r, cap),
        quantized=np.full(r, int(rung == "quantized"))))
    saas_gpus = (lay.saas_servers[:, None] * lay.gpus_per_server + np.arange(lay.gpus_per_server)).ravel()
    env.reset(seed=seed)
    burn = int(round(BURN_IN_S / lay.control_interval_s))
    power, finished, violated, dropped, tokens, seconds = [], 0, 0, 0, 0.0, 0.0
    step, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(action)
        done = term or trunc
        step += 1
        if step <= burn:
            continue
        m = env.last_metrics
        power.append(float(env.last_telemetry.gpu_power_w[saas_gpus].sum()))
        finished += m.finished
        violated += m.slo_violations
        dropped += m.dropped
        tokens += m.tokens_generated
        seconds += m.interval_s
    resolved = finished + dropped
    load_s = ctx.profiles[int(rung[2:])].load_time_s if rung.startswith("tp") else 0.0
    return {
        "saas_power_kw": float(np.mean(power)) / 1e3,
        "slo_attainment": (finished - violated) / resolved if resolved else 1.0,
        "tokens_per_s": tokens / seconds,
        "reload_gpu_s": load_s * len(saas_gpus),
        "quality_loss": s.serving.quantized_quality_loss if rung == "quantized" else 0.0,
    }


def main() -> int:
    args = tyro.cli(KnobArgs, description=__doc__.split("\n\n")[0])
    base = load_scenario(args.scenario)
    start = time.perf_counter()
    runs = {(rung, load, seed): run_rung(base, rung, load, args.hours, seed)
            for load in args.loads for rung in RUNGS for seed in args.seeds}
    headline: dict[str, object] = {}
    print(f"{args.scenario}: Tuesday 14:00, {args.hours:g} h measured, seeds {list(args.seeds)}, SaaS only\n")
    print("| rung | load | SaaS GPU power kW | change vs floor config | SLO attainment | tokens/s "
          "| one-off reload GPU-s | quality loss |")
    print("|---|---|---|---|---|---|---|---|")
    for load in args.loads:
        ref = np.array([runs["none", load, s]["saas_power_kw"] for s in args.seeds])
        for rung in RUNGS:
            cells = [runs[rung, load, s] for s in args.seeds]
            p = np.array([c["saas_power_kw"] for c in cells])
            change = p / ref - 1.0
            slo = float(np.mean([c["slo_attainment"] for c in cells]))
            pct = fmt_ci(*mean_ci95(100 * change), 2)
            print(f"| {rung} | {load:g}x | {fmt_ci(*mean_ci95(p), 4)} | {pct}% "
                  f"| {slo:.4f} | {np.mean([c['tokens_per_s'] for c in cells]):,.0f} "
                  f"| {cells[0]['reload_gpu_s']:,.0f} | {cells[0]['quality_loss']:g} |")
            headline[f"{rung}_{load:g}x_saas_power_change"] = round(float(change.mean()), 4)
            headline[f"{rung}_{load:g}x_slo_attainment"] = round(slo, 4)
    ok = [r for r in RUNGS if headline[f"{r}_1x_slo_attainment"] >= 0.99] if 1.0 in args.loads else []
    headline["cheapest_power_rung_1x"] = (min(ok, key=lambda r: headline[f"{r}_1x_saas_power_change"])
                                          if ok else None)
    print(f"\n{time.perf_counter() - start:.0f} s")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
