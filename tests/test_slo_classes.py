"""Per-request SLO classes (`serving.slo_classes`): each request judged by its prompt's class.

The serving models are driven by hand on one instance (constant step times) so that every
expected count follows from the rules; the scenario tests load files and run short episodes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.scenario import ScenarioError, SloClassSpec, load_scenario
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator
from llm_cluster_gym.envs.sim.serving_aggregate import AggregateServing
from llm_cluster_gym.envs.sim.serving_request import RequestLevelServing, SlotModel
from llm_cluster_gym.envs.sim.slo_classes import SloClasses, classes_of_input_pools
from llm_cluster_gym.envs.sim.workload import DEFAULT_POOLS

ROOT = Path(__file__).resolve().parents[1]
P0_S, P1_S, ITER_S, BUDGET = 0.02, 1e-4, 0.02, 8192
LENIENT_S = 1e9


def instance() -> InstanceTable:
    """One instance on one GPU, in pool 0."""
    inst = InstanceTable.empty(np.array([0]), gpus_per_server=1)
    inst.active[0], inst.pool[0], inst.max_batch[0] = True, 0, 512
    return inst


def model() -> SlotModel:
    """Constant step times: p0 + p1 x tokens per pass, a fixed decode iteration."""
    return SlotModel(prefill_time_s=lambda tok, i: P0_S + P1_S * np.asarray(tok, dtype=float),
                     decode_iter_time_s=lambda b, c, i: np.full(len(b), ITER_S),
                     kv_capacity_tokens=np.array([1e9]))


def classes(*slos: tuple[int | None, float, float]) -> SloClasses:
    return SloClasses.from_serving(dataclasses.replace(
        load_scenario("small").serving, slo_classes=tuple(SloClassSpec(*c) for c in slos)))


# ---------------------------------------------------------------------------- request level
def _request_run(slo_classes: SloClasses | None) -> ServiceAccumulator:
    """A 6,000-token prompt then a 100-token one, both at t = 0, in one pool with a lenient SLO."""
    serving = RequestLevelServing(1, 1, BUDGET, 60.0, slo_classes=slo_classes)
    serving.add_arrivals(np.zeros(2), np.array([6000, 100]), np.array([10, 10]), np.zeros(2, dtype=np.int64))
    inst, m, acc = instance(), model(), ServiceAccumulator(1)
    for k in range(10):
        serving.tick(k * 0.5, 0.5, inst, np.array([True]), m, np.ones(1), np.array([LENIENT_S]),
                     np.array([LENIENT_S]), np.zeros(1), acc)
    assert acc.finished == 2
    return acc


def test_short_prompt_in_a_mixed_pool_is_judged_by_the_short_class():
    """The short prompt waits behind the long one's prefill (about 0.6 s): within the pool's
    lenient SLO, but past its class's 0.1 s; the long prompt meets its own class's 2 s."""
    assert _request_run(None).violations == 0
    acc = _request_run(classes((450, 0.1, LENIENT_S), (None, 2.0, LENIENT_S)))
    ttft = np.concatenate(acc.ttft_s)
    assert ttft.min() > 0.1 and ttft.max() < 2.0  # both TTFTs: the short one misses only its class's SLO
    assert acc.ttft_violations == 1 and acc.violations == 1 and acc.tbt_violations == 0
    # The TBT SLO is the class's too.
    acc = _request_run(classes((450, LENIENT_S, 1e-6), (None, LENIENT_S, LENIENT_S)))
    assert acc.tbt_violations == 1 and acc.ttft_violations == 0


# ---------------------------------------------------------------------------- aggregate
def _aggregate_run(slo_classes: SloClasses | None, prompts: tuple[int, ...], slo_ttft_s: float = 0.3,
                   ticks: int = 6) -> ServiceAccumulator:
    """Per 5 s tick, 20 requests of each prompt length in `prompts`, one instance, pool SLO given."""
    agg = AggregateServing(1, 1, BUDGET, drop_after_s=600.0, slo_classes=slo_classes)
    inst, m, acc = instance(), model(), ServiceAccumulator(1)
    n = 20
    for k in range(ticks):
        for p in prompts:
            agg.add_arrivals(np.full(n, k * 5.0), np.full(n, p), np.full(n, 50), np.zeros(n, dtype=np.int64))
        agg.tick(k * 5.0, 5.0, inst, np.array([True]), m, np.ones(1), np.array([slo_ttft_s]),
                 np.array([0.05]), np.zeros(1), acc)
    assert acc.finished > 0
    return acc


def _counts(acc: ServiceAccumulator) -> tuple:
    return acc.finished, acc.ttft_violations, acc.tbt_violations, acc.violations


def test_aggregate_pool_of_one_class_equals_the_figure_without_classes_exactly():
    """Every prompt in one class whose SLOs are the pool's: the same counts, bit for bit."""
    plain = _aggregate_run(None, (2000,))
    assert 0 < plain.ttft_violations < plain.finished  # the test exercises partial misses
    one = _aggregate_run(classes((450, 0.01, 0.01), (None, 0.3, 0.05)), (2000,))
    assert _counts(one) == _counts(plain)
    assert [a.tolist() for a in one.ttft_s] == [a.tolist() for a in plain.ttft_s]


def test_aggregate_mixed_pool_is_the_share_weighted_sum_over_classes():
    """A cohort of 1 short : 3 long prompts. A class that nobody can meet (TTFT SLO 1 us)
    misses exactly its share; a lenient one adds nothing."""
    prompts = (100, 3000, 3000, 3000)
    short_only = _aggregate_run(classes((450, 1e-6, LENIENT_S), (None, LENIENT_S, LENIENT_S)), prompts)
    assert short_only.ttft_violations == pytest.approx(0.25 * short_only.finished, rel=1e-12)
    long_only = _aggregate_run(classes((450, LENIENT_S, LENIENT_S), (None, 1e-6, LENIENT_S)), prompts)
    assert long_only.ttft_violations == pytest.approx(0.75 * long_only.finished, rel=1e-12)
    # TBT: the cohort's TBT against each class's TBT SLO.
    tbt = _aggregate_run(classes((450, LENIENT_S, 1e-6), (None, LENIENT_S, LENIENT_S)), prompts)
    assert tbt.tbt_violations == pytest.approx(0.25 * tbt.finished, rel=1e-12)


def test_aggregate_class_ttft_base_is_its_own_prompt():
    """One SLO for both classes: the short class (its own shorter prefill) misses less than the
    long one, and the mixed pool's figure lies between the two."""
    prompts = (100, 3000)
    slo = 0.25
    short_miss = _aggregate_run(classes((450, slo, LENIENT_S), (None, LENIENT_S, LENIENT_S)), prompts)
    long_miss = _aggregate_run(classes((450, LENIENT_S, LENIENT_S), (None, slo, LENIENT_S)), prompts)
    both = _aggregate_run(classes((450, slo, LENIENT_S), (None, slo, LENIENT_S)), prompts)
    assert short_miss.ttft_violations < long_miss.ttft_violations
    assert both.ttft_violations == pytest.approx(short_miss.ttft_violations + long_miss.ttft_violations,
                                                 rel=1e-12)


# ---------------------------------------------------------------------------- scenarios
@functools.cache
def _small_data() -> dict:
    return yaml.safe_load((ROOT / "envs" / "scenarios" / "small.yaml").read_text())


def _write(tmp_path: Path, slo_classes) -> Path:
    data = copy.deepcopy(_small_data())
    data["serving"]["slo_classes"] = slo_classes
    path = tmp_path / "mutant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _cls(below, ttft=0.1, tbt=0.1) -> dict:
    return {"input_tokens_below": below, "slo_ttft_s": ttft, "slo_tbt_s": tbt}


BOUND = "serving.slo_classes[{}].input_tokens_below"


@pytest.mark.parametrize(("classes_yaml", "field", "value"), [
    ([_cls(450)], BOUND.format(0), "450"),
    ([_cls(None), _cls(None)], BOUND.format(0), "None"),
    ([_cls(450), _cls(450), _cls(None)], BOUND.format(1), "450"),
    ([_cls(0), _cls(None)], BOUND.format(0), "0"),
    ([_cls(None, ttft=0.0)], "serving.slo_classes[0].slo_ttft_s", "0.0"),
    ([{"input_tokens_below": None, "slo_ttft_s": 0.1}], "serving.slo_classes[0].slo_tbt_s", None),
    ([{**_cls(None), "pool": 1}], "serving.slo_classes[0].pool", "1"),
], ids=["last-bounded", "middle-null", "not-increasing", "zero-bound", "zero-slo", "missing-tbt",
        "unknown-key"])
def test_bad_classes_are_refused_naming_file_field_and_value(tmp_path, classes_yaml, field, value):
    path = _write(tmp_path, classes_yaml)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg, msg
    if value is not None:
        assert value in msg, msg


def test_cli_exits_2_on_bad_classes(tmp_path):
    path = _write(tmp_path, [_cls(450)])
    res = subprocess.run([sys.executable, "-m", "llm_cluster_gym", "simulate", "--scenario", str(path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "serving.slo_classes[0].input_tokens_below" in lines[0], res.stderr


def test_classes_of_input_pools_reuse_the_pool_edges_and_slos():
    s = load_scenario("dynamo_week")
    got = classes_of_input_pools(s.serving, "by_input")
    assert [c.input_tokens_below for c in got] == [*DEFAULT_POOLS.input_edges, None]
    assert [(c.slo_ttft_s, c.slo_tbt_s) for c in got] == [(p.slo_ttft_s, p.slo_tbt_s)
                                                          for p in s.serving.pools]
    nine = dataclasses.replace(s.serving, pools=s.serving.pools * 3)
    with pytest.raises(ScenarioError, match="output length"):
        classes_of_input_pools(nine, "default")


@pytest.mark.parametrize("serving_model", ["aggregate", "request"])
def test_by_input_pools_judged_by_their_own_classes_score_exactly_as_without(serving_model):
    """Classes equal to the pools (each pool one class with its SLOs): the same episode, bit for bit."""
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.rollout import run_episode
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    s = load_scenario("small").with_overrides(duration_s=60.0)
    with_cls = s.with_overrides(serving=dataclasses.replace(
        s.serving, slo_classes=classes_of_input_pools(s.serving, "by_input")))
    out = []
    for sc in (s, with_cls):
        env = ClusterEnv(task="energy", backend=SimCluster(sc, serving_model=serving_model))
        out.append(run_episode(env, None, 0).summary())
    assert out[0] == out[1]
