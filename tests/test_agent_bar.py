"""Issue 20's bar figures (`agents/bar.py`) measure what they say on the shipped checkpoints."""

from __future__ import annotations

import math

import pytest

from llm_cluster_gym.agents import bar


def test_transfers_tells_layout_free_checkpoints_from_layout_bound_ones():
    moved = bar.transfers({"checkpoints/residual_energy": "energy", "checkpoints/energy": "energy"})
    assert set(moved["checkpoints/residual_energy"]) == set(bar.TRANSFER_SCENARIOS["energy"])
    assert all(v == "ok" for v in moved["checkpoints/residual_energy"].values())
    old = moved["checkpoints/energy"]
    assert old["small"] == "ok"  # the scenario it was trained on
    assert old["medium"].startswith("CheckpointError") and "action_nvec" in old["medium"]


@pytest.mark.slow
def test_energy_bar_holds_the_agent_against_the_least_energy_rule_that_meets_the_slo():
    from llm_cluster_gym.scripts.dynamo_week import POLICIES

    out = bar.energy_agent_bar(days=(0,), seeds=(0,), hours=0.5)
    (row,) = out["rows"]
    assert set(row["rules"]) == set(POLICIES)
    meeting = {p: r["energy_kwh"] for p, r in row["rules"].items()
               if r["slo_attainment"] >= bar.SLO_TARGET}
    assert row["best_rule"] == min(meeting, key=meeting.get)
    assert row["agent_vs_best_rule_energy"] == pytest.approx(row["agent_kwh"] / meeting[row["best_rule"]])
    assert 0.0 <= row["agent_slo_attainment"] <= 1.0
    assert 0.0 <= row["shield_override_rate"] <= 1.0
    ratio, half = out["summary"]["agent_vs_best_rule_energy"]
    assert ratio == pytest.approx(row["agent_vs_best_rule_energy"]) and math.isnan(half)  # one day


def test_a_residual_checkpoint_is_a_policy_spec_like_any_other():
    """`ckpt:` loads a residual agent as its metadata's kind says, shielded with `shield:`."""
    from llm_cluster_gym.agents.train_residual import ResidualPolicy
    from llm_cluster_gym.controllers.policy_spec import make_policy
    from llm_cluster_gym.controllers.shield import Shield
    from llm_cluster_gym.envs.cluster_env import ClusterEnv

    env = ClusterEnv(task="energy", scenario="medium", serving_model="aggregate")
    policy = make_policy("shield:ckpt:checkpoints/residual_energy", env, same_scenario=False)
    assert isinstance(policy, Shield) and isinstance(policy.inner, ResidualPolicy)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        a = policy.act(obs, None)
        assert env.action_space.contains(a)
        obs, *_ = env.step(a)


def test_every_shipped_checkpoint_runs_on_every_scenario_size_of_its_task():
    moved = bar.transfers()
    assert set(moved) == set(bar.SHIPPED)
    for directory, task in bar.SHIPPED.items():
        assert moved[directory] == {sc: "ok" for sc in bar.TRANSFER_SCENARIOS[task]}, directory
