"""SLO attainment counts every arrival: serving nothing is 0, never 1.

Dropped requests, and the requests still in flight when the episode ends, are violations; an
interval judges the requests it resolved (finished or dropped). Checked on the definition
itself (`envs.backend.slo_attainment`), on episodes of both serving models where nothing is
served, on the reward, and with hypothesis on random scenarios and actions: the episode's
attainment is never above its served fraction.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_cluster_gym.agents.evaluate import EpisodeStats
from llm_cluster_gym.envs.backend import ClusterAction, slo_attainment
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.episode import METRIC_BY_KEY, EpisodeRecorder, EpisodeResult
from llm_cluster_gym.envs.rollout import run_episode
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import Scenario, load_scenario

SERVING_MODELS = ("request", "aggregate")


def scenario(duration_s: float = 200.0, n_instances: int | None = None, drop_after_s: float = 60.0,
             rps_per_gpu: float | None = None) -> Scenario:
    """`small` cut to `duration_s`, optionally with every pool at `n_instances` TP-4 instances."""
    s = load_scenario("small")
    sv = dataclasses.replace(s.serving, drop_after_s=drop_after_s)
    if n_instances is not None:
        sv = dataclasses.replace(sv, pools=tuple(dataclasses.replace(p, n_instances=n_instances, tp=4)
                                                 for p in sv.pools))
    w = s.workload if rps_per_gpu is None else dataclasses.replace(s.workload,
                                                                   rps_per_gpu=rps_per_gpu)
    return s.with_overrides(duration_s=duration_s, serving=sv, workload=w)


def held_episode(s: Scenario, serving_model: str, seed: int = 0,
                 action: ClusterAction | None = None) -> EpisodeResult:
    """One episode of the scenario's configuration (after `action`, if given) through the env."""
    env = ClusterEnv(task="energy", backend=SimCluster(s, serving_model=serving_model))
    if action is None:
        return run_episode(env, None, seed, seed_backend=True)
    env.reset(seed=seed, options={"backend_seed": seed})
    env.backend.apply(action)
    rec = EpisodeRecorder(env.backend.describe(), seed, "held")
    truncated = False
    while not truncated:
        _, reward, _, truncated, _ = env.step(None)
        rec.record(env.last_metrics, env.last_telemetry, reward)
    return rec.result()


def assert_attainment_bounded(r: EpisodeResult) -> float:
    """The summary's attainment is in [0, 1] and never above the served fraction; returns it."""
    s = r.summary()
    a = s["slo_attainment"]
    assert 0.0 <= a <= 1.0
    assert a <= s["requests_finished"] / s["requests_arrived"]
    judged = s["requests_finished"] + s["requests_dropped"] + r.metrics["in_flight"][-1]
    assert a <= s["requests_finished"] / judged
    # The same definition; the totals are summed in another order (Python's sum interval by
    # interval against numpy's pairwise sum), which may differ in the last bit with the fluid
    # model's fractional counts.
    assert EpisodeStats.from_result(r).slo_attainment == pytest.approx(a, rel=1e-12, abs=1e-15)
    return a


# ---------------------------------------------------------------------------- the definition


def test_definition_counts_drops_and_unserved_requests():
    assert slo_attainment(100, 10, 0) == pytest.approx(0.9)
    assert slo_attainment(100, 10, 50) == pytest.approx(90 / 150)
    assert slo_attainment(100, 10, 50, unserved=50) == pytest.approx(90 / 200)
    assert slo_attainment(0, 0, 0, unserved=1600, arrived=1600) == 0.0  # nothing served
    assert slo_attainment(0, 0, 1600) == 0.0  # everything dropped
    assert math.isnan(slo_attainment(0, 0, 0))  # no request at all
    # A window that began with requests in flight judges them too (never above 1).
    assert slo_attainment(120, 0, 0, unserved=0, arrived=100) == 1.0
    assert slo_attainment(100, 0, 0, unserved=0, arrived=120) == pytest.approx(100 / 120)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(finished=st.floats(0, 1e6), bad=st.floats(0, 1), dropped=st.floats(0, 1e6),
       unserved=st.floats(0, 1e6), arrived=st.floats(0, 3e6))
def test_definition_is_never_above_the_served_fraction(finished, bad, dropped, unserved, arrived):
    violations = finished * bad
    a = slo_attainment(finished, violations, dropped, unserved, arrived)
    judged = max(finished + dropped + unserved, arrived)
    if judged == 0:
        assert math.isnan(a)
        return
    assert 0.0 <= a <= 1.0
    assert a <= finished / judged
    if arrived > 0:
        assert a <= finished / arrived


def test_interval_attainment_is_one_when_nothing_resolved_and_counts_drops():
    r = held_episode(scenario(duration_s=100.0, n_instances=0), "request")
    m = r.metrics
    idle = (m["finished"] == 0) & (m["dropped"] == 0)
    assert idle.any() and (m["slo_attainment"][idle] == 1.0).all()
    assert ((m["dropped"] > 0) <= (m["slo_attainment"] == 0.0)).all()
    assert METRIC_BY_KEY["slo_attainment"].label == "SLO attainment (all arrivals)"


# ---------------------------------------------------------------------------- nothing served


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_every_pool_at_zero_instances_attains_zero(serving_model):
    """No instance at all: every arrival is dropped `drop_after_s` later or left in flight."""
    r = held_episode(scenario(n_instances=0), serving_model)
    s = r.summary()
    assert s["requests_arrived"] > 500 and s["requests_finished"] == 0.0
    assert s["slo_attainment"] == 0.0  # it read 1.0 before drops and the unserved counted
    assert s["requests_dropped"] > 0.5 * s["requests_arrived"]  # the fluid model drops too
    assert EpisodeStats.from_result(r).slo_attainment == 0.0
    # Once the first requests are dropped, every interval attains 0 and the reward charges it.
    first_drop = int(np.argmax(r.metrics["dropped"] > 0))
    assert first_drop * r.interval_s <= 60.0 + 2 * r.interval_s
    assert (r.metrics["slo_attainment"][first_drop:] == 0.0).all()


def test_admission_refusing_everything_attains_zero():
    r = held_episode(scenario(duration_s=60.0), "request", action=ClusterAction(admit_fraction=0.0))
    s = r.summary()
    assert s["requests_dropped"] == s["requests_arrived"] > 0
    assert s["slo_attainment"] == 0.0
    assert (r.metrics["slo_attainment"] == 0.0).all()


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_last_reward_charges_requests_still_in_flight(serving_model):
    env = ClusterEnv(task="energy", backend=SimCluster(scenario(duration_s=100.0, n_instances=0),
                                                       serving_model=serving_model))
    env.reset(seed=0)
    costs, truncated = [], False
    while not truncated:
        _, _, _, truncated, info = env.step(None)
        costs.append(info["cost_slo"])
    m = env.last_metrics
    assert m.in_flight > 0 and m.finished == 0
    assert costs[0] == 0.0  # the first interval resolved nothing: no miss yet
    assert costs[-1] == 1.0  # the last one judges everything left waiting as missed
    # On a served episode, the last interval's cost counts its unserved requests as misses.
    env = ClusterEnv(task="energy", backend=SimCluster(scenario(duration_s=30.0),
                                                       serving_model=serving_model))
    env.reset(seed=0)
    truncated = False
    while not truncated:
        _, _, _, truncated, info = env.step(None)
    m = env.last_metrics
    judged = m.finished + m.dropped + m.in_flight
    assert m.in_flight > 0
    assert info["cost_slo"] == pytest.approx((m.slo_violations + m.dropped + m.in_flight) / judged)


# ---------------------------------------------------------------------------- hypothesis


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(serving_model=st.sampled_from(SERVING_MODELS), seed=st.integers(0, 2**31 - 1),
       n_instances=st.integers(0, 2), rps_per_gpu=st.floats(0.05, 2.0),
       drop_after_s=st.floats(2.0, 60.0), admit_fraction=st.floats(0.0, 1.0),
       max_batch=st.sampled_from([32, 256]))
@pytest.mark.slow
def test_episode_attainment_is_never_above_the_served_fraction(
        serving_model, seed, n_instances, rps_per_gpu, drop_after_s, admit_fraction, max_batch):
    s = scenario(duration_s=40.0, n_instances=n_instances, drop_after_s=drop_after_s,
                 rps_per_gpu=rps_per_gpu)
    pools = tuple(dataclasses.replace(p, max_batch=max_batch) for p in s.serving.pools)
    s = s.with_overrides(serving=dataclasses.replace(s.serving, pools=pools))
    r = held_episode(s, serving_model, seed, ClusterAction(admit_fraction=admit_fraction))
    a = assert_attainment_bounded(r)
    if r.summary()["requests_finished"] == 0:
        assert a == 0.0
    assert ((r.metrics["slo_attainment"] >= 0.0) & (r.metrics["slo_attainment"] <= 1.0)).all()
