"""Shipped scenarios: current model set, SLOs equal to their derivation from the physics."""

from __future__ import annotations

import json

import pytest

from llm_cluster_gym.envs.sim.profiles import ProfileLibrary
from llm_cluster_gym.envs.sim.scenario import SCENARIO_DIR, load_scenario
from llm_cluster_gym.envs.sim.slo_derivation import (
    SLO_MULTIPLE,
    derivation_comment,
    derive_slos,
    round_sig,
    uncontended_prefill_s,
)
from llm_cluster_gym.scripts import cli

SHIPPED = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_slos_are_the_derivation_and_the_file_says_how(name):
    s = load_scenario(name)
    slos = derive_slos(s)
    assert [(p.slo_ttft_s, p.slo_tbt_s) for p in s.serving.pools] == [
        (x.slo_ttft_s, x.slo_tbt_s) for x in slos]
    text = (SCENARIO_DIR / f"{name}.yaml").read_text()
    assert derivation_comment(s, slos) in text


def test_shipped_scenarios_use_the_current_model_set_on_three_gpu_types():
    models = {load_scenario(n).serving.model for n in SHIPPED}
    gpus = {load_scenario(n).serving.gpu for n in SHIPPED}
    assert {"llama-3.1-70b-instruct", "llama-3.1-8b-instruct", "qwen3-30b-a3b"} <= models
    assert {"h100", "h200", "b200"} <= gpus
    assert not models & {"llama2-70b", "llama3-8b"}  # the old tables are calibration data now


def test_derivation_is_five_times_the_fastest_uncontended_latency():
    s = load_scenario("small")
    lib = ProfileLibrary.load()
    profs = [lib.get(s.serving.model, s.serving.gpu, tp) for tp in s.serving.tp_choices]
    for x in derive_slos(s):
        best_ttft = min(uncontended_prefill_s(p, x.p90_input_tokens, 8192) for p in profs)
        best_tbt = min(float(p.decode_iter_time_s(1.0, x.decode_context_tokens, p.max_freq_mhz))
                       for p in profs)
        assert x.uncontended_ttft_s == pytest.approx(best_ttft)
        assert x.slo_ttft_s == round_sig(SLO_MULTIPLE * best_ttft)
        assert x.slo_tbt_s == round_sig(SLO_MULTIPLE * best_tbt)
    # A dense 70B is fastest at its largest TP degree; SLOs grow with the prompt.
    slos = derive_slos(s)
    assert slos[0].slo_ttft_s < slos[1].slo_ttft_s < slos[2].slo_ttft_s


def test_long_prompts_are_prefilled_in_budget_chunks():
    p = ProfileLibrary.load().get("llama-3.1-8b-instruct", "h100", 1)
    one = uncontended_prefill_s(p, 8192, 8192)
    two = uncontended_prefill_s(p, 16384, 8192)
    assert two == pytest.approx(2 * one)
    assert uncontended_prefill_s(p, 9000, 8192) > one


@pytest.mark.parametrize("value, want", [(0.0873, 0.087), (0.1449, 0.14), (12.34, 12.0), (0.0, 0.0)])
def test_round_sig(value, want):
    assert round_sig(value) == want


def test_cli_prints_the_derivation_and_checks_the_file(capsys):
    assert cli.main(["derive-slos", "--scenario", "medium"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["scenario"] == "medium" and last["file_agrees"] is True
    assert [p["pool"] for p in last["pools"]] == ["S", "M", "L"]


def test_cli_unknown_scenario_exits_2(capsys):
    assert cli.main(["derive-slos", "--scenario", "no-such-scenario"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-scenario" in err[0]
