"""A short training run's TensorBoard files, read back with TensorBoard's own reader."""

from __future__ import annotations

import dataclasses

import pytest

from llm_cluster_gym.agents.config import load_task_config
from llm_cluster_gym.agents.train import train
from llm_cluster_gym.agents.train_logging import TENSORBOARD_SCALARS
from llm_cluster_gym.envs.reward import TERMS

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(tb_dir) -> dict[str, list]:
    """Every scalar of every run under `tb_dir` (one folder per training stage), by tag."""
    out: dict[str, list] = {}
    runs = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    assert runs, f"no event files under {tb_dir}"
    for run in runs:
        acc = event_accumulator.EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(acc.Scalars(tag))
    return out


@pytest.mark.integration
def test_training_run_logs_the_readme_scalars(tmp_path):
    cfg = load_task_config("energy")
    # Evaluations on the aggregate env the agent trains on (the request-level one is 10x slower;
    # what is logged does not depend on it).
    cfg = dataclasses.replace(
        cfg, algo_params=dataclasses.replace(cfg.algo_params, n_steps=256, batch_size=64),
        n_envs=1, eval_freq=256, eval_episodes=1, checkpoint_freq=10**9, eval_id=cfg.env_id)
    res = train(cfg, tmp_path, seed=0, steps=512, n_envs=1, progress=False, tensorboard=True,
                evaluate=True, finetune_steps=0)
    scalars = read_scalars(tmp_path / "tb")
    missing = [t for t in TENSORBOARD_SCALARS if t not in scalars]
    assert not missing, (missing, sorted(scalars))
    # Two 120-interval episodes end in each 256-step rollout: the episode means are theirs.
    assert len(scalars["episode/reward"]) == 2
    for a, *terms in zip(scalars["episode/reward"],
                         *(scalars[f"episode/reward_{t}"] for t in TERMS), strict=True):
        assert a.value == pytest.approx(sum(t.value for t in terms), rel=1e-4, abs=1e-4)
        assert a.value < 0
    assert all(0.0 <= s.value <= 1.0 for s in scalars["episode/slo_attainment"])
    assert all(s.value > 0 for s in scalars["episode/energy_j"])
    # SB3's own mean return of the last 100 episodes agrees at the first rollout (two episodes).
    assert scalars["rollout/ep_rew_mean"][0].value == pytest.approx(
        scalars["episode/reward"][0].value, rel=1e-4)
    # The evaluations: one per 256 steps (the last at the end), and the final test comparison.
    assert [s.step for s in scalars["validation/reward"]] == [256, 512]
    ev = res.metadata["evaluation"]
    for who in ("policy", "static"):
        for k in ("reward", "energy_j", "slo_attainment"):
            (s,) = scalars[f"evaluation/{who}_{k}"]
            assert s.value == pytest.approx(ev[who][k]["mean"], rel=1e-6) and s.step == 512
    (ratio,) = scalars["evaluation/energy_ratio_vs_static"]
    assert ratio.value == pytest.approx(ev["energy_ratio_vs_static"], rel=1e-6)
