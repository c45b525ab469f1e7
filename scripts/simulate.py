"""Simulate a scenario under its fixed configuration and write a report.

Usage::

    python -m scripts.simulate [--scenario small] [--seed 0] [--serving request|aggregate]
                               [--out reports/sim-<scenario>] [--duration-s 120] [--no-progress]

Prints the headline table (energy, energy per token, carbon, GPU-hour cost, TTFT/TBT, SLO
attainment, throttling events, peak row power, max GPU temperature) and writes ``report.md``,
``summary.json`` and plots into the output folder (see `envs.sim.report`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_gym.envs.sim.report import format_table, run_episode, write_report  # noqa: E402
from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario  # noqa: E402

SERVING_MODELS = ("request", "aggregate")


@dataclass
class SimulateArgs:
    """Arguments of `python -m scripts.simulate`."""

    scenario: str = "small"
    """Shipped scenario name (small, small_tapas, small_faults, medium, large) or a YAML path."""
    seed: int = 0
    """Seed of the episode (workload sampling, random faults, VMs)."""
    serving: str = "request"
    """Serving model: 'request' (per-request continuous batching) or 'aggregate' (fluid, fast)."""
    out: str | None = None
    """Output folder for report.md, summary.json and plots (default: reports/sim-<scenario>)."""
    duration_s: float | None = None
    """Override the scenario's duration (s), e.g. for a quick look."""
    no_progress: bool = False
    """Hide the progress bar."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), read from source.

    Returns an empty mapping when the source is not available (the help text is then blank).
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def dataclass_parser(cls: type, prog: str, description: str, types: dict[str, type],
                     choices: dict[str, tuple] | None = None) -> argparse.ArgumentParser:
    """One option per dataclass field (`--field-name`), help from the field's docstring.

    A field defaulting to False becomes a store-true flag; the others take `types[name]`
    (``str`` for a field not in it).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if f.default is False:
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kwargs: dict = {"dest": f.name, "type": types.get(f.name, str), "default": f.default,
                        "help": f"{help_text} (default: {f.default})"}
        if choices and f.name in choices:
            kwargs["choices"] = choices[f.name]
        parser.add_argument(flag, **kwargs)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one option per `SimulateArgs` field, help from its docstring."""
    return dataclass_parser(
        SimulateArgs, "python -m scripts.simulate",
        "Simulate a scenario under its fixed configuration and write a report.",
        {"scenario": str, "seed": int, "serving": str, "out": str, "duration_s": float},
        {"serving": SERVING_MODELS})


def parse_args(argv: list[str] | None = None) -> SimulateArgs:
    """Parse a command line into `SimulateArgs`."""
    ns = build_parser().parse_args(argv)
    return SimulateArgs(**vars(ns))


def main(argv: list[str] | None = None) -> int:
    """Run the simulation, print the table and write the report; returns the exit status."""
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = SimulateArgs(**vars(parser.parse_args(argv)))
    try:
        scenario = load_scenario(args.scenario)
        if args.duration_s is not None:
            scenario = scenario.with_overrides(duration_s=args.duration_s)
    except ScenarioError as exc:
        parser.error(str(exc))
    out = Path(args.out) if args.out is not None else Path("reports") / f"sim-{scenario.name}"
    backend = SimCluster(scenario, serving_model=args.serving, record_ticks=True)
    result = run_episode(backend, seed=args.seed, progress=not args.no_progress)
    title = f"Simulation of '{scenario.name}' ({args.serving} serving, seed {args.seed})"
    command = "python -m scripts.simulate " + shlex.join(argv)
    report = write_report(result, out, title, command=command.strip())
    print(f"# {title}\n")
    print(format_table(result.summary()))
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
