"""LayoutFreeSpaces: one observation and action space for every scenario size (issue 20)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from llm_cluster_gym.envs.actions import ROUTE_WEIGHT_LEVELS, InvalidActionError
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.fixed_spaces import (
    BATCH_LEVELS,
    FIXED_OBSERVATION_NAMES,
    FREQ_LEVELS,
    MAX_POOLS,
    PLACEMENT_RULES,
    ROW_GROUPS,
    SHARE_LEVELS,
    TP_LEVELS,
    LayoutFreeSpaces,
    position_inverse,
    position_map,
)
from llm_cluster_gym.envs.sim.scenario import load_scenario

SCENARIOS = ("small", "small_tapas", "medium", "large", "dynamo_week", "tapas_dc")
TASKS = ("energy", "thermal", "combined")
_CACHE: dict[tuple, LayoutFreeSpaces] = {}


def wrapped(scenario: str, task: str, steps: int = 2, **vm_overrides) -> LayoutFreeSpaces:
    """A wrapped aggregate-model env whose episode lasts `steps` intervals (built once per key)."""
    key = (scenario, task, steps, tuple(sorted(vm_overrides.items())))
    if key not in _CACHE:
        sc = load_scenario(scenario)
        sc = replace(sc, duration_s=steps * sc.control_interval_s)
        if vm_overrides:
            sc = replace(sc, vms=replace(sc.vms, **vm_overrides))
        _CACHE[key] = LayoutFreeSpaces(ClusterEnv(task, scenario=sc, serving_model="aggregate"))
    return _CACHE[key]


@pytest.mark.parametrize("task", TASKS)
def test_spaces_are_identical_on_every_scenario(task):
    ref = wrapped("small", task)
    assert ref.observation_space.shape == (len(FIXED_OBSERVATION_NAMES),)
    for scenario in SCENARIOS:
        env = wrapped(scenario, task)
        # The wrapped spaces differ from scenario to scenario; the fixed ones do not.
        assert env.observation_space == ref.observation_space, scenario
        assert env.action_space == ref.action_space, scenario
        assert np.array_equal(env.action_space.nvec, ref.action_space.nvec), scenario
        assert env.observation_names == ref.observation_names
        assert env.action_names == ref.action_names
        assert len(env.action_names) == len(env.action_space.nvec)
    inner = {wrapped(s, task).unwrapped.action_space.nvec.shape for s in SCENARIOS}
    assert len(inner) > 1  # the test would not show anything if the wrapped envs agreed


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("task", TASKS)
def test_one_random_fixed_action_steps_every_scenario(scenario, task):
    env = wrapped(scenario, task)
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    env.action_space.seed(2)
    action = env.action_space.sample(mask=_per_dim(env.action_masks(), env.action_space.nvec))
    inner = env.inner_action(action)
    assert env.unwrapped.action_space.contains(inner)
    obs, reward, terminated, truncated, info = env.step(action)
    assert env.observation_space.contains(obs) and np.isfinite(reward) and not terminated
    assert info["placement_masked"] == 0.0  # the rules only pick legal servers


def test_observation_is_read_from_the_wrapped_env_by_name():
    env = wrapped("small_tapas", "thermal")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    inner = env.unwrapped
    o = np.asarray(env._inner_obs, dtype=float)
    by = dict(zip(inner.observation_names, o, strict=True))
    fixed = dict(zip(env.observation_names, env.observation(o), strict=True))
    n = inner.layout.n_rows
    load = [by[f"row[{r}].power"] / (by[f"row[{r}].power"] + by[f"row[{r}].headroom"]) for r in range(n)]
    assert fixed["row.load.max"] == pytest.approx(max(load), rel=1e-5)
    assert fixed["row.load.p90"] == pytest.approx(np.percentile(load, 90), rel=1e-5)
    heat = [by[f"aisle[{a}].heat_over_capacity"] for a in range(inner.layout.n_aisles)]
    assert fixed["aisle.heat_over_capacity.mean"] == pytest.approx(np.mean(heat), rel=1e-5)
    assert fixed["slo.attainment"] == pytest.approx(by["slo.attainment"])
    # One pool ("all"): slot 0 present and copied, slots 1 and 2 padded with zeros.
    assert fixed["pool_slot[0].present"] == 1.0
    assert fixed["pool_slot[0].freq"] == pytest.approx(by["pool[all].freq"])
    for s in range(1, MAX_POOLS):
        assert all(v == 0.0 for k, v in fixed.items() if k.startswith(f"pool_slot[{s}]."))
    assert sum(fixed[f"row_group[{g}].share"] for g in range(ROW_GROUPS)) == pytest.approx(1.0)


def test_untrained_policy_built_on_small_runs_unchanged_on_tapas_dc(tmp_path):
    """The `transfers` property: a checkpoint made on small loads and acts on tapas_dc."""
    torch = pytest.importorskip("torch")
    sb3 = pytest.importorskip("stable_baselines3")
    sb3_contrib = pytest.importorskip("sb3_contrib")
    torch.set_num_threads(1)
    small = wrapped("small", "energy")
    model = sb3.PPO("MlpPolicy", small, n_steps=8, batch_size=8, seed=0,
                    policy_kwargs={"net_arch": [8]})
    model.save(tmp_path / "energy")
    dc = wrapped("tapas_dc", "energy")
    loaded = sb3.PPO.load(tmp_path / "energy", env=dc)  # SB3 refuses a space mismatch here
    obs, _ = dc.reset(seed=0)
    action, _ = loaded.predict(obs, deterministic=True)
    dc.step(action)

    small_c = wrapped("small_tapas", "combined")
    masked = sb3_contrib.MaskablePPO("MlpPolicy", small_c, n_steps=8, batch_size=8, seed=0,
                                     policy_kwargs={"net_arch": [8]})
    masked.save(tmp_path / "combined")
    dc_c = wrapped("tapas_dc", "combined")
    loaded_c = sb3_contrib.MaskablePPO.load(tmp_path / "combined", env=dc_c)
    obs, _ = dc_c.reset(seed=0)
    action, _ = loaded_c.predict(obs, deterministic=True, action_masks=dc_c.action_masks())
    _, _, _, _, info = dc_c.step(action)
    assert info["placement_masked"] == 0.0


def _with_rows(env: LayoutFreeSpaces, load: np.ndarray) -> np.ndarray:
    """The last wrapped observation with row loads set (limit in force = nominal) and cool aisles."""
    names = env.unwrapped.observation_names
    o = np.array(env._inner_obs, dtype=float)
    for r, x in enumerate(load):
        o[names.index(f"row[{r}].power")] = x
        o[names.index(f"row[{r}].headroom")] = 1.0 - x
    for a in range(env.layout.n_aisles):
        o[names.index(f"aisle[{a}].max_gpu_temp")] = 0.0
    return o


def test_tightest_group_setting_goes_to_rows_with_least_slack():
    env = wrapped("small_tapas", "thermal")
    env.reset(seed=0)
    lay = env.layout
    o = _with_rows(env, np.array([0.5, 0.9, 0.2, 0.6]))  # slack 0.5, 0.1, 0.8, 0.4
    assert env.row_groups(o).tolist() == [1, 0, 2, 1]  # four rows: 1 + 2 + 1
    # route, clock-ceiling level, quantize per group (tightest first), then the placement rule
    action = np.array([0, 0, 1, 2, 3, 0, 3, FREQ_LEVELS - 1, 0, 0])
    act = env.cluster_action(action, inner_obs=o, legal_servers=np.zeros(lay.n_servers, dtype=bool))
    freqs = lay.freq_choices_mhz
    assert act.row_freq_cap_mhz.tolist() == [freqs[3], freqs[0], freqs[-1], freqs[3]]
    assert act.row_quantized.tolist() == [False, True, False, False]
    assert act.row_route_weight.tolist() == [ROUTE_WEIGHT_LEVELS[2], 0.0, 1.0, ROUTE_WEIGHT_LEVELS[2]]
    # The same through the codec: the wrapped env's vector decodes to those rows.
    decoded, _ = env.codec.decode(env.codec.encode_action(act), np.zeros(lay.n_servers, dtype=bool))
    assert np.array_equal(decoded.row_freq_cap_mhz, act.row_freq_cap_mhz)
    # A hot aisle makes its rows the tightest, whatever their power.
    names = env.unwrapped.observation_names
    hot_aisle = int(lay.server_aisle[np.flatnonzero(lay.server_row == 2)[0]])
    o[names.index(f"aisle[{hot_aisle}].max_gpu_temp")] = 0.99
    hot_rows = sorted({int(r) for r in lay.server_row[lay.server_aisle == hot_aisle]})
    assert set(np.flatnonzero(env.row_groups(o) == 0)) <= set(hot_rows)


def test_rank_groups_are_thirds_on_a_large_layout():
    env = wrapped("large", "thermal", steps=1)
    env.reset(seed=0)
    n = env.layout.n_rows
    load = np.random.default_rng(0).uniform(0.1, 0.95, n)
    groups = env.row_groups(_with_rows(env, load))
    order = np.argsort(-load)  # least slack first
    sizes = np.bincount(groups, minlength=ROW_GROUPS)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
    assert set(order[: sizes[0]]) == set(np.flatnonzero(groups == 0))
    assert set(order[n - sizes[2]:]) == set(np.flatnonzero(groups == 2))


def test_placement_rules_pick_what_they_say():
    env = wrapped("small_tapas", "thermal")
    env.reset(seed=0)
    lay = env.layout
    names = env.unwrapped.observation_names
    legal = np.zeros(lay.n_servers, dtype=bool)
    # Three legal servers in three different rows, two aisles.
    chosen = [int(np.flatnonzero(lay.server_row == r)[0]) for r in (0, 2, 3)]
    legal[chosen] = True
    load = np.array([0.3, 0.5, 0.8, 0.1])  # row 3 has the most headroom, row 2 the least
    o = _with_rows(env, load)
    o[names.index("vm.pending_power")] = 0.6
    aisle_of = {s: int(lay.server_aisle[s]) for s in chosen}
    assert len(set(aisle_of.values())) == 2
    cool = aisle_of[chosen[1]]  # make the aisle of the row-2 server the coolest
    for a in range(lay.n_aisles):
        o[names.index(f"aisle[{a}].max_gpu_temp")] = 0.2 if a == cool else 0.7
        o[names.index(f"aisle[{a}].heat_over_capacity")] = 0.3
    assert env.place("none", o, legal) == ()
    assert env.place("first_fit", o, legal) == (min(chosen),)
    assert env.place("most_headroom", o, legal) == (chosen[2],)
    first_cool = min(s for s in chosen if aisle_of[s] == cool)
    assert env.place("coolest_aisle", o, legal) == (first_cool,)
    for rule in PLACEMENT_RULES:
        assert env.place(rule, o, np.zeros(lay.n_servers, dtype=bool)) == ()
    # The fixed action's last dimension chooses the rule.
    action = np.zeros(len(env.action_space.nvec), dtype=np.int64)
    action[-1] = PLACEMENT_RULES.index("most_headroom")
    act = env.cluster_action(action, inner_obs=o, legal_servers=legal)
    placed = act.vm_servers if hasattr(act, "vm_servers") else (act.vm_server,)
    assert placed[0] == chosen[2]


def test_masks_follow_the_waiting_vm_and_the_rules_place_it():
    env = wrapped("small_tapas", "combined", steps=40, arrivals_per_hour=3600.0)
    env.reset(seed=0)
    nvec = env.action_space.nvec
    seen_waiting = placed = 0
    for _ in range(40):
        mask = env.action_masks()
        assert mask.shape == (int(nvec.sum()),)
        rules = mask[-len(PLACEMENT_RULES):]
        waiting = bool(env.codec.legal_servers(env.unwrapped.action_masks()).any())
        assert rules.tolist() == [not waiting] + [waiting] * (len(PLACEMENT_RULES) - 1)
        # Pool slots 1 and 2 hold no pool on small_tapas: only 0 is offered.
        starts = np.concatenate(([0], np.cumsum(nvec)[:-1]))
        for d in range(4, 4 * MAX_POOLS):
            assert mask[starts[d]: starts[d] + nvec[d]].tolist() == [True] + [False] * (nvec[d] - 1)
        action = env.action_space.sample(mask=_per_dim(mask, nvec))
        _, _, _, truncated, info = env.step(action)
        assert info["placement_masked"] == 0.0
        seen_waiting += waiting
        placed += waiting and action[-1] != 0
        if truncated:
            break
    assert seen_waiting > 0 and placed > 0


def _per_dim(mask: np.ndarray, nvec: np.ndarray) -> tuple[np.ndarray, ...]:
    """A flat MaskablePPO mask as gymnasium's per-dimension int8 masks."""
    return tuple(m.astype(np.int8) for m in np.split(mask, np.cumsum(nvec)[:-1]))


def test_position_maps_reach_every_choice_and_invert():
    for n_fixed in (3, 4, 7, 33):
        for n in range(1, n_fixed + 1):
            fwd, inv = position_map(n_fixed, n), position_inverse(n_fixed, n)
            assert set(fwd.tolist()) == set(range(n))
            assert fwd[inv].tolist() == list(range(n))
    assert position_map(3, 1).tolist() == [0, 0, 0]
    assert position_map(7, 4).tolist() == [0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("scenario", ["medium", "small"])
def test_pool_mapping_round_trip(scenario):
    """Every configuration of the scenario's codec -> fixed block -> the same configuration.

    medium has one TP degree (fixed 3) and other batch caps; small has 4 share levels (fixed 32).
    """
    env = wrapped(scenario, "energy")
    lay, codec = env.layout, env.codec
    assert (TP_LEVELS, FREQ_LEVELS, BATCH_LEVELS) == (3, 7, 4)
    assert set(env.tp_map.tolist()) == set(range(len(lay.tp_choices)))
    assert set(env.share_map.tolist()) == set(range(codec.share_levels + 1))
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = lay.n_pools
        levels = rng.integers(0, codec.share_levels + 1, n)
        tps = [lay.tp_choices[i] for i in rng.integers(0, len(lay.tp_choices), n)]
        pools = codec.pool_configs(levels, tps,
                                   [lay.freq_choices_mhz[i] for i in rng.integers(0, 7, n)],
                                   [lay.batch_choices[i] for i in rng.integers(0, 4, n)])
        block = env.pool_block(pools)
        assert block.shape == (4 * MAX_POOLS,)
        assert env.pools_of(block) == pools
        action = np.zeros(len(env.action_space.nvec), dtype=np.int64)
        action[: 4 * MAX_POOLS] = block
        decoded, _ = codec.decode(env.inner_action(action), np.zeros(lay.n_servers, dtype=bool))
        assert decoded.pools == pools
    if scenario == "medium":  # any fixed TP index runs the one TP degree
        for j in range(TP_LEVELS):
            block = np.zeros(4 * MAX_POOLS, dtype=np.int64)
            block[1::4] = j
            assert {p.tp for p in env.pools_of(block)} == {lay.tp_choices[0]}
    else:  # share level 8 of 32 is a quarter of small's 4 SaaS servers: one server
        block = np.zeros(4 * MAX_POOLS, dtype=np.int64)
        block[0] = SHARE_LEVELS // 4
        assert codec.pool_servers(env.pools_of(block)).tolist() == [1, 0, 0]


def test_out_of_space_fixed_action_is_refused():
    env = wrapped("small", "combined")
    env.reset(seed=0)
    bad = np.zeros(len(env.action_space.nvec), dtype=np.int64)
    bad[0] = SHARE_LEVELS + 1
    with pytest.raises(InvalidActionError, match="pool_slot\\[0\\].share"):
        env.step(bad)
    with pytest.raises(InvalidActionError, match="shape"):
        env.step(bad[:-1])


@pytest.mark.parametrize("scenario", ["small", "dynamo_week"])
def test_observations_of_many_copies_equal_each_copys_observation(scenario):
    """`LayoutFreeSpaces.observations` (the batched envs' summary) gives, row for row, the float32
    values `observation` gives, on batched copies under random actions (a NaN entry included)."""
    from llm_cluster_gym.envs.vector_env import BatchedClusterEnv
    from llm_cluster_gym.scripts.dynamo_week import DAY_S, make_env, window_scenario

    s = load_scenario(scenario)
    if scenario == "dynamo_week":
        s = window_scenario(s, 2 * DAY_S + 14 * 3600.0, 0.0, 300.0)
    venv = BatchedClusterEnv(num_envs=6, scenario=s)
    fixed = LayoutFreeSpaces(make_env(s))
    obs, _ = venv.reset(seed=0)
    for step in range(25):
        obs, *_ = venv.step(np.stack([venv.single_action_space.sample() for _ in range(6)]))
        obs = obs.copy()
        if step == 3:
            obs[0, 5] = np.nan
        np.testing.assert_array_equal(fixed.observations(obs), np.stack([fixed.observation(o) for o in obs]))


def test_observations_refuses_a_task_with_row_actions():
    fixed = LayoutFreeSpaces(ClusterEnv(task="thermal", scenario="small_tapas"))
    with pytest.raises(ValueError, match="row actions"):
        fixed.observations(np.zeros((2, len(fixed.env.unwrapped.observation_names))))
