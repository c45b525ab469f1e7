"""RealCluster: a real GPU node behind the ClusterBackend protocol.

The node is one server (one row, one aisle) whose GPUs each run an inference worker
(:mod:`envs.real.worker`). ``advance()`` spends one control interval of wall time replaying
an Azure LLM trace window against the workers: arrivals are admitted (``admit_fraction``),
routed to the worker with the fewest outstanding requests and served with continuous
batching under the batch cap the controller sets. Telemetry comes from an NVML sampler
(:mod:`envs.real.telemetry`) and the service metrics are the simulator's
(:class:`envs.backend.ServiceMetrics`), so an environment, a rule-based controller or a
trained policy runs unchanged.

Virtual power budget: the node's "row limit" is a budget below the hardware limit
(``power_budget_w``), and budget drills lower it for a while (reported as an active
``power_failure``). Nothing on the GPU enforces it: the controller must hold the measured
power under it through the batch cap, admission and routing. Exceedances are counted as
power-throttle events (rising edges of the 1 s mean power above the budget), so emergency
drills run without touching any GPU setting. Clock requests (``freq_mhz``,
``row_freq_cap_mhz``) go to :class:`envs.real.actuators.GpuActuators`, which is disabled
unless the caller enables it (and must stay disabled on shared machines).

What is not measured: the aisle inlet air temperature (``assumed_inlet_c`` is a modelling
assumption reported as the inlet), server overhead power beyond the GPUs (row power here is
the sum of GPU power), and outside temperature.

Request accounting is per episode, as the simulator's: every trace arrival is counted in
``arrived``; a request refused by admission control, refused or dropped by a worker (waiting
past ``drop_after_s``) or lost with a killed worker is ``dropped``; ``in_flight`` is this
episode's admitted requests not yet finished or dropped (completions of an earlier episode's
requests, still in a worker at the reset, are left out), so that arrived = finished + dropped
+ in flight after every interval and the episode's SLO attainment
(`envs.backend.slo_attainment`) can count the requests left unserved at its end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llm_cluster_gym.envs.backend import (
    BackendDescription,
    ClusterAction,
    ClusterLayout,
    PoolConfig,
    PoolStats,
    ServerPowerSpec,
    ServiceMetrics,
    Telemetry,
    TickHistory,
)
from llm_cluster_gym.envs.latency import latency_histogram
from llm_cluster_gym.envs.real.actuators import GpuActuators
from llm_cluster_gym.envs.real.telemetry import (
    POWER_MASK,
    THERMAL_MASK,
    GpuDevice,
    TelemetrySampler,
    column_index,
    open_devices,
    save_recording,
)
from llm_cluster_gym.envs.real.worker import (
    Completed,
    EngineStats,
    InlineWorker,
    Request,
    WorkerConfig,
    WorkerProcess,
    WorkerReport,
)
from llm_cluster_gym.envs.sim.profiles import clock_slowdown
from llm_cluster_gym.envs.sim.serving import weighted_percentiles
from llm_cluster_gym.envs.sim.workload import Trace, builtin_trace, scale_to_rate

REAL_PROFILE = Path(__file__).resolve().parents[1] / "data" / "real" / "llama3-8b-real_h100_tp1.json"
"""Profile of the real worker measured on the H100 (see envs/data/real/README.md)."""


class RealClusterError(ValueError):
    """Bad RealCluster configuration or action (the message names the field and value)."""


class Worker(Protocol):
    """What RealCluster needs of a worker (InlineWorker, WorkerProcess)."""

    def submit(self, reqs: list[Request]) -> None: ...  # noqa: D102
    def set_control(self, **kwargs: Any) -> None: ...  # noqa: D102
    def pump(self, until_s: float) -> None: ...  # noqa: D102
    def poll(self) -> WorkerReport: ...  # noqa: D102
    def close(self) -> None: ...  # noqa: D102


@dataclass(frozen=True)
class RealClusterConfig:
    """How the real node is run.

    Attributes:
        worker: Engine configuration (its ``device`` is replaced per GPU: ``cuda:<gpu>``).
        gpus: GPU indices, one worker each.
        trace: Builtin trace name (``azure_conv_2023``, ``azure_code_2023``).
        trace_start_s: Window start in the trace (s).
        duration_s: Episode length (s of wall time).
        rate_rps: Replay the window at this mean rate (None: the trace's own arrivals).
        control_interval_s: Wall seconds per ``advance()``.
        power_budget_w: Virtual power budget of the node (sum of GPU power), below the
            hardware limit.
        budget_drills: ``(start_s, duration_s, budget_w)`` windows where the budget drops.
        slo_ttft_s: TTFT SLO (s).
        slo_tbt_s: TBT SLO (s).
        initial_max_batch: Batch cap at reset.
        batch_choices: Batch caps a controller may pick.
        sample_hz: NVML sampling rate.
        mode: ``"inline"`` (engines stepped in this thread; CPU tests, one GPU) or
            ``"process"`` (one spawned worker process per GPU).
        assumed_inlet_c: Inlet air temperature reported (not measured; a modelling
            assumption; the default is the inlet offset fitted to the H100 recordings in
            ``envs/data/thermal/h100_thermal_fit.json``, about 28-30 C).
        carbon_g_per_kwh: Grid carbon intensity (EIA US average 2022, as in the scenarios).
    """

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    gpus: tuple[int, ...] = (0,)
    trace: str = "azure_conv_2023"
    trace_start_s: float = 0.0
    duration_s: float = 120.0
    rate_rps: float | None = None
    control_interval_s: float = 5.0
    power_budget_w: float = 500.0
    budget_drills: tuple[tuple[float, float, float], ...] = ()
    slo_ttft_s: float = 1.0
    slo_tbt_s: float = 0.2
    initial_max_batch: int = 64
    batch_choices: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sample_hz: float = 25.0
    mode: str = "inline"
    assumed_inlet_c: float = 29.0
    carbon_g_per_kwh: float = 390.0

    def validate(self) -> None:
        """Raise :class:`RealClusterError` naming the first bad field."""
        if not self.gpus:
            raise RealClusterError("RealClusterConfig: field 'gpus' must name at least one GPU")
        for name in ("duration_s", "control_interval_s", "power_budget_w", "slo_ttft_s",
                     "slo_tbt_s", "sample_hz"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise RealClusterError(f"RealClusterConfig: field '{name}' must be > 0, got {v!r}")
        if self.rate_rps is not None and not self.rate_rps > 0:
            raise RealClusterError(f"RealClusterConfig: field 'rate_rps' must be > 0, got "
                                   f"{self.rate_rps!r}")
        if self.mode not in ("inline", "process"):
            raise RealClusterError(f"RealClusterConfig: field 'mode' must be 'inline' or "
                                   f"'process', got {self.mode!r}")
        for i, d in enumerate(self.budget_drills):
            if len(d) != 3 or not d[1] > 0 or not d[2] > 0:
                raise RealClusterError(f"RealClusterConfig: field 'budget_drills[{i}]' must be "
                                       f"(start_s, duration_s > 0, budget_w > 0), got {d!r}")
        if self.initial_max_batch < 1:
            raise RealClusterError(f"RealClusterConfig: field 'initial_max_batch' must be >= 1, "
                                   f"got {self.initial_max_batch}")


@dataclass
class RunLog:
    """Everything one episode produced (for fidelity reports and recordings)."""

    t0_s: float = 0.0
    requests: list[Completed] = field(default_factory=list)
    intervals: list[dict[str, float]] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)


class RealCluster:
    """A real GPU node serving an LLM trace; implements `envs.backend.ClusterBackend`.

    Args:
        config: How to run the node.
        devices: Telemetry devices, one per worker (default: NVML devices of ``config.gpus``;
            tests pass :class:`envs.real.telemetry.ReplayGpuDevice`).
        workers: Workers, one per GPU (default: built from ``config``).
        actuators: Clock/power actuators (default: disabled, so clock requests are logged only).

    Raises:
        RealClusterError: Bad configuration.
        envs.real.telemetry.GpuUnavailableError: No NVML/GPU and no devices given.
    """

    def __init__(self, config: RealClusterConfig | None = None,
                 devices: Sequence[GpuDevice] | None = None,
                 workers: Sequence[Worker] | None = None,
                 actuators: GpuActuators | None = None) -> None:
        self.config = cfg = config or RealClusterConfig()
        cfg.validate()
        self.devices = list(devices) if devices is not None else open_devices(cfg.gpus)
        if len(self.devices) != len(cfg.gpus):
            raise RealClusterError(f"RealCluster: {len(self.devices)} telemetry devices for "
                                   f"{len(cfg.gpus)} GPUs (field 'gpus' = {cfg.gpus})")
        self.actuators = actuators or GpuActuators(self.devices, enable=False)
        self._workers: list[Worker] | None = list(workers) if workers is not None else None
        self.sampler = TelemetrySampler(self.devices, rate_hz=cfg.sample_hz, keep_all=True)
        st = self.devices[0].static()
        hw_limit = st.power_limit_w if math.isfinite(st.power_limit_w) else 700.0
        max_clock = st.max_sm_clock_mhz if math.isfinite(st.max_sm_clock_mhz) else 1980.0
        slowdown = st.slowdown_temp_c if math.isfinite(st.slowdown_temp_c) else 89.0
        n = len(cfg.gpus)
        freqs = tuple(f for f in st.supported_sm_clocks_mhz if f >= 0.4 * max_clock)[::-1]
        self.layout = ClusterLayout(
            n_rows=1, n_aisles=1, n_servers=1, gpus_per_server=n,
            server_row=np.zeros(1, dtype=np.int64), server_aisle=np.zeros(1, dtype=np.int64),
            server_is_saas=np.ones(1, dtype=bool), pool_names=("all",), tp_choices=(1,),
            freq_choices_mhz=freqs or (max_clock,), batch_choices=cfg.batch_choices,
            model=cfg.worker.model, gpu=st.name, control_interval_s=cfg.control_interval_s,
            slo_ttft_s=np.array([cfg.slo_ttft_s]), slo_tbt_s=np.array([cfg.slo_tbt_s]),
            row_limit_w=np.array([cfg.power_budget_w]),
            aisle_capacity_w=np.array([n * hw_limit]),
            initial_pools=(PoolConfig(n, 1, max_clock, cfg.initial_max_batch),),
            nominal_rps=cfg.rate_rps or 1.0, max_freq_mhz=max_clock, gpu_power_limit_w=hw_limit,
            slowdown_temp_c=slowdown,
        )
        self._rng = np.random.default_rng(0)
        self.log = RunLog()
        self._t0 = time.time()
        self.elapsed_s = 0.0
        self._trace: Trace | None = None
        self._pos = 0
        self._next_id = 0
        self._first_id = 0
        self._unresolved = 0
        self._admit = 1.0
        self._max_batch = cfg.initial_max_batch
        self._freq_mhz = max_clock
        self._over_budget = False
        self._prev_stats: list[EngineStats] = []
        self._outstanding = np.zeros(n)
        self._last_report: list[WorkerReport] = []
        self._description: BackendDescription | None = None
        self._closed = False

    # ------------------------------------------------------------------ workers
    def _build_workers(self) -> list[Worker]:
        cfg = self.config
        out: list[Worker] = []
        for g in cfg.gpus:
            wc = WorkerConfig(**{**asdict(cfg.worker), "device": (
                f"cuda:{g}" if cfg.worker.device.startswith("cuda") else cfg.worker.device)})
            out.append(InlineWorker(wc) if cfg.mode == "inline" else WorkerProcess(wc))
        return out

    @property
    def workers(self) -> list[Worker]:
        """The workers (built on first use)."""
        if self._workers is None:
            self._workers = self._build_workers()
        return self._workers

    # ------------------------------------------------------------------ protocol
    def reset(self, seed: int | None = None) -> Telemetry:
        """Start an episode: new trace draw, fresh counters, sampler running."""
        cfg = self.config
        self._rng = np.random.default_rng(seed)
        base = builtin_trace(cfg.trace)
        win = base.window(cfg.trace_start_s, cfg.duration_s)
        self._trace = (scale_to_rate(win, cfg.rate_rps, self._rng, duration_s=cfg.duration_s)
                       if cfg.rate_rps else win)
        for w in self.workers:
            w.set_control(max_batch=cfg.initial_max_batch, accepting=True)
            w.poll()  # drain anything left from an earlier episode
        self._max_batch = cfg.initial_max_batch
        self._admit = 1.0
        self._pos = 0
        self._over_budget = False
        self.sampler.start()
        deadline = time.time() + 2.0
        while len(self.sampler.buffers[0]) < 2 and time.time() < deadline:
            time.sleep(0.01)
        self._prev_stats = [w.poll().stats for w in self.workers]
        self._outstanding = np.zeros(len(self.workers))
        self._first_id = self._next_id  # requests of earlier episodes are not this one's
        self._unresolved = 0
        self._t0 = time.time()
        self.elapsed_s = 0.0
        self.log = RunLog(t0_s=self._t0)
        return self.telemetry()

    @property
    def trace(self) -> Trace:
        """The request trace of the current episode."""
        if self._trace is None:
            raise RealClusterError("RealCluster: call reset() first")
        return self._trace

    def budget_w(self, t_rel_s: float) -> float:
        """Virtual budget in force ``t_rel_s`` seconds into the episode."""
        b = self.config.power_budget_w
        for start, dur, val in self.config.budget_drills:
            if start <= t_rel_s < start + dur:
                b = min(b, val)
        return b

    def apply(self, action: ClusterAction) -> None:
        """Batch cap, admission and (through the guarded actuators) clocks for the next interval.

        Raises:
            RealClusterError: Wrong number of pools or an out-of-range value.
        """
        ctl: dict[str, Any] = {"t_s": self.elapsed_s}
        if action.pools is not None:
            if len(action.pools) != 1:
                raise RealClusterError(f"RealCluster: field 'pools' must hold 1 pool config, got "
                                       f"{len(action.pools)}")
            p = action.pools[0]
            if p.max_batch < 1 or p.tp != 1:
                raise RealClusterError(f"RealCluster: pool config {p} needs max_batch >= 1 and "
                                       "tp == 1")
            if p.max_batch != self._max_batch:
                self._max_batch = int(p.max_batch)
                for w in self.workers:
                    w.set_control(max_batch=self._max_batch)
                ctl["max_batch"] = self._max_batch
            self._request_clock(p.freq_mhz, ctl)
        if action.row_freq_cap_mhz is not None:
            cap = np.asarray(action.row_freq_cap_mhz, dtype=float)
            if cap.shape != (1,):
                raise RealClusterError(f"RealCluster: field 'row_freq_cap_mhz' must have shape "
                                       f"(1,), got {cap.shape}")
            self._request_clock(float(cap[0]), ctl)
        if action.admit_fraction is not None:
            a = float(action.admit_fraction)
            if not 0.0 <= a <= 1.0:
                raise RealClusterError(f"RealCluster: field 'admit_fraction' must be in [0, 1], "
                                       f"got {a}")
            self._admit = a
            ctl["admit_fraction"] = a
        if action.row_route_weight is not None:
            w = np.asarray(action.row_route_weight, dtype=float)
            if w.shape != (1,) or w[0] < 0:
                raise RealClusterError(f"RealCluster: field 'row_route_weight' must be one "
                                       f"weight >= 0, got {w}")
            if w[0] == 0:  # the only row is avoided: nothing is admitted
                self._admit = 0.0
                ctl["admit_fraction"] = 0.0
        if action.server_route_weight is not None:
            raise RealClusterError("RealCluster: field 'server_route_weight' is not supported: one "
                                   "node routes per row (its layout has route_per_server false)")
        if len(ctl) > 1:
            self.log.controls.append(ctl)

    def _request_clock(self, freq_mhz: float, ctl: dict[str, Any]) -> None:
        if not freq_mhz > 0:
            raise RealClusterError(f"RealCluster: clock request must be > 0 MHz, got {freq_mhz}")
        f = min(float(freq_mhz), self.layout.max_freq_mhz)
        if f == self._freq_mhz:
            return
        self._freq_mhz = f
        applied = [self.actuators.lock_sm_clocks_mhz(d.index, f) for d in self.devices]
        ctl["freq_mhz"] = f
        ctl["freq_applied"] = all(applied)

    def _release_arrivals(self, now_s: float) -> tuple[int, int]:
        tr = self.trace
        rel = now_s - self._t0
        hi = int(np.searchsorted(tr.arrival_s, rel, side="right"))
        lo, self._pos = self._pos, hi
        if hi <= lo:
            return 0, 0
        keep = np.ones(hi - lo, dtype=bool)
        if self._admit < 1.0:
            keep = self._rng.random(hi - lo) < self._admit
        batches: list[list[Request]] = [[] for _ in self.workers]
        for k in np.flatnonzero(keep):
            i = lo + int(k)
            w = int(np.argmin(self._outstanding))
            self._outstanding[w] += 1
            batches[w].append(Request(self._next_id, self._t0 + float(tr.arrival_s[i]),
                                      int(tr.input_tokens[i]), int(tr.output_tokens[i]), 0))
            self._next_id += 1
        for w, b in zip(self.workers, batches, strict=True):
            w.submit(b)
        self._unresolved += int(keep.sum())
        dropped = int((~keep).sum())
        for k in np.flatnonzero(~keep):
            i = lo + int(k)
            self.log.requests.append(Completed(-1, 0, self._t0 + float(tr.arrival_s[i]),
                                               int(tr.input_tokens[i]), int(tr.output_tokens[i]),
                                               dropped=True))
        return hi - lo, dropped

    def advance(self) -> ServiceMetrics:
        """Serve one control interval of wall time and measure it."""
        cfg = self.config
        dt = cfg.control_interval_s
        t_start = self._t0 + self.elapsed_s
        t_end = t_start + dt
        arrived = dropped = 0
        while True:
            now = time.time()
            a, d = self._release_arrivals(min(now, t_end))
            arrived += a
            dropped += d
            if now >= t_end:
                break
            nxt = (self._t0 + float(self.trace.arrival_s[self._pos])
                   if self._pos < len(self.trace) else t_end)
            until = min(t_end, max(nxt, now + 0.001), now + 0.05)
            for w in self.workers:
                w.pump(until)
            if time.time() < until:  # inline workers idle: wait for the next arrival
                time.sleep(max(0.0, until - time.time()))
        reports = [w.poll() for w in self.workers]
        self._last_report = reports
        self.elapsed_s += dt
        return self._metrics(reports, t_start, t_end, arrived, dropped)

    def _metrics(self, reports: list[WorkerReport], t0: float, t1: float, arrived: int,
                 dropped_admission: int) -> ServiceMetrics:
        cfg = self.config
        done = [c for r in reports for c in r.completed if c.req_id >= self._first_id]
        self._unresolved -= len(done)
        for k, r in enumerate(reports):
            self._outstanding[k] = r.waiting + r.running
        fin = [c for c in done if not c.dropped]
        dropped = dropped_admission + sum(c.dropped for c in done)
        self.log.requests.extend(done)
        ttft = np.array([c.ttft_s for c in fin])
        tbt = np.array([c.tbt_s for c in fin])
        if len(fin):
            t50, t99 = weighted_percentiles(ttft, np.ones(len(fin)), (50.0, 99.0))
            b50, b99 = weighted_percentiles(tbt, np.ones(len(fin)), (50.0, 99.0))
        else:
            t50 = t99 = b50 = b99 = 0.0
        bad_ttft, bad_tbt = ttft > cfg.slo_ttft_s, tbt > cfg.slo_tbt_s
        engine: dict[str, float] = {}
        for k, r in enumerate(reports):
            prev = self._prev_stats[k] if k < len(self._prev_stats) else EngineStats()
            for name, value in asdict(r.stats).items():
                engine[name] = engine.get(name, 0.0) + value - getattr(prev, name)
        tokens = engine.get("decode_tokens", 0.0) + engine.get("prefill_passes", 0.0)
        self._prev_stats = [r.stats for r in reports]
        # Power: 1 s means from the energy counter; budget exceedances are the virtual events.
        n_gpu = len(self.devices)
        edges = np.arange(t0, t1 + 1e-9, 1.0)
        if edges[-1] < t1 - 1e-6:
            edges = np.append(edges, t1)
        sec_w = np.array([self.sampler.mean_power_w(a, b).sum() for a, b in
                          zip(edges[:-1], edges[1:], strict=True)])
        budgets = np.array([self.budget_w(a - self._t0) for a in edges[:-1]])
        over = sec_w > budgets
        events = 0
        state = self._over_budget
        for o in over:
            events += int(o and not state)
            state = bool(o)
        self._over_budget = state
        gpu_energy = 0.0
        temps: list[float] = []
        thermal_s = hw_cap_s = clock_lost = 0.0
        slow_share = 0.0  # per GPU, mean extra decode time under thermal throttling (summed)
        phi = self.describe().profiles_by_tp[self.layout.tp_choices[0]].decode_phi
        tc, mi = column_index("temp_c"), column_index("throttle_mask")
        fc = column_index("sm_clock_mhz")
        for k in range(n_gpu):
            pw_k = self.sampler.energy_j(t0, t1, k).mean_power_w
            gpu_energy += pw_k * (t1 - t0) if math.isfinite(pw_k) else 0.0
            w = self.sampler.window(t0, t1, k)
            if len(w):
                temps.append(float(np.nanmax(w[:, tc])))
                mask = np.nan_to_num(w[:, mi]).astype(np.int64)
                thermal_s += float(((mask & THERMAL_MASK) > 0).mean()) * (t1 - t0)
                hw_cap_s += float(((mask & POWER_MASK) > 0).mean()) * (t1 - t0)
                # Clock lost: the requested clock minus the measured one in the samples the
                # hardware flags as thermally throttled (an idle clock drop is no loss), their
                # time share times the interval, as for the seconds above. As on the simulator,
                # a GPU's own power limit (POWER_MASK: hw_power_capped_s in the log) is not
                # counted, and the virtual row budget moves no clock: nothing is lost to it.
                held = (mask & THERMAL_MASK) > 0
                f = w[:, fc]
                gap = np.where(held & np.isfinite(f), np.maximum(self._freq_mhz - np.nan_to_num(f), 0.0),
                               0.0)
                clock_lost += float(gap.mean()) * (t1 - t0)
                # Tokens lost (as the simulator counts them): the decode slowdown ratio of the
                # measured clock against the requested one, over the throttled samples.
                f_ok = np.where(held & np.isfinite(f) & (f > 0), f, self._freq_mhz)
                fm = self.layout.max_freq_mhz
                ratio = clock_slowdown(f_ok, fm, phi) / clock_slowdown(self._freq_mhz, fm, phi)
                slow_share += float(np.maximum(ratio - 1.0, 0.0).mean())
        waiting = float(sum(r.waiting for r in reports))
        running = float(sum(r.running for r in reports))
        m = ServiceMetrics(
            interval_s=t1 - t0,
            arrived=arrived,
            finished=len(fin),
            dropped=dropped,
            in_flight=self._unresolved,
            tokens_generated=tokens,
            energy_j=gpu_energy,
            gpu_energy_j=gpu_energy,
            ttft_p50_s=t50, ttft_p99_s=t99, tbt_p50_s=b50, tbt_p99_s=b99,
            slo_ttft_violations=int(bad_ttft.sum()),
            slo_tbt_violations=int(bad_tbt.sum()),
            slo_violations=int((bad_ttft | bad_tbt).sum()),
            thermal_throttle_events=0,
            power_throttle_events=events,
            thermal_throttled_gpu_s=thermal_s,
            power_capped_gpu_s=float(over.sum()) * n_gpu,
            # Every GPU of the node serves the LLM: all of it is SaaS, none IaaS.
            saas_throttled_gpu_s=thermal_s,
            iaas_throttled_gpu_s=0.0,
            saas_capped_gpu_s=float(over.sum()) * n_gpu,
            iaas_capped_gpu_s=0.0,
            clock_lost_mhz_s=clock_lost,
            saas_clock_lost_mhz_s=clock_lost,
            saas_tokens_lost=tokens * slow_share / max(n_gpu, 1),
            iaas_clock_lost_mhz_s=0.0,
            quality_loss=0.0,
            reconfigurations=0,
            arrivals_per_pool=np.array([float(arrived)]),
            queued_per_pool=np.array([waiting]),
            running_per_pool=np.array([running]),
            peak_row_power_w=float(sec_w.max()) if len(sec_w) else 0.0,
            max_gpu_temp_c=max(temps) if temps else float("nan"),
            carbon_g=gpu_energy / 3.6e6 * cfg.carbon_g_per_kwh,
            gpu_hours=n_gpu * (t1 - t0) / 3600.0,
            facility_energy_j=math.nan,  # one node: no facility (cooling, power delivery) is modelled
            ttft_hist=latency_histogram(ttft),
            tbt_hist=latency_histogram(tbt),
        )
        row = {k: v for k, v in m.as_dict().items()}
        row.update(t_rel_s=t0 - self._t0, budget_w=float(budgets.min()),
                   hw_power_capped_s=hw_cap_s, max_batch=self._max_batch,
                   admit_fraction=self._admit,
                   **{f"engine_{name}": value for name, value in engine.items()})
        self.log.intervals.append(row)
        return m

    def telemetry(self) -> Telemetry:
        """Latest readings: 1 s mean power per GPU, temperature, clock, throttle reasons."""
        now = time.time()
        latest = self.sampler.latest()
        power = self.sampler.mean_power_w(now - 1.0, now)
        fallback = latest[:, column_index("power_w")]
        power = np.where(np.isfinite(power), power, np.nan_to_num(fallback))
        mask = np.nan_to_num(latest[:, column_index("throttle_mask")]).astype(np.int64)
        rel = now - self._t0
        budget = self.budget_w(rel)
        row_w = float(power.sum())
        drill = any(s <= rel < s + d for s, d, _ in self.config.budget_drills)
        return Telemetry(
            time_s=self.elapsed_s,
            gpu_power_w=power,
            gpu_temp_c=latest[:, column_index("temp_c")],
            gpu_freq_mhz=latest[:, column_index("sm_clock_mhz")],
            gpu_thermal_throttled=(mask & THERMAL_MASK) > 0,
            gpu_power_capped=np.full(len(power), row_w > budget),
            row_power_w=np.array([row_w]),
            row_limit_w=np.array([budget]),
            aisle_inlet_c=np.array([self.config.assumed_inlet_c]),
            aisle_heat_w=np.array([row_w]),
            aisle_capacity_w=self.layout.aisle_capacity_w.copy(),
            outside_temp_c=self.config.assumed_inlet_c,
            active_faults=("power_failure",) if drill else (),
            pending_vm_expected_gpu_w=0.0,  # no VMs on the real node
            legal_vm_servers=np.zeros(1, dtype=bool),
        )

    @property
    def done(self) -> bool:
        """True once the episode's duration has been served."""
        return self.elapsed_s >= self.config.duration_s - 1e-9

    def describe(self) -> BackendDescription:
        """What a controller may know about the node (built once; no scenario file here).

        Assembled from what is measured: the profile fitted to the H100 worker
        (`REAL_PROFILE`), the thermal fit of the same recordings, the trace's request-length
        statistics (one pool), and a server power model with no overhead (row power here is
        the sum of GPU power). The node knows no future arrivals and no GPU-hour price.
        """
        if self._description is None:
            from llm_cluster_gym.envs.sim.profiles import load_profile
            from llm_cluster_gym.envs.sim.thermal import ThermalParams

            lay, cfg = self.layout, self.config
            tr = builtin_trace(cfg.trace)
            stats = PoolStats(np.array([1.0]), np.array([tr.input_tokens.mean()]),
                              np.array([np.percentile(tr.input_tokens, 90)]),
                              np.array([tr.output_tokens.mean()]), float(tr.input_tokens.mean()))
            n = lay.gpus_per_server
            prof = load_profile(REAL_PROFILE)
            self._description = BackendDescription(
                layout=lay,
                # GPU power only: the node's non-GPU power is not metered (0 W idle and at full load).
                server=ServerPowerSpec(n, n * lay.gpu_power_limit_w, lay.gpu_power_limit_w, 0.0,
                                       overhead_max_w=0.0),
                thermal=ThermalParams.load(),
                pool_stats=stats,
                profiles_by_tp={tp: prof for tp in lay.tp_choices},
                scenario_name=None,
                gpu_hour_usd=0.0,
                episode_intervals=math.ceil(cfg.duration_s / cfg.control_interval_s - 1e-9),
                slowdown_temp_c=float(lay.slowdown_temp_c),
                arrival_oracle=None,
            )
        return self._description

    def tick_history(self) -> TickHistory | None:
        """None: the node keeps no per-tick history (its telemetry samples are in the recording)."""
        return None

    def save_recording(self, path: str | Path, provenance: Mapping[str, Any] | None = None,
                       run: Mapping[str, Any] | None = None, **sections: Any) -> Path:
        """Write this episode's recording (`envs.real.telemetry.save_recording` format).

        It holds the telemetry samples, the first GPU's static description, the per-interval
        metrics (``intervals``), the control changes (``controls``) and the budget schedule
        (``drill``: episode start, budget, drills, duration, interval), which
        `controllers.live.report.analyse` reads.

        Args:
            path: Output file (``.gz`` compresses).
            provenance: Added to the static description (command line, date, versions).
            run: Added to the ``drill`` section (how the episode was controlled).
            **sections: More top-level sections (e.g. the loop's ``decisions``).

        Returns:
            The path written.
        """
        cfg = self.config
        static = {**self.devices[0].static().as_dict(), **(provenance or {})}
        drill = {"t0_s": self.log.t0_s, "power_budget_w": cfg.power_budget_w,
                 "budget_drills": [list(d) for d in cfg.budget_drills],
                 "duration_s": self.elapsed_s, "control_interval_s": cfg.control_interval_s,
                 **(run or {})}
        return save_recording(path, static, self.sampler.recorded(), drill=drill,
                              intervals=self.log.intervals, controls=self.log.controls, **sections)

    def close(self) -> None:
        """Stop the sampler and workers and restore any GPU setting changed (once)."""
        if self._closed:
            return
        self._closed = True
        self.sampler.stop()
        if self._workers is not None:
            for w in self._workers:
                w.close()
        self.actuators.close()

    def __enter__(self) -> RealCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
