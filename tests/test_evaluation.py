from pathlib import Path

import pytest

from llm_cluster_gym.agents.config import WINDOWS
from llm_cluster_gym.agents.evaluation import (
    AGENT,
    SHIELDED_AGENT,
    TaskPlan,
    evaluate_task,
    format_table,
    windowed,
    write_evaluation,
)

ROOT = Path(__file__).resolve().parent.parent


def test_windowed_scenario_draws_from_the_held_out_window():
    sc = windowed("small", "test")
    assert (sc.workload.start_s, sc.workload.window_s) == WINDOWS["test"]
    train = windowed("small", "train")
    assert train.workload.start_s + train.workload.window_s <= sc.workload.start_s


@pytest.mark.slow
def test_evaluation_runs_agent_shielded_agent_and_baselines_and_writes_report(tmp_path):
    plan = TaskPlan("thermal", ROOT / "checkpoints/thermal", "small_tapas_high", ("unaware",),
                    "unaware")
    ev = evaluate_task(plan, seeds=(0,), warmup=12)
    assert list(ev.runs) == [SHIELDED_AGENT, AGENT, "unaware"]
    for runs in ev.runs.values():
        assert len(runs.summaries) == 1 and runs.summaries[0]["energy_kwh"] > 0
    ratios = ev.ratios()
    assert ratios["unaware"]["energy_kwh_vs_unaware"] == pytest.approx(1.0)
    # the raw agent never has shield overrides; the shielded one reports its count
    assert ev.runs[AGENT].stat("shield_overrides")[0] == 0
    table = format_table(ev)
    assert "shield:agent" in table and "energy kwh vs unaware" in table
    path = write_evaluation([ev], tmp_path / "eval", command="test")
    text = path.read_text()
    assert "held out from training" in text and "The shield stepped in" in text
    pngs = sorted(p.name for p in (tmp_path / "eval").glob("*.png"))
    assert pngs == ["thermal_small_tapas_high_over_time.png", "thermal_small_tapas_high_pareto.png"]
    for p in pngs:
        assert (tmp_path / "eval" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_with_wrong_task_for_the_checkpoint_is_refused():
    plan = TaskPlan("energy", ROOT / "checkpoints/thermal", "small", ("static",), "static")
    with pytest.raises(ValueError, match="checkpoint task is 'thermal'"):
        evaluate_task(plan, seeds=(0,))


def test_overrides_during_declared_emergencies_are_counted_apart():
    """During `small_faults`' cooling failure the shield applies its emergency fallback whatever
    the policy proposes: the shipped thermal agent is overridden only then (none avoidable);
    the unaware baseline is overridden then and, for its placements and clocks, outside it; on
    `small_tapas_high` (no fault) every override of it is avoidable."""
    from llm_cluster_gym.controllers.policy_spec import make_policy
    from llm_cluster_gym.envs.rollout import run_measured
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    def counts(scenario: str, policy: str) -> tuple[float, float, int]:
        measured, s = run_measured("thermal", load_scenario(scenario), "aggregate",
                                   lambda env: make_policy(policy, env, 0, same_scenario=False), 0, 12)
        emergency_only = sum(bool(o) and all(r.startswith("emergency:") for r in o)
                             for o in measured.shield_overrides)
        return s["shield_overrides"], s["shield_overrides_avoidable"], emergency_only

    agent = f"shield:ckpt:{ROOT / 'checkpoints/residual_thermal'}"
    total, avoidable, emergency_only = counts("small_faults", agent)
    assert total > 0 and avoidable == 0 and emergency_only == total
    total, avoidable, emergency_only = counts("small_faults", "shield:unaware")
    assert 0 < avoidable < total and avoidable + emergency_only == total
    total, avoidable, emergency_only = counts("small_tapas_high", "shield:unaware")
    assert total > 0 and avoidable == total and emergency_only == 0
