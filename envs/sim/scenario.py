"""Declarative scenarios: the datacenter, its workload, SLOs and faults, read from YAML files.

A scenario file is the one place a user describes an experiment. The dataclasses below are the
file format's schema: every field carries its unit, its allowed range and a one-line meaning
(`spec`), and `docs/SCENARIOS.md` is generated from them (`scenario_reference`; a test keeps
it up to date). Loading is strict and happens in three steps, each raising `ScenarioError`
that names the file, the field path (`faults[1].magnitude`) and the value:

1. `_build`: YAML mappings to dataclasses; unknown or duplicate keys and wrong types refused.
2. `validate`: every field's range (finite numbers only), then the cross-field rules
   (`CROSS_FIELD_RULES`), e.g. a control interval that is a whole number of ticks.
3. `resolve`: what a run will need is found now, not mid-run: the trace file (exists and
   parses), the length-pool set, the model's profile for every TP degree, and the limits the
   profile sets (clock range, GPU power range) (`RESOLVE_RULES`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm_cluster_gym.envs.sim.carbon import GRID_REGIONS, GridDataError, hourly_carbon, parse_start
from llm_cluster_gym.envs.sim.profiles import ProfileError, ProfileLibrary
from llm_cluster_gym.envs.sim.weather import LOCATIONS as WEATHER_LOCATIONS
from llm_cluster_gym.envs.sim.weather import START_PATTERN as WEATHER_START_PATTERN
from llm_cluster_gym.envs.sim.weather import WeatherDataError, location_weather
from llm_cluster_gym.envs.sim.weather import parse_start as parse_weather_start
from llm_cluster_gym.envs.sim.workload import (
    Trace,
    TraceError,
    is_builtin_name,
    is_week_trace,
    resolve_trace,
)

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
REFERENCE_DOC = "docs/SCENARIOS.md"
"""Where the generated format reference lives, relative to the repository root."""

FAULT_KINDS = ("cooling_failure", "power_failure", "load_spike")
PREFILL_MODES = ("chunked", "serial")
"""How an engine runs prompts (`serving.prefill_mode`)."""

MAX_OVERSUBSCRIPTION = 3.0
"""Upper bound of power and cooling oversubscription (see `_oversubscription_doc`)."""

OVERSUBSCRIPTION_BASES = ("nameplate", "measured_peak")
"""What `datacenter.power_oversubscription` and `cooling_oversubscription` are relative to."""

MAX_EFFECTIVE_COOLING_OVERSUBSCRIPTION = 12.0
"""Upper bound of cooling oversubscription / cooling-failure magnitude (an aisle's nameplate
heat over what its cooling removes while a failure is on)."""

MAX_GPUS = 1_048_576
"""Largest datacenter the simulator accepts (its per-GPU arrays must fit in memory)."""

DEFAULT_PUE = 1.12
"""Facility / IT energy: Microsoft's design PUE of its newest datacenter generation (N. Walsh, "How
Microsoft measures datacenter water and energy use to improve Azure Cloud sustainability", Azure blog,
22 April 2022). A design figure (best case); the industry's average was 1.55 in 2022 (Uptime
Institute Global Data Center Survey 2022)."""

START_PATTERN = r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?)?"
"""`carbon.start`: a date, or a date and time, in UTC without offset."""

MAX_EPISODE_REQUESTS = 50_000_000
MAX_EPISODE_VMS = 10_000_000
MAX_EPISODE_RANDOM_FAULTS = 100_000
"""Most requests, VM arrivals and random faults one episode may expect (drawn at reset)."""


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file, field and value."""


# --------------------------------------------------------------------------------------------
# Field specifications: the schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """Unit, range and meaning of one scenario field (for lists: of each element).

    Attributes:
        doc: One-line meaning (the documentation's "meaning" column).
        unit: Unit of the value ("" when it has none).
        ge, gt, le, lt: Bounds (inclusive `ge`/`le`, exclusive `gt`/`lt`); None: unbounded.
        choices: Allowed values of a string (or a function returning them, resolved lazily).
        pattern: Regular expression a string must match in full.
        pattern_doc: How `pattern` reads in the documentation and in errors.
        min_items: Fewest elements of a list.
        increasing: A list's elements must be strictly increasing.
        distinct: A list's elements must be distinct.
        loader_only: Set by the loader; a file may not set it.
    """

    doc: str
    unit: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    pattern: str | None = None
    pattern_doc: str = ""
    min_items: int = 0
    increasing: bool = False
    distinct: bool = False
    loader_only: bool = False

    def allowed(self) -> tuple[str, ...] | None:
        """The allowed strings, if the field has a fixed set."""
        return self.choices() if callable(self.choices) else self.choices

    def bounds_text(self) -> str:
        """The numeric bounds as the documentation writes them, e.g. `(0, 1]`, `>= 1` ("" if none)."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"{low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
        return ""

    def range_text(self) -> str:
        """The allowed values as the documentation's "range" column writes them."""
        text = self.bounds_text()
        allowed = self.allowed()
        if allowed is not None:
            text = "one of " + ", ".join(f"`{c}`" for c in allowed)
        if self.pattern_doc:
            text = self.pattern_doc
        extras = []
        if self.min_items:
            extras.append(f"at least {self.min_items} item{'s' if self.min_items > 1 else ''}")
        if self.increasing:
            extras.append("strictly increasing")
        elif self.distinct:
            extras.append("distinct")
        return "; ".join(x for x in [text, *extras] if x) or "any"


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() and abs(x) >= 10_000 else f"{x:g}"


def spec(default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING,
         **rule: Any) -> Any:
    """A dataclass field carrying its `FieldSpec` (unit, range, meaning) in its metadata."""
    return field(default=default, default_factory=default_factory,
                 metadata={"spec": FieldSpec(doc=doc, **rule)})


def field_spec(f: dataclasses.Field) -> FieldSpec:
    """The `FieldSpec` of a scenario dataclass field."""
    return f.metadata["spec"]


def _pool_set_names() -> tuple[str, ...]:
    from llm_cluster_gym.envs.sim.demand import POOL_SETS

    return tuple(POOL_SETS)


# --------------------------------------------------------------------------------------------
# The scenario dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """A GPU server: its GPUs, the power of everything that is not a GPU, and its power states.

    Defaults: NVIDIA DGX H100 datasheet (8x H100 SXM, 10.2 kW max system power; also
    splitwise-sim `configs/hardware_repo/skus/dgx-h100.yaml`, tdp 10200). `overhead_idle_w` is
    measured: NVIDIA's MLPerf Inference Power submissions of a DGX H100 (v3.1 and v4.0, closed,
    `DGX-H100_H100-SXM-80GBx8_TRT_MaxQ`) record the whole system's wall power at about 2,200 W
    before the benchmark starts, with the GPUs idle and no CUDA context; less 8 x 72 W of bare-idle
    GPUs (`envs/data/gpus.json`) that leaves 1,624 W. `overhead_max_w` (non-GPU power with the GPUs
    at full load) is measured too: the same submissions' Llama-2-70B Offline run at 450 W GPU caps
    (5,920 W whole system) extrapolated linearly to 700 W GPUs gives 2,780 W, and an 8-GPU H100
    node's 8.4 kW maximum while training (Latif et al., arXiv:2412.08602) less 8 x 700 W gives
    2,800 W; the nameplate's remainder, 10,200 - 8 x 700 = 4,600 W, overstates a busy server by
    1.8 kW (`envs/data/server_power/README.md`). `max_power_w` stays the nameplate rows are
    provisioned for. No published DGX standby power or boot time was found:
    `standby_w` and `wake_latency_s` stay assumptions, with the nearest published anchors.
    """

    gpus: int = spec(8, doc="GPUs per server.", ge=1, le=72)
    max_power_w: float = spec(10200.0, unit="W", gt=0,
                              doc="Nameplate power of a whole server (GPUs at TDP plus everything else).")
    gpu_tdp_w: float = spec(700.0, unit="W", gt=0, le=2000,
                            doc="Nameplate power of one GPU; at least the profile's GPU power limit.")
    overhead_idle_w: float = spec(
        1624.0, unit="W", ge=0,
        doc="Non-GPU power (CPUs, memory, NVSwitches, NICs, fans, PSU losses) while the GPUs idle. Default: "
            "measured, a DGX H100's wall power with idle GPUs (about 2,200 W, NVIDIA's MLPerf Inference "
            "v3.1/v4.0 Power submissions) less 8 x 72 W of bare-idle H100s "
            "(envs/data/server_power/README.md).")
    overhead_max_w: float = spec(
        2780.0, unit="W", ge=0,
        doc="Non-GPU power with every GPU at `gpu_tdp_w`; the non-GPU power rises linearly with GPU load "
            "from `overhead_idle_w`. At least `overhead_idle_w`, at most `max_power_w - gpus x gpu_tdp_w` "
            "(the nameplate's remainder; set it to that for the simulator's behaviour before this field). "
            "Default: measured for a DGX H100, NVIDIA's MLPerf Inference v4.0 Power llama2-70b Offline run "
            "(5,920 W whole system at 450 W GPU caps) extrapolated to 700 W GPUs: 2,780 W; Latif et al. "
            "(arXiv:2412.08602) measured about 8.4 kW for an 8x H100 node at full utilization, 2,800 W "
            "less the GPUs (envs/data/server_power/README.md).")
    standby_w: float = spec(
        50.0, unit="W", ge=0,
        doc="Power of a server that is off (BMC and PSU standby rails); at most `overhead_idle_w`. Default: "
            "an assumption (no published DGX figure found; envs/data/server_power/README.md).")
    wake_latency_s: float = spec(
        200.0, unit="s", ge=0, le=3600,
        doc="Power-on to usable (firmware, OS, drivers) of a server that is off; its instances then load "
            "their model. It draws its idle power meanwhile. Default: the 200 s setup time Gandhi et al. "
            "(CMU, Intel Labs) measured on a rack server; for a DGX an assumption, likely a lower bound (no "
            "published DGX H100 boot time found; envs/data/server_power/README.md).")
    gpu_inlet_offsets_c: tuple[float, ...] = spec(
        (), unit="C", ge=-10, le=30,
        doc="Air temperature at each GPU of a server above the server's inlet, by GPU position (one value "
            "per GPU, in GPU order); empty: every GPU at the inlet (the behaviour before this field). GPUs "
            "downstream in the server's airflow take air the upstream ones heated. No default: no published "
            "per-position DGX/HGX H100 figure was found; envs/data/thermal/README.md gives the heat-balance "
            "estimate and an example.")


@dataclass(frozen=True)
class CoolingSpec:
    """Aisle cooling model parameters (see `envs.sim.thermal.AisleCoolingParams`).

    Defaults and their sources: `envs/data/thermal/aisle_cooling_default.json` (supply setpoint
    inside ASHRAE's recommended 18-27 C inlet envelope; the other three are assumptions).
    """

    supply_temp_c: float = spec(
        24.0, unit="C", ge=0, le=80,
        doc="Cold-aisle supply air setpoint. ASHRAE allows 5-45 C; hotter values are stress tests "
            "(the GPUs slow down near 89 C).")
    outside_temp_coeff: float = spec(0.1, unit="C/C", ge=0, le=1,
                                     doc="Inlet rise per degree of outside air above the setpoint.")
    overload_c_per_frac: float = spec(
        20.0, unit="C", ge=0, le=100,
        doc="Inlet rise per unit of heat load above the aisle's cooling capacity (1 = 2x capacity).")
    tau_inlet_s: float = spec(
        300.0, unit="s", gt=0, le=86400,
        doc="Time constant of the aisle inlet temperature (also its rise after a cooling failure). Khankari "
            "(ASHRAE Trans. 117(1), 2011) models a room's heating after a cooling loss as such an "
            "exponential; published rises reach limits within minutes (Schneider Electric WP 179).")
    rack_inlet_spread_c: float = spec(
        0.0, unit="C", ge=0, le=20,
        doc="Inlet rise from the rack nearest the cooling unit (first of its row) to the farthest (last), "
            "linear along the row: hot-air recirculation grows with distance from the cooling unit. 0: "
            "every rack at its aisle's inlet (the behaviour before this field). An assumption to set per "
            "site (no default; envs/data/thermal/README.md).")


@dataclass(frozen=True)
class WeatherSpec:
    """A site's hourly typical-year outside temperature, interpolated, at `start + workload.start_s + t`.

    It replaces the daily sine (`outside_temp_mean_c`, `outside_temp_amplitude_c`); the data:
    `envs/data/weather/` (EnergyPlus TMYx files from NOAA ISD records). Hourly values are
    interpolated linearly (each is an instant's reading). `start` is the local standard time of the
    source trace's time 0; a typical year has no year, and it wraps from Dec 31 to Jan 1.
    """

    location: str = spec(choices=tuple(WEATHER_LOCATIONS),
                         doc="Site: leesburg_va (northern Virginia, beside grid PJM), san_jose_ca (CISO), "
                             "dallas_tx (ERCO), seattle_wa (BPAT).")
    start: str = spec(pattern=WEATHER_START_PATTERN,
                      pattern_doc="`MM-DD` or `MM-DDTHH:MM`, the site's local standard time",
                      doc="Day (and time) of the typical year at the source trace's time 0; no February 29.")


@dataclass(frozen=True)
class DatacenterSpec:
    """Topology and provisioning.

    Rows are power domains (a row PDU/UPS limit); aisles are cooling domains: each aisle cools
    `rows_per_aisle` adjacent rows (a cold aisle between facing rows).
    Oversubscription = servers' peak power / provisioned limit, where the peak is the nameplate
    (`oversubscription_basis: nameplate`, every server at `max_power_w`) or the measured full-load
    draw (`measured_peak`: `gpus x gpu_tdp_w + overhead_max_w`, 8,380 W for the default DGX H100
    against its 10,200 W nameplate). TAPAS oversubscribes against measured peaks: a row provisioned
    for nameplates that no server reaches is not oversubscribed at all.
    """

    rows: int = spec(1, doc="Rows (power domains).", ge=1)
    racks_per_row: int = spec(1, doc="Racks per row.", ge=1)
    servers_per_rack: int = spec(4, doc="Servers per rack.", ge=1)
    rows_per_aisle: int = spec(1, ge=1, doc="Adjacent rows one aisle (cooling domain) cools; at most `rows`.")
    server: ServerSpec = spec(default_factory=ServerSpec, doc="The server model (all servers alike).")
    power_oversubscription: float = spec(
        1.0, unit="x", ge=0.01, le=MAX_OVERSUBSCRIPTION,
        doc="Servers' nameplate power / each row's provisioned power limit.")
    cooling_oversubscription: float = spec(
        1.0, unit="x", ge=0.01, le=MAX_OVERSUBSCRIPTION,
        doc="Servers' nameplate heat / each aisle's cooling capacity.")
    oversubscription_basis: str = spec(
        "nameplate", choices=OVERSUBSCRIPTION_BASES,
        doc="What both oversubscriptions divide: `nameplate` (every server at `server.max_power_w`) or "
            "`measured_peak` (every server at its measured full-load power, `server.gpus x gpu_tdp_w + "
            "server.overhead_max_w`). TAPAS sets oversubscription against measured peaks.")
    cooling: CoolingSpec = spec(default_factory=CoolingSpec, doc="Aisle cooling model.")
    outside_temp_mean_c: float = spec(20.0, unit="C", ge=-60, le=60,
                                      doc="Mean outside air temperature (when `weather` is null).")
    outside_temp_amplitude_c: float = spec(
        5.0, unit="C", ge=0, le=40,
        doc="Amplitude of the daily outside temperature swing (a 24 h sine, coldest at midnight; when "
            "`weather` is null).")
    weather: WeatherSpec | None = spec(
        None, doc="A site's real hourly outside temperature (typical year) instead of the daily sine.")
    saas_fraction: float = spec(
        1.0, ge=0, le=1,
        doc="Fraction of servers serving the LLM (the rest host IaaS VMs); at least one server.")
    idle_to_off_s: float | None = spec(
        200.0, unit="s", ge=0, le=86400,
        doc="A server with no instance (serving or loading) and no VM for this long powers off (it then "
            "draws `server.standby_w`; waking it takes `server.wake_latency_s`); null: servers never power "
            "off. Default 200 s, about the default wake latency: the break-even (ski-rental) rule, idle no "
            "longer than a wake costs (200 s x 2,200 W / 2,150 W = 205 s; envs/data/server_power/README.md).")
    pue: float = spec(
        DEFAULT_PUE, unit="x", ge=1, le=3,
        doc="Power usage effectiveness: facility energy (servers plus cooling and power delivery) / "
            "server energy. Default 1.12: Microsoft's design PUE of its newest datacenters (2022).")


@dataclass(frozen=True)
class SpikeSpec:
    """A burst of extra load: multiplier x the local arrival rate for a window."""

    start_s: float = spec(unit="s", ge=0, doc="Start, from the episode start; before the episode ends.")
    duration_s: float = spec(unit="s", gt=0, doc="Length (clipped at the episode's end).")
    multiplier: float = spec(unit="x", ge=1, le=100, doc="Arrival rate multiplier inside the window.")


@dataclass(frozen=True)
class DiurnalSpec:
    """A sinusoidal daily pattern imposed on the load (period shortened for simulation)."""

    peak_to_mean: float = spec(1.5, unit="x", ge=1, le=2,
                               doc="Peak over mean arrival rate (2 makes the trough zero).")
    period_s: float = spec(3600.0, unit="s", ge=1, doc="Period of the sinusoid.")
    phase_s: float = spec(0.0, unit="s", doc="Time of the peak, from the episode start.")


@dataclass(frozen=True)
class WorkloadSpec:
    """What arrives: a real trace scaled to a target rate, optionally diurnal, with spikes.

    `start_s` and `window_s` select the stretch of the source trace an episode draws from,
    `[start_s, start_s + window_s)` (`window_s` None: to the trace's end). Training and
    held-out evaluation use disjoint windows (see `agents.windows`). A 2024 week trace
    (`azure_code_2024_week`, `azure_conv_2024_week`) is generated per episode from the week's
    digitized rate (`envs/sim/week_trace.py`): the episode is the week's stretch from
    `start_s` (seconds from the week's start; the week repeats), or from a random point of
    the window when `window_s` exceeds the episode.
    """

    trace: str = spec(
        "azure_conv_2023",
        doc="A shipped trace (`azure_conv_2023`, `azure_code_2023`), a 2024 week "
            "(`azure_conv_2024_week`, `azure_code_2024_week`: generated, see `envs/data/traces/README.md`) "
            "or a CSV file path (Azure 2023/2024 or Vidur format; relative: to the scenario file's folder, "
            "then the current directory); read at load.")
    rps_per_gpu: float = spec(0.5, unit="req/s per GPU", ge=0, le=100,
                              doc="Mean arrival rate per SaaS GPU (the trace is rescaled to it; for a 2024 "
                                  "week, the mean over the whole week, so a weekday stays busier than a "
                                  "weekend day).")
    start_s: float = spec(0.0, unit="s", ge=0,
                          doc="Start of the source-trace window; before the trace's end (a 2024 week: "
                              "seconds from its first midnight, UTC, below 604800).")
    window_s: float | None = spec(None, unit="s", gt=0,
                                  doc="Length of the source-trace window (null or past the end: to the "
                                      "trace's end; a 2024 week: at least `duration_s`).")
    diurnal: DiurnalSpec | None = spec(None, doc="Sinusoidal load instead of the trace's own arrival times.")
    spikes: tuple[SpikeSpec, ...] = spec((), doc="Load spikes.")
    pools: str = spec("default", choices=_pool_set_names,
                      doc="Length-pool set: how requests split into pools (`serving.pools` has one "
                          "entry per pool).")


@dataclass(frozen=True)
class PoolSpec:
    """Initial serving configuration and SLO of one request-length pool."""

    n_instances: int = spec(ge=0, doc="Model instances serving the pool at the start.")
    tp: int = spec(ge=1, doc="Tensor-parallel degree of each instance; one of `serving.tp_choices`.")
    freq_mhz: float = spec(unit="MHz", gt=0,
                           doc="GPU clock of the pool's instances; one of `serving.freq_choices_mhz`.")
    max_batch: int = spec(ge=1, doc="Batch cap of each instance; one of `serving.batch_choices`.")
    slo_ttft_s: float = spec(unit="s", gt=0, doc="Time-to-first-token SLO.")
    slo_tbt_s: float = spec(unit="s", gt=0, doc="Time-between-tokens SLO.")


@dataclass(frozen=True)
class SloClassSpec:
    """The SLO of one request class by prompt length, whichever pool serves the request.

    Classes follow the length pools' rule (`envs/sim/workload.py` `LengthPools`): class i holds
    prompts with `input_tokens_below` of class i-1 <= input tokens < its own `input_tokens_below`;
    the last class has no upper bound (null). DynamoLLM judges every scheme by such per-request-type
    SLOs, so a short prompt must meet a short prompt's TTFT even in a pool that mixes lengths.
    """

    input_tokens_below: int | None = spec(
        unit="tokens", ge=1,
        doc="Exclusive upper bound of the class's prompt length (the previous class's bound is its "
            "lower one); null for the last class, which takes every longer prompt.")
    slo_ttft_s: float = spec(unit="s", gt=0, doc="Time-to-first-token SLO of the class's requests.")
    slo_tbt_s: float = spec(unit="s", gt=0, doc="Time-between-tokens SLO of the class's requests.")


@dataclass(frozen=True)
class ServingSpec:
    """The SaaS service: one model family on one GPU type, split into length pools."""

    model: str = spec("llama2-70b", doc="Served model; a profile must exist for each TP choice.")
    gpu: str = spec("h100", doc="GPU type of the profiles.")
    pools: tuple[PoolSpec, ...] = spec((), min_items=1,
                                       doc="One entry per pool of `workload.pools`, in its order.")
    tp_choices: tuple[int, ...] = spec(
        (2, 4, 8), ge=1, min_items=1, increasing=True,
        doc="TP degrees a controller may choose; each divides `datacenter.server.gpus`.")
    freq_choices_mhz: tuple[float, ...] = spec(
        (800.0, 1200.0, 1600.0, 1980.0), unit="MHz", gt=0, min_items=1, increasing=True,
        doc="GPU clocks a controller may choose; inside the profile's clock range.")
    batch_choices: tuple[int, ...] = spec((8, 16, 32, 64), ge=1, min_items=1, increasing=True,
                                          doc="Batch caps a controller may choose.")
    max_prefill_tokens: int = spec(
        8192, unit="tokens", ge=1,
        doc="Token budget of one engine step (vLLM's max_num_batched_tokens): one token per "
            "decoding request plus prompt chunks.")
    prefill_mode: str = spec(
        "chunked", choices=PREFILL_MODES,
        doc="How prompts are run. `chunked`: vLLM V1's default, prompt chunks mixed into decode "
            "steps under `max_prefill_tokens`, one prefill clock per instance set by the episode's "
            "mean prompt. `serial`: each prompt in its own pass that stalls decoding, passes of up "
            "to `max_prefill_tokens` prompt tokens then one decode iteration, each pass at the "
            "clock its own prompt allows under the GPU power limit (HF-style engines and this "
            "project's real worker, `envs/real/engine.py`). `serial` needs the request-level "
            "serving model.")
    drop_after_s: float = spec(120.0, unit="s", gt=0,
                               doc="A request without its first token after this long is dropped.")
    quantized_speedup: float = spec(1.0, unit="x", ge=1, le=10,
                                    doc="Throughput gain of a quantized instance.")
    quantized_power_factor: float = spec(1.0, unit="x", gt=0, le=2,
                                         doc="Busy power of a quantized instance / unquantized.")
    quantized_quality_loss: float = spec(0.0, ge=0, le=1,
                                         doc="Quality lost by serving quantized (fraction).")
    route_per_server: bool = spec(
        False,
        doc="Let controllers weight new requests per SaaS server as well as per row (routing per SaaS "
            "instance: an instance never spans two servers): the thermal and combined tasks get one "
            "routing-weight choice per SaaS server and the observation each SaaS server's hottest GPU "
            "and weight. false: per row only.")
    slo_classes: tuple[SloClassSpec, ...] = spec(
        (),
        doc="Per-request SLO classes by prompt length, in increasing order, the last one unbounded: "
            "every request is judged by its class's SLOs whichever pool serves it (the pools' own SLOs "
            "then only guide controllers). Empty: each request is judged by its pool's SLOs.")


VM_TYPE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
"""`vms.types[].name`: the scenario name's characters."""

VM_TYPE_SHARE_TOLERANCE = 1e-6
"""How far the types' shares may sum from 1 (rounding in a hand-written file)."""


@dataclass(frozen=True)
class VmTypeSpec:
    """One IaaS VM type (a SKU or workload class) and the per-GPU power pattern its VMs draw (assumed).

    A VM of this type draws, per GPU, ``mean_gpu_w x (1 + diurnal_amplitude x cos(2 pi (h -
    diurnal_peak_hour) / 24))`` plus its own noise, clipped to [the GPU profile's idle power, its
    power limit]. ``h`` is the hour of the day on the source trace's clock (episode time plus
    `workload.start_s`, its time 0 taken as midnight, as the daily outside-air sine takes it). The
    noise is an Ornstein-Uhlenbeck process per VM (stationary standard deviation `noise_sd_w`,
    correlation time `noise_tau_s`), started from its stationary law when the VM starts and stepped
    exactly for any tick length.

    What is an assumption: we have no per-VM-type power telemetry of Azure (or any cloud's) GPU
    VMs. TAPAS (Stojkovic et al., 2025) places new GPU VMs using historical power and temperature
    data, kept here per VM type, which is why the simulator has types at all; the shape chosen here
    (a daily cosine plus mean-reverting noise) and every number a scenario puts in these fields are
    the scenario author's, not measurements. Hence no defaults beyond zero noise and zero diurnal
    swing. A placer is shown the P95 of the type's readings so far in the episode
    (`envs.sim.vms.EXPECTED_POWER_PERCENTILE`), `mean_gpu_w` before any VM of the type has run.
    """

    name: str = spec(pattern=VM_TYPE_NAME_PATTERN,
                     pattern_doc="1-64 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit",
                     doc="Type name; distinct among `vms.types`.")
    share: float = spec(gt=0, le=1,
                        doc="Probability that a VM (arriving, or present at the start) is of this type; the "
                            "types' shares sum to 1.")
    mean_gpu_w: float = spec(
        unit="W", gt=0,
        doc="Mean per-GPU power of the type's VMs, as a tenant declares it or the SKU's figure; the "
            "expected power a placer sees before any VM of the type has run. Between the profile's idle "
            "power and GPU power limit.")
    lifetime_s: float = spec(unit="s", gt=0, doc="Mean lifetime of the type's VMs (exponential).")
    diurnal_amplitude: float = spec(
        0.0, ge=0, le=1,
        doc="Daily swing of the mean, as a fraction of `mean_gpu_w` (a 24 h cosine; 0: none).")
    diurnal_peak_hour: float = spec(
        0.0, unit="h", ge=0, lt=24,
        doc="Hour of the day the daily swing peaks, on the source trace's clock (`workload.start_s` + "
            "episode time, 0 = midnight).")
    noise_sd_w: float = spec(
        0.0, unit="W", ge=0, le=2000,
        doc="Stationary standard deviation of each VM's own power noise (an Ornstein-Uhlenbeck "
            "process; 0: none).")
    noise_tau_s: float | None = spec(
        None, unit="s", gt=0,
        doc="Correlation time of the noise (its autocorrelation after t is exp(-t / tau)); needed when "
            "`noise_sd_w` > 0.")


MAX_PLACEMENTS_PER_INTERVAL = 32
"""Most VM placements per control interval (`vms.placements_per_interval`): each is an action dimension."""


@dataclass(frozen=True)
class VmSpec:
    """Opaque IaaS GPU VMs (whole servers) arriving for placement.

    Either `types` (per-VM-type power patterns) or the legacy constant levels `gpu_power_w` with one
    `lifetime_s`: with `types` empty, each level is a constant-power type drawn with equal
    probability (the behaviour before types).
    """

    arrivals_per_hour: float = spec(0.0, unit="1/h", ge=0,
                                    doc="Mean VM arrivals (Poisson); > 0 needs IaaS servers.")
    lifetime_s: float = spec(3600.0, unit="s", gt=0,
                             doc="Mean VM lifetime (exponential) when `types` is empty.")
    gpu_power_w: tuple[float, ...] = spec(
        (450.0,), unit="W", gt=0, min_items=1,
        doc="Per-GPU power levels a VM draws (one drawn per VM, constant for its lifetime) when `types` is "
            "empty; between the profile's idle power and GPU power limit.")
    initial_fraction: float = spec(0.0, ge=0, le=1,
                                   doc="Fraction of IaaS servers hosting a VM at the start.")
    types: tuple[VmTypeSpec, ...] = spec(
        (), doc="VM types with power that varies over a VM's lifetime; empty: the constant levels "
                "`gpu_power_w`. An assumption: no per-VM-type power telemetry of cloud GPU VMs is published, "
                "so the shape (a daily cosine plus mean-reverting noise) and every number are the scenario "
                "author's. A placer sees the P95 of a type's readings so far in the episode (its "
                "`mean_gpu_w` before any VM of the type ran), never the waiting VM's own power.")
    placements_per_interval: int = spec(
        1, ge=1, le=MAX_PLACEMENTS_PER_INTERVAL,
        doc="Waiting VMs a controller may place per control interval (the first ones in queue order): "
            "the action has this many placement choices, and with more than 1 the observation shows "
            "each of those VMs' expected power. 1 keeps one placement per interval.")


@dataclass(frozen=True)
class FaultSpec:
    """A scheduled fault. `magnitude` is the capacity/limit fraction kept, or the load multiplier.

    A fault starts inside the episode; one lasting past the episode's end is still on when the
    episode ends (it is not an error).
    """

    kind: str = spec(choices=FAULT_KINDS, doc="What fails.")
    start_s: float = spec(unit="s", ge=0, doc="Start, from the episode start; before the episode ends.")
    duration_s: float = spec(unit="s", gt=0, doc="Length (it may last past the episode's end).")
    magnitude: float = spec(
        unit="fraction or x", gt=0,
        doc="cooling/power failure: fraction of the aisle's cooling capacity or the row's power "
            "limit kept, in (0, 1]; load_spike: arrival rate multiplier, in [1, 100].")
    target: int = spec(0, ge=0,
                       doc="Aisle (cooling_failure) or row (power_failure) index; ignored by load_spike.")


@dataclass(frozen=True)
class RandomFaultSpec:
    """Faults drawn at random from the episode's generator (start uniform over the episode)."""

    per_hour: float = spec(0.0, unit="1/h", ge=0, doc="Mean faults per hour (Poisson).")
    kinds: tuple[str, ...] = spec(FAULT_KINDS, choices=FAULT_KINDS, distinct=True,
                                  doc="Kinds drawn from (uniformly); not empty when `per_hour` > 0.")
    duration_s: float = spec(300.0, unit="s", gt=0, doc="Length of each fault.")
    magnitude: float = spec(0.6, gt=0, le=1,
                            doc="Capacity or limit fraction a failure keeps; a spike multiplies the "
                                "load by 1 + magnitude.")


@dataclass(frozen=True)
class CarbonSpec:
    """A US grid region's hourly 2022 intensity, stepwise; episode time t is `start + workload.start_s + t`.

    It replaces the series `carbon_g_per_kwh` (the data: `envs/data/grid/`). Stepwise, as the
    hourly data is (no interpolation inside an hour): a tick takes the value of the hour its start
    falls in. `start` is the grid time of the source trace's time 0, so a later trace window (a
    held-out day) meets the grid hours of that window.
    """

    region: str = spec(choices=GRID_REGIONS,
                       doc="Grid region (EIA balancing authority): BPAT Pacific Northwest, CISO California, "
                           "ERCO Texas, MISO Midwest, NYIS New York, PJM Mid-Atlantic.")
    start: str = spec(pattern=START_PATTERN,
                      pattern_doc="`YYYY-MM-DD` or `YYYY-MM-DDTHH:MM[:SS]`, UTC, no offset",
                      doc="UTC date and time of the source trace's time 0; the whole episode lies in 2022.")


NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


@dataclass(frozen=True)
class Scenario:
    """One experiment: datacenter, workload, service, faults and accounting."""

    name: str = spec(pattern=NAME_PATTERN,
                     pattern_doc="1-64 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit",
                     doc="Scenario name; it names the default report folder, so no path characters.")
    description: str = spec("", doc="Free text.")
    duration_s: float = spec(600.0, unit="s", gt=0, le=2_592_000,
                             doc="Episode length; a whole number of control intervals (30 days at most).")
    tick_s: float = spec(0.5, unit="s", ge=0.01, le=60,
                         doc="Simulation step of the request-level model.")
    control_interval_s: float = spec(5.0, unit="s", gt=0, le=3600,
                                     doc="Time between controller decisions; a whole number of ticks.")
    datacenter: DatacenterSpec = spec(default_factory=DatacenterSpec, doc="Topology and provisioning.")
    workload: WorkloadSpec = spec(default_factory=WorkloadSpec, doc="Arriving requests.")
    serving: ServingSpec = spec(default_factory=ServingSpec, doc="The LLM service.")
    vms: VmSpec = spec(default_factory=VmSpec, doc="IaaS VMs.")
    faults: tuple[FaultSpec, ...] = spec((), doc="Scheduled faults.")
    random_faults: RandomFaultSpec = spec(default_factory=RandomFaultSpec, doc="Random faults.")
    carbon_g_per_kwh: tuple[float, ...] = spec(
        (390.0,), unit="g/kWh", ge=0, le=2000, min_items=1,
        doc="Grid carbon intensity series, one value per `carbon_step_s`, repeated (when `carbon` is null).")
    carbon_step_s: float = spec(3600.0, unit="s", ge=1, doc="Time each carbon value holds.")
    carbon: CarbonSpec | None = spec(
        None, doc="A grid region's hourly 2022 intensity instead of the series `carbon_g_per_kwh`.")
    gpu_hour_usd: float = spec(0.0, unit="USD", ge=0, le=1000, doc="Price of one GPU-hour (0: unknown).")
    source: str = spec("", loader_only=True, doc="The file the scenario was read from.")

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

    @property
    def n_saas_servers(self) -> int:
        """Servers serving the LLM (the topology rounds `saas_fraction` the same way)."""
        return round(self.n_servers * self.datacenter.saas_fraction)

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with top-level fields replaced, validated and resolved again.

        A shorter `duration_s` keeps the prefix of the episode: the scheduled faults and load
        spikes this scenario inherits that start at or after the new end are left out (they
        would never be on). Faults or a workload passed in `changes` are checked as given.
        """
        end = changes.get("duration_s")
        if isinstance(end, numbers.Real) and not isinstance(end, bool):
            if "faults" not in changes:
                changes["faults"] = tuple(f for f in self.faults if f.start_s < end)
            if "workload" not in changes and self.workload.spikes:
                changes["workload"] = dataclasses.replace(
                    self.workload, spikes=tuple(sp for sp in self.workload.spikes if sp.start_s < end))
        try:
            new = dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise ScenarioError(f"{self.source or self.name}: {exc}") from None
        where = self.source or self.name
        validate(new, where)
        beside = self.source if self.source and Path(self.source).is_file() else None
        return resolve(new, where, scenario_file=beside)


SECTIONS: tuple[tuple[str, type], ...] = (
    ("", Scenario),
    ("datacenter", DatacenterSpec),
    ("datacenter.server", ServerSpec),
    ("datacenter.cooling", CoolingSpec),
    ("datacenter.weather", WeatherSpec),
    ("workload", WorkloadSpec),
    ("workload.diurnal", DiurnalSpec),
    ("workload.spikes[]", SpikeSpec),
    ("serving", ServingSpec),
    ("serving.pools[]", PoolSpec),
    ("serving.slo_classes[]", SloClassSpec),
    ("vms", VmSpec),
    ("vms.types[]", VmTypeSpec),
    ("faults[]", FaultSpec),
    ("random_faults", RandomFaultSpec),
    ("carbon", CarbonSpec),
)
"""Every section of a scenario file: its path and dataclass (the documentation's tables)."""


# --------------------------------------------------------------------------------------------
# Step 1: YAML to dataclasses
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _fail(where: str, path: str, value: Any, why: str) -> ScenarioError:
    """A `ScenarioError` naming the file, the field path and the value."""
    return ScenarioError(f"{where}: field '{path}' = {value!r}: {why}")


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    """Turn nested dicts into the dataclass `cls`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise _fail(where, path or cls.__name__, data, "must be a mapping of fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        f = fields.get(key)
        if f is None or field_spec(f).loader_only:
            known = sorted(k for k, g in fields.items() if not field_spec(g).loader_only)
            raise ScenarioError(
                f"{where}: unknown key '{_join(path, key)}' (value {data[key]!r}); known keys: {known}")
    kwargs = {f.name: _convert(hints[f.name], data[f.name], where, _join(path, f.name))
              for f in fields.values() if f.name in data}
    for f in fields.values():  # after the given values: a wrong value is named before a missing one
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ScenarioError(f"{where}: missing required field '{_join(path, f.name)}'")
    return cls(**kwargs)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""`1e3`: a number YAML 1.1 (PyYAML) reads as a string."""


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    """`value` from YAML as the type `tp` (numbers, strings, tuples, nested dataclasses)."""
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
        if value is None:
            raise _fail(where, path, value, "must be a list (write [] for none)")
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_convert(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    if tp is str and isinstance(value, datetime.date):  # YAML reads 2022-06-01 as a date
        return value.isoformat()
    _check_type(tp, value, where, path)
    return float(value) if tp is float else value


def _check_type(tp: Any, value: Any, where: str, path: str) -> None:
    """Refuse a value that is not of the scalar type `tp` (float: a finite number)."""
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(where, path, value, "must be a number")
        if not math.isfinite(value):
            raise _fail(where, path, value, "must be a finite number")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(where, path, value, "must be an integer")
    elif tp is str:
        if not isinstance(value, str):
            raise _fail(where, path, value, "must be a string")
    elif tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, path, value, "must be true or false")


# --------------------------------------------------------------------------------------------
# Step 2: field ranges and cross-field rules
# --------------------------------------------------------------------------------------------


def _check_fields(obj: Any, where: str, path: str) -> None:
    """Check every field of the dataclass `obj` (recursively) against its type and `FieldSpec`."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        _check_value(hints[f.name], field_spec(f), getattr(obj, f.name), where, _join(path, f.name))


def _check_value(tp: Any, rule: FieldSpec, value: Any, where: str, path: str) -> None:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise _fail(where, path, value, f"must be a {tp.__name__} mapping")
        _check_fields(value, where, path)
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise _fail(where, path, value, "must be a list")
        if len(value) < rule.min_items:
            raise _fail(where, path, list(value), f"must list at least {rule.min_items} item(s)")
        for i, v in enumerate(value):
            _check_value(args[0], rule, v, where, f"{path}[{i}]")
        if rule.increasing and any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise _fail(where, path, list(value), "must be strictly increasing")
        if rule.distinct and len(set(value)) != len(value):
            raise _fail(where, path, list(value), "must not repeat a value")
        return
    _check_type(tp, value, where, path)
    _check_range(rule, value, where, path)


def _check_range(rule: FieldSpec, value: Any, where: str, path: str) -> None:
    """Refuse a scalar outside the field's bounds, choices or pattern."""
    if isinstance(value, str):
        allowed = rule.allowed()
        if allowed is not None and value not in allowed:
            raise _fail(where, path, value, f"must be one of {list(allowed)}")
        if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
            raise _fail(where, path, value, f"must be {rule.pattern_doc}")
        return
    if ((rule.ge is not None and value < rule.ge) or (rule.gt is not None and value <= rule.gt)
            or (rule.le is not None and value > rule.le) or (rule.lt is not None and value >= rule.lt)):
        unit = f" {rule.unit}" if rule.unit and rule.unit != "x" else ""
        text = rule.bounds_text()
        raise _fail(where, path, value, f"must be {'in ' if text[0] in '[(' else ''}{text}{unit}")


CROSS_FIELD_RULES: list[Callable[[Scenario, str], None]] = []
"""Consistency rules between fields, checked after the field ranges; each docstring's first
line is its entry in the documentation."""


def _cross_field(rule: Callable[[Scenario, str], None]) -> Callable[[Scenario, str], None]:
    CROSS_FIELD_RULES.append(rule)
    return rule


def _whole_multiple(a: float, b: float) -> bool:
    ratio = a / b
    return round(ratio) >= 1 and abs(ratio - round(ratio)) <= 1e-9 * max(1.0, ratio)


@_cross_field
def _interval_is_whole_ticks(s: Scenario, where: str) -> None:
    """`control_interval_s` is a whole number (>= 1) of `tick_s`."""
    if not _whole_multiple(s.control_interval_s, s.tick_s):
        raise _fail(where, "control_interval_s", s.control_interval_s,
                    f"must be a whole multiple of tick_s ({s.tick_s})")


@_cross_field
def _duration_is_whole_intervals(s: Scenario, where: str) -> None:
    """`duration_s` is a whole number (>= 1) of control intervals (an episode is never extended)."""
    if not _whole_multiple(s.duration_s, s.control_interval_s):
        raise _fail(where, "duration_s", s.duration_s,
                    f"must be a whole multiple (>= 1) of control_interval_s ({s.control_interval_s})")


@_cross_field
def _aisles_fit_rows(s: Scenario, where: str) -> None:
    """`datacenter.rows_per_aisle` is at most `datacenter.rows`."""
    d = s.datacenter
    if d.rows_per_aisle > d.rows:
        raise _fail(where, "datacenter.rows_per_aisle", d.rows_per_aisle,
                    f"exceeds datacenter.rows ({d.rows})")


@_cross_field
def _datacenter_fits_memory(s: Scenario, where: str) -> None:
    """The datacenter has at most 1,048,576 GPUs (rows x racks x servers x GPUs)."""
    if s.n_gpus > MAX_GPUS:
        raise _fail(where, "datacenter.rows", s.datacenter.rows,
                    f"the datacenter would have {s.n_gpus:,} GPUs; at most {MAX_GPUS:,} fit in memory")


@_cross_field
def _episode_fits_memory(s: Scenario, where: str) -> None:
    """An episode draws at most 50 million requests, 10 million VMs and 100,000 random faults (expected)."""
    saas_gpus = s.n_saas_servers * s.datacenter.server.gpus
    hours = s.duration_s / 3600.0
    for path, value, expected, limit, what in (
        ("workload.rps_per_gpu", s.workload.rps_per_gpu,
         s.workload.rps_per_gpu * saas_gpus * s.duration_s, MAX_EPISODE_REQUESTS, "requests"),
        ("vms.arrivals_per_hour", s.vms.arrivals_per_hour, s.vms.arrivals_per_hour * hours,
         MAX_EPISODE_VMS, "VM arrivals"),
        ("random_faults.per_hour", s.random_faults.per_hour, s.random_faults.per_hour * hours,
         MAX_EPISODE_RANDOM_FAULTS, "random faults"),
    ):
        if expected > limit:
            raise _fail(where, path, value,
                        f"an episode of {s.duration_s:g} s would hold {expected:,.0f} {what}; at most "
                        f"{limit:,} are simulated (the whole episode is drawn in memory at reset)")


@_cross_field
def _server_power_adds_up(s: Scenario, where: str) -> None:
    """`max_power_w` exceeds `gpus x gpu_tdp_w`; `overhead_idle_w` <= `overhead_max_w` <= the difference."""
    sv = s.datacenter.server
    gpus_w = sv.gpus * sv.gpu_tdp_w
    if gpus_w >= sv.max_power_w:
        raise _fail(where, "datacenter.server.max_power_w", sv.max_power_w,
                    f"must exceed gpus x gpu_tdp_w ({gpus_w:g} W)")
    if sv.overhead_max_w > sv.max_power_w - gpus_w:
        raise _fail(where, "datacenter.server.overhead_max_w", sv.overhead_max_w,
                    f"exceeds the nameplate's non-GPU share, max_power_w - gpus x gpu_tdp_w "
                    f"({sv.max_power_w - gpus_w:g} W); set overhead_max_w (non-GPU power at full load) "
                    f"for this server")
    if sv.overhead_idle_w > sv.overhead_max_w:
        raise _fail(where, "datacenter.server.overhead_idle_w", sv.overhead_idle_w,
                    f"exceeds overhead_max_w ({sv.overhead_max_w:g} W), the non-GPU power at full load")


@_cross_field
def _standby_below_idle(s: Scenario, where: str) -> None:
    """`server.standby_w` (a server that is off) is at most `server.overhead_idle_w` (one that idles)."""
    sv = s.datacenter.server
    if sv.standby_w > sv.overhead_idle_w:
        raise _fail(where, "datacenter.server.standby_w", sv.standby_w,
                    f"exceeds overhead_idle_w ({sv.overhead_idle_w:g} W): a server that is off draws "
                    f"less than one that idles")


@_cross_field
def _some_saas_server(s: Scenario, where: str) -> None:
    """At least one server serves the LLM: round(servers x `saas_fraction`) >= 1."""
    if s.n_saas_servers < 1:
        raise _fail(where, "datacenter.saas_fraction", s.datacenter.saas_fraction,
                    f"leaves no SaaS server among {s.n_servers}")


@_cross_field
def _vms_have_hosts(s: Scenario, where: str) -> None:
    """VMs (`vms.arrivals_per_hour` or `vms.initial_fraction` > 0) need IaaS servers (`saas_fraction` < 1)."""
    if s.n_servers - s.n_saas_servers > 0:
        return
    for name in ("arrivals_per_hour", "initial_fraction"):
        value = getattr(s.vms, name)
        if value > 0:
            raise _fail(where, f"vms.{name}", value,
                        f"but no server hosts VMs (datacenter.saas_fraction {s.datacenter.saas_fraction})")


@_cross_field
def _vm_types_fit(s: Scenario, where: str) -> None:
    """`vms.types`: distinct names, shares summing to 1, `noise_tau_s` wherever `noise_sd_w` > 0.

    With types, `vms.gpu_power_w` and `vms.lifetime_s` keep their defaults (each type has its own).
    """
    vt = s.vms.types
    if not vt:
        return
    names = [t.name for t in vt]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _fail(where, f"vms.types[{i}].name", name, "names another type already; names are distinct")
    shares = [t.share for t in vt]
    total = math.fsum(shares)
    if abs(total - 1.0) > VM_TYPE_SHARE_TOLERANCE:
        raise _fail(where, "vms.types", shares,
                    f"the types' shares sum to {total:g}; they must sum to 1 (each is the probability a VM "
                    f"is of that type)")
    for i, t in enumerate(vt):
        if t.noise_sd_w > 0 and t.noise_tau_s is None:
            raise _fail(where, f"vms.types[{i}].noise_tau_s", None,
                        f"must be given when noise_sd_w > 0 ({t.noise_sd_w:g} W)")
    defaults = {f.name: f.default for f in dataclasses.fields(VmSpec)}
    for name in ("gpu_power_w", "lifetime_s"):
        value = getattr(s.vms, name)
        if value != defaults[name]:
            raise _fail(where, f"vms.{name}", list(value) if isinstance(value, tuple) else value,
                        "is ignored when vms.types lists types (each type has its own): give one or the "
                        "other")


@_cross_field
def _tp_fits_servers(s: Scenario, where: str) -> None:
    """Every TP degree in `serving.tp_choices` divides `datacenter.server.gpus`."""
    gpus = s.datacenter.server.gpus
    for i, tp in enumerate(s.serving.tp_choices):
        if gpus % tp:
            raise _fail(where, f"serving.tp_choices[{i}]", tp,
                        f"does not divide the {gpus} GPUs of a server")


@_cross_field
def _pools_are_choices(s: Scenario, where: str) -> None:
    """Each pool's `tp`, `freq_mhz` and `max_batch` is one of the choices a controller has."""
    sv = s.serving
    for i, p in enumerate(sv.pools):
        for name, choices_name in (("tp", "tp_choices"), ("freq_mhz", "freq_choices_mhz"),
                                   ("max_batch", "batch_choices")):
            value, choices = getattr(p, name), getattr(sv, choices_name)
            if not any(math.isclose(value, c, rel_tol=1e-9) for c in choices):
                raise _fail(where, f"serving.pools[{i}].{name}", value,
                            f"not one of serving.{choices_name} {list(choices)}")


@_cross_field
def _slo_classes_cover_lengths(s: Scenario, where: str) -> None:
    """`serving.slo_classes` (if any): bounds strictly increasing, only the last class unbounded (null)."""
    classes = s.serving.slo_classes
    for i, c in enumerate(classes):
        path = f"serving.slo_classes[{i}].input_tokens_below"
        last = i == len(classes) - 1
        if last and c.input_tokens_below is not None:
            raise _fail(where, path, c.input_tokens_below,
                        "the last class must be null (unbounded) so that every prompt has a class")
        if not last and c.input_tokens_below is None:
            raise _fail(where, path, None, "only the last class may be unbounded (null)")
        prev = classes[i - 1].input_tokens_below if i else None
        if not last and prev is not None and c.input_tokens_below <= prev:
            raise _fail(where, path, c.input_tokens_below,
                        f"must exceed the previous class's bound ({prev}): bounds strictly increase")


@_cross_field
def _pools_fit_saas_gpus(s: Scenario, where: str) -> None:
    """The pools' instances fit the SaaS GPUs: sum of n_instances x tp <= SaaS servers x GPUs."""
    saas_gpus = s.n_saas_servers * s.datacenter.server.gpus
    used = sum(p.n_instances * p.tp for p in s.serving.pools)
    if used > saas_gpus:
        raise ScenarioError(
            f"{where}: field 'serving.pools' asks for {used} GPUs but the SaaS part of the "
            f"datacenter has {saas_gpus} (servers x saas_fraction x gpus)")


def _fault_magnitude_why(kind: str, magnitude: float, cooling_oversubscription: float) -> str | None:
    """Why a fault's magnitude is out of range for its kind, or None."""
    if kind == "load_spike":
        return None if 1.0 <= magnitude <= 100.0 else "a load_spike multiplies the load: must be in [1, 100]"
    if not 0.0 < magnitude <= 1.0:
        return f"a {kind} keeps this fraction of capacity: must be in (0, 1]"
    if kind == "cooling_failure":
        effective = cooling_oversubscription / magnitude
        if effective > MAX_EFFECTIVE_COOLING_OVERSUBSCRIPTION * (1 + 1e-12):
            return (f"with cooling_oversubscription {cooling_oversubscription:g} the aisle would be "
                    f"{effective:.3g}x oversubscribed during the failure; at most "
                    f"{MAX_EFFECTIVE_COOLING_OVERSUBSCRIPTION:g}x (cooling_oversubscription / magnitude) "
                    f"is modelled")
    return None


@_cross_field
def _faults_fit(s: Scenario, where: str) -> None:
    """Each fault starts inside the episode; its magnitude fits its kind; its target exists."""
    over = s.datacenter.cooling_oversubscription
    for i, f in enumerate(s.faults):
        if f.start_s >= s.duration_s:
            raise _fail(where, f"faults[{i}].start_s", f.start_s,
                        f"starts after the episode ends (duration_s {s.duration_s:g})")
        why = _fault_magnitude_why(f.kind, f.magnitude, over)
        if why:
            raise _fail(where, f"faults[{i}].magnitude", f.magnitude, why)
        if f.kind != "load_spike":
            cooling = f.kind == "cooling_failure"
            limit, what = (s.n_aisles, "aisles") if cooling else (s.datacenter.rows, "rows")
            if f.target >= limit:
                raise _fail(where, f"faults[{i}].target", f.target, f"this datacenter has {limit} {what}")


@_cross_field
def _random_faults_fit(s: Scenario, where: str) -> None:
    """Random faults: some kind to draw when `per_hour` > 0; a cooling failure's magnitude as above."""
    rf = s.random_faults
    if rf.per_hour > 0 and not rf.kinds:
        raise _fail(where, "random_faults.kinds", list(rf.kinds), "must name a kind when per_hour > 0")
    if rf.per_hour > 0 and "cooling_failure" in rf.kinds:
        why = _fault_magnitude_why("cooling_failure", rf.magnitude, s.datacenter.cooling_oversubscription)
        if why:
            raise _fail(where, "random_faults.magnitude", rf.magnitude, why)


@_cross_field
def _spikes_fit(s: Scenario, where: str) -> None:
    """Each `workload.spikes` entry starts inside the episode."""
    for i, sp in enumerate(s.workload.spikes):
        if sp.start_s >= s.duration_s:
            raise _fail(where, f"workload.spikes[{i}].start_s", sp.start_s,
                        f"starts after the episode ends (duration_s {s.duration_s:g})")


@_cross_field
def _carbon_start_is_a_date(s: Scenario, where: str) -> None:
    """`carbon.start` is a real date and time (2022-02-30 is not)."""
    if s.carbon is None:
        return
    try:
        parse_start(s.carbon.start)
    except ValueError as exc:
        raise _fail(where, "carbon.start", s.carbon.start, f"not a date and time ({exc})") from None


@_cross_field
def _one_carbon_source(s: Scenario, where: str) -> None:
    """With `carbon` (a grid region), `carbon_g_per_kwh` and `carbon_step_s` keep their defaults."""
    if s.carbon is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(Scenario)}
    for name in ("carbon_g_per_kwh", "carbon_step_s"):
        value = getattr(s, name)
        if value != defaults[name]:
            raise _fail(where, name, list(value) if isinstance(value, tuple) else value,
                        f"is ignored when carbon names a grid region ({s.carbon.region}): give one or "
                        "the other")


@_cross_field
def _weather_start_is_a_date(s: Scenario, where: str) -> None:
    """`datacenter.weather.start` is a real day and time of a non-leap year (02-29 and 04-31 are not)."""
    w = s.datacenter.weather
    if w is None:
        return
    try:
        parse_weather_start(w.start)
    except ValueError as exc:
        raise _fail(where, "datacenter.weather.start", w.start, f"not a day and time ({exc})") from None


@_cross_field
def _one_outside_source(s: Scenario, where: str) -> None:
    """With `datacenter.weather`, `outside_temp_mean_c` and `outside_temp_amplitude_c` keep their defaults."""
    d = s.datacenter
    if d.weather is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(DatacenterSpec)}
    for name in ("outside_temp_mean_c", "outside_temp_amplitude_c"):
        if getattr(d, name) != defaults[name]:
            raise _fail(where, f"datacenter.{name}", getattr(d, name),
                        f"is ignored when datacenter.weather names a site ({d.weather.location}): give one "
                        "or the other")


@_cross_field
def _gpu_offsets_fit_server(s: Scenario, where: str) -> None:
    """`datacenter.server.gpu_inlet_offsets_c` is empty or has one value per GPU of the server."""
    sv = s.datacenter.server
    n = len(sv.gpu_inlet_offsets_c)
    if n and n != sv.gpus:
        raise _fail(where, "datacenter.server.gpu_inlet_offsets_c", list(sv.gpu_inlet_offsets_c),
                    f"has {n} values; give one per GPU (datacenter.server.gpus = {sv.gpus}) or none")


def validate(s: Scenario, where: str) -> None:
    """Check every field's type and range, then the cross-field rules (no file is read).

    Raises:
        ScenarioError: Naming `where`, the field path and the value.
    """
    if not isinstance(s, Scenario):
        raise ScenarioError(f"{where}: expected a Scenario, got {type(s).__name__}")
    _check_fields(s, where, "")
    for rule in CROSS_FIELD_RULES:
        rule(s, where)


# --------------------------------------------------------------------------------------------
# Step 3: resolve what a run needs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Resolved:
    """What `resolve` found: the trace and the profiles' common limits."""

    trace: Trace
    min_freq_mhz: float
    max_freq_mhz: float
    idle_power_w: float
    gpu_power_limit_w: float


RESOLVE_RULES: list[Callable[[Scenario, str, _Resolved], None]] = []
"""Rules that need the trace and the profiles; each docstring's first line is documented."""


_ResolveRule = Callable[[Scenario, str, _Resolved], None]


def _resolve_rule(rule: _ResolveRule) -> _ResolveRule:
    RESOLVE_RULES.append(rule)
    return rule


def trace_path(ref: str, scenario_file: str | Path | None = None) -> Path | None:
    """The file `workload.trace` names, or None for a shipped trace name.

    A name without `/` and `.` is a shipped trace. A relative path is looked up next to the
    scenario file first, then in the current directory.
    """
    if is_builtin_name(ref):
        return None
    path = Path(ref).expanduser()
    if not path.is_absolute() and scenario_file is not None:
        beside = Path(scenario_file).parent / path
        if beside.exists():
            return beside.resolve()
    return path.resolve()


@_resolve_rule
def _window_in_trace(s: Scenario, where: str, r: _Resolved) -> None:
    """`workload.start_s` lies before the trace's end and the window holds a request.

    A window reaching past the trace's end is clipped to it.
    """
    w = s.workload
    if w.start_s >= r.trace.duration_s:
        raise _fail(where, "workload.start_s", w.start_s,
                    f"is past the end of trace {w.trace!r} ({r.trace.duration_s:.1f} s)")
    if w.rps_per_gpu > 0 and w.window_s is not None and not len(r.trace.window(w.start_s, w.window_s)):
        raise _fail(where, "workload.window_s", w.window_s,
                    f"the window from start_s {w.start_s:g} holds no request of trace {w.trace!r}")


@_resolve_rule
def _week_window_holds_the_episode(s: Scenario, where: str, r: _Resolved) -> None:
    """With a 2024 week trace, `workload.window_s` (if given) is at least `duration_s`.

    The episode is the week's stretch from a point of the window; it never runs past the
    window's end (training and held-out windows stay apart).
    """
    w = s.workload
    if is_week_trace(w.trace) and w.window_s is not None and w.window_s < s.duration_s:
        raise _fail(where, "workload.window_s", w.window_s,
                    f"shorter than the episode (duration_s {s.duration_s:g}); a week trace's episode "
                    f"lies inside its window")


@_resolve_rule
def _pool_count(s: Scenario, where: str, r: _Resolved) -> None:
    """`serving.pools` lists one entry per pool of the `workload.pools` set."""
    from llm_cluster_gym.envs.sim.demand import POOL_SETS

    names = POOL_SETS[s.workload.pools].names
    if len(s.serving.pools) != len(names):
        raise _fail(where, "serving.pools", f"{len(s.serving.pools)} pools",
                    f"workload.pools {s.workload.pools!r} has {len(names)} pools {list(names)}")


@_resolve_rule
def _clocks_in_range(s: Scenario, where: str, r: _Resolved) -> None:
    """Every clock (`serving.freq_choices_mhz`, the pools' `freq_mhz`) lies in the profile's clock range."""
    lo, hi = r.min_freq_mhz, r.max_freq_mhz
    why = f"outside the GPU's clock range [{lo:g}, {hi:g}] MHz (profile {s.serving.model}/{s.serving.gpu})"
    for i, f in enumerate(s.serving.freq_choices_mhz):
        if not lo <= f <= hi:
            raise _fail(where, f"serving.freq_choices_mhz[{i}]", f, why)
    for i, p in enumerate(s.serving.pools):
        if not lo <= p.freq_mhz <= hi:
            raise _fail(where, f"serving.pools[{i}].freq_mhz", p.freq_mhz, why)


@_resolve_rule
def _vm_power_in_range(s: Scenario, where: str, r: _Resolved) -> None:
    """Each `vms.gpu_power_w`, `vms.types[].mean_gpu_w` lies between the profile's idle power and limit."""
    lo, hi = r.idle_power_w, r.gpu_power_limit_w
    for i, w in enumerate(s.vms.gpu_power_w):
        if not lo <= w <= hi:
            raise _fail(where, f"vms.gpu_power_w[{i}]", w,
                        f"a GPU draws between {lo:g} W (idle) and {hi:g} W (its power limit)")
    for i, t in enumerate(s.vms.types):
        if not lo <= t.mean_gpu_w <= hi:
            raise _fail(where, f"vms.types[{i}].mean_gpu_w", t.mean_gpu_w,
                        f"a GPU draws between {lo:g} W (idle) and {hi:g} W (its power limit)")


@_resolve_rule
def _tdp_covers_gpu(s: Scenario, where: str, r: _Resolved) -> None:
    """`datacenter.server.gpu_tdp_w` is at least the profile's GPU power limit."""
    tdp = s.datacenter.server.gpu_tdp_w
    if tdp < r.gpu_power_limit_w:
        raise _fail(where, "datacenter.server.gpu_tdp_w", tdp,
                    f"below the GPU power limit of the profile ({r.gpu_power_limit_w:g} W)")


@_resolve_rule
def _carbon_hours_in_table(s: Scenario, where: str, r: _Resolved) -> None:
    """The episode's grid hours (`duration_s` from `carbon.start + workload.start_s`) are in the table."""
    if s.carbon is None:
        return
    try:
        table = hourly_carbon()
    except GridDataError as exc:
        raise _fail(where, "carbon.region", s.carbon.region, str(exc)) from None
    begin = parse_start(s.carbon.start) + datetime.timedelta(seconds=s.workload.start_s)
    end = begin + datetime.timedelta(seconds=s.duration_s)
    if begin < table.first_hour_utc or end > table.end_utc:
        span = "" if s.workload.start_s == 0 else f" + workload.start_s {s.workload.start_s:g} s"
        raise _fail(where, "carbon.start", s.carbon.start,
                    f"the episode ({s.duration_s:g} s from start{span}) must lie inside the hourly "
                    f"data, {table.first_hour_utc:%Y-%m-%dT%H:%M} to {table.end_utc:%Y-%m-%dT%H:%M} UTC")


@_resolve_rule
def _weather_file_reads(s: Scenario, where: str, r: _Resolved) -> None:
    """The site's weather file (`datacenter.weather.location`) reads: 8,760 hourly dry-bulb values."""
    w = s.datacenter.weather
    if w is None:
        return
    try:
        location_weather(w.location)
    except WeatherDataError as exc:
        raise _fail(where, "datacenter.weather.location", w.location, str(exc)) from None


def resolve(s: Scenario, where: str, scenario_file: str | Path | None = None) -> Scenario:
    """Find what a run will need, now: the trace, the pool set and the profiles.

    Args:
        s: A validated scenario.
        where: The file (or name) errors name.
        scenario_file: The scenario file, for a trace path relative to it.

    Returns:
        The scenario with a trace file path made absolute (shipped names stay names).

    Raises:
        ScenarioError: An unreadable or malformed trace, an unknown pool set, a missing
            profile, or a value outside what the profile allows.
    """
    w = s.workload
    path = trace_path(w.trace, scenario_file)
    if path is not None and str(path) != w.trace:
        s = dataclasses.replace(s, workload=dataclasses.replace(w, trace=str(path)))
    try:
        trace = resolve_trace(s.workload.trace)
    except TraceError as exc:
        raise _fail(where, "workload.trace", w.trace, str(exc)) from None
    sv = s.serving
    library = ProfileLibrary.load()
    profiles = []
    if not library.tps(sv.model, sv.gpu):
        if sv.model not in library.models():
            raise _fail(where, "serving.model", sv.model,
                        f"no profile of this model; profiled: {library.models()}")
        raise _fail(where, "serving.gpu", sv.gpu,
                    f"no profile of {sv.model} on this GPU; profiled: {library.gpus(sv.model)}")
    for i, tp in enumerate(sv.tp_choices):
        try:
            profiles.append(library.get(sv.model, sv.gpu, tp))
        except ProfileError:
            raise _fail(where, f"serving.tp_choices[{i}]", tp,
                        f"no profile of {sv.model} on {sv.gpu} at this TP degree; profiled: "
                        f"{library.tps(sv.model, sv.gpu)}") from None
    found = _Resolved(
        trace=trace,
        min_freq_mhz=max(p.min_freq_mhz for p in profiles),
        max_freq_mhz=min(p.max_freq_mhz for p in profiles),
        idle_power_w=max(p.idle_power_w for p in profiles),
        gpu_power_limit_w=min(p.gpu_power_limit_w for p in profiles),
    )
    for rule in RESOLVE_RULES:
        rule(s, where, found)
    return s


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a shipped scenario by name (`small`, `medium`, ...) or a YAML file by path.

    Raises:
        ScenarioError: Unknown name, unreadable file, invalid YAML, or any field that breaks
            the schema (`docs/SCENARIOS.md`); the message names the file, field and value.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
            raise ScenarioError(f"unknown scenario {name_or_path!r}; shipped: {shipped}")
    where = str(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (safe)
    except OSError as exc:
        raise ScenarioError(f"{where}: cannot read scenario file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{where}: not a UTF-8 text file (byte {exc.start}); a scenario is YAML"
                            ) from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or "name" not in data:
        raise ScenarioError(f"{where}: a scenario file is a mapping with at least a 'name' key")
    scenario = _build(Scenario, data, where, "")
    scenario = dataclasses.replace(scenario, source=where)
    validate(scenario, where)
    return resolve(scenario, where, scenario_file=path)


def shipped_scenarios() -> list[str]:
    """Names of the scenarios that ship with the package."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------------------------
# The format's documentation, generated from the schema
# --------------------------------------------------------------------------------------------


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return f"{_type_text(inner)} or null"
    if origin is tuple:
        inner = args[0]
        return "list of mappings" if dataclasses.is_dataclass(inner) else f"list of {_type_text(inner)}s"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {float: "number", int: "integer", str: "string", bool: "boolean"}[tp]


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return "see its section"
    if f.default is dataclasses.MISSING:
        return "required"
    v = f.default
    if v is None:
        return "null"
    if isinstance(v, tuple):
        return "[" + ", ".join(_default_scalar(x) for x in v) + "]"
    return _default_scalar(v)


def _default_scalar(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"' if v else '""'
    if isinstance(v, float):
        return _num(v)
    return str(v)


def _first_paragraph(doc: str | None) -> str:
    text = (doc or "").strip().split("\n\n")[0]
    return " ".join(text.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


_INTRO = """\
# Scenario files

<!-- Generated by llm_cluster_gym.envs.sim.scenario.scenario_reference(); do not edit by hand.
     Regenerate with: python -m llm_cluster_gym.envs.sim.scenario docs/SCENARIOS.md -->

A scenario file is a YAML mapping that describes one experiment: the datacenter, the requests
that arrive, the LLM service, IaaS VMs, faults and accounting. `llm-cluster simulate --scenario
<name or file>` and every other command that takes `--scenario` read it with
`load_scenario`; the shipped ones are in `envs/scenarios/`. This page is generated from the
dataclasses in `envs/sim/scenario.py`, which are the schema, and a test fails when it is out
of date.

Loading is strict. Every problem is a `ScenarioError` whose one line names the file, the field
path and the value, e.g.

    mine.yaml: field 'faults[1].magnitude' = 5.0: a cooling_failure keeps this fraction of
    capacity: must be in (0, 1]

and the command line turns it into exit status 2 with that line and no traceback. Refused:
unknown keys, a key given twice, wrong types (a number where a list is expected is read as a
one-element list), NaN or infinite numbers, values outside the ranges below, the cross-field
rules broken, and anything the run would need that cannot be found. Numbers may be written
`1e3`. Where the table gives no unit, the value is a count or a fraction.
"""

_CHOICES = """\
## Decisions

- **Oversubscription is bounded at 3x** (power and cooling; below 1 a domain is provisioned for
  more than its nameplate, down to 0.01). Operators run rows and aisles at
  1.2-2x (the range the TAPAS paper studies); a value far above that is a typo, and the
  simulator's linear aisle-overload model (`overload_c_per_frac`) is not meant for it: at 100x
  the GPUs read hundreds of degrees. For the same reason a cooling failure may not leave an
  aisle more than 12x oversubscribed (`cooling_oversubscription / magnitude`): in
  `small_faults` at 1 request/s per GPU with every IaaS server hosting a 690 W VM, the thermal
  slowdown still holds the hottest GPU near 104 C at 12x; at 20x it reaches about 155 C. Such
  values are refused rather than warned about: a warning scrolls past, a wrong temperature
  ends up in a report.
- **Faults and spikes must start inside the episode** (`0 <= start_s < duration_s`): one that
  starts later would never happen, which is always a mistake in a file. A fault that lasts past
  the end is allowed: it is still on when the episode ends. `Scenario.with_overrides(duration_s=...)`
  (what `llm-cluster simulate --duration-s` does) runs a prefix of the episode, so it leaves out
  the inherited faults and spikes that start after the new end.
- **The episode is a whole number of control intervals**, and the control interval a whole
  number of ticks: nothing is silently rounded or extended.
- **A failure keeps a fraction in (0, 1] of capacity**; 0 (no cooling at all, no power at all)
  is not modelled: servers would be off, not slow. A load spike multiplies the load by [1, 100].
- **The initial configuration is one a controller could choose**: each pool's TP degree, clock
  and batch cap are among the `serving` choices, and the clocks lie in the GPU's clock range
  read from the profile (they are not clamped).
- **The name is a safe file name**: it names the report folder (`reports/sim-<name>`), so it
  cannot contain `/`, `\\` or start with `.`.
- **Carbon is counted on the facility's energy**: each tick's server (IT) energy times
  `datacenter.pue` (cooling and power delivery) times the grid intensity at the tick's start. The
  grid supplies the whole facility. The aisle cooling model computes inlet temperatures, not the
  power of the cooling plant, so the overhead is a published PUE: 1.12 by default, Microsoft's
  design PUE of its newest datacenters (Azure blog, April 2022); the industry's 2022 average was
  1.55 (Uptime Institute survey). With a constant PUE, carbon and energy savings differ only when
  the intensity changes during the episode (`carbon` names a grid region).
- **Grid intensity is hourly and stepwise** (`carbon`): the 2022 hourly data is each hour's mean,
  so the whole hour gets it; a smooth curve between hours would invent a shape the data lacks.
  An episode must lie inside 2022 (it does not wrap around to January).
- **A trace window past the trace's end is clipped to it** (the held-out test window is "to the
  end"); a window that starts after the end is refused.
"""

_TRACES = """\
## Trace files

`workload.trace` names a shipped trace or a CSV file, read when the scenario loads (and cached
per file version, so each episode reuses it). Accepted formats, found from the header (extra
columns are ignored):

| format | arrival column | input tokens | output tokens |
|---|---|---|---|
| Azure 2023 / 2024 | `TIMESTAMP` (ISO: naive, `+HH:MM`, `Z`) | `ContextTokens` | `GeneratedTokens` |
| Vidur | `arrived_at` (seconds, >= 0) | `num_prefill_tokens` | `num_decode_tokens` |

Arrival times must be sorted; token counts are whole numbers >= 1; NaN, infinite, negative and
non-numeric values are refused; blank lines are skipped. A bad trace is a `TraceError` (exit 2)
naming the file, the line, the column and the value, e.g.

    traces/mine.csv: field 'ContextTokens' (column 2), row 2 (line 3): value '-3': must be >= 1

A file that is not UTF-8 text (a binary file given by mistake) is refused with the line of the
first undecodable byte.
"""


def scenario_reference() -> str:
    """The format's documentation (`docs/SCENARIOS.md`), generated from the schema."""
    out = [_INTRO]
    for path, cls in SECTIONS:
        title = path or "top level"
        out.append(f"## `{title}`\n" if path else "## Top level\n")
        out.append(_first_paragraph(cls.__doc__) + "\n")
        out.append("| field | type | unit | range | default | meaning |")
        out.append("|---|---|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rule = field_spec(f)
            if rule.loader_only:
                continue
            tp = hints[f.name]
            is_section = dataclasses.is_dataclass(tp) or (
                typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0])
            ) or any(dataclasses.is_dataclass(a) for a in typing.get_args(tp))
            rng = "see its section" if is_section else rule.range_text()
            out.append("| " + " | ".join(_cell(x) for x in (
                f"`{f.name}`", _type_text(tp), rule.unit or "", rng, _default_text(f), rule.doc)) + " |")
        out.append("")
    out.append("## Cross-field rules\n")
    out.append("Checked after every field is in range:\n")
    out += [f"- {_first_paragraph(r.__doc__)}" for r in CROSS_FIELD_RULES]
    out.append("")
    out.append("## Resolved at load\n")
    out.append("Everything a run needs is found when the scenario loads, not mid-run: the trace\n"
               "(`workload.trace` exists and parses), the pool set (`workload.pools`), and a profile\n"
               "of `serving.model` on `serving.gpu` for every TP degree in `serving.tp_choices`\n"
               "(`envs/data/profiles/`). Then:\n")
    out += [f"- {_first_paragraph(r.__doc__)}" for r in RESOLVE_RULES]
    out.append("")
    out.append(_CHOICES)
    out.append(_TRACES)
    return "\n".join(out).rstrip() + "\n"


def write_scenario_reference(path: str | Path) -> Path:
    """Write `scenario_reference()` to `path` (the repository keeps it at `docs/SCENARIOS.md`)."""
    path = Path(path)
    path.write_text(scenario_reference(), encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m llm_cluster_gym.envs.sim.scenario docs/SCENARIOS.md
    print(write_scenario_reference(sys.argv[1] if len(sys.argv) > 1 else REFERENCE_DOC))
