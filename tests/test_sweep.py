from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from llm_cluster_gym.agents.sweep import (
    DRILLS,
    Cell,
    SweepError,
    SweepSpec,
    drill_scenario,
    expand_grid,
    run_cell,
    run_sweep,
    write_sweep,
)
from llm_cluster_gym.controllers.policy_spec import PolicySpecError
from llm_cluster_gym.scripts.compare import run_compare

SPEC = SweepSpec(task="energy", serving="aggregate", warmup=4)
CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "energy"


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def test_grid_order_and_unknown_drill():
    cells = expand_grid(["static", "dynamo"], ["small"], [0, 1], ["scenario", "load_spike"])
    assert len(cells) == 8
    assert cells[0] == Cell("static", "small", 0, "scenario")
    assert cells[1] == Cell("static", "small", 1, "scenario")
    assert cells[-1] == Cell("dynamo", "small", 1, "load_spike")
    with pytest.raises(SweepError, match="drills.*'meteor'"):
        expand_grid(["static"], ["small"], [0], ["meteor"])
    with pytest.raises(SweepError, match="empty"):
        expand_grid([], ["small"], [0])
    with pytest.raises(SweepError, match="task"):
        SweepSpec(task="cooking")


def test_drills_replace_faults():
    base = drill_scenario("small_faults", "scenario")
    assert len(base.faults) == 3
    assert drill_scenario("small_faults", "none").faults == ()
    spike = drill_scenario("small", "load_spike")
    (f,) = spike.faults
    assert f.kind == "load_spike" and f.magnitude == 2.0
    assert f.start_s == pytest.approx(0.75 * spike.duration_s)
    assert set(DRILLS) >= {"none", "cooling_failure", "power_failure", "load_spike"}


@pytest.mark.slow
def test_sweep_equals_cells_one_by_one(ray_local, tmp_path):
    cells = expand_grid(["static", "dynamo"], ["small"], [0, 1], ["scenario", "load_spike"])
    if (CHECKPOINT / "model.zip").exists():  # a trained policy, its files shipped to the worker
        cells.append(Cell(f"ckpt:{CHECKPOINT}", "small", 3))
    sweep = run_sweep(cells, SPEC, progress=False)
    assert not sweep.failures
    assert [r.cell for r in sweep.results] == cells
    for r in sweep.results:
        alone = run_cell(r.cell, SPEC)
        assert _same(r.summary, alone.summary), r.cell.name
    # The fault drill changes the episode, and the scenario drill is exactly scripts.compare's cell.
    by_cell = {r.cell: r.summary for r in sweep.results}
    assert by_cell[cells[0]]["energy_kwh"] != by_cell[Cell("static", "small", 0, "load_spike")]["energy_kwh"]
    for name in ("static", "dynamo"):
        ref = run_compare("energy", "small", "aggregate", [name], [1], SPEC.warmup, None)[name]
        assert _same(by_cell[Cell(name, "small", 1, "scenario")], ref)
    md = write_sweep(sweep, tmp_path, reports="none")
    assert "| static | small | load_spike | 2 |" in md.read_text()
    csv_rows = (tmp_path / "cells.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(cells)
    one = dataclasses.replace(sweep, results=sweep.results[:2])
    write_sweep(one, tmp_path / "one", reports="first-seed")
    assert [p.parent.name for p in (tmp_path / "one").glob("reports/*/report.md")] == [
        "static__small__scenario__seed0"]


def test_failed_cell_is_named_retried_once_and_others_finish(ray_local):
    # 'tapas' is a valid spec but needs row actions: the cell fails in its worker (energy task).
    cells = [Cell("tapas", "small", 0), Cell("static", "small", 0)]
    sweep = run_sweep(cells, SPEC, progress=False, log=lambda msg: None)
    assert [r.cell for r in sweep.results] == [cells[1]]
    (failure,) = sweep.failures
    assert failure.cell == cells[0] and failure.attempts == 2
    assert "tapas" in failure.error and "ValueError" in failure.error
    assert any("retrying" in e and "tapas" in e for e in sweep.events)
    assert any("FAILED" in e for e in sweep.events)


def test_malformed_policy_specs_are_refused_before_any_cell_runs():
    with pytest.raises(PolicySpecError, match="no_such_policy"):
        expand_grid(["static", "no_such_policy"], ["small"], [0])
    with pytest.raises(PolicySpecError, match="checkpoint:x"):
        run_sweep([Cell("static", "small", 0), Cell("checkpoint:x", "small", 0)], SPEC, progress=False)


def test_search_space_file_and_trial_config(tmp_path):
    from llm_cluster_gym.agents.config import load_task_config
    from llm_cluster_gym.agents.tune import TuneSpaceError, load_search_space, trial_config

    for task in ("energy", "thermal", "combined"):
        s = load_search_space(task)
        assert s.max_iterations >= s.grace_iterations >= 1 and s.space
    s = load_search_space("energy")
    cfg = trial_config(load_task_config("energy"), {"n_steps": 256, "batch_size": 512,
                                                    "net_arch": [128, 128]}, n_envs=1)
    assert cfg.algo_params.batch_size == 256 and cfg.algo_params.net_arch == (128, 128)
    assert cfg.finetune_steps == 0 and cfg.n_envs == 1
    bad = tmp_path / "space.yaml"
    bad.write_text("energy: {trial_steps: 10, report_steps: 5, grace_steps: 5, reduction_factor: 2,\n"
                   "  num_samples: 2, eval_seeds: [1], space: {learning_rate: {loguniform: [0.0, 1.0]}}}\n")
    with pytest.raises(TuneSpaceError, match=r"space.yaml.*energy.space.learning_rate.loguniform"):
        load_search_space("energy", bad)
    bad.write_text(bad.read_text().replace("learning_rate", "learning_speed"))
    with pytest.raises(TuneSpaceError, match="learning_speed"):
        load_search_space("energy", bad)
    with pytest.raises(TuneSpaceError, match="no entry for task 'thermal'"):
        load_search_space("thermal", bad)
