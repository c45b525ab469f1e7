"""Sweep scaling: wall time of a fixed evaluation grid on Ray with 1 and with 2 workers.

The grid: static and dynamo x `small` x 4 seeds (8 cells), request-level serving, energy task,
12 warm-up intervals (what `llm-cluster sweep` runs by default). One local Ray with 2 CPUs
(no dashboard) runs it twice: one cell in flight at a time (1 worker), then two (2 workers).
Before timing, both worker processes are started and have imported the simulator (a 2-cell
warm-up sweep), so neither measurement pays Ray's worker start-up. The sweep results of the two
runs must be identical (checked). The speed-up is bounded by the cores free at the time: the
load average is printed next to the figures.

Usage::

    python bench/sweep_scaling.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from llm_cluster_gym.agents.sweep import SweepSpec, expand_grid, init_ray, run_sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="seeds per policy (cells = 2 x seeds)")
    args = p.parse_args()
    ray = init_ray(num_cpus=2, include_dashboard=False, quiet=True)
    spec = SweepSpec(task="energy", serving="request", warmup=12)
    cells = expand_grid(["static", "dynamo"], ["small"], list(range(args.seeds)))
    run_sweep(cells[:1] + cells[-1:], spec, max_in_flight=2, progress=False)  # warm both workers
    times, summaries = {}, {}
    for workers in (1, 2):
        sweep = run_sweep(cells, spec, max_in_flight=workers, progress=False)
        assert not sweep.failures, sweep.failures
        times[workers] = sweep.wall_s
        summaries[workers] = [r.summary for r in sweep.results]
        print(f"{workers} worker(s): {len(cells)} cells in {sweep.wall_s:.2f} s")
    identical = json.dumps(summaries[1]) == json.dumps(summaries[2])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; results identical: {identical}")
    ray.shutdown()
    if not identical:
        raise SystemExit("the 1-worker and 2-worker sweeps gave different results")
    print(json.dumps({"workers_1_s": round(times[1], 3), "workers_2_s": round(times[2], 3),
                      "speedup": round(times[1] / times[2], 3)}))


if __name__ == "__main__":
    main()
