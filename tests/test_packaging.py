"""The distribution: one import package, its data, its registered ids, a light core import."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("llm_cluster_gym-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_installs_one_top_level_package_with_its_data(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"llm_cluster_gym", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for needed in ("llm_cluster_gym/envs/scenarios/small.yaml", "llm_cluster_gym/agents/hyperparams.yaml",
                   "llm_cluster_gym/controllers/live/grafana_dashboard.json",
                   "llm_cluster_gym/controllers/live/alerts.yaml",
                   "llm_cluster_gym/controllers/live/metrics_server.py"):
        assert needed in names
    assert any(n.startswith("llm_cluster_gym/envs/data/traces/") for n in names)
    assert not any(n.startswith(("llm_cluster_gym/tests/", "llm_cluster_gym/bench/")) for n in names)
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llm-cluster = llm_cluster_gym.scripts.cli:main" in entry

    # Installed on its own (dependencies from this interpreter), away from the checkout.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import gymnasium, llm_cluster_gym, sys\n"
        f"assert llm_cluster_gym.__file__.startswith({str(target)!r}), llm_cluster_gym.__file__\n"
        "env = gymnasium.make('LLMCluster/Thermal-small-v0')\n"
        "env.reset(seed=0); env.step(env.action_space.sample())\n"
        "for name in ('envs', 'agents', 'controllers', 'scripts'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(f'top-level {name!r} importable from the wheel')\n"
        "print('ok')\n"
    )
    res = _run(code, tmp_path, env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_make_by_module_qualified_id_needs_no_prior_import(tmp_path):
    code = (
        "import sys, gymnasium\n"
        "env = gymnasium.make('llm_cluster_gym:LLMCluster/Energy-small-v0')\n"
        "print(env.spec.max_episode_steps)\n"
        "env.reset(seed=0)\n"
        "print('torch' in sys.modules, 'stable_baselines3' in sys.modules)\n"
    )
    res = _run(code, tmp_path)
    assert res.returncode == 0, res.stderr
    steps, heavy = res.stdout.split("\n")[:2]
    assert int(steps) == 120
    assert heavy == "False False"  # the environment never imports torch or SB3


@pytest.mark.slow
def test_every_id_has_max_episode_steps_equal_to_its_episode():
    import gymnasium

    import llm_cluster_gym

    for env_id in llm_cluster_gym.TASK_IDS:
        spec = gymnasium.spec(env_id)
        assert spec.max_episode_steps is not None, env_id
        env = gymnasium.make(env_id)
        env.reset(seed=0)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            steps, done = steps + 1, terminated or truncated
        assert steps == spec.max_episode_steps, env_id


def test_no_generic_top_level_package_outside_the_checkout(tmp_path):
    res = _run("import llm_cluster_gym.envs.cluster_env\n"
               "for name in ('envs', 'agents', 'controllers', 'scripts'):\n"
               "    try:\n"
               "        __import__(name)\n"
               "    except ImportError:\n"
               "        continue\n"
               "    raise SystemExit(name)\n", tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout


def test_no_path_outside_the_repository_and_no_sys_path_edits():
    """Self-contained: no file names a path outside the checkout; no module edits sys.path."""
    offenders = []
    for folder in ("llm_cluster_gym", "envs", "agents", "controllers", "scripts", "bench", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".md", ".yaml", ".toml", ".sh") or "__pycache__" in path.parts:
                continue
            text = path.read_text(errors="replace")
            if "../shared" in text or "/work/" in text or "sys.path.insert" in text:
                offenders.append(str(path.relative_to(ROOT)))
    for name in ("README.md", "requirements.txt", "pyproject.toml", "run-main.sh", "run-tests.sh"):
        text = (ROOT / name).read_text()
        if "../shared" in text or "/work/" in text or "this machine" in text:
            offenders.append(name)
    assert offenders == []
