"""Outputs are complete or absent, never mixed with an old run's; options are checked before any work.

The crash tests inject the failure into a third-party library (matplotlib's ``savefig``,
``torch.save``) or the standard library, never into the project's own code, or use a bad
policy (a corrupted checkpoint) through the real console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
import yaml

from llm_cluster_gym.envs.outputs import (
    MANIFEST,
    OutputFolderError,
    check_output_folder,
    safe_name,
    staged_file,
    staged_folder,
)
from llm_cluster_gym.scripts import cli
from llm_cluster_gym.scripts.compare import default_out as compare_out
from llm_cluster_gym.scripts.compare import report_folders
from llm_cluster_gym.scripts.simulate import default_out as simulate_out

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "envs" / "scenarios" / "small.yaml"
CHECKPOINT = ROOT / "checkpoints" / "energy"


def console_script() -> str:
    path = Path(sys.executable).parent / "llm-cluster"
    found = str(path) if path.exists() else shutil.which("llm-cluster")
    assert found, "the console script is not installed (pip install -e .)"
    return found


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *args], capture_output=True, text=True, cwd=cwd,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}, timeout=300)


def assert_user_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-cluster"), res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Staging files or folders left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if ".incomplete-" in p.name or ".old-" in p.name)


def short_scenario(folder: Path, name: str = "short", duration_s: float = 60.0) -> Path:
    """The small scenario, shortened, as a YAML file (fast runs through the console script)."""
    data = yaml.safe_load(SMALL.read_text())
    data.update(name=name, duration_s=duration_s)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Boom(RuntimeError):
    pass


def _explode(*args, **kwargs):
    raise Boom("disk full (injected)")


# ------------------------------------------------------------------ names and the folder helper
@pytest.mark.parametrize(("text", "name"), [
    ("small", "small"), ("../../etc/passwd", "etc_passwd"), ("..", "unnamed"), ("", "unnamed"),
    (".hidden", "hidden"), ("a/b\\c d", "a_b_c_d"), ("ckpt:checkpoints/energy", "ckpt_checkpoints_energy"),
])
def test_safe_name_is_one_harmless_path_component(text, name):
    assert safe_name(text) == name


@pytest.mark.parametrize("name", ["../../../escape", "/abs/path", "..", "a/../../b", "~/x"])
def test_default_report_folders_stay_under_reports(name):
    reports = Path("reports").resolve()
    for out in (simulate_out(name), compare_out("energy", name)):
        assert out.resolve().parent == reports, out


def test_report_folders_of_policies_are_distinct():
    folders = report_folders(["ckpt:a/b", "ckpt:a_b", "shield:dynamo", "dynamo"])
    assert len(set(folders.values())) == 4 and folders["shield:dynamo"] == "shield_dynamo"
    assert all("/" not in f and not f.startswith(".") for f in folders.values())


def test_staged_folder_replaces_the_old_run_whole(tmp_path):
    out = tmp_path / "rep"
    with staged_folder(out, "first") as stage:
        (stage / "a.md").write_text("old a")
        (stage / "old_only.png").write_bytes(b"x")
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.md", "old_only.png"]
    with staged_folder(out, "second") as stage:
        assert not any(stage.iterdir())  # a new run starts empty
        (stage / "a.md").write_text("new a")
    assert sorted(snapshot(out)) == [MANIFEST, "a.md"]  # nothing of the old run is left
    assert (out / "a.md").read_text() == "new a"
    assert json.loads((out / MANIFEST).read_text())["command"] == "second"
    assert leftovers(tmp_path) == []


def test_a_failing_run_leaves_the_old_folder_as_it_was(tmp_path):
    out = tmp_path / "rep"
    with staged_folder(out) as stage:
        (stage / "report.md").write_text("old")
    before = snapshot(out)
    with pytest.raises(Boom), staged_folder(out) as stage:
        (stage / "report.md").write_text("half")
        _explode()
    assert snapshot(out) == before and leftovers(tmp_path) == []
    with pytest.raises(Boom), staged_folder(tmp_path / "new") as stage:
        _explode()
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_foreign_folders_and_files_are_refused_untouched(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="no llm-cluster run wrote"):
        check_output_folder(mine)
    with pytest.raises(OutputFolderError), staged_folder(mine):
        pytest.fail("the block must not run")
    assert (mine / "todo.txt").read_text() == "keep me" and leftovers(tmp_path) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        check_output_folder(afile, "--out")
    # An empty folder and a report folder of an earlier version (no manifest) may be replaced.
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")
    legacy = tmp_path / "legacy" / "static"
    legacy.mkdir(parents=True)
    for name in ("report.md", "summary.json", "energy.png"):
        (legacy / name).write_text("x")
    with staged_folder(tmp_path / "legacy") as stage:
        (stage / "report.md").write_text("new")
    assert sorted(snapshot(tmp_path / "legacy")) == [MANIFEST, "report.md"]


def test_a_killed_runs_staging_folder_is_cleared_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".rep.incomplete-{int(dead.stdout)}-0123abcd"
    stale.mkdir()
    (stale / "report.md").write_text("half")
    with staged_folder(tmp_path / "rep") as stage:
        (stage / "report.md").write_text("whole")
    assert not stale.exists() and leftovers(tmp_path) == []


def test_staged_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "run" / "drill.json.gz"
    with staged_file(path) as tmp:
        assert tmp.name.endswith("drill.json.gz") and tmp.parent == path.parent
        tmp.write_bytes(b"old")
    with pytest.raises(Boom), staged_file(path) as tmp:
        tmp.write_bytes(b"ha")
        _explode()
    assert path.read_bytes() == b"old" and leftovers(path.parent) == []


# ------------------------------------------------------------------ the writers, crashing in a library
@pytest.fixture(scope="module")
def episode():
    """A short measured episode of the static controller (what every report is made of)."""
    from llm_cluster_gym.controllers.policy_spec import make_policy
    from llm_cluster_gym.envs.rollout import run_measured
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    scenario = load_scenario("small").with_overrides(duration_s=60.0)
    return run_measured("energy", scenario, "aggregate", lambda env: make_policy("static", env, seed=0), 0, 0)


@pytest.mark.slow
def test_simulate_crash_while_plotting_keeps_the_previous_report(tmp_path, monkeypatch):
    out = tmp_path / "sim"
    argv = ["simulate", "--duration-s", "30", "--serving", "aggregate", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    (out / "stray.md").write_text("a file of the old run")
    before = snapshot(out)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _explode)
    with pytest.raises(Boom):
        cli.main(argv)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert not (out / "stray.md").exists()  # the new run replaced the old one whole
    assert {"report.md", "summary.json", MANIFEST} <= set(snapshot(out))


@pytest.mark.slow
def test_sweep_and_evaluation_writers_are_all_or_nothing(episode, tmp_path, monkeypatch):
    from llm_cluster_gym.agents.evaluation import SHIELDED_AGENT, PolicyRuns, TaskEvaluation, TaskPlan
    from llm_cluster_gym.agents.sweep import Cell, CellResult, SweepResult, SweepSpec, write_sweep

    measured, summary = episode
    spec = SweepSpec(serving="aggregate", warmup=0)
    cell = Cell("static", "small", 0)
    sweep = SweepResult(spec, [cell], [CellResult(cell, summary, measured, 1.0)], [], 1.0)
    runs = {n: PolicyRuns(n, [summary], [measured]) for n in (SHIELDED_AGENT, "static")}
    ev = TaskEvaluation(TaskPlan("energy", CHECKPOINT, "small", ("static",), "static"), (0,), "test", 0,
                        runs, 1.0)
    from llm_cluster_gym.agents.evaluation import write_evaluation

    writers = {"sweep": lambda out: write_sweep(sweep, out, reports="all"),
               "evaluation": lambda out: write_evaluation([ev], out, command="test")}
    for name, write in writers.items():
        out = tmp_path / name
        write(out)
        (out / "stray.csv").write_text("old run")
        before = snapshot(out)
        with monkeypatch.context() as m:
            m.setattr(matplotlib.figure.Figure, "savefig", _explode)
            with pytest.raises(Boom):
                write(out)
        assert snapshot(out) == before and leftovers(tmp_path) == [], name
        write(out)
        assert "stray.csv" not in snapshot(out) and MANIFEST in snapshot(out), name


@pytest.mark.slow
def test_a_checkpoint_save_that_dies_never_looks_complete(tmp_path, monkeypatch):
    import gymnasium as gym
    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from llm_cluster_gym.agents.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    shipped = load_checkpoint(CHECKPOINT)
    venv = DummyVecEnv([lambda: gym.make(shipped.metadata["env_id"], disable_env_checker=True)])
    stats = VecNormalize.load(str(CHECKPOINT / "vecnormalize.pkl"), venv)
    meta = {k: v for k, v in shipped.metadata.items() if k != "files_sha256"}
    ck = tmp_path / "ck"
    save_checkpoint(ck, shipped.model, stats, {**meta, "steps": 1})
    before = snapshot(ck)
    # Dies while writing the model (the slow part): the previous checkpoint stays whole.
    monkeypatch.setattr(torch, "save", _explode)
    with pytest.raises(Boom):
        save_checkpoint(ck, shipped.model, stats, {**meta, "steps": 2})
    monkeypatch.undo()
    assert snapshot(ck) == before
    assert load_checkpoint(ck).metadata["steps"] == 1
    # Dies while moving the files into place: no metadata, so no checkpoint that looks complete.
    monkeypatch.setattr(os, "replace", _explode)
    with pytest.raises(Boom):
        save_checkpoint(ck, shipped.model, stats, {**meta, "steps": 3})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="missing metadata"):
        load_checkpoint(ck)
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) == []
    save_checkpoint(ck, shipped.model, stats, {**meta, "steps": 4})
    assert load_checkpoint(ck).metadata["steps"] == 4
    venv.close()


# ------------------------------------------------------------------ through the console script
@pytest.mark.slow
def test_compare_that_dies_mid_run_leaves_the_old_folder_and_names_it_by_scenario(tmp_path):
    """A bad policy (a checkpoint whose model is corrupt) fails after the first controller ran."""
    scenario = short_scenario(tmp_path / "some" / "path", name="small")  # the checkpoint's scenario
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(CHECKPOINT, bad, ignore=shutil.ignore_patterns("last", "tb"))
    model = bad / "model.zip"
    model.write_bytes(model.read_bytes()[:1000])
    ok = run_cli("compare", "--scenario", str(scenario), "--controllers", "static", "--seeds", "0",
                 "--serving", "aggregate", "--warmup", "0", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    # The default folder is named after the scenario's name, not its path, and lies in reports/.
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["compare-energy-small"]
    out = tmp_path / "reports" / "compare-energy-small"
    before = snapshot(out)
    res = run_cli("compare", "--scenario", str(scenario), "--controllers", "dynamo", f"ckpt:{bad}",
                  "--seeds", "0", "--serving", "aggregate", "--warmup", "0", cwd=tmp_path)
    assert_user_error(res, "model.zip")
    assert snapshot(out) == before  # no dynamo report mixed into the static run's folder
    assert leftovers(out.parent) == []


@pytest.mark.parametrize(("argv", "words"), [
    (["simulate", "--seed", "-1"], ["--seed", "-1"]),
    (["simulate", "--duration-s", "nan"], ["--duration-s", "nan"]),
    (["simulate", "--duration-s", "inf"], ["--duration-s", "inf"]),
    (["compare", "--seeds", "0", "-2"], ["--seeds", "-2"]),
    (["sweep", "--seeds", "-1"], ["--seeds"]),
    (["deploy", "--interval-s", "-1"], ["--interval-s", ">= 0"]),
    (["deploy", "--drill", "policy_error@999", "--max-steps", "5"], ["policy_error@999", "last step 4"]),
    (["simulate", "--out", "afile"], ["--out", "afile", "is a file"]),
])
@pytest.mark.slow
def test_bad_options_exit_2_through_the_console_script(argv, words, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_user_error(run_cli(*argv, cwd=tmp_path), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing was written


@pytest.mark.parametrize(("argv", "words"), [
    (["evaluate", "--seeds", "5000000000"], ["--seeds"]),
    (["train", "--seed", "-1"], ["--seed"]),
    (["tune", "--seed", "-3"], ["--seed"]),
    (["deploy", "--seed", "-1"], ["--seed"]),
    (["deploy", "--interval-s", "nan"], ["--interval-s", "nan"]),
    (["deploy", "--interval-s", "inf"], ["--interval-s", "inf"]),
    (["deploy", "--scenario", "local", "--interval-s", "0"], ["--interval-s", "> 0"]),
    (["deploy", "--duration-s", "nan"], ["--duration-s"]),
    (["deploy", "--power-margin", "1.5"], ["--power-margin"]),
    (["deploy", "--budget-drill", "1,inf,300"], ["--budget-drill"]),
    (["deploy", "--drill", "worker_kill@2"], ["worker_kill", "--scenario local"]),
    (["deploy", "--drill", "telemetry_loss@120"], ["telemetry_loss@120", "last step 119"]),
    (["compare", "--scenario", "no_such_scenario"], ["no_such_scenario"]),
    (["compare", "--controllers", "ckpt:no/such/dir"], ["no/such/dir"]),
    (["compare", "--controllers", f"ckpt:{ROOT / 'checkpoints' / 'thermal'}"], ["task 'thermal'"]),
    (["compare", "--scenario", "medium", "--controllers", f"ckpt:{CHECKPOINT}"], ["scenario 'small'"]),
    (["sweep", "--scenarios", "small", "no_such_scenario"], ["no_such_scenario"]),
    (["sweep", "--out", "notes"], ["--out", "no llm-cluster run wrote"]),
    (["evaluate", "--out", "notes"], ["--out"]),
    (["compare", "--out", "notes"], ["--out"]),
])
def test_bad_options_exit_2_before_any_work(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llm-cluster"), err
    for w in words:
        assert w in err, (w, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # nothing was written


def test_deploy_starts_a_new_log_and_refuses_nothing_valid(tmp_path):
    log = tmp_path / "runs" / "d.jsonl"
    argv = ["deploy", "--scenario", str(short_scenario(tmp_path)), "--serving-model", "aggregate",
            "--policy", "static", "--interval-s", "0", "--metrics-port", "-1", "--log", str(log),
            "--drill", "policy_error@11"]  # the last of the 12 decisions
    assert cli.main(argv) == 0
    first = [json.loads(x) for x in log.read_text().splitlines()]
    assert first[-1]["event"] == "stop" and first[-1]["policy_errors"] == 1
    assert cli.main([*argv[:-2], "--max-steps", "3"]) == 0
    second = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(second) == 4 and second[-1]["steps"] == 3  # the old run's records are gone


class DirCheckpoint:
    """What `tune_agent` reads off Ray's best checkpoint: `to_directory` (a folder of the run)."""

    def __init__(self, src: Path) -> None:
        self.src = src

    def to_directory(self, path: str) -> str:
        shutil.copytree(self.src, path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tb"))
        return path


def test_tune_outputs_replace_the_checkpoint_whole_or_not_at_all(tmp_path, monkeypatch):
    from llm_cluster_gym.agents.checkpoint import load_metadata, sha256_file
    from llm_cluster_gym.agents.config import load_task_config
    from llm_cluster_gym.agents.tune import _write_outputs, load_search_space

    cfg, settings = load_task_config("energy"), load_search_space("energy")
    trials = [{"learning_rate": 1e-4, "net_arch": [64, 64], "best_reward": 1.0, "error": ""}]

    def write(out: Path, reward: float) -> None:
        _write_outputs(out, DirCheckpoint(CHECKPOINT), cfg, {"learning_rate": 1e-4}, reward, trials,
                       settings, seed=0, n_envs=1, hyperparams=ROOT / "agents" / "hyperparams.yaml",
                       space_path="space.yaml")

    out = tmp_path / "tuned"
    out.mkdir()
    write(out, 1.0)
    meta = load_metadata(out)
    assert meta["tune"]["best_validation_reward"] == 1.0 and (out / "last" / "model.zip").is_file()
    for name, digest in meta["files_sha256"].items():
        assert sha256_file(out / name) == digest
    before = snapshot(out)
    monkeypatch.setattr(yaml, "safe_dump", _explode)  # dies before anything is moved into place
    with pytest.raises(Boom):
        write(out, 2.0)
    assert snapshot(out) == before and leftovers(out) == []
    monkeypatch.undo()
    write(out, 3.0)
    assert load_metadata(out)["tune"]["best_validation_reward"] == 3.0 and leftovers(out) == []
