"""Declarative scenarios: the datacenter, its workload, SLOs and faults, read from YAML files.

A scenario file is the one place a user describes an experiment. Loading is strict: an unknown
key, a negative capacity or an inconsistent topology raises `ScenarioError` naming the file, the
field and the value, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file, field and value."""


@dataclass(frozen=True)
class ServerSpec:
    """A DGX-H100-class server: GPUs and the power of everything that is not a GPU.

    Defaults: NVIDIA DGX H100 datasheet (8x H100 SXM, 10.2 kW max system power; also
    splitwise-sim `configs/hardware_repo/skus/dgx-h100.yaml`, tdp 10200). The non-GPU share at full
    load is 10,200 - 8 x 700 = 4,600 W; its idle level is a modelling assumption (see
    `envs/data/README.md`).
    """

    gpus: int = 8
    max_power_w: float = 10200.0
    gpu_tdp_w: float = 700.0
    overhead_idle_w: float = 2000.0


@dataclass(frozen=True)
class CoolingSpec:
    """Aisle cooling model parameters (see `envs.sim.thermal.AisleCoolingParams`).

    Defaults and their sources: `envs/data/thermal/aisle_cooling_default.json` (supply setpoint
    inside ASHRAE's recommended 18-27 C inlet envelope; the other three are assumptions).
    """

    supply_temp_c: float = 24.0
    outside_temp_coeff: float = 0.1
    overload_c_per_frac: float = 20.0
    tau_inlet_s: float = 300.0


@dataclass(frozen=True)
class DatacenterSpec:
    """Topology and provisioning.

    Rows are power domains (a row PDU/UPS limit); aisles are cooling domains: each aisle cools
    `rows_per_aisle` adjacent rows (a cold aisle between facing rows).
    Oversubscription = nameplate (every server at max power) / provisioned limit.
    """

    rows: int = 1
    racks_per_row: int = 1
    servers_per_rack: int = 4
    rows_per_aisle: int = 1
    server: ServerSpec = field(default_factory=ServerSpec)
    power_oversubscription: float = 1.0
    cooling_oversubscription: float = 1.0
    cooling: CoolingSpec = field(default_factory=CoolingSpec)
    outside_temp_mean_c: float = 20.0
    outside_temp_amplitude_c: float = 5.0
    saas_fraction: float = 1.0


@dataclass(frozen=True)
class SpikeSpec:
    """A burst of extra load: multiplier x the local arrival rate for a window."""

    start_s: float
    duration_s: float
    multiplier: float


@dataclass(frozen=True)
class DiurnalSpec:
    """A sinusoidal daily pattern imposed on the load (period shortened for simulation)."""

    peak_to_mean: float = 1.5
    period_s: float = 3600.0
    phase_s: float = 0.0


@dataclass(frozen=True)
class WorkloadSpec:
    """What arrives: a real trace scaled to a target rate, optionally diurnal, with spikes.

    `start_s` and `window_s` select the stretch of the source trace an episode draws from,
    `[start_s, start_s + window_s)` (`window_s` None: to the trace's end). Training and
    held-out evaluation use disjoint windows (see `agents.windows`).
    """

    trace: str = "azure_conv_2023"
    rps_per_gpu: float = 0.5
    start_s: float = 0.0
    window_s: float | None = None
    diurnal: DiurnalSpec | None = None
    spikes: tuple[SpikeSpec, ...] = ()
    pools: str = "default"


@dataclass(frozen=True)
class PoolSpec:
    """Initial serving configuration and SLO of one request-length pool."""

    n_instances: int
    tp: int
    freq_mhz: float
    max_batch: int
    slo_ttft_s: float
    slo_tbt_s: float


@dataclass(frozen=True)
class ServingSpec:
    """The SaaS service: one model family on one GPU type, split into length pools."""

    model: str = "llama2-70b"
    gpu: str = "h100"
    pools: tuple[PoolSpec, ...] = ()
    tp_choices: tuple[int, ...] = (2, 4, 8)
    freq_choices_mhz: tuple[float, ...] = (800.0, 1200.0, 1600.0, 1980.0)
    batch_choices: tuple[int, ...] = (8, 16, 32, 64)
    max_prefill_tokens: int = 8192
    drop_after_s: float = 120.0
    quantized_speedup: float = 1.0
    quantized_power_factor: float = 1.0
    quantized_quality_loss: float = 0.0


@dataclass(frozen=True)
class VmSpec:
    """Opaque IaaS GPU VMs (whole servers) arriving for placement."""

    arrivals_per_hour: float = 0.0
    lifetime_s: float = 3600.0
    gpu_power_w: tuple[float, ...] = (450.0,)
    initial_fraction: float = 0.0


@dataclass(frozen=True)
class FaultSpec:
    """A scheduled fault. `magnitude` is the capacity/limit fraction kept, or the load multiplier."""

    kind: str
    start_s: float
    duration_s: float
    magnitude: float
    target: int = 0


@dataclass(frozen=True)
class RandomFaultSpec:
    """Faults drawn at random from the episode's generator."""

    per_hour: float = 0.0
    kinds: tuple[str, ...] = ("cooling_failure", "power_failure", "load_spike")
    duration_s: float = 300.0
    magnitude: float = 0.6


@dataclass(frozen=True)
class Scenario:
    """One experiment: datacenter, workload, service, faults and accounting."""

    name: str
    description: str = ""
    duration_s: float = 600.0
    tick_s: float = 0.5
    control_interval_s: float = 5.0
    datacenter: DatacenterSpec = field(default_factory=DatacenterSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    vms: VmSpec = field(default_factory=VmSpec)
    faults: tuple[FaultSpec, ...] = ()
    random_faults: RandomFaultSpec = field(default_factory=RandomFaultSpec)
    carbon_g_per_kwh: tuple[float, ...] = (390.0,)
    carbon_step_s: float = 3600.0
    gpu_hour_usd: float = 0.0
    source: str = ""

    @property
    def n_servers(self) -> int:
        """Servers in the datacenter."""
        d = self.datacenter
        return d.rows * d.racks_per_row * d.servers_per_rack

    @property
    def n_gpus(self) -> int:
        """GPUs in the datacenter."""
        return self.n_servers * self.datacenter.server.gpus

    @property
    def n_aisles(self) -> int:
        """Cooling domains."""
        d = self.datacenter
        return math.ceil(d.rows / d.rows_per_aisle)

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with top-level fields replaced (validated again)."""
        new = dataclasses.replace(self, **changes)
        validate(new, self.source or self.name)
        return new


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    """Turn nested dicts into the dataclass `cls`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: field '{path or cls.__name__}' must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ScenarioError(
                f"{where}: unknown key '{_join(path, key)}' (value {data[key]!r}); "
                f"known keys: {sorted(known)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], where, _join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ScenarioError(f"{where}: missing required field '{_join(path, f.name)}'")
    return cls(**kwargs)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_convert(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{where}: field '{path}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ScenarioError(f"{where}: field '{path}' must be finite, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{where}: field '{path}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{where}: field '{path}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{where}: field '{path}' must be a string, got {value!r}")
        return value
    return value


def _positive(where: str, path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ScenarioError(f"{where}: field '{path}' must be {bound}, got {value!r}")


def validate(s: Scenario, where: str) -> None:
    """Check ranges and the consistency of the topology, pools and faults."""
    for name in ("duration_s", "tick_s", "control_interval_s"):
        _positive(where, name, getattr(s, name))
    ratio = s.control_interval_s / s.tick_s
    if abs(ratio - round(ratio)) > 1e-9:
        raise ScenarioError(
            f"{where}: field 'control_interval_s' ({s.control_interval_s}) must be a whole "
            f"multiple of tick_s ({s.tick_s})"
        )
    d = s.datacenter
    for name in ("rows", "racks_per_row", "servers_per_rack", "rows_per_aisle"):
        _positive(where, f"datacenter.{name}", getattr(d, name))
    if d.rows_per_aisle > d.rows:
        raise ScenarioError(
            f"{where}: field 'datacenter.rows_per_aisle' ({d.rows_per_aisle}) exceeds "
            f"datacenter.rows ({d.rows})"
        )
    for name in ("gpus", "max_power_w", "gpu_tdp_w", "overhead_idle_w"):
        _positive(where, f"datacenter.server.{name}", getattr(d.server, name))
    if d.server.gpus * d.server.gpu_tdp_w >= d.server.max_power_w:
        raise ScenarioError(
            f"{where}: field 'datacenter.server.max_power_w' ({d.server.max_power_w}) must exceed "
            f"gpus x gpu_tdp_w ({d.server.gpus * d.server.gpu_tdp_w})"
        )
    for name in ("power_oversubscription", "cooling_oversubscription"):
        _positive(where, f"datacenter.{name}", getattr(d, name))
    if not 0.0 <= d.saas_fraction <= 1.0:
        raise ScenarioError(
            f"{where}: field 'datacenter.saas_fraction' must be in [0, 1], got {d.saas_fraction}"
        )
    _positive(where, "datacenter.cooling.tau_inlet_s", d.cooling.tau_inlet_s)
    w = s.workload
    _positive(where, "workload.rps_per_gpu", w.rps_per_gpu, allow_zero=True)
    _positive(where, "workload.start_s", w.start_s, allow_zero=True)
    if w.window_s is not None:
        _positive(where, "workload.window_s", w.window_s)
    for i, sp in enumerate(w.spikes):
        _positive(where, f"workload.spikes[{i}].duration_s", sp.duration_s)
        _positive(where, f"workload.spikes[{i}].multiplier", sp.multiplier)
    sv = s.serving
    if not sv.pools:
        raise ScenarioError(f"{where}: field 'serving.pools' must list at least one pool")
    saas_gpus = round(s.n_servers * d.saas_fraction) * d.server.gpus
    used = 0
    for i, p in enumerate(sv.pools):
        _positive(where, f"serving.pools[{i}].n_instances", p.n_instances, allow_zero=True)
        if p.tp not in sv.tp_choices:
            raise ScenarioError(
                f"{where}: field 'serving.pools[{i}].tp' is {p.tp}, not one of "
                f"serving.tp_choices {sv.tp_choices}"
            )
        if d.server.gpus % p.tp:
            raise ScenarioError(
                f"{where}: field 'serving.pools[{i}].tp' ({p.tp}) does not divide the "
                f"{d.server.gpus} GPUs of a server"
            )
        for name in ("freq_mhz", "max_batch", "slo_ttft_s", "slo_tbt_s"):
            _positive(where, f"serving.pools[{i}].{name}", getattr(p, name))
        used += p.n_instances * p.tp
    if used > saas_gpus:
        raise ScenarioError(
            f"{where}: field 'serving.pools' asks for {used} GPUs but the SaaS part of the "
            f"datacenter has {saas_gpus} (servers x saas_fraction x gpus)"
        )
    for name in ("tp_choices", "freq_choices_mhz", "batch_choices"):
        values = getattr(sv, name)
        if not values or any(v <= 0 for v in values):
            raise ScenarioError(f"{where}: field 'serving.{name}' must be positive, got {values}")
    _positive(where, "serving.max_prefill_tokens", sv.max_prefill_tokens)
    _positive(where, "serving.drop_after_s", sv.drop_after_s)
    _positive(where, "vms.arrivals_per_hour", s.vms.arrivals_per_hour, allow_zero=True)
    _positive(where, "vms.lifetime_s", s.vms.lifetime_s)
    kinds = ("cooling_failure", "power_failure", "load_spike")
    for i, fs in enumerate(s.faults):
        if fs.kind not in kinds:
            raise ScenarioError(f"{where}: field 'faults[{i}].kind' is {fs.kind!r}, not one of {kinds}")
        _positive(where, f"faults[{i}].duration_s", fs.duration_s)
        _positive(where, f"faults[{i}].magnitude", fs.magnitude)
        limit = s.n_aisles if fs.kind == "cooling_failure" else d.rows
        if fs.kind != "load_spike" and not 0 <= fs.target < limit:
            raise ScenarioError(
                f"{where}: field 'faults[{i}].target' is {fs.target}; this datacenter has "
                f"{limit} {'aisles' if fs.kind == 'cooling_failure' else 'rows'}"
            )
    for k in s.random_faults.kinds:
        if k not in kinds:
            raise ScenarioError(f"{where}: field 'random_faults.kinds' has {k!r}, not one of {kinds}")
    if not s.carbon_g_per_kwh or any(c < 0 for c in s.carbon_g_per_kwh):
        raise ScenarioError(
            f"{where}: field 'carbon_g_per_kwh' must be non-negative, got {s.carbon_g_per_kwh}"
        )


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a shipped scenario by name (`small`, `medium`, ...) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
            raise ScenarioError(f"unknown scenario {name_or_path!r}; shipped: {shipped}")
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{where}: cannot read scenario file ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or "name" not in data:
        raise ScenarioError(f"{where}: a scenario file is a mapping with at least a 'name' key")
    scenario = _build(Scenario, data, where, "")
    scenario = dataclasses.replace(scenario, source=where)
    validate(scenario, where)
    return scenario


def shipped_scenarios() -> list[str]:
    """Names of the scenarios that ship with the package."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
