"""What backends tell controllers (`describe`), their per-tick history and their `close`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.live.loop import GuardedBackend, guarded_env
from llm_cluster_gym.controllers.oracle import OracleController
from llm_cluster_gym.envs.backend import ClusterBackend
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.real.cluster import RealCluster, RealClusterConfig
from llm_cluster_gym.envs.real.telemetry import ReplayGpuDevice
from llm_cluster_gym.envs.real.worker import InlineWorker, WorkerConfig
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
STEPS = ROOT / "envs" / "data" / "thermal" / "recordings" / "h100_steps_20261125.json.gz"
TINY = WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=64)


class CountingWorker(InlineWorker):
    """The inline worker, counting how often it is closed."""

    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


def _real(worker: InlineWorker | None = None) -> RealCluster:
    cfg = RealClusterConfig(worker=TINY, duration_s=2.0, control_interval_s=1.0, rate_rps=10.0,
                            power_budget_w=300.0)
    return RealCluster(cfg, devices=[ReplayGpuDevice(STEPS, start_offset_s=29.0)],
                       workers=[worker or InlineWorker(TINY)])


def test_sim_description_comes_from_the_scenario():
    c = SimCluster(load_scenario("small").with_overrides(duration_s=60))
    d = c.describe()
    assert d.layout is c.layout and d.scenario_name == "small"
    assert d.episode_intervals == 12 and d.gpu_hour_usd == pytest.approx(12.29)
    assert d.slowdown_temp_c == pytest.approx(d.thermal.slowdown_temp_c)
    assert sorted(d.profiles_by_tp) == sorted(c.layout.tp_choices)
    assert all(p.model == c.layout.model for p in d.profiles_by_tp.values())
    assert d.pool_stats.fraction.sum() == pytest.approx(1.0)
    assert len(d.pool_stats.mean_input_tokens) == c.layout.n_pools
    assert d.server.gpus == c.layout.gpus_per_server and d.server.overhead_idle_w > 0


def test_sim_arrival_oracle_counts_the_episode_trace():
    c = SimCluster(load_scenario("small").with_overrides(duration_s=60))
    c.reset(seed=4)
    oracle = c.describe().arrival_oracle
    assert oracle is not None
    rates = oracle(0.0, 12, 5.0)
    assert rates.shape == (12, c.layout.n_pools)
    # Every arrival of the episode falls in exactly one interval: rates x interval = arrivals.
    arrived = []
    while not c.done:
        arrived.append(c.advance().arrivals_per_pool)
    np.testing.assert_allclose(rates * 5.0, np.array(arrived))


def test_tick_history_only_when_recorded():
    plain = SimCluster("small")
    plain.advance()
    assert plain.tick_history() is None
    rec = SimCluster("small", record_ticks=True)
    assert rec.tick_history() is None  # no tick yet
    rec.advance()
    h = rec.tick_history()
    assert h is not None and h.row_power_w.shape == (rec.ticks_per_interval, rec.layout.n_rows)
    assert h.time_s[-1] == pytest.approx(rec.layout.control_interval_s)


def test_real_node_description_and_controller_context():
    c = _real()
    assert isinstance(c, ClusterBackend)
    d = c.describe()
    assert d.arrival_oracle is None and d.scenario_name is None
    assert d.episode_intervals == 2 and d.server.overhead_idle_w == 0.0
    assert d.pool_stats.fraction.tolist() == [1.0]
    env = ClusterEnv(task="energy", backend=c)
    ctx = ControllerContext.from_env(env)
    assert ctx.profiles[1] is d.profiles_by_tp[1] and ctx.pool_stats is d.pool_stats
    with pytest.raises(ValueError, match="future arrivals"):
        OracleController(ctx, env)
    c.close()


def test_env_close_closes_the_real_node_once():
    w = CountingWorker(TINY)
    env = ClusterEnv(task="energy", backend=_real(w))
    env.reset(seed=0)
    env.close()
    env.close()
    assert w.closes == 1


def test_guard_passes_the_protocol_only():
    env = guarded_env(ClusterEnv(task="energy", scenario="small"))
    guard = env.unwrapped.backend
    assert isinstance(guard, GuardedBackend) and isinstance(guard, ClusterBackend)
    assert guard.describe().scenario_name == "small"
    assert guard.tick_history() is None
    with pytest.raises(AttributeError):
        guard.trace  # noqa: B018  (a non-protocol attribute does not pass through)
    # The guarded env is a new env over the guard, with the original's settings.
    assert guarded_env(env) is env and env.unwrapped.task == "energy"
