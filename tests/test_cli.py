"""The `llm-cluster` command: subcommands, help text, one-line user errors, the policy-spec syntax."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from llm_cluster_gym.agents.sweep import DRILLS
from llm_cluster_gym.controllers.policy_spec import PolicySpec, PolicySpecError, parse_policy_spec
from llm_cluster_gym.envs.sim.scenario import ScenarioError
from llm_cluster_gym.scripts import cli
from llm_cluster_gym.scripts.calibrate import CalibrateFitArgs, CalibrateRecordArgs
from llm_cluster_gym.scripts.evaluate import EvaluateArgs, MainArgs
from llm_cluster_gym.scripts.sweep import SweepArgs

ROOT = Path(__file__).resolve().parents[1]
NAMES = [c.name for c in cli.COMMANDS]


def console_script() -> str:
    """The installed `llm-cluster` script of this interpreter's environment."""
    path = Path(sys.executable).parent / "llm-cluster"
    found = str(path) if path.exists() else shutil.which("llm-cluster")
    assert found, "the console script is not installed (pip install -e .)"
    return found


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *args], capture_output=True, text=True, cwd=cwd,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}, timeout=300)


# ------------------------------------------------------------------ subcommands and help
def test_help_lists_every_subcommand_on_one_line():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for c in cli.COMMANDS:
        hits = [ln for ln in lines if re.search(rf"• {re.escape(c.name)}\s", ln)]
        assert len(hits) == 1 and c.summary in hits[0], (c.name, hits)
    assert {"main", "simulate", "compare", "evaluate", "train", "deploy", "sweep", "tune", "profile",
            "profile-tp", "calibrate", "measure-reconfig", "fit-thermal", "build-profiles"} <= set(NAMES)


@pytest.mark.slow
def test_python_dash_m_is_the_same_command():
    res = subprocess.run([sys.executable, "-m", "llm_cluster_gym", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == run_cli("--help").stdout


def option_helps(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, read from tyro's help (boxes drawn in UTF-8 or in ASCII)."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        body = line.rstrip().rstrip("│")
        body = body[1:] if body.startswith("│") else body
        if re.match(r"^\s{1,2}--", body):
            head, *rest = re.split(r"\s{2,}", body.strip(), maxsplit=1)
            current = head.split()[0]
            helps[current] = rest[0] if rest else ""
        elif current and re.match(r"^\s{4,}\S", body):
            helps[current] += " " + body.strip()
        else:
            current = None
    return helps


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


SUBCOMMAND_ARGS = [([c.name], c.args) for c in cli.COMMANDS if c.name != "calibrate"] + [
    (["calibrate", "record"], CalibrateRecordArgs), (["calibrate", "fit"], CalibrateFitArgs)]


@pytest.mark.parametrize(("argv", "args_cls"), SUBCOMMAND_ARGS, ids=[" ".join(a) for a, _ in SUBCOMMAND_ARGS])
def test_every_option_has_help_text(argv, args_cls, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    helps = option_helps(text)
    for f in dataclasses.fields(args_cls):
        if _flag(f) not in helps:  # a positional argument (compare-profiles' tables)
            assert "positional arguments" in text and f.name == "tables", (argv, f.name)
            continue
        text_only = helps[_flag(f)].strip().removesuffix("(required)")
        words = text_only.rsplit("(default: ", 1)[0].split()  # the help without the default tyro adds
        assert len(words) >= 2, (argv, f.name, helps[_flag(f)])


def test_calibrate_has_record_and_fit(capsys):
    assert cli.main(["calibrate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "record" in out and "fit" in out


def test_main_is_evaluate_with_its_defaults_plus_the_week_day():
    main_args = dataclasses.asdict(MainArgs())
    evaluate_part = {k: v for k, v in main_args.items()
                     if not k.startswith("week_") and k != "tapas_out"}
    assert evaluate_part == dataclasses.asdict(EvaluateArgs())
    assert main_args["week_day"] == 2
    assert cli.main(["main", "--help"]) == 0
    assert cli.main(["main", "--week-day", "3"]) == 2  # a validation day is not held out


def test_sweep_drill_choices_are_the_sweep_drills():
    (drill,) = get_args(get_type_hints(SweepArgs)["drills"])
    assert set(get_args(drill)) == set(DRILLS)


# ------------------------------------------------------------------ user errors
@pytest.mark.parametrize("argv", [
    ["simulate", "--bogus", "1"],                         # bad option
    ["simulate", "--scenario", "no_such_scenario"],       # unknown scenario
    ["deploy", "--policy", "no_such_policy"],             # unknown policy
    ["compare", "--controllers", "checkpoint:x"],         # the other checkpoint syntax
    ["sweep", "--policies", "shield:nope"],               # unknown policy in a grid
    ["compare", "--seeds", "0,1,2"],                      # lists are written one way: --seeds 0 1 2
    ["evaluate", "--checkpoint-dir", "no/such/dir"],      # bad input file, found before any run
])
@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(argv, tmp_path):
    res = run_cli(*argv, cwd=tmp_path)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-cluster"), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


@pytest.mark.parametrize("argv", [
    ["deploy", "--drill", "meteor@3"],
    ["deploy", "--budget-drill", "60,60"],
    ["calibrate", "record", "--batch-steps", "10:64"],
    ["calibrate", "record", "--lead-s", "-1"],
    ["train", "--steps", "0"],
    ["train", "--task", "thermal", "--batched"],
    ["evaluate", "--tasks", "nope"],
    ["profile-tp", "--models", "gpt5"],
    ["build-profiles"],
    ["compare-profiles", "no_such_table.json"],
])
def test_bad_options_are_rejected_before_any_work(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("llm-cluster")


def test_user_errors_are_told_apart_from_bugs():
    assert cli.is_user_error(ScenarioError("x")) and cli.is_user_error(PolicySpecError("x"))
    assert cli.is_user_error(FileNotFoundError("x"))
    assert not cli.is_user_error(ValueError("x")) and not cli.is_user_error(KeyError("x"))


def test_one_line_reads_tyro_boxes():
    box = "\n".join(["╭─ Invalid choice ────────────╮",
                     "│ invalid choice 'foo' for    │",
                     "│ argument '--serving'.       │",
                     "│ ─────────────────────────── │",
                     "│ For full helptext, run x    │",
                     "╰─────────────────────────────╯"])
    assert cli.one_line(box) == "invalid choice 'foo' for argument '--serving'."
    ascii_box = "\n".join([" Invalid choice ", " -------------- ", "  invalid choice 'foo' for ",
                           "  argument '--serving'. ", "  -------------- ", "  For full helptext, run x "])
    assert cli.one_line(ascii_box) == "invalid choice 'foo' for argument '--serving'."
    assert cli.one_line("policy 'x':\n unknown") == "policy 'x': unknown"


# ------------------------------------------------------------------ policy specs
@pytest.mark.parametrize(("text", "spec"), [
    ("dynamo", PolicySpec(controller="dynamo")),
    ("shield:dynamo", PolicySpec(controller="dynamo", shield=True)),
    ("random", PolicySpec(controller="random")),
    ("ckpt:checkpoints/energy", PolicySpec(checkpoint=Path("checkpoints/energy"))),
    ("shield:ckpt:checkpoints/thermal", PolicySpec(checkpoint=Path("checkpoints/thermal"), shield=True)),
])
def test_policy_spec_accepts(text, spec):
    assert parse_policy_spec(text) == spec
    assert str(spec) == text and parse_policy_spec(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "nope", "checkpoint:checkpoints/energy", "ckpt:", "shield:",
                                  "shield:shield:dynamo", "shield:nope", "Dynamo", "ckpt"])
def test_policy_spec_rejects(text):
    with pytest.raises(PolicySpecError, match="policy"):
        parse_policy_spec(text)


# ------------------------------------------------------------------ a real run
@pytest.mark.slow
def test_simulate_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "sim"
    res = run_cli("simulate", "--scenario", "small", "--duration-s", "30", "--out", str(out),
                  "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "energy_kwh" in res.stdout and (out / "report.md").is_file()
    doc = json.loads((out / "summary.json").read_text())
    assert doc["command"].startswith("llm-cluster simulate --scenario small --duration-s 30")
    assert doc["n_intervals"] == 6
