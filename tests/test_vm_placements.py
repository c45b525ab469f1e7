"""Several IaaS VM placements per control interval (`vms.placements_per_interval`, issue 19).

The default (1) keeps the action and observation spaces of before (the golden digests check the
rest); with P > 1 the codec has P placement slots, the simulator places slot by slot, the
TAPAS-style controller spreads one interval's VMs over rows, first fit fills the slots, and the
shield checks the placements cumulatively.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.shield import Shield
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.controllers.unaware import UnawareController
from llm_cluster_gym.envs.actions import ActionCodec, InvalidActionError
from llm_cluster_gym.envs.backend import ClusterAction
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario

P = 3
ROOT = Path(__file__).resolve().parents[1]


@cache
def burst_scenario(placements: int = P):
    """small_tapas with 2 rows of 8 servers (4 IaaS per row), no VM at the start and a burst of arrivals."""
    sc = load_scenario("small_tapas")
    return sc.with_overrides(
        duration_s=120.0,
        datacenter=dataclasses.replace(sc.datacenter, rows=2, servers_per_rack=8),
        vms=dataclasses.replace(sc.vms, placements_per_interval=placements, arrivals_per_hour=1500.0,
                                initial_fraction=0.0))


def env_with_waiting(placements: int = P, at_least: int = P) -> tuple[ClusterEnv, np.ndarray]:
    """A thermal env stepped (holding its settings) until `at_least` VMs wait, and its observation."""
    env = ClusterEnv(task="thermal", backend=SimCluster(burst_scenario(placements), serving_model="aggregate",
                                                       auto_place_vms=False))
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        if len(env.last_telemetry.pending_vms_expected_gpu_w) >= at_least:
            return env, obs
        obs, *_ = env.step(None)
    raise AssertionError("no burst of waiting VMs")


def test_default_is_one_placement_and_the_observation_of_before():
    env = ClusterEnv(task="thermal", scenario="small_tapas")
    lay = env.layout
    assert lay.vm_placements_per_interval == 1 and env.codec.placement_slots == 1
    assert env.action_space.nvec[-1] == lay.n_servers + 1
    assert env.action_space.nvec[-2] == 2  # the last row's quantized flag: one placement dimension
    assert not any(n.startswith("vm.pending_power[") for n in env.observation_names)
    assert env.observation_names[-1] == "gpu.throttled"


def test_p_slots_in_the_spaces():
    env, obs = env_with_waiting()
    lay = env.layout
    assert lay.vm_placements_per_interval == P
    assert env.action_space.nvec[-P:].tolist() == [lay.n_servers + 1] * P
    assert env.observation_names[-(P - 1):] == ("vm.pending_power[1]", "vm.pending_power[2]")
    view = ControllerContext.from_env(env).view
    np.testing.assert_allclose(view.pending_vms_expected_gpu_w(obs),
                               env.last_telemetry.pending_vms_expected_gpu_w[:P], rtol=1e-6)


@pytest.mark.parametrize("value", [0, 33, 1.5, True])
def test_placements_per_interval_out_of_range_is_refused(value, tmp_path):
    data = yaml.safe_load((ROOT / "envs" / "scenarios" / "small_tapas.yaml").read_text())
    data["vms"]["placements_per_interval"] = value
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ScenarioError, match=r"vms\.placements_per_interval"):
        load_scenario(path)


def _codec(placements: int) -> ActionCodec:
    env = ClusterEnv(task="combined", scenario="small_tapas")
    lay = dataclasses.replace(env.layout, vm_placements_per_interval=placements)
    return ActionCodec("combined", lay, env.codec.n_saas_servers)


def test_masks_per_slot():
    codec = _codec(P)
    n = codec.layout.n_servers
    free = np.zeros(n, bool)
    free[[4, 5, 7]] = True
    for waiting, open_slots in ((0, 0), (1, 1), (2, 2), (3, 3), (5, 3)):
        legal = codec.slot_legality(free, waiting)
        assert legal.shape == (P, n)
        assert legal.any(axis=1).sum() == open_slots
        for i in range(open_slots):
            np.testing.assert_array_equal(legal[i], free)
        mask = codec.masks(legal)
        np.testing.assert_array_equal(codec.slot_legal_servers(mask), legal)
        np.testing.assert_array_equal(codec.legal_servers(mask), legal[0])
        none_legal = mask[len(mask) - P * (n + 1):].reshape(P, n + 1)[:, n]
        np.testing.assert_array_equal(none_legal, ~legal.any(axis=1))  # "no placement" only where no server
    # Fewer free servers than waiting VMs: only as many slots open as distinct servers exist.
    one = np.zeros(n, bool)
    one[6] = True
    assert codec.slot_legality(one, 3).any(axis=1).tolist() == [True, False, False]


def test_codec_round_trip_and_duplicates_with_several_slots():
    codec = _codec(P)
    n = codec.layout.n_servers
    free = np.zeros(n, bool)
    free[[4, 5, 6, 7]] = True
    legal = codec.slot_legality(free, 3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = (rng.random(len(codec.nvec())) * codec.nvec()).astype(np.int64)
        action, _ = codec.decode(v, legal)
        assert len(action.vm_servers) == P
        placed = [s for s in action.vm_servers if s is not None]
        assert len(set(placed)) == len(placed) and all(free[s] for s in placed)
        w = codec.encode_action(action)
        back, _ = codec.decode(w, legal)
        assert back.vm_servers == action.vm_servers
        np.testing.assert_array_equal(codec.encode_action(back), w)
    base = codec.encode_action(codec.decode(np.zeros(len(codec.nvec()), np.int64), legal)[0])
    v = base.copy()
    v[-P:] = [5, 5, 7]  # slot 1 repeats slot 0's server: dropped and counted
    action, masked = codec.decode(v, legal)
    assert action.vm_servers == (5, None, 7) and masked == 1
    v[-P:] = [2, n, 4]  # a SaaS server (masked) and "no placement" where servers were offered
    action, masked = codec.decode(v, legal)
    assert action.vm_servers == (None, None, 4) and masked == 2
    with pytest.raises(InvalidActionError, match=r"vm_servers\[1\]=5: an earlier slot takes that server"):
        codec.encode_action(dataclasses.replace(action, vm_servers=(5, 5, None)))
    with pytest.raises(InvalidActionError, match="has 4 placements; the vector has 3 slot"):
        codec.encode_action(dataclasses.replace(action, vm_servers=(4, 5, 6, 7)))
    short = codec.encode_action(dataclasses.replace(action, vm_servers=(6,)))  # padded with None
    assert short[-P:].tolist() == [6, n, n]


def test_a_burst_is_placed_in_one_interval_slot_by_slot():
    c = SimCluster(burst_scenario(), serving_model="aggregate", auto_place_vms=False)
    c.reset(seed=0)
    while c.vms.n_pending < 4:
        c.advance()
    kinds = list(c.vms.pending_kind)
    free = np.flatnonzero(c.vms.legal_servers())
    a, b = int(free[0]), int(free[-1])
    c.apply(ClusterAction(vm_servers=(a, None, b)))  # the 2nd waiting VM keeps waiting
    assert c.vms.kind[a] == kinds[0] and c.vms.kind[b] == kinds[2]
    assert c.vms.pending_kind == [kinds[1], *kinds[3:]]
    with pytest.raises(ValueError, match="at most 3 per interval"):
        c.apply(ClusterAction(vm_servers=(None,) * 4))
    with pytest.raises(ValueError, match="not legal"):
        c.apply(ClusterAction(vm_servers=(a,)))


def test_env_places_three_on_distinct_servers_and_reports_a_duplicate():
    env, obs = env_with_waiting()
    codec = env.codec
    mask = env.action_masks()
    legal = codec.slot_legal_servers(mask)
    assert legal.any(axis=1).all()
    free = np.flatnonzero(legal[0])
    before = env.backend.vms.n_pending
    occupied = env.backend.vms.occupied().copy()
    action = UnawareController(ControllerContext.from_env(env)).decide(obs, mask)
    assert action.vm_servers == tuple(int(s) for s in free[:P])  # first fit, one server each
    _, _, _, _, info = env.step(codec.encode_action(action))
    now = env.backend.vms.occupied()
    assert np.flatnonzero(now & ~occupied).tolist() == free[:P].tolist()
    assert info["placement_masked"] == 0.0
    assert env.backend.vms.n_pending <= before - P + 5  # three left the queue (a few may have arrived)
    # Two slots on one server: the later one is not executed, and counted.
    env2, obs2 = env_with_waiting()
    mask = env2.action_masks()
    s = int(np.flatnonzero(env2.codec.slot_legal_servers(mask)[0])[0])
    t = int(np.flatnonzero(env2.codec.slot_legal_servers(mask)[2])[-1])
    unaware = UnawareController(ControllerContext.from_env(env2))
    v = env2.codec.encode_action(unaware.decide(obs2, mask))
    v[-P:] = [s, s, t]
    occupied = env2.backend.vms.occupied().copy()
    _, _, _, _, info = env2.step(v)
    assert info["placement_masked"] == 1.0
    assert np.flatnonzero(env2.backend.vms.occupied() & ~occupied).tolist() == sorted({s, t})


def test_tapas_spreads_one_intervals_vms_over_rows():
    env, obs = env_with_waiting()
    ctx = ControllerContext.from_env(env)
    lay = ctx.layout
    mask = env.action_masks()
    legal = ctx.slot_legal_servers(mask)
    assert {int(lay.server_row[s]) for s in np.flatnonzero(legal[0])} == {0, 1}  # both rows have room
    tapas = TapasController(ctx)
    placed = tapas.decide(obs, mask).vm_servers
    assert None not in placed and len(set(placed)) == P
    rows = [int(lay.server_row[s]) for s in placed]
    assert set(rows) == {0, 1}, rows  # not all three onto the row that looked emptiest
    # Without its own accounting each VM would go to the same best row: the first VM's.
    one = TapasController(ctx)
    one._observe(obs)  # the same row history the first controller built
    alone = [one._place(obs, legal[i:i + 1])[0] for i in range(P)]
    assert len({int(lay.server_row[s]) for s in alone}) == 1


def test_shield_checks_placements_cumulatively():
    env, obs = env_with_waiting()
    ctx = ControllerContext.from_env(env)
    lay = ctx.layout
    mask = env.action_masks()
    row0 = [int(s) for s in np.flatnonzero(ctx.slot_legal_servers(mask)[0]) if lay.server_row[s] == 0][:P]
    assert len(row0) == P

    class PileOn:
        """Puts every waiting VM onto row 0."""

        name = "pile-on"

        def reset(self) -> None:
            pass

        def act(self, observation, action_mask=None):
            r = lay.n_rows
            return ctx.codec.encode_action(ctx.action(
                route_level=np.full(r, 3), cap_idx=np.full(r, len(lay.freq_choices_mhz) - 1),
                quantized=np.zeros(r), vm_servers=tuple(row0)))

    shield = Shield(PileOn(), ctx, env.backend.telemetry)
    shield.reset()
    tel = env.backend.telemetry()
    vm_w = ctx.view.pending_vms_expected_gpu_w(obs)
    dyn = shield._saas_dyn_w(tel)
    f = np.full(lay.n_rows, lay.max_freq_mhz)
    placements = tuple((s, float(vm_w[i])) for i, s in enumerate(row0))
    row_w = [shield._predict(tel, dyn, f, placements[:k])[0][0] for k in range(P + 1)]
    assert row_w[0] < row_w[1] < row_w[2] < row_w[3]
    # A margin that one VM fits under and three do not: each placement alone would pass.
    limit0 = float(tel.row_limit_w[0])
    shield.power_margin = (row_w[1] + row_w[2]) / 2 / limit0
    for i, s in enumerate(row0):
        assert shield._predict(tel, dyn, f, ((s, float(vm_w[i])),))[0][0] <= shield.power_margin * limit0
    shield.reset()
    out = shield.act(obs, mask)
    assert "placement" in shield.last_override
    kept, _ = ctx.codec.decode(out, ctx.slot_legal_servers(mask))
    chosen = tuple((s, float(vm_w[i])) for i, s in enumerate(kept.vm_servers) if s is not None)
    assert chosen  # the shield still places what fits
    assert sum(lay.server_row[s] == 0 for s, _ in chosen) <= 1
    final = shield._predict(tel, shield._saas_dyn_w(tel), f, chosen)[0]
    assert (final <= shield.power_margin * np.asarray(tel.row_limit_w)).all()


def test_vm_wait_and_hosted_hours_follow_the_queue_and_the_servers():
    """`vm_wait_s` integrates the waiting queue and `vm_running_s` the hosted VMs over each interval.

    With nothing placed (no initial VM, placements held) the queue only grows, so an interval's
    waiting VM-seconds lie between its start and end queue lengths times its length, and no VM is
    hosted; once the queue is placed, hosted VM-seconds appear and the episode summary converts
    both to VM-hours.
    """
    env = ClusterEnv(task="thermal", backend=SimCluster(burst_scenario(), serving_model="aggregate",
                                                       auto_place_vms=False))
    env.reset(seed=0)
    vms, interval = env.backend.vms, env.layout.control_interval_s
    held_wait = 0.0
    for _ in range(6):
        before = vms.n_pending
        _, _, _, _, info = env.step(None)
        assert info["vm_running_s"] == 0.0
        assert before * interval - 1e-9 <= info["vm_wait_s"] <= vms.n_pending * interval + 1e-9
        held_wait += info["vm_wait_s"]
    assert held_wait > 0.0
    hosted = 0.0
    for _ in range(8):
        free = np.flatnonzero(env.backend.vms.legal_servers())[:P]
        env.backend.apply(ClusterAction(vm_servers=tuple(int(s) for s in free)))
        _, _, _, _, info = env.step(None)
        hosted += info["vm_running_s"]
    assert hosted > 0.0


def test_shield_holding_vms_back_shows_as_waiting_vm_hours():
    """The shield's placement overrides defer IaaS service, and the summary says how much."""
    from llm_cluster_gym.envs.rollout import run_episode

    out = {}
    for name in ("tapas", "shield"):
        env = ClusterEnv(task="thermal", scenario="small_tapas_high", serving_model="aggregate")
        ctx = ControllerContext.from_env(env)
        policy = TapasController(ctx)
        if name == "shield":
            policy = Shield(policy, ctx, env.backend.telemetry)
        out[name] = run_episode(env, policy, 1).summary()
    assert out["shield"]["vm_wait_h"] > out["tapas"]["vm_wait_h"]
    assert out["shield"]["vm_hours"] < out["tapas"]["vm_hours"]
    assert out["shield"]["power_capped_gpu_s"] < out["tapas"]["power_capped_gpu_s"]
