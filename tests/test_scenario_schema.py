"""Scenario and trace inputs: the schema is the format's documentation, every bad input is a clear error.

Each bad input the issue lists ends in a `ScenarioError` or `TraceError` naming the file, the
field and the value; property-based tests mutate one field of a shipped scenario (or one cell of
a generated trace) and check that the result either loads and runs a short episode with the
simulator's invariants intact, or is refused with an error that names a real field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import (
    REFERENCE_DOC,
    SECTIONS,
    FaultSpec,
    Scenario,
    ScenarioError,
    field_spec,
    load_scenario,
    scenario_reference,
)
from llm_cluster_gym.envs.sim.workload import TraceError, load_trace

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("small", "small_faults", "small_tapas")


@functools.cache
def _shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "envs" / "scenarios" / f"{name}.yaml").read_text())


def base_data(name: str) -> dict:
    """A fresh copy of a shipped scenario file's YAML data."""
    return copy.deepcopy(_shipped(name))


def set_path(data: dict, path: str, value: Any) -> dict:
    """Set `a.b[1].c` in nested YAML data (creating missing mappings); returns `data`."""
    keys = [int(k) if k.isdigit() else k for k in re.split(r"\.|\[|\]\.?", path) if k != ""]
    node = data
    for key in keys[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[keys[-1]] = value
    return data


def write(tmp_path: Path, data: dict, name: str = "mutant.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def schema_has(path: str) -> bool:
    """Whether `path` (indices allowed) names a field of the scenario schema."""
    cls: Any = Scenario
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        tp = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        cls = args[0] if args and typing.get_origin(tp) is not None else tp
    return True


def named_field(message: str) -> str | None:
    m = re.search(r"field '([^']+)'", message)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------- the schema is the doc


def test_reference_doc_is_generated_from_the_schema():
    doc = ROOT / REFERENCE_DOC
    assert doc.read_text() == scenario_reference(), (
        f"{REFERENCE_DOC} is out of date: python -m llm_cluster_gym.envs.sim.scenario {REFERENCE_DOC}")


UNIT_BY_SUFFIX = {"_s": "s", "_w": "W", "_c": "C", "_mhz": "MHz", "_usd": "USD", "_kwh": "g/kWh",
                  "_per_hour": "1/h"}


@pytest.mark.parametrize(("section", "cls"), SECTIONS, ids=[s or "top" for s, _ in SECTIONS])
def test_every_field_documents_its_meaning_and_the_unit_its_name_says(section, cls):
    doc = scenario_reference()
    for f in dataclasses.fields(cls):
        spec = field_spec(f)
        assert spec.doc.strip(), f"{section}.{f.name} has no description"
        suffix = next((s for s in UNIT_BY_SUFFIX if f.name.endswith(s)), None)
        if suffix is not None and f.name != "source":
            assert spec.unit == UNIT_BY_SUFFIX[suffix], (section, f.name, spec.unit)
        if not spec.loader_only:
            assert f"| `{f.name}` |" in doc


# ---------------------------------------------------------------------------- the issue's cases

ISSUE_CASES = [
    # (shipped scenario, field path, bad value, field the error names, words of the reason)
    ("small_tapas", "vms.gpu_power_w", [-300], "vms.gpu_power_w[0]", "> 0"),
    ("small_tapas", "vms.gpu_power_w", [5000], "vms.gpu_power_w[0]", "power limit"),
    ("small_faults", "faults[0].magnitude", 5, "faults[0].magnitude", "(0, 1]"),
    ("small_faults", "faults[2].magnitude", 0.5, "faults[2].magnitude", "[1, 100]"),
    ("small_faults", "faults[0].magnitude", 0.05, "faults[0].magnitude", "oversubscribed"),
    ("small_faults", "faults[1].start_s", 900, "faults[1].start_s", "after the episode ends"),
    ("small_faults", "faults[1].start_s", -10, "faults[1].start_s", ">= 0"),
    ("small_faults", "faults[0].target", 9, "faults[0].target", "aisles"),
    ("small", "gpu_hour_usd", -1, "gpu_hour_usd", "[0, 1000]"),
    ("small", "serving.pools[0].freq_mhz", 1500, "serving.pools[0].freq_mhz", "freq_choices_mhz"),
    ("small", "serving.freq_choices_mhz", [800, 1980, 2500], "serving.freq_choices_mhz[2]", "clock range"),
    ("small", "serving.freq_choices_mhz", [100, 1980], "serving.freq_choices_mhz[0]", "clock range"),
    ("small", "datacenter.cooling_oversubscription", 100, "datacenter.cooling_oversubscription", "[0.01, 3]"),
    ("small", "datacenter.power_oversubscription", 100, "datacenter.power_oversubscription", "[0.01, 3]"),
    ("small", "duration_s", 3, "duration_s", "whole multiple"),
    ("small", "duration_s", 7, "duration_s", "whole multiple"),
    ("small_tapas", "vms.initial_fraction", 1.5, "vms.initial_fraction", "[0, 1]"),
    ("small", "carbon_step_s", 0, "carbon_step_s", ">= 1"),
    ("small", "carbon_g_per_kwh", [390, -5], "carbon_g_per_kwh[1]", "[0, 2000]"),
    ("small", "carbon_g_per_kwh", [], "carbon_g_per_kwh", "at least 1"),
    ("small", "name", "../outside", "name", "letter or digit"),
    ("small", "name", "a/b", "name", "letter or digit"),
    ("small", "name", "a\\b", "name", "letter or digit"),
    ("small", "name", "", "name", "letter or digit"),
    ("small", "control_interval_s", 1.25, "control_interval_s", "whole multiple of tick_s"),
    ("small", "tick_s", 0, "tick_s", "[0.01, 60]"),
    ("small", "duration_s", float("nan"), "duration_s", "finite"),
    ("small", "duration_s", float("inf"), "duration_s", "finite"),
    ("small", "workload.rps_per_gpu", -1, "workload.rps_per_gpu", "[0, 100]"),
    ("small", "workload.trace", "no_such_trace", "workload.trace", "unknown builtin trace"),
    ("small", "workload.trace", "missing/trace.csv", "workload.trace", "no such trace file"),
    ("small", "workload.pools", "bogus", "workload.pools", "one of"),
    ("small", "workload.pools", "single", "serving.pools", "has 1 pools"),
    ("small", "workload.start_s", 1e6, "workload.start_s", "past the end of trace"),
    ("small", "workload.spikes", [{"start_s": 10, "duration_s": 5, "multiplier": 0.5}],
     "workload.spikes[0].multiplier", "[1, 100]"),
    ("small", "workload.spikes", [{"start_s": 700, "duration_s": 5, "multiplier": 2}],
     "workload.spikes[0].start_s", "after the episode ends"),
    ("small", "workload.diurnal", {"peak_to_mean": 3}, "workload.diurnal.peak_to_mean", "[1, 2]"),
    ("small", "serving.tp_choices", [3], "serving.tp_choices[0]", "divide"),
    ("small", "serving.tp_choices", [8, 4], "serving.tp_choices", "increasing"),
    ("small", "serving.model", "nope", "serving.model", "no profile"),
    ("small", "serving.gpu", "a100", "serving.gpu", "no profile"),
    ("small", "serving.pools[0].max_batch", 48, "serving.pools[0].max_batch", "batch_choices"),
    ("small", "serving.pools[0].n_instances", 40, "serving.pools", "asks for"),
    ("small", "serving.quantized_quality_loss", 2, "serving.quantized_quality_loss", "[0, 1]"),
    ("small", "datacenter.saas_fraction", 0.01, "datacenter.saas_fraction", "no SaaS server"),
    ("small", "datacenter.rows_per_aisle", 5, "datacenter.rows_per_aisle", "exceeds"),
    ("small", "datacenter.rows", 2.5, "datacenter.rows", "integer"),
    ("small", "datacenter.rows", True, "datacenter.rows", "integer"),
    ("small", "datacenter.server.gpu_tdp_w", 300, "datacenter.server.gpu_tdp_w", "power limit"),
    ("small", "datacenter.server.overhead_idle_w", 5000, "datacenter.server.overhead_idle_w", "full load"),
    ("small", "datacenter.server.max_power_w", 5000, "datacenter.server.max_power_w", "gpus x gpu_tdp_w"),
    ("small", "datacenter.server.max_power_w", 7000, "datacenter.server.overhead_max_w", "nameplate"),
    ("small", "datacenter.server.overhead_max_w", 1000, "datacenter.server.overhead_idle_w", "full load"),
    ("small", "datacenter.cooling.supply_temp_c", 120, "datacenter.cooling.supply_temp_c", "[0, 80]"),
    ("small", "vms.arrivals_per_hour", 10, "vms.arrivals_per_hour", "no server hosts VMs"),
    ("small", "random_faults.kinds", ["fire"], "random_faults.kinds[0]", "one of"),
    ("small", "random_faults.magnitude", 1.5, "random_faults.magnitude", "(0, 1]"),
    ("small", "workload.rps_per_gpu", 100, "workload.rps_per_gpu", None),  # 1.9 M requests: fine
    ("medium", "duration_s", 2_592_000, "workload.rps_per_gpu", "at most 50,000,000"),
    ("small", "faults", None, "faults", "must be a list"),
]


@pytest.mark.parametrize(("scenario", "path", "value", "named", "why"), ISSUE_CASES,
                         ids=[f"{c[1]}={c[2]!r}" for c in ISSUE_CASES])
def test_bad_scenario_value_is_a_clear_error(tmp_path, scenario, path, value, named, why):
    file = write(tmp_path, set_path(base_data(scenario), path, value))
    if why is None:
        load_scenario(file)
        return
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    msg = str(info.value)
    assert msg.startswith(f"{file}: "), msg
    assert named_field(msg) == named, msg
    assert why in msg
    assert "\n" not in msg


def test_yaml_level_mistakes_are_clear_errors(tmp_path):
    text = (ROOT / "envs/scenarios/small.yaml").read_text()
    p = tmp_path / "dup.yaml"
    p.write_text(text + "duration_s: 60\n")  # YAML would silently keep the last one
    with pytest.raises(ScenarioError, match=r"dup\.yaml.*'duration_s' given twice"):
        load_scenario(p)
    p = tmp_path / "binary.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ScenarioError, match=r"binary\.yaml: not a UTF-8 text file"):
        load_scenario(p)
    p = tmp_path / "source.yaml"
    p.write_text(text + "source: elsewhere.yaml\n")
    with pytest.raises(ScenarioError, match=r"unknown key 'source'"):
        load_scenario(p)
    p = tmp_path / "exp.yaml"
    p.write_text(text.replace("duration_s: 600", "duration_s: 6e2"))  # YAML 1.1 reads 6e2 as text
    assert load_scenario(p).duration_s == 600.0


def test_physically_meaningful_edges_load_and_run(tmp_path):
    """A fault lasting past the end, a failure keeping all capacity, a hot supply: allowed."""
    data = base_data("small_faults")
    set_path(data, "faults[0].duration_s", 10_000)
    set_path(data, "faults[1].magnitude", 1.0)
    set_path(data, "datacenter.cooling.supply_temp_c", 45)
    s = load_scenario(write(tmp_path, data))
    short = s.with_overrides(duration_s=150.0)
    assert [f.start_s for f in short.faults] == [120.0]  # the prefix keeps what starts before 150 s
    metrics = run_short(short, intervals=30)
    assert len(metrics) == 30


def test_with_overrides_refuses_an_explicit_fault_after_the_end():
    s = load_scenario("small_faults")
    late = FaultSpec(kind="power_failure", start_s=200.0, duration_s=10.0, magnitude=0.5, target=0)
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.start_s.*after the episode ends"):
        s.with_overrides(duration_s=150.0, faults=(late,))
    with pytest.raises(ScenarioError, match=r"duration_s.*whole multiple"):
        s.with_overrides(duration_s=2.0)
    with pytest.raises(ScenarioError, match="bogus"):
        s.with_overrides(bogus=1)


def test_relative_trace_path_is_read_next_to_the_scenario_file(tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "trace.csv").write_text(trace_text("vidur", [0.0, 0.5, 1.0], [10, 20, 30], [5, 6, 7]))
    data = set_path(base_data("small"), "workload.trace", "./trace.csv")
    path = write(folder, data)
    monkeypatch.chdir(tmp_path)  # not where the trace is
    s = load_scenario(path)
    assert s.workload.trace == str((folder / "trace.csv").resolve())
    run_short(s)


# ---------------------------------------------------------------------------- traces


def trace_text(fmt: str, times: list[Any], ins: list[Any], outs: list[Any],
               blank_before: set[int] = frozenset()) -> str:
    """A trace file in the Azure (timestamps) or Vidur (seconds) format; blank lines before rows."""
    header = "TIMESTAMP,ContextTokens,GeneratedTokens" if fmt == "azure" else \
        "arrived_at,num_prefill_tokens,num_decode_tokens"
    lines = [header]
    for i, (t, a, b) in enumerate(zip(times, ins, outs, strict=True)):
        if i in blank_before:
            lines.append("")
        if fmt == "azure" and isinstance(t, float):
            t = str(np.datetime64("2024-05-10T00:00:00", "us") + np.timedelta64(int(t * 1e6), "us"))
            t = t.replace("T", " ")
        lines.append(f"{t},{a},{b}")
    return "\n".join(lines) + "\n"


def test_binary_trace_names_the_file_and_line(tmp_path):
    p = tmp_path / "weights.csv"
    p.write_bytes(b"arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,10,3\n\xff\xfe\x00\x01,4,4\n")
    with pytest.raises(TraceError, match=r"weights\.csv: line 3: byte 0xff is not UTF-8"):
        load_trace(p)
    p.write_bytes(bytes(range(256)))
    with pytest.raises(TraceError, match=r"weights\.csv"):
        load_trace(p)


@pytest.mark.parametrize(("cell", "column", "why"), [
    ("nan", 2, "not a finite number"), ("inf", 3, "not a finite number"), ("-3", 2, ">= 1"),
    ("-1.5", 1, "finite and >= 0"), ("nan", 1, "finite and >= 0"), ("inf", 1, "finite and >= 0"),
])
def test_non_finite_and_negative_trace_cells_name_file_line_column(tmp_path, cell, column, why):
    rows = [["0.0", "10", "5"], ["1.0", "10", "5"], ["2.0", "10", "5"]]
    rows[2][column - 1] = cell
    p = tmp_path / "cells.csv"
    p.write_text(trace_text("vidur", *[[r[k] for r in rows] for k in range(3)], blank_before={1}))
    with pytest.raises(TraceError) as info:
        load_trace(p)
    msg = str(info.value)
    # header line 1, row 1 line 2, a blank line 3, row 2 line 4, row 3 line 5
    assert "cells.csv" in msg and "row 3 (line 5)" in msg and f"(column {column})" in msg
    assert repr(cell) in msg and why in msg


def test_short_row_names_its_line(tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n\n1.0,10\n")
    with pytest.raises(TraceError, match=r"short\.csv: row 2 \(line 4\): 2 comma-separated values"):
        load_trace(p)


TIME_DEFECTS = {"azure": ["nan", "abc", "", "5", "2024-13-45 00:00:00"],
                "vidur": ["nan", "inf", "-3", "abc", ""]}
TOKEN_DEFECTS = ["nan", "inf", "-inf", "-3", "0", "2.5", "abc", "", "1e99"]


@st.composite
def trace_cases(draw):
    """A trace file's content, and (row, column) of its one defect or None."""
    fmt = draw(st.sampled_from(["azure", "vidur"]))
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.floats(0.0, 5.0, allow_nan=False).map(lambda x: round(x, 3)),
                         min_size=n, max_size=n))
    times: list[Any] = list(np.cumsum(gaps))
    ins: list[Any] = draw(st.lists(st.integers(1, 8000), min_size=n, max_size=n))
    outs: list[Any] = draw(st.lists(st.integers(1, 2000), min_size=n, max_size=n))
    blank = draw(st.sets(st.integers(0, n - 1), max_size=3))
    defect = None
    if draw(st.booleans()):
        row = draw(st.integers(0, n - 1))
        column = draw(st.integers(0, 2))
        cell = draw(st.sampled_from(TIME_DEFECTS[fmt] if column == 0 else TOKEN_DEFECTS))
        [times, ins, outs][column][row] = cell
        defect = (row, column, cell)
    elif n >= 2 and draw(st.booleans()):  # out of order
        row = draw(st.integers(1, n - 1))
        times[row] = float(times[row - 1]) - 1.0
        if fmt == "vidur" and times[row] < 0:
            times = [t + 10.0 for t in times]
        defect = (row, 0, None)
    times = [float(t) if not isinstance(t, str) else t for t in times]
    return fmt, trace_text(fmt, times, ins, outs, blank), n, blank, defect, ins, outs


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=trace_cases())
def test_generated_traces_load_or_name_file_line_and_column(tmp_path_factory, case):
    fmt, text, n, blank, defect, ins, outs = case
    folder = tmp_path_factory.mktemp("trace")
    p = folder / "gen.csv"
    p.write_text(text)
    if defect is None:
        tr = load_trace(p)
        assert len(tr) == n and int(tr.input_tokens.sum()) == sum(ins)
        assert int(tr.output_tokens.sum()) == sum(outs)
        assert np.isfinite(tr.arrival_s).all() and tr.duration_s > tr.arrival_s[-1]
        return
    row, column, cell = defect
    with pytest.raises(TraceError) as info:
        load_trace(p)
    msg = str(info.value)
    line = 2 + row + sum(1 for b in blank if b <= row)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    assert f"row {row + 1} (line {line})" in msg, msg
    assert f"(column {column + 1})" in msg, msg
    if cell is not None:
        assert f"value {cell!r}" in msg, msg


def test_scenario_with_a_bad_trace_names_the_field_and_the_trace_line(tmp_path):
    (tmp_path / "t.csv").write_text(trace_text("vidur", [0.0, 1.0], [10, "nan"], [4, 4]))
    path = write(tmp_path, set_path(base_data("small"), "workload.trace", "t.csv"))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert named_field(msg) == "workload.trace" and "t.csv" in msg and "row 2 (line 3)" in msg


# ---------------------------------------------------------------------------- mutated scenarios


def run_short(s: Scenario, intervals: int = 3, seed: int = 0) -> list:
    """Run `intervals` aggregate-model intervals; check energy = integral of power and conservation."""
    c = SimCluster(s, serving_model="aggregate", record_ticks=True)
    c.reset(seed=seed)
    metrics = []
    while not c.done and len(metrics) < intervals:
        metrics.append(c.advance())
        tel = c.telemetry()
        assert np.isfinite(tel.gpu_temp_c).all() and np.isfinite(tel.gpu_power_w).all()
    row_w = np.array(c.record.row_power_w)
    per_interval_j = (row_w.sum(axis=1) * c.tick_s).reshape(len(metrics), -1).sum(axis=1)
    np.testing.assert_allclose(per_interval_j, [m.energy_j for m in metrics], rtol=1e-12, atol=1e-6)
    arrived = np.cumsum([m.arrived for m in metrics])
    out = np.cumsum([m.finished + m.dropped for m in metrics])
    np.testing.assert_allclose(arrived, out + np.array([m.in_flight for m in metrics]),
                               rtol=1e-9, atol=1e-6)
    for m in metrics:
        assert m.energy_j > 0 and math.isfinite(m.energy_j)
    return metrics


def _leaves(cls: type, data: dict, prefix: str) -> list[tuple[str, Any, Any]]:
    """(path, FieldSpec, type) of every scalar or scalar-list field, with list entries of `data`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = field_spec(f)
        if spec.loader_only:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if args else tp
        if dataclasses.is_dataclass(inner) and typing.get_origin(tp) is not tuple:
            out += _leaves(inner, (data or {}).get(f.name) or {}, path)
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(inner):
            for i, item in enumerate((data or {}).get(f.name) or []):
                out += _leaves(inner, item, f"{path}[{i}]")
        else:
            out.append((path, spec, tp))
    return out


LEAVES = {name: _leaves(Scenario, _shipped(name), "") for name in SMALL}

GENERIC = [-1, 0, 1, 2, 0.5, 7.5, 1e12, float("nan"), float("inf"), "x", True, None, [], {"k": 1}]


def _outside(spec) -> list[float]:
    """Values just outside the field's documented bounds."""
    out = []
    for bound, step in ((spec.ge, -1), (spec.gt, 0), (spec.le, 1), (spec.lt, 0)):
        if bound is not None:
            out.append(bound + step * max(1e-3, abs(bound) * 1e-3) if step else bound)
    return out


def _is_type_error(tp: Any, value: Any) -> bool:
    """Whether `value` is not of the field's type at all (so the error must name that field)."""
    args = typing.get_args(tp)
    if value is None:
        return type(None) not in args
    scalar = [a for a in args if a is not type(None)]
    base = scalar[0] if scalar and typing.get_origin(tp) is not tuple else tp
    if typing.get_origin(tp) is tuple:
        return isinstance(value, dict)
    if base is float:
        non_finite = isinstance(value, float) and not math.isfinite(value)
        return isinstance(value, bool | str | list | dict) or non_finite
    if base is int:
        return isinstance(value, bool | str | list | dict | float)
    if base is str:
        return not isinstance(value, str)
    return False


@st.composite
def mutations(draw):
    name = draw(st.sampled_from(SMALL))
    path, spec, tp = draw(st.sampled_from(LEAVES[name]))
    outside = _outside(spec)
    value = draw(st.one_of(
        st.sampled_from(GENERIC + outside) if outside else st.sampled_from(GENERIC),
        st.integers(-3, 300),
        st.floats(-1e4, 1e4, allow_nan=False),
    ))
    if typing.get_origin(tp) is tuple and draw(st.booleans()):
        value = [value]
    return name, path, spec, tp, value, value in outside and not isinstance(value, bool)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=mutations())
@pytest.mark.slow
def test_mutated_scenarios_run_with_invariants_or_name_a_field(tmp_path_factory, case):
    name, path, spec, tp, value, out_of_range = case
    file = write(tmp_path_factory.mktemp("mut"), set_path(base_data(name), path, value))
    try:
        s = load_scenario(file)
    except ScenarioError as exc:
        msg = str(exc)
        assert msg.startswith(f"{file}: ") and "\n" not in msg, msg
        named = named_field(msg)
        assert named is not None and schema_has(named), msg
        if _is_type_error(tp, value) or out_of_range:
            assert named == path or named.startswith(path + "["), (path, value, msg)
        return
    # It loaded: a short episode runs with the invariants intact.
    run_short(s.with_overrides(duration_s=3 * s.control_interval_s))


# ---------------------------------------------------------------------------- the command line


def _cli() -> str:
    path = Path(sys.executable).parent / "llm-cluster"
    found = str(path) if path.exists() else shutil.which("llm-cluster")
    assert found, "the console script is not installed (pip install -e .)"
    return found


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d, tmp: set_path(d, "faults[0].magnitude", 5), "faults[0].magnitude"),
    (lambda d, tmp: ((tmp / "w.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"),
                     set_path(d, "workload.trace", "w.csv"))[1], "workload.trace"),
], ids=["cooling-failure-magnitude-5", "binary-trace"])
@pytest.mark.slow
def test_cli_exits_2_with_one_line_naming_the_field(tmp_path, mutate, field):
    path = write(tmp_path, mutate(base_data("small_faults"), tmp_path))
    res = subprocess.run([_cli(), "simulate", "--scenario", str(path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"field '{field}'" in lines[0] and "mutant.yaml" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
