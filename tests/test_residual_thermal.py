"""The thermal agent over the TAPAS-style controller, shield in the loop (`agents/residual_thermal.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_gym.agents.checkpoint import CheckpointError
from llm_cluster_gym.agents.policy import checkpoint_task, load_policy
from llm_cluster_gym.agents.residual_thermal import (
    GATE_LEVELS,
    RESIDUAL_THERMAL_KIND,
    RESIDUAL_THERMAL_OBSERVATION_NAMES,
    SERVICE_WEIGHT,
    ResidualOverTapas,
)
from llm_cluster_gym.agents.train_residual_thermal import (
    CONSTRAINT_GROUPS,
    ResidualThermalPolicy,
    TrainResidualThermalArgs,
    train,
)
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.controllers.tapas_forecast import TapasForecastController
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.fixed_spaces import FREQ_LEVELS, ROW_GROUPS
from llm_cluster_gym.envs.rollout import run_episode

AS_TAPAS = np.array([FREQ_LEVELS - 1] * ROW_GROUPS + [GATE_LEVELS.index("all")])
"""Every ceiling at the top, every placement TAPAS proposes: the wrapper is TAPAS."""


def wrapper(scenario: str = "small_tapas_high", project: bool = False, **kw) -> ResidualOverTapas:
    """The wrapper on `scenario`, aggregate model; unprojected unless asked (TAPAS as proposed)."""
    return ResidualOverTapas(ClusterEnv(task="thermal", scenario=scenario, serving_model="aggregate"),
                             project=project, **kw)


def harm_share(env: ResidualOverTapas, info: dict) -> float:
    """A waiting VM's GPUs, throttled and capped GPU-seconds, over the cluster's GPU-seconds."""
    lay = env.inner.layout
    harmed = (lay.gpus_per_server * info["vm_wait_s"] + info["thermal_throttled_gpu_s"]
              + info["power_capped_gpu_s"])
    return harmed / (lay.n_servers * lay.gpus_per_server * lay.control_interval_s)


def run(env: ResidualOverTapas, action, seed: int = 1) -> list[dict]:
    env.reset(seed=seed)
    infos, done = [], False
    while not done:
        _, reward, te, tr, info = env.step(action(env) if callable(action) else action)
        infos.append({**info, "reward": reward})
        done = te or tr
    return infos


def test_top_ceilings_and_open_gate_are_the_tapas_controller_step_for_step():
    infos = run(wrapper(shielded=False), AS_TAPAS)
    env = ClusterEnv(task="thermal", scenario="small_tapas_high", serving_model="aggregate")
    ref = run_episode(env, TapasController(ControllerContext.from_env(env)), 1)
    for key in ("energy_j", "power_capped_gpu_s", "vm_wait_s", "vm_running_s"):
        assert np.allclose([i[key] for i in infos], ref.metrics[key]), key


def test_spaces_are_the_same_on_every_scenario_size():
    shapes = {(wrapper(s).observation_space.shape, tuple(wrapper(s).action_space.nvec))
              for s in ("small_tapas", "small_tapas_high", "tapas_dc")}
    assert shapes == {((len(RESIDUAL_THERMAL_OBSERVATION_NAMES),),
                       (FREQ_LEVELS,) * ROW_GROUPS + (len(GATE_LEVELS),))}


def test_ceilings_only_lower_tapas_and_the_gate_holds_vms():
    env = wrapper(shielded=False)
    env.reset(seed=1)
    base_cap = np.asarray(env._base.row_freq_cap_mhz, dtype=float)
    low = env.corrected_action(np.array([0] * ROW_GROUPS + [GATE_LEVELS.index("hold")]))
    assert np.all(np.asarray(low.row_freq_cap_mhz) <= base_cap)
    assert np.all(np.asarray(low.row_freq_cap_mhz) == min(env.inner.layout.freq_choices_mhz))
    assert all(s is None for s in low.vm_servers)
    top = env.corrected_action(AS_TAPAS)
    assert np.array_equal(top.row_freq_cap_mhz, base_cap) and top.vm_servers == env._base.vm_servers
    # Holding every VM: nothing is ever hosted beyond what the scenario starts with, and the
    # waiting VMs' GPUs are charged in the reward as harmed service.
    held = run(wrapper(shielded=False, service_weight=0.5), np.array(
        [FREQ_LEVELS - 1] * ROW_GROUPS + [GATE_LEVELS.index("hold")]))
    free = run(wrapper(shielded=False, service_weight=0.5), AS_TAPAS)
    assert sum(i["vm_wait_s"] for i in held) > sum(i["vm_wait_s"] for i in free)
    for i in held:
        assert i["reward"] == pytest.approx(i["env_reward"] - 0.5 * harm_share(env, i))
    with pytest.raises(ValueError, match="service_weight"):
        wrapper(service_weight=-1.0)
    with pytest.raises(ValueError, match="action must be"):
        env.corrected_action(np.array([FREQ_LEVELS] * ROW_GROUPS + [0]))


def test_shield_in_the_loop_charges_the_multiplier_for_each_override():
    a = run(wrapper(lagrange=0.0), AS_TAPAS)
    b = run(wrapper(lagrange=3.0), AS_TAPAS)
    overrides = np.array([i["shield_override"] for i in a])
    assert overrides.sum() > 0  # the shield does override TAPAS on this scenario
    assert np.array_equal(overrides, [i["shield_override"] for i in b])
    assert np.array_equal(overrides, [i["shield_override_avoidable"] for i in a])  # no fault here
    env = wrapper()
    assert np.allclose([i["reward"] for i in a],
                       [i["env_reward"] - SERVICE_WEIGHT * harm_share(env, i) for i in a])
    assert np.allclose(np.array([i["reward"] for i in a]) - [i["reward"] for i in b], 3.0 * overrides)


def test_projected_tapas_is_tapas_heeding_the_forecast_and_is_charged_for_it():
    """Projected onto the forecast, TAPAS's own proposal is `tapas_forecast` step for step; the
    shield never overrides it, and each interval the projection changed costs the multiplier."""
    a = run(wrapper(project=True, shielded=False), AS_TAPAS)
    env = ClusterEnv(task="thermal", scenario="small_tapas_high", serving_model="aggregate")
    ref = run_episode(env, TapasForecastController(ControllerContext.from_env(env), env.backend.telemetry), 1)
    for key in ("energy_j", "power_capped_gpu_s", "vm_wait_s", "vm_running_s"):
        assert np.allclose([i[key] for i in a], ref.metrics[key]), key
    shielded = wrapper(project=True)
    b = run(shielded, AS_TAPAS)
    c = run(wrapper(project=True, lagrange=3.0), AS_TAPAS)
    projected = np.array([i["projected"] for i in b])
    assert sum(i["shield_override_avoidable"] for i in b) == 0
    assert 0 < projected.sum() < len(b)
    assert shielded.projection_rate == pytest.approx(projected.mean())
    assert np.array_equal(projected, [i["unsafe_proposal"] for i in b])
    assert np.allclose(np.array([i["reward"] for i in b]) - [i["reward"] for i in c], 3.0 * projected)


def test_a_trained_checkpoint_loads_as_a_controller_on_any_size(tmp_path):
    from llm_cluster_gym.scripts.residual_thermal import run_train

    out = tmp_path / "ck"  # through the command (it prints the per-family multipliers)
    assert run_train(TrainResidualThermalArgs(steps=1024, n_envs=1, dc_share=0.0, out=str(out),
                                              tensorboard=None, max_minutes=5)) == 0
    assert checkpoint_task(out) == "thermal"
    import json
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["kind"] == RESIDUAL_THERMAL_KIND and meta["steps"] >= 1024
    assert set(meta["lagrange"]) == set(CONSTRAINT_GROUPS) and min(meta["lagrange"].values()) >= 0.0
    assert meta["projects_onto_forecast"] is True
    for scenario in ("small_tapas", "medium"):
        env = ClusterEnv(task="thermal", scenario=scenario, serving_model="aggregate")
        policy = load_policy(out, env)
        assert isinstance(policy, ResidualThermalPolicy) and policy.res.project
        result = run_episode(env, policy, 0, max_intervals=5)
        assert result.n_intervals == 5
    # Fine-tuning continues from the checkpoint: its steps, multiplier and history carry over.
    tuned = train(TrainResidualThermalArgs(steps=1024, n_envs=1, dc_share=0.0, init=str(out),
                                           lagrange_init=5.0, out=str(tmp_path / "tuned"),
                                           tensorboard=None, max_minutes=5, no_scale_reward=True))
    after = json.loads((tuned / "metadata.json").read_text())
    assert after["steps"] >= meta["steps"] + 1024 and len(after["stages"]) == 2
    assert after["stages"][0]["steps"] == meta["steps"]
    assert after["stages"][1]["lagrange_start"] == dict.fromkeys(CONSTRAINT_GROUPS, 5.0)
    assert meta["stages"][0]["reward_scaled_by_multiplier"] is True  # the default
    assert after["stages"][1]["reward_scaled_by_multiplier"] is False
    assert after["stages"][1]["reward_normalized"] is True  # the default
    # Normalized rewards: the fine-tune's return statistics start afresh (this stage's steps only).
    import pickle
    with open(tuned / "vecnormalize.pkl", "rb") as fh:
        count = pickle.load(fh).ret_rms.count
    assert after["stages"][1]["steps"] <= count < after["stages"][1]["steps"] + 1
    # The constraint is kept per scenario family: the datacenter drew no episode (dc_share 0), so
    # its multiplier did not move, while the small scenarios' followed their own violations.
    end = after["stages"][1]["lagrange_end"]
    assert end["tapas_dc"] == 5.0 and any(end[g] != 5.0 for g in ("small_tapas", "small_tapas_high"))
    assert after["lagrange"] == after["stages"][1]["lagrange_end"]
    assert after["train_wall_s"] >= meta["train_wall_s"]
    with pytest.raises(CheckpointError, match="field 'kind' must be 'residual_over_tapas'.*found "
                                              "'residual_over_manager'"):
        train(TrainResidualThermalArgs(steps=64, init="checkpoints/residual_energy",
                                       out=str(tmp_path / "x"), tensorboard=None))
    with pytest.raises(CheckpointError, match="found no residual agent's metadata"):
        train(TrainResidualThermalArgs(steps=64, init="checkpoints/energy",
                                       out=str(tmp_path / "x"), tensorboard=None))


def heeding(env: ResidualOverTapas) -> np.ndarray:
    """Each group's ceiling at the level the forecast allows, placements where it says they fit."""
    i = RESIDUAL_THERMAL_OBSERVATION_NAMES.index("forecast.safe_ceiling_position[0]")
    levels = np.rint(env._last_obs[i:i + ROW_GROUPS] * (FREQ_LEVELS - 1)).astype(np.int64)
    return np.concatenate([levels, [GATE_LEVELS.index("forecast")]])


@pytest.mark.parametrize("serving", ["aggregate", "request"])
def test_an_agent_heeding_the_forecast_is_never_overridden(serving):
    """The forecast features are the shield's own judgement: acting on them avoids every override."""
    env = ResidualOverTapas(ClusterEnv(task="thermal", scenario="small_tapas_high", serving_model=serving),
                            project=False)
    obs, _ = env.reset(seed=1)
    done, overrides, placed = False, [], 0
    while not done:
        env._last_obs = obs
        action = heeding(env)
        placed += sum(s is not None for s in env.corrected_action(action).vm_servers or ())
        obs, _, te, tr, info = env.step(action)
        overrides.append(info["shield_override_avoidable"])
        done = te or tr
    assert sum(overrides) == 0 and placed > 0
    assert sum(i["shield_override_avoidable"] for i in run(wrapper(), AS_TAPAS)) > 0


def test_thermal_eval_pairs_every_contender_with_tapas_on_the_same_units(tmp_path):
    """`llm-cluster thermal-eval`: every contender on the same units (a process pool gives the
    rows one process gives), and each paired difference is the mean of the per-unit differences."""
    from llm_cluster_gym.agents.train_residual_thermal import CONTENDERS, _evaluate_unit
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.scripts.dynamo_week import window_scenario
    from llm_cluster_gym.scripts.residual_thermal import ResidualThermalEvalArgs, run_eval
    from llm_cluster_gym.scripts.usage import UsageError

    out = tmp_path / "eval"
    # In a process whose torch threads have run (as control_quality's, after the energy agent):
    # a forked pool deadlocked there; the evaluation spawns its workers. A hang fails by timeout.
    import subprocess
    import sys
    code = ("import torch; torch.ones(512, 512) @ torch.ones(512, 512)\n"
            "from llm_cluster_gym.scripts.residual_thermal import ResidualThermalEvalArgs, run_eval\n"
            f"run_eval(ResidualThermalEvalArgs(seeds=(0,), dc_days=(0,), dc_hours=0.05, dc_seeds=(0, 1), "
            f"jobs=2, out={str(out)!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600, capture_output=True)
    import json
    res = json.loads((out / "results.json").read_text())
    assert (out / "units.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The floating-point paths it ran on: the tests' canonical ones (numpy's baseline loops).
    assert res["host"]["numpy_simd"] == [] and res["host"]["numpy"] == np.__version__
    assert [(r["unit"], r["seed"]) for r in res["rows"]] == [
        ("small_tapas_high", 0), ("tapas_dc day 0", 0), ("tapas_dc day 0", 1)]
    one = _evaluate_unit("checkpoints/residual_thermal", "tapas_dc day 0",
                         window_scenario(load_scenario("tapas_dc"), 0.0, 0.0, 0.05 * 3600.0), "aggregate", 1)
    assert one == res["rows"][2]
    dc = res["rows"][1:]
    for name in (c for c in CONTENDERS if c != "tapas"):
        diffs = [r[name]["harm_gpu_s"] - r["tapas"]["harm_gpu_s"] for r in dc]
        assert res["paired_vs_tapas"]["tapas_dc"][name]["harm_gpu_s"][0] == pytest.approx(np.mean(diffs))
    for row in res["rows"]:  # the harm's IaaS part is kept beside the whole
        for name in CONTENDERS:
            assert 0.0 <= row[name]["iaas_throttled_gpu_s"] <= row[name]["thermal_throttled_gpu_s"]
            assert 0.0 <= row[name]["iaas_capped_gpu_s"] <= row[name]["power_capped_gpu_s"]
    for row in dc:  # the agent's reward, term by term: its service term is the run's harm and VM wait
        for name in CONTENDERS:
            terms, fig = row[name]["reward_terms"], row[name]
            gpu_s = 1024 * 5.0  # tapas_dc: 1,024 GPUs, 5 s intervals
            assert terms["reward_service"] == pytest.approx(
                -SERVICE_WEIGHT * (8 * fig["vm_wait_h"] * 3600.0 + fig["harm_gpu_s"]) / gpu_s)
            assert terms["reward_total"] == pytest.approx(
                sum(v for k, v in terms.items() if k != "reward_total"))
            assert terms["reward_energy"] < 0.0
        assert row["unaware"]["reward_terms"]["reward_total"] < row["tapas"]["reward_terms"]["reward_total"]
    with pytest.raises(UsageError, match="--jobs"):
        run_eval(ResidualThermalEvalArgs(jobs=0, out=str(out)))


def test_scaled_reward_is_the_lagrangian_over_one_plus_the_multiplier():
    """`scale_reward` divides the whole constrained reward by 1 + multiplier (PPO-Lagrangian):
    the same steps, the same violations, the reward bounded however high the multiplier."""
    plain = run(wrapper(project=True, lagrange=50.0), AS_TAPAS)
    scaled = run(wrapper(project=True, lagrange=50.0, scale_reward=True), AS_TAPAS)
    unsafe = np.array([i["unsafe_proposal"] for i in plain])
    assert unsafe.sum() > 0
    assert np.array_equal(unsafe, [i["unsafe_proposal"] for i in scaled])
    assert np.allclose([i["reward"] for i in scaled], np.array([i["reward"] for i in plain]) / 51.0)
    assert max(abs(i["reward"]) for i in scaled) < max(abs(i["reward"]) for i in plain) / 10.0


def test_random_scenarios_name_their_family_and_take_its_multiplier():
    """Each training episode's family gets its own multiplier and is named in every step's info,
    so that the per-family constraint counts each unsafe proposal toward its family."""
    from llm_cluster_gym.agents.residual import GROUP_KEY
    from llm_cluster_gym.agents.train_residual_thermal import _env_factory

    multipliers = {g: float(i + 1) for i, g in enumerate(CONSTRAINT_GROUPS)}
    env = _env_factory(np.random.default_rng(5), dc_share=0.3, dc_window_h=0.05)()
    env.set_lagrange(multipliers)
    seen = set()
    for _ in range(8):
        env.reset()
        _, _, _, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.int64))
        seen.add(info[GROUP_KEY])
        assert info["lagrange"] == multipliers[info[GROUP_KEY]]
    assert seen <= set(CONSTRAINT_GROUPS) and len(seen) >= 2
    env.set_lagrange(7.0)  # one value: every family's
    assert env.env.lagrange == 7.0


def test_each_residual_controller_refuses_the_other_kind_of_checkpoint():
    """A shipped energy agent handed to the thermal controller (and the reverse) fails on the
    metadata's kind, naming the file, before any model is unpickled."""
    from llm_cluster_gym.agents.train_residual import ResidualPolicy

    thermal_env = ClusterEnv(task="thermal", scenario="small_tapas")
    with pytest.raises(CheckpointError, match=r"residual_energy/metadata.json: field 'kind' must be "
                                              r"'residual_over_tapas', found 'residual_over_manager'"):
        ResidualThermalPolicy("checkpoints/residual_energy", thermal_env)
    energy_env = ClusterEnv(task="energy", scenario="small")
    with pytest.raises(CheckpointError, match=r"residual_thermal/metadata.json: field 'kind' must be "
                                              r"'residual_over_manager', found 'residual_over_tapas'"):
        ResidualPolicy("checkpoints/residual_thermal", energy_env)
    assert ResidualThermalPolicy("checkpoints/residual_thermal", thermal_env).kind == "residual_over_tapas"
