"""The action codec: `encode_action` is the exact inverse of `decode`, and refuses what it cannot write.

Layouts are those of every shipped scenario (each task), plus the same layouts with other
SaaS server counts and pool counts, where the share levels no longer map one to one onto
servers and `decode` hands out remainders.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.actions import TASKS, ActionCodec, InvalidActionError
from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario

SCENARIOS = ("small", "small_faults", "small_tapas", "small_tapas_high", "medium", "large", "tapas_dc")
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@cache
def _env_codec(scenario: str, task: str) -> ActionCodec:
    return ClusterEnv(task=task, scenario=scenario, serving_model="aggregate").codec


def _codec(scenario: str, task: str, n_saas: int | None = None, n_pools: int | None = None,
           placements: int | None = None, route_per_server: bool = False) -> ActionCodec:
    """The env's codec, or one over the same layout with other SaaS server / pool / placement
    counts, or routing per SaaS server."""
    codec = _env_codec(scenario, task)
    lay = codec.layout
    if n_pools is not None:
        lay = dataclasses.replace(lay, pool_names=tuple(f"p{i}" for i in range(n_pools)))
    if placements is not None:
        lay = dataclasses.replace(lay, vm_placements_per_interval=placements)
    if route_per_server:
        lay = dataclasses.replace(lay, route_per_server=True)
    if n_saas is None and n_pools is None and placements is None and not route_per_server:
        return codec
    return ActionCodec(task, lay, codec.n_saas_servers if n_saas is None else n_saas)


def assert_same_action(a: ClusterAction, b: ClusterAction) -> None:
    """Field by field (ClusterAction holds arrays, so `==` on the dataclass is ambiguous)."""
    for f in dataclasses.fields(ClusterAction):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f"{f.name}: {x!r} != {y!r}"


@st.composite
def layouts_and_vectors(draw, synthetic: bool):
    scenario = draw(st.sampled_from(SCENARIOS))
    task = draw(st.sampled_from(TASKS))
    if synthetic:
        codec = _codec(scenario, task, n_saas=draw(st.integers(1, 40)),
                       n_pools=draw(st.integers(1, 4)), placements=draw(st.integers(1, 4)),
                       route_per_server=draw(st.booleans()))
    else:
        codec = _codec(scenario, task)
    nvec = codec.nvec()
    v = np.array([draw(st.integers(0, int(n) - 1)) for n in nvec], dtype=np.int64)
    n = codec.layout.n_servers
    legal = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    if codec.placement_slots > 1:  # per slot, as the env gives it: the free servers while VMs wait
        legal = codec.slot_legality(legal, draw(st.integers(0, codec.placement_slots + 1)))
    return codec, v, legal


def _is_canonical(codec: ActionCodec, v: np.ndarray, legal: np.ndarray) -> bool:
    """Whether `v` is the one vector of its decoded action (see `encode_action`)."""
    lay = codec.layout
    i = 0
    if codec.has_pools:
        levels = v[: 4 * lay.n_pools: 4]
        i = 4 * lay.n_pools
        if levels.sum() > codec.share_levels:  # scaled down: another vector gives its servers
            return False
    if codec.has_rows:
        if not v[i: i + 3 * lay.n_rows: 3].any():  # all routing levels 0 read as all 3
            return False
        servers = v[i + 3 * lay.n_rows: i + 3 * lay.n_rows + codec.route_servers]
        if len(servers) and not servers.any():  # the same for the per-server levels
            return False
        slots = codec.placement_slots
        legal = np.broadcast_to(legal, (slots, lay.n_servers))
        chosen = v[len(v) - slots:]
        for i, s in enumerate(chosen):
            if s < lay.n_servers and (not legal[i, s] or s in chosen[:i]):
                return False  # masked, or an earlier slot's server: decodes as "no placement"
    return True


@PROPERTY
@given(layouts_and_vectors(synthetic=False))
@pytest.mark.slow
def test_encode_inverts_decode_on_shipped_layouts(case):
    codec, v, legal = case
    action, _ = codec.decode(v, legal)
    w = codec.encode_action(action)
    assert codec.space().contains(w)
    assert_same_action(codec.decode(w, legal)[0], action)
    # Shipped layouts give every pool a whole number of servers per level: within the
    # budget the levels are the only ones giving their servers, so the vector comes back.
    if _is_canonical(codec, v, legal):
        np.testing.assert_array_equal(w, v)
    np.testing.assert_array_equal(codec.encode_action(codec.decode(w, legal)[0]), w)


@PROPERTY
@given(layouts_and_vectors(synthetic=True))
@pytest.mark.slow
def test_encode_inverts_decode_where_servers_get_remainders(case):
    codec, v, legal = case
    action, _ = codec.decode(v, legal)
    w = codec.encode_action(action)
    assert codec.space().contains(w)
    assert_same_action(codec.decode(w, legal)[0], action)
    np.testing.assert_array_equal(codec.encode_action(codec.decode(w, legal)[0]), w)


def test_noncanonical_vectors_encode_to_their_canonical_twin():
    codec = _codec("small", "combined")  # 4 SaaS servers, K = 4, 3 pools, 2 rows, 4 servers
    v = np.array([4, 2, 6, 3, 4, 2, 6, 3, 0, 2, 6, 3,  # levels 4+4+0 > K: scaled to 2, 2, 0
                  0, 6, 0, 0, 6, 1,  # routing levels all 0: equal weight
                  1])  # server 1, masked below
    legal = np.array([True, False, False, False])
    action, masked = codec.decode(v, legal)
    assert masked == 1 and action.vm_servers == (None,)
    assert [p.n_instances for p in action.pools] == [2, 2, 0]
    w = codec.encode_action(action)
    np.testing.assert_array_equal(w, [2, 2, 6, 3, 2, 2, 6, 3, 0, 2, 6, 3, 3, 6, 0, 3, 6, 1, 4])
    assert_same_action(codec.decode(w, legal)[0], action)


def test_remainders_go_to_the_largest_fractions_and_splits_list_what_decode_gives():
    codec = _codec("medium", "energy", n_saas=48)  # K = 32: a level asks for 1.5 servers
    assert codec.share_levels == 32
    assert codec.servers_per_pool([11, 11, 10]).tolist() == [17, 16, 15]  # floors 16, 16, 15 + 1 spare
    splits = codec.server_splits()
    assert not splits.flags.writeable
    assert len({tuple(s) for s in splits}) == len(splits)
    assert [17, 16, 15] in splits.tolist()
    for split in splits:
        levels = codec.share_levels_for(split)
        assert levels.sum() <= codec.share_levels
        np.testing.assert_array_equal(codec.servers_per_pool(levels), split)
    # Every within-budget share vector gives one of the splits.
    rng = np.random.default_rng(0)
    for _ in range(200):
        levels = rng.integers(0, codec.share_levels + 1, size=3)
        if levels.sum() <= codec.share_levels:
            assert codec.servers_per_pool(levels).tolist() in splits.tolist()


@PROPERTY
@given(scenario=st.sampled_from(SCENARIOS), n_saas=st.integers(1, 40), n_pools=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_share_levels_for_inverts_servers_per_pool(scenario, n_saas, n_pools, seed):
    codec = _codec(scenario, "energy", n_saas=n_saas, n_pools=n_pools)
    levels = np.random.default_rng(seed).integers(0, codec.share_levels + 1, size=n_pools)
    servers = codec.servers_per_pool(levels)
    back = codec.share_levels_for(servers)
    np.testing.assert_array_equal(codec.servers_per_pool(back), servers)
    # The canonical levels come first in the order: fewest in total, then from the last pool.
    assert (back.sum(), tuple(back[::-1])) <= (levels.sum(), tuple(levels[::-1]))


def test_masks_and_legal_servers_are_inverse():
    for task in TASKS:
        codec = _codec("small_tapas", task)
        n = codec.layout.n_servers
        legal = np.arange(n) % 3 == 1
        got = codec.legal_servers(codec.masks(legal))
        np.testing.assert_array_equal(got, legal if codec.has_rows else np.zeros(n, bool))
        assert not codec.legal_servers(None).any()


def _pools(codec: ActionCodec, **change) -> tuple[PoolConfig, ...]:
    lay = codec.layout
    pools = codec.pool_configs([1] * lay.n_pools, [lay.tp_choices[-1]] * lay.n_pools,
                               [lay.freq_choices_mhz[-1]] * lay.n_pools,
                               [lay.batch_choices[-1]] * lay.n_pools)
    return (dataclasses.replace(pools[0], **change), *pools[1:])


@pytest.mark.parametrize("action, match", [
    (lambda c: ClusterAction(pools=None), r"pools=None \(keep\)"),
    (lambda c: ClusterAction(pools=_pools(c, tp=3)), r"pools\[0\]\.tp=3 is not one of"),
    (lambda c: ClusterAction(pools=_pools(c, freq_mhz=1234.0)), r"pools\[0\]\.freq_mhz=1234\.0"),
    (lambda c: ClusterAction(pools=_pools(c, max_batch=7)), r"pools\[0\]\.max_batch=7"),
    (lambda c: ClusterAction(pools=_pools(c, tp=4, n_instances=3)),
     r"pools\[0\]\.n_instances=3 is not a whole number of servers at tp=4"),
    (lambda c: ClusterAction(pools=_pools(c, tp=8, n_instances=5)),
     r"n_instances=\[5, 1, 1\].*no share levels"),
    (lambda c: ClusterAction(pools=_pools(c, quantized=True)), r"pools\[0\]\.quantized=True"),
    (lambda c: ClusterAction(pools=_pools(c), admit_fraction=0.5), r"admit_fraction=0\.5"),
    (lambda c: ClusterAction(pools=_pools(c), vm_servers=(1,)), r"vm_servers=\(1,\): the energy task"),
    (lambda c: ClusterAction(pools=_pools(c)[:2]), r"pools has 2 configurations"),
])
def test_energy_encode_refuses_what_the_vector_cannot_say(action, match):
    codec = _codec("small", "energy")
    with pytest.raises(InvalidActionError, match=match):
        codec.encode_action(action(codec))
    assert issubclass(InvalidActionError, ValueError)


def _rows(codec: ActionCodec, **change) -> ClusterAction:
    n = codec.layout.n_rows
    base = dict(row_route_weight=np.ones(n), row_freq_cap_mhz=np.full(n, 1980.0),
                row_quantized=np.zeros(n, bool), vm_servers=(None,))
    base.update(change)
    return ClusterAction(**base)


@pytest.mark.parametrize("change, match", [
    (dict(row_route_weight=None), r"row_route_weight=None \(keep\)"),
    (dict(row_route_weight=np.array([1.0, 0.5, 1.0, 1.0])), r"row_route_weight\[1\]=0\.5"),
    (dict(row_route_weight=np.zeros(4)), r"all 0"),
    (dict(row_freq_cap_mhz=np.array([1980.0, 1980.0, 900.0, 1980.0])),
     r"row_freq_cap_mhz\[2\]=900\.0"),
    (dict(row_quantized=np.array([0, 2, 0, 0])), r"row_quantized\[1\]=2"),
    (dict(row_quantized=np.zeros(3, bool)), r"row_quantized must have shape \(4,\)"),
    (dict(vm_servers=(8,)), r"vm_servers\[0\]=8 is not a server index in \[0, 7\]"),
    (dict(vm_servers=(-1,)), r"vm_servers\[0\]=-1"),
    (dict(vm_servers=(1, 2)), r"has 2 placements; the vector has 1 slot"),
    (dict(pools=()), r"pools=\(\): the thermal task's vector has no pool dimensions"),
])
def test_thermal_encode_refuses_what_the_vector_cannot_say(change, match):
    codec = _codec("small_tapas", "thermal")
    codec.encode_action(_rows(codec))  # the unchanged action is fine
    with pytest.raises(InvalidActionError, match=match):
        codec.encode_action(_rows(codec, **change))


class _RecordingSim(SimCluster):
    """The simulator, keeping every action it is given (to compare with the codec's)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.applied: list[ClusterAction] = []

    def apply(self, action: ClusterAction) -> None:
        self.applied.append(action)
        super().apply(action)


@pytest.mark.parametrize("scenario, task", [("small", "energy"), ("small_tapas", "combined"),
                                            ("small_faults", "thermal")])
def test_the_backend_gets_what_the_codec_says_executes(scenario, task):
    """Each step, the backend receives exactly the decoded action of the encoded vector."""
    sc = load_scenario(scenario).with_overrides(duration_s=60.0)
    backend = _RecordingSim(sc, serving_model="aggregate", auto_place_vms=task == "energy")
    env = ClusterEnv(task=task, backend=backend, reconfig_every=1)
    codec = env.codec
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = env.action_masks()
        legal = codec.legal_servers(mask)
        v = (rng.random(len(codec.nvec())) * codec.nvec()).astype(np.int64)
        if codec.has_rows and legal.any():
            v[-1] = int(rng.choice(np.flatnonzero(legal)))
        predicted, _ = codec.decode(codec.encode_action(codec.decode(v, legal)[0]), legal)
        env.step(codec.encode_action(predicted))
        assert_same_action(backend.applied[-1], predicted)
