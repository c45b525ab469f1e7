"""`llm-cluster`: the project's one command; every job is a subcommand (``llm-cluster --help``).

Each subcommand is a dataclass of arguments (one field per option, its docstring the help
text) and a ``run(args, command)`` function in its module of `llm_cluster_gym.scripts`; `tyro`
turns the dataclasses into the command line, so every option is spelled and documented the
same way (lists as ``--seeds 0 1 2``, flags as ``--no-progress``). ``python -m llm_cluster_gym``
is the same command.

Errors: a bad option, an unknown scenario or policy, a missing input file and the other
user-input errors listed in `USER_ERRORS` end the command with one line on stderr and exit
status 2, before any work starts where the arguments alone show it; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Union

import tyro

from llm_cluster_gym.scripts import (
    build_profiles,
    calibrate,
    compare,
    compare_profiles,
    deploy,
    derive_slos,
    dynamo_week,
    evaluate,
    fetch_traces,
    fit_thermal,
    measure_reconfig,
    predict,
    profile_gpu,
    profile_tp,
    record_h100_steps,
    residual,
    residual_thermal,
    sim_profile,
    simulate,
    sweep,
    tapas_scale,
    train,
    tune,
)

PROG = "llm-cluster"


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, argument dataclass, entry point and one-line summary."""

    name: str
    args: type
    run: Callable[[Any, str], int]
    summary: str


COMMANDS: tuple[Command, ...] = (
    Command("main", evaluate.MainArgs, evaluate.run_main,
            "Main job (./run-main.sh): the week comparison, then the agents"),
    Command("simulate", simulate.SimulateArgs, simulate.run, "Simulate a scenario, write a report"),
    Command("compare", compare.CompareArgs, compare.run, "Compare controllers on a scenario over seeds"),
    Command("evaluate", evaluate.EvaluateArgs, evaluate.run, "Evaluate checkpoints against the baselines"),
    Command("train", train.TrainArgs, train.run, "Train an agent, write its checkpoint"),
    Command("deploy", deploy.DeployArgs, deploy.run, "Run a policy as a live controller"),
    Command("sweep", sweep.SweepArgs, sweep.run, "Evaluation grid as Ray tasks"),
    Command("tune", tune.TuneArgs, tune.run, "Hyperparameter search with Ray Tune"),
    Command("profile", profile_gpu.ProfileArgs, profile_gpu.run,
            "Profile the worker's time and power on a GPU"),
    Command("profile-tp", profile_tp.ProfileTPArgs, profile_tp.run,
            "Profile tensor-parallel workers (TP 1-8)"),
    Command("calibrate", calibrate.CalibrateArgs, calibrate.run,
            "Record on a GPU, fit the simulator, compare"),
    Command("measure-reconfig", measure_reconfig.MeasureReconfigArgs, measure_reconfig.run,
            "Measure re-sharding downtime (TP4 -> TP8)"),
    Command("fit-thermal", fit_thermal.FitThermalArgs, fit_thermal.run,
            "Fit the GPU thermal model to H100 runs"),
    Command("build-profiles", build_profiles.BuildProfilesArgs, build_profiles.run,
            "Build profile files from the public data"),
    Command("compare-profiles", compare_profiles.CompareProfilesArgs, compare_profiles.run,
            "Compare measured TP tables with the profiles"),
    Command("record-h100-steps", record_h100_steps.RecordStepsArgs, record_h100_steps.run,
            "Record GPU power/temperature under a load"),
    Command("predict", predict.PredictArgs, predict.run,
            "Steady-state vLLM throughput, latency, power from a model config"),
    Command("sim-profile", sim_profile.SimProfileArgs, sim_profile.run,
            "Simulator profile of a model, GPU and TP, with its fit errors"),
    Command("derive-slos", derive_slos.DeriveSlosArgs, derive_slos.run,
            "A scenario's latency SLOs derived from the physics"),
    Command("fetch-traces", fetch_traces.FetchTracesArgs, fetch_traces.run,
            "Download the 2024 week-long Azure traces (resumable)"),
    Command("dynamo-week", dynamo_week.WeekArgs, dynamo_week.run,
            "Energy policies on held-out days of the 2024 week, with CIs"),
    Command("tapas-scale", tapas_scale.TapasScaleArgs, tapas_scale.run,
            "TAPAS vs unaware at datacenter scale: harm and capacity, with CIs"),
    Command("train-residual", residual.TrainResidualArgs, residual.run_train,
            "Train the residual energy agent over the DynamoLLM manager"),
    Command("residual-eval", residual.ResidualEvalArgs, residual.run_eval,
            "Residual energy agent vs the manager on held-out week days"),
    Command("train-thermal", residual_thermal.TrainResidualThermalArgs, residual_thermal.run_train,
            "Train the thermal agent over TAPAS, the shield in the loop"),
    Command("thermal-eval", residual_thermal.ResidualThermalEvalArgs, residual_thermal.run_eval,
            "Thermal agent vs TAPAS (with and without the shield)"),
)
"""Every subcommand, in the order ``llm-cluster --help`` lists them (summaries fit one line)."""

USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("builtins", "FileNotFoundError"),
    ("llm_cluster_gym.scripts.usage", "UsageError"),
    ("llm_cluster_gym.envs.outputs", "OutputFolderError"),
    ("llm_cluster_gym.controllers.policy_spec", "PolicySpecError"),
    ("llm_cluster_gym.controllers.live.exporter", "MetricsPortError"),
    ("llm_cluster_gym.envs.sim.scenario", "ScenarioError"),
    ("llm_cluster_gym.envs.sim.workload", "TraceError"),
    ("llm_cluster_gym.scripts.dynamo_week", "WeekEvalError"),
    ("llm_cluster_gym.scripts.tapas_scale", "TapasScaleError"),
    ("llm_cluster_gym.envs.sim.profiles", "ProfileError"),
    ("llm_cluster_gym.envs.sim.thermal", "ThermalError"),
    ("llm_cluster_gym.agents.checkpoint", "CheckpointError"),
    ("llm_cluster_gym.agents.config", "HyperparamsError"),
    ("llm_cluster_gym.agents.config", "TrainingPlanError"),
    ("llm_cluster_gym.agents.tune", "TuneSpaceError"),
    ("llm_cluster_gym.agents.sweep", "SweepError"),
    ("llm_cluster_gym.agents.sweep", "RayMissingError"),
    ("llm_cluster_gym.controllers.live.loop", "LiveLoopError"),
    ("llm_cluster_gym.controllers.live.governor", "GovernorError"),
    ("llm_cluster_gym.controllers.live.report", "DrillReportError"),
    ("llm_cluster_gym.envs.real.cluster", "RealClusterError"),
    ("llm_cluster_gym.envs.real.worker", "WorkerError"),
    ("llm_cluster_gym.envs.real.telemetry", "GpuUnavailableError"),
    ("llm_cluster_gym.envs.real.telemetry", "TelemetryFileError"),
    ("llm_cluster_gym.envs.real.fidelity", "FidelityError"),
    ("llm_cluster_gym.scripts.compare_profiles", "CompareError"),
    ("llm_cluster_gym.scripts.record_h100_steps", "RecordingError"),
    ("llm_cluster_gym.scripts.fetch_traces", "FetchError"),
)
"""(module, class) of every exception that means bad input or a missing device, not a bug.

Looked up only among modules already imported: an exception cannot be raised before its
module is loaded, so the list costs no imports (no torch or Ray for ``--help``)."""

_CONFIG = (tyro.conf.FlagCreatePairsOff, tyro.conf.OmitSubcommandPrefixes)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DATACLASS_PREFIX = re.compile(r"^Error parsing (?!-)\S+: ")
"""tyro's prefix of an error raised by an argument dataclass itself (its message names the option)."""


def subcommands() -> Any:
    """The union of every subcommand's argument dataclass, as tyro reads it."""
    members = tuple(Annotated[c.args, tyro.conf.subcommand(c.name, description=c.summary)]
                    for c in COMMANDS)
    return Union[members]  # noqa: UP007 - a Union built from a tuple of members


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is one of `USER_ERRORS` (bad input or a missing device), not a bug."""
    types = tuple(getattr(sys.modules[mod], name) for mod, name in USER_ERRORS if mod in sys.modules)
    return isinstance(exc, types)


def one_line(text: str) -> str:
    """A message (or one of tyro's error boxes) as one line.

    Of a box, drawn in UTF-8 or in ASCII, it keeps the first block of text (up to the first
    rule), without the frame, the title and the pointers to ``--help``.
    """
    rows: list[tuple[bool, str]] = []  # (is a rule, text)
    for raw in _ANSI.sub("", text).splitlines():
        s = raw.strip()
        if not s or s[0] in "╭╰":
            continue
        inner = s.strip("│").strip()
        if inner:
            rows.append((len(inner) >= 3 and set(inner) <= {"─", "━", "-"}, inner))
    if "╭" not in text and len(rows) >= 2 and rows[1][0]:
        rows = rows[2:]  # an ASCII box: its title line and the rule under it
    lines: list[str] = []
    for is_rule, inner in rows:
        if is_rule:
            if lines:
                break
            continue
        lines.append(inner)
    return _DATACLASS_PREFIX.sub("", " ".join(" ".join(lines).split()))


def _error(where: str, message: str) -> int:
    print(f"{where}: error: {message}", file=sys.stderr)
    return 2


def parse(argv: Sequence[str]) -> Any:
    """The argument dataclass of the subcommand `argv` names (tyro prints help and errors).

    Raises:
        SystemExit: Help was printed (0), or the arguments are malformed (2).
    """
    return tyro.cli(subcommands(), args=list(argv), prog=PROG, description=__doc__.splitlines()[0],
                    config=_CONFIG)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command line; returns the exit status (2: bad input, told in one line on stderr).

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    named = [c.name for c in COMMANDS if argv and argv[0] == c.name]
    where = " ".join([PROG, *named])
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = parse(argv)
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stderr.write(captured.getvalue())
            return 0
        return _error(where, one_line(captured.getvalue()) or f"bad arguments (see {PROG} --help)")
    except Exception as exc:
        sys.stderr.write(captured.getvalue())
        if is_user_error(exc):
            return _error(where, one_line(str(exc)))
        raise
    sys.stderr.write(captured.getvalue())
    command = next(c for c in COMMANDS if type(args) is c.args)
    try:
        return command.run(args, shlex.join([PROG, *argv]))
    except Exception as exc:
        if is_user_error(exc):
            return _error(f"{PROG} {command.name}", one_line(str(exc)))
        raise
