"""Evaluation sweeps on Ray: (policy or checkpoint) x scenario x seed x fault drill.

One *cell* is one episode: a policy (a rule-based controller by name, or a trained checkpoint)
on one scenario under one fault drill with one seed, measured exactly like one controller/seed
of `llm-cluster compare` (request-level serving, the first `warmup` intervals left out,
`EpisodeResult.summary()` plus the count of shield overrides). `run_cell` runs a cell in this
process; `run_sweep` runs a grid of cells as Ray tasks, on a local Ray started by `init_ray()`
or on an existing cluster given its address, and gathers them into one `SweepResult`.

Why Ray tasks and not a process pool: the same code runs on one laptop and on a multi-node
cluster (``ray start --head`` / ``--address``), the scheduler packs cells onto free CPUs, and the
episode results come back through the object store, so the driver writes every table and report
and the workers need no shared file system. Checkpoints are shipped the same way: the driver
reads a checkpoint's files once, puts them in the object store, and each task materializes them
in a temporary folder (the checkpoint loader then checks their SHA-256 as usual).

Failures: a task that raises (or whose worker dies) is retried once by the driver (`retries`);
if it fails again it is reported by name with its error in `SweepResult.failures`, and every
other cell still completes.

Fault drills (`DRILLS`) replace the scenario's scheduled faults and switch off its random
faults, so a drill measures one known emergency. Their timings and magnitudes are copied from
`envs/scenarios/small_faults.yaml` as fractions of the episode (a modelling choice, not
measured data): cooling aisle 0 keeps 25% capacity from 20% to 60% of the episode; power feed of
row 0 keeps 60% of its limit from 50% to 70%; a 2x load spike from 75% to 85%. The drill
``scenario`` keeps the scenario file's own faults (what `llm-cluster compare` runs).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.controllers.policy_spec import make_policy as make_spec_policy
from llm_cluster_gym.controllers.policy_spec import parse_policy_spec
from llm_cluster_gym.envs.episode import COMPARISON_COLUMNS, EpisodeResult
from llm_cluster_gym.envs.outputs import staged_folder
from llm_cluster_gym.envs.rollout import run_measured
from llm_cluster_gym.envs.sim.report import write_report
from llm_cluster_gym.envs.sim.scenario import FaultSpec, Scenario, load_scenario

DRILLS: dict[str, tuple[dict[str, float | str | int], ...] | None] = {
    "scenario": None,
    "none": (),
    "cooling_failure": ({"kind": "cooling_failure", "target": 0, "start_frac": 0.2,
                         "duration_frac": 0.4, "magnitude": 0.25},),
    "power_failure": ({"kind": "power_failure", "target": 0, "start_frac": 0.5,
                       "duration_frac": 0.2, "magnitude": 0.6},),
    "load_spike": ({"kind": "load_spike", "target": 0, "start_frac": 0.75,
                    "duration_frac": 0.1, "magnitude": 2.0},),
}
"""Fault drills: None keeps the scenario's faults; otherwise the faults that replace them
(start and duration as fractions of the episode; sources in the module docstring)."""

TASKS = ("energy", "thermal", "combined")
SERVING_MODELS = ("request", "aggregate")

COLUMNS = COMPARISON_COLUMNS
"""(summary key, column label) of the table: `envs.episode`'s comparison columns."""


class SweepError(ValueError):
    """A sweep is malformed (unknown drill, task, serving model, missing checkpoint, no cells)."""


class RayMissingError(ImportError):
    """Ray is not installed; it is the optional extra ``llm-cluster-gym[ray]``."""


def require_ray() -> Any:
    """Import and return the `ray` module, or raise `RayMissingError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RayMissingError(
            "Ray is needed for sweeps and tuning: pip install 'llm-cluster-gym[ray]' "
            "(or pip install 'ray[default,tune]>=2.9')") from exc
    return ray


@dataclass(frozen=True)
class Cell:
    """One episode of a sweep.

    Attributes:
        policy: Policy spec (`controllers.policy_spec`): a controller name (``static``,
            ``shield:dynamo``, ...), or ``ckpt:<dir>`` / ``shield:ckpt:<dir>`` for a trained
            checkpoint.
        scenario: Scenario name or YAML path.
        seed: Episode seed (env reset and controller).
        drill: Key of `DRILLS`.
    """

    policy: str
    scenario: str
    seed: int
    drill: str = "scenario"

    @property
    def name(self) -> str:
        """Readable identifier used in progress messages, failures and tables."""
        return f"{self.policy} | {self.scenario} | seed {self.seed} | {self.drill}"

    @property
    def slug(self) -> str:
        """File-system-safe identifier (report folders)."""
        raw = f"{self.policy}__{Path(self.scenario).stem}__{self.drill}__seed{self.seed}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


@dataclass(frozen=True)
class SweepSpec:
    """How every cell of a sweep is measured (the same for all cells).

    Attributes:
        task: Env task ("energy", "thermal", "combined").
        serving: Serving model of the simulator ("request" for evaluation, "aggregate" is faster).
        warmup: Intervals left out at the start (start-up reconfiguration, model loads).
        window: Trace window ("train", "validation", "test" of `agents.config.WINDOWS`), or
            None for the scenario's own (what `llm-cluster compare` uses).
    """

    task: str = "energy"
    serving: str = "request"
    warmup: int = 12
    window: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SweepError(f"sweep: field 'task' is {self.task!r}, not one of {TASKS}")
        if self.serving not in SERVING_MODELS:
            raise SweepError(f"sweep: field 'serving' is {self.serving!r}, not one of {SERVING_MODELS}")
        if self.warmup < 0:
            raise SweepError(f"sweep: field 'warmup' is {self.warmup}, must be >= 0")
        if self.window is not None:
            from llm_cluster_gym.agents.config import WINDOWS

            if self.window not in WINDOWS:
                raise SweepError(f"sweep: field 'window' is {self.window!r}, not one of {sorted(WINDOWS)}")


@dataclass
class CellResult:
    """A finished cell: its summary (compare's figures), the measured episode and bookkeeping."""

    cell: Cell
    summary: dict[str, float]
    result: EpisodeResult
    wall_s: float
    attempts: int = 1


@dataclass(frozen=True)
class CellFailure:
    """A cell that failed on every attempt; `error` is the last exception as text."""

    cell: Cell
    error: str
    attempts: int


@dataclass
class SweepResult:
    """All cells of a sweep, in grid order, and the failed ones."""

    spec: SweepSpec
    cells: list[Cell]
    results: list[CellResult]
    failures: list[CellFailure]
    wall_s: float
    events: list[str] = field(default_factory=list)

    def table(self) -> dict[tuple[str, str, str], dict[str, float]]:
        """Mean over seeds of every summary figure, per (policy, scenario, drill)."""
        groups: dict[tuple[str, str, str], list[dict[str, float]]] = {}
        for r in self.results:
            groups.setdefault((r.cell.policy, r.cell.scenario, r.cell.drill), []).append(r.summary)
        out = {}
        for key, rows in groups.items():
            out[key] = {k: _nanmean([row[k] for row in rows]) for k in rows[0]}
            out[key]["n_seeds"] = float(len(rows))
        return out


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


def expand_grid(policies: Iterable[str], scenarios: Iterable[str], seeds: Iterable[int],
                drills: Iterable[str] = ("scenario",)) -> list[Cell]:
    """Every combination, policy-major (the order of the table and of the reports).

    Raises:
        SweepError: An unknown drill, or an empty grid.
        PolicySpecError: A policy that is not a valid spec.
    """
    policies, scenarios, seeds, drills = list(policies), list(scenarios), list(seeds), list(drills)
    for p in policies:
        parse_policy_spec(p)
    for d in drills:
        if d not in DRILLS:
            raise SweepError(f"sweep: field 'drills' has {d!r}, not one of {sorted(DRILLS)}")
    cells = [Cell(p, s, int(k), d) for p, s, d, k in itertools.product(policies, scenarios, drills, seeds)]
    if not cells:
        raise SweepError("sweep: the grid is empty (give at least one policy, scenario, seed and drill)")
    return cells


def drill_scenario(scenario: str | Scenario, drill: str, window: str | None = None) -> Scenario:
    """The scenario with the drill's faults (and the trace window) applied.

    Raises:
        SweepError: Unknown drill.
        ScenarioError: The drill does not fit the scenario (e.g. a target row it lacks).
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    if drill not in DRILLS:
        raise SweepError(f"sweep: field 'drill' is {drill!r}, not one of {sorted(DRILLS)}")
    faults = DRILLS[drill]
    changes: dict[str, Any] = {}
    if faults is not None:
        changes["faults"] = tuple(
            FaultSpec(kind=str(f["kind"]), target=int(f["target"]),
                      start_s=float(f["start_frac"]) * sc.duration_s,
                      duration_s=float(f["duration_frac"]) * sc.duration_s,
                      magnitude=float(f["magnitude"]))
            for f in faults)
        changes["random_faults"] = dataclasses.replace(sc.random_faults, per_hour=0.0)
    if window is not None:
        from llm_cluster_gym.agents.config import WINDOWS

        start_s, window_s = WINDOWS[window]
        changes["workload"] = dataclasses.replace(sc.workload, start_s=start_s, window_s=window_s)
    return sc.with_overrides(**changes) if changes else sc


def checkpoint_dir(policy: str) -> Path | None:
    """The checkpoint directory of a ``[shield:]ckpt:<dir>`` spec, or None for a controller name."""
    return parse_policy_spec(policy).checkpoint


def read_checkpoint_files(directory: str | Path) -> dict[str, bytes]:
    """The files of a checkpoint (model, statistics, metadata) as bytes, to ship to workers.

    Raises:
        SweepError: The directory lacks one of the files.
    """
    from llm_cluster_gym.agents.checkpoint import METADATA_FILE, MODEL_FILE, VECNORM_FILE

    directory = Path(directory)
    files = {}
    for name in (MODEL_FILE, VECNORM_FILE, METADATA_FILE):
        path = directory / name
        if not path.is_file():
            raise SweepError(f"sweep: checkpoint {str(directory)!r} has no file {name!r}")
        files[name] = path.read_bytes()
    return files


def make_policy(policy: str, env: Any, seed: int, checkpoint_path: str | Path | None = None) -> Any:
    """A controller for `env` from a policy spec (see `Cell.policy`).

    Args:
        policy: The spec.
        env: The `ClusterEnv` the policy will act on.
        seed: Seed of controllers that draw random numbers.
        checkpoint_path: Where the checkpoint's files are (default: the directory in the spec).
    """
    return make_spec_policy(policy, env, seed, checkpoint_path)


def run_cell(cell: Cell, spec: SweepSpec, checkpoint_files: dict[str, bytes] | None = None) -> CellResult:
    """Run one cell in this process, measured as one controller/seed of `llm-cluster compare`.

    Args:
        cell: The cell.
        spec: Task, serving model, warm-up and window.
        checkpoint_files: For a checkpoint policy, its files as bytes (a Ray worker gets them
            from the object store); None reads the directory named in the spec.
    """
    t0 = time.perf_counter()
    scenario = drill_scenario(cell.scenario, cell.drill, spec.window)
    with tempfile.TemporaryDirectory(prefix="sweep-ckpt-") as tmp:
        path = None
        if checkpoint_files is not None:
            for name, data in checkpoint_files.items():
                (Path(tmp) / name).write_bytes(data)
            path = tmp
        measured, summary = run_measured(
            spec.task, scenario, spec.serving,
            lambda env: make_policy(cell.policy, env, cell.seed, path), cell.seed, spec.warmup)
    return CellResult(cell=cell, summary=summary, result=measured, wall_s=time.perf_counter() - t0)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             include_dashboard: bool | None = None, ship_code: bool = False,
             quiet: bool = False) -> Any:
    """Start or join Ray the way a user expects, and return the `ray` module.

    A local start (no address) is a new one-machine cluster on 127.0.0.1 (`agents.ray_setup`:
    Ray would take the host's network address and listen on every interface): Ray enables token
    authentication by default (a token in ``~/.ray/auth_token``, created readable by its owner
    only, unless ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` says otherwise;
    ``RAY_AUTH_MODE=disabled`` opts out) and starts the dashboard on 127.0.0.1 when its
    dependencies (``ray[default]``) are installed. With an address (``auto``,
    ``<head-ip>:6379`` or ``ray://<head-ip>:10001``) it joins that cluster, whose token must be
    available here the same way (a token file of this user's is made private first).

    Args:
        address: Existing cluster to join, or None for a local one.
        num_cpus: CPUs of the local cluster (default: all); ignored with an address.
        include_dashboard: Force the dashboard on/off (None: Ray's default); local only.
        ship_code: Upload this repository as the job's working directory (for cluster nodes
            that do not have the package installed).
        quiet: Do not forward worker logs to this terminal.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"log_to_driver": not quiet}
    if ship_code:
        root = Path(__file__).resolve().parent.parent
        kwargs["runtime_env"] = {"working_dir": str(root), "excludes": [
            ".git", ".venv", "reports", "checkpoints/*/tb", "checkpoints/*/last", "**/__pycache__"]}
    from llm_cluster_gym.agents.ray_setup import loopback_only, private_token_file

    private_token_file(create=address is None)
    if address is None:
        kwargs.update(num_cpus=num_cpus, include_dashboard=include_dashboard)
        with loopback_only():  # "local": never a cluster named by RAY_ADDRESS or a past `ray start`
            ray.init(address="local", **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return ray


def _task_fn(cell: Cell, spec: SweepSpec, checkpoint_files: dict[str, bytes] | None) -> CellResult:
    """The body of a Ray task (module level so workers import it by name)."""
    return run_cell(cell, spec, checkpoint_files)


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def run_sweep(cells: Sequence[Cell], spec: SweepSpec, *, retries: int = 1,
              max_in_flight: int | None = None, progress: bool = True,
              cpus_per_cell: float = 1.0, log: Callable[[str], None] | None = None) -> SweepResult:
    """Run every cell as a Ray task; gather results in grid order.

    Ray must be initialized (`init_ray`); otherwise a local Ray is started with defaults.

    Args:
        cells: The grid (`expand_grid`).
        spec: How every cell is measured.
        retries: Extra attempts of a failed cell (1: retried once).
        max_in_flight: Cells submitted at once (None: all; Ray queues them by free CPUs). 1
            runs them one at a time (the bench's one-worker case).
        progress: Show a tqdm progress bar.
        cpus_per_cell: CPUs Ray reserves for one cell.
        log: Where failure and retry messages go (default: printed above the bar).

    Returns:
        The results in grid order and the failures; never raises for a failing cell.

    Raises:
        SweepError: An empty grid.
        PolicySpecError: A cell's policy is not a valid spec (before Ray starts).
        ScenarioError: A cell's scenario is unknown or its drill does not fit it (before Ray starts).
    """
    if not cells:
        raise SweepError("sweep: the grid is empty")
    for c in cells:
        parse_policy_spec(c.policy)
    for scenario, drill in dict.fromkeys((c.scenario, c.drill) for c in cells):
        drill_scenario(scenario, drill, spec.window)  # unknown scenario or unfit drill: before Ray
    ray = init_ray() if not _ray_ready() else require_ray()
    from tqdm.auto import tqdm

    remote = ray.remote(num_cpus=cpus_per_cell, max_retries=0)(_task_fn)
    spec_ref = ray.put(spec)
    files_refs: dict[Path, Any] = {}
    for c in cells:
        d = checkpoint_dir(c.policy)
        if d is not None and d not in files_refs:
            files_refs[d] = ray.put(read_checkpoint_files(d))
    limit = max(1, int(max_in_flight)) if max_in_flight else len(cells)
    bar = tqdm(total=len(cells), unit="cell", dynamic_ncols=True, disable=not progress)
    events: list[str] = []

    def note(msg: str) -> None:
        events.append(msg)
        (log or bar.write)(msg)

    t0 = time.perf_counter()
    pending: deque[int] = deque(range(len(cells)))
    in_flight: dict[Any, int] = {}
    attempts = [0] * len(cells)
    done: dict[int, CellResult] = {}
    failed: dict[int, CellFailure] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                i = pending.popleft()
                d = checkpoint_dir(cells[i].policy)
                ref = remote.remote(cells[i], spec_ref, files_refs[d] if d is not None else None)
                in_flight[ref] = i
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                i = in_flight.pop(ref)
                attempts[i] += 1
                try:
                    res = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - any task failure is reported, not raised
                    err = _error_text(exc)
                    if attempts[i] <= retries:
                        note(f"cell failed (attempt {attempts[i]}), retrying: {cells[i].name}: {err}")
                        pending.appendleft(i)
                        continue
                    note(f"cell FAILED after {attempts[i]} attempts: {cells[i].name}: {err}")
                    failed[i] = CellFailure(cells[i], err, attempts[i])
                else:
                    res.attempts = attempts[i]
                    done[i] = res
                bar.update(1)
                bar.set_postfix(failed=len(failed))
    finally:
        bar.close()
        for ref in in_flight:
            ray.cancel(ref)
    return SweepResult(spec=spec, cells=list(cells), results=[done[i] for i in sorted(done)],
                       failures=[failed[i] for i in sorted(failed)], wall_s=time.perf_counter() - t0,
                       events=events)


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _fmt(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.4g}"


def format_table(sweep: SweepResult) -> str:
    """The sweep as a Markdown table: one row per (policy, scenario, drill), means over seeds."""
    head = "| policy | scenario | drill | seeds | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * len(COLUMNS)]
    for (policy, scenario, drill), s in sweep.table().items():
        cells = [_fmt(s.get(k, math.nan)) for k, _ in COLUMNS]
        lines.append(f"| {policy} | {scenario} | {drill} | {int(s['n_seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep(sweep: SweepResult, out: str | Path, reports: str = "first-seed",
                command: str = "llm-cluster sweep") -> Path:
    """Write the sweep's table, per-cell figures and episode reports under `out`.

    Files: ``sweep.md`` (table, failures, settings), ``cells.csv`` (one row per finished cell,
    every summary figure), ``sweep.json`` (the same plus failures), and per cell
    ``reports/<slug>/`` with `envs.sim.report.write_report`'s report, the single-run
    evaluation's format. The folder is written all at once (`envs.outputs.staged_folder`): it
    appears complete, replacing the previous sweep's, or not at all.

    Args:
        sweep: The result.
        out: Folder (created).
        reports: "all" cells, "first-seed" (lowest seed of each policy/scenario/drill, as
            `llm-cluster compare` does), or "none".
        command: Command line recorded in the reports.

    Returns:
        Path of ``sweep.md``.

    Raises:
        OutputFolderError: `out` is a file or holds files no run wrote.
    """
    if reports not in ("all", "first-seed", "none"):
        raise SweepError(f"sweep: field 'reports' is {reports!r}, not one of ('all', 'first-seed', 'none')")
    with staged_folder(out, command) as stage:
        _write_sweep_files(sweep, stage, reports, command)
    return Path(out) / "sweep.md"


def _write_sweep_files(sweep: SweepResult, out: Path, reports: str, command: str) -> None:
    """The files of `write_sweep`, into the (staging) folder `out`."""
    import csv
    import json

    keys = list(sweep.results[0].summary) if sweep.results else [k for k, _ in COLUMNS]
    with open(out / "cells.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", "scenario", "drill", "seed", "attempts", "wall_s", *keys])
        for r in sweep.results:
            c = r.cell
            w.writerow([c.policy, c.scenario, c.drill, c.seed, r.attempts, f"{r.wall_s:.3f}",
                        *[repr(r.summary.get(k, math.nan)) for k in keys]])
    payload = {
        "spec": dataclasses.asdict(sweep.spec), "wall_s": sweep.wall_s,
        "cells": [{**dataclasses.asdict(r.cell), "attempts": r.attempts, "wall_s": r.wall_s,
                   "summary": {k: (v if np.isfinite(v) else None) for k, v in r.summary.items()}}
                  for r in sweep.results],
        "failures": [{**dataclasses.asdict(f.cell), "error": f.error, "attempts": f.attempts}
                     for f in sweep.failures],
    }
    (out / "sweep.json").write_text(json.dumps(payload, indent=1))
    s = sweep.spec
    lines = [f"# Sweep: {s.task} task, {s.serving} serving, first {s.warmup} intervals left out"
             + (f", {s.window} trace window" if s.window else ""), "",
             f"{len(sweep.results)} of {len(sweep.cells)} cells finished in {sweep.wall_s:.1f} s; "
             "figures are means over seeds.", "", format_table(sweep), ""]
    if sweep.failures:
        lines += ["## Failed cells", ""] + [f"- {f.cell.name} ({f.attempts} attempts): {f.error}"
                                            for f in sweep.failures] + [""]
    lines += [f"Command: `{command}`", ""]
    if reports != "none":
        first: dict[tuple[str, str, str], int] = {}
        for r in sweep.results:
            key = (r.cell.policy, r.cell.scenario, r.cell.drill)
            first[key] = min(first.get(key, r.cell.seed), r.cell.seed)
        lines += ["## Episode reports", ""]
        for r in sweep.results:
            c = r.cell
            if reports == "first-seed" and c.seed != first[(c.policy, c.scenario, c.drill)]:
                continue
            write_report(r.result, out / "reports" / c.slug,
                         f"{c.policy} on {c.scenario}, drill {c.drill} ({s.task}, seed {c.seed})",
                         command=command)
            lines.append(f"- [{c.name}](reports/{c.slug}/report.md)")
        lines.append("")
    (out / "sweep.md").write_text("\n".join(lines))
