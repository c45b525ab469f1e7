"""CPU tests of the real backend: they replay telemetry recorded on an H100 (no mocks)."""

from __future__ import annotations

import gzip
import json
import math
import signal
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.envs.backend import ClusterAction, ClusterBackend, PoolConfig
from llm_cluster_gym.envs.perf.calibration import fit_coefficients, load_coefficients
from llm_cluster_gym.envs.perf.step import Coefficients
from llm_cluster_gym.envs.real.actuators import ActuatorError, GpuActuators
from llm_cluster_gym.envs.real.cluster import RealCluster, RealClusterConfig, RealClusterError
from llm_cluster_gym.envs.real.fidelity import (
    FidelityError,
    _latency_errors,
    compare,
    fit_thermal,
    initial_thermal_state,
    power_windows,
    pre_history_s,
    profile_object,
    thermal_rmse,
)
from llm_cluster_gym.envs.real.node_calibration import (
    NODE_BOUNDS,
    NODE_COEFFICIENTS_FILE,
    fit_node,
    load_node_fit,
    node_observations,
    profile_document,
)
from llm_cluster_gym.envs.real.telemetry import (
    COLUMNS,
    GpuUnavailableError,
    ReplayGpuDevice,
    RingBuffer,
    TelemetryFileError,
    TelemetrySampler,
    column_index,
    decode_throttle_reasons,
    load_recording,
    save_recording,
    window_energy,
)
from llm_cluster_gym.envs.real.worker import (
    STEP_LOG_COLUMNS,
    InferenceEngine,
    Request,
    WorkerConfig,
    WorkerError,
)
from llm_cluster_gym.envs.sim.thermal import ThermalParams
from llm_cluster_gym.scripts.calibrate import CalibrateRecordArgs, parse_batch_steps, parse_budget
from llm_cluster_gym.scripts.usage import UsageError

DATA = Path(__file__).resolve().parents[1] / "envs" / "data"
PROFILE = DATA / "real" / "h100_llama3-8b_profile.json.gz"
RUN = DATA / "real" / "h100_fidelity_run.json.gz"
CALIBRATION_RUN = DATA / "real" / "h100_calibration_run.json.gz"
MEASURED = DATA / "real" / "llama3-8b-real_h100_tp1.json"
OTHER_GPU_RUNS = (DATA / "real" / "h100_other_gpu_window1200.json.gz",
                  DATA / "real" / "h100_other_gpu_window1800.json.gz")
STEPS = DATA / "thermal" / "recordings" / "h100_steps_20261125.json.gz"
TINY = WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=256)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ telemetry
def test_throttle_reasons_decode_names():
    assert decode_throttle_reasons(0) == ()
    assert decode_throttle_reasons(0x4) == ("sw_power_cap",)
    assert decode_throttle_reasons(0x1 | 0x40) == ("gpu_idle", "hw_thermal_slowdown")
    assert decode_throttle_reasons(0x1000) == ("bit_0x1000",)
    assert decode_throttle_reasons(float("nan")) == ()


def test_load_recordings_both_formats():
    old = load_recording(STEPS)
    new = load_recording(RUN)
    assert old.samples[0].shape[1] == len(COLUMNS)
    assert np.isfinite(old.column("temp_c")).all()
    assert old.phases and old.phases[0] == "init"
    assert new.static["name"] == "NVIDIA H100 80GB HBM3"
    # The H100 run was sampled at >= 20 Hz.
    t = new.column("t_s")
    assert (len(t) - 1) / (t[-1] - t[0]) >= 20.0


def test_energy_counter_agrees_with_power_integral_on_h100_run():
    rec = load_recording(RUN)
    s = rec.samples[0]
    t = s[:, 0]
    chk = window_energy(s, t[0] + 5, t[-1] - 5)
    assert chk.counter_j > 30_000  # ~3 minutes at ~400 W
    assert abs(chk.rel_diff) < 0.02


def test_replay_device_plays_the_recording_in_time():
    clock = FakeClock()
    dev = ReplayGpuDevice(STEPS, clock=clock, start_offset_s=0.0)
    rec = dev.rec.samples[0]
    trel = rec[:, 0] - rec[0, 0]
    clock.t = 60.0  # 60 s into the recording: sustained prefill at ~700 W
    row = dev.read()
    i = np.searchsorted(trel, 60.0, side="right") - 1
    assert row[column_index("power_w")] == rec[i, column_index("power_w")]
    e1 = row[column_index("energy_mj")]
    clock.t = 61.0
    e2 = dev.read()[column_index("energy_mj")]
    assert 300_000 < e2 - e1 < 900_000  # mJ in one second of heavy prefill
    # Looping keeps the energy counter monotone.
    clock.t = dev.duration_s + 1.0
    assert dev.read()[column_index("energy_mj")] > e2
    assert dev.static().power_limit_w == 700.0


def test_sampler_thread_rate_and_ring_buffer_bound():
    dev = ReplayGpuDevice(STEPS, speed=10.0)
    s = TelemetrySampler([dev], rate_hz=50.0, capacity=20)
    with s:
        time.sleep(0.8)
    assert len(s.buffers[0]) == 20  # bounded
    assert s.buffers[0].total_written >= 25
    assert s.achieved_rate_hz() >= 20.0
    rb = RingBuffer(3, 1)
    for v in range(5):
        rb.append(np.array([v]))
    assert rb.snapshot().ravel().tolist() == [2, 3, 4]


def test_bad_recording_raises_named_error(tmp_path):
    bad = tmp_path / "bad.json.gz"
    with gzip.open(bad, "wt") as fh:
        json.dump({"columns": ["t", "power_w"], "samples": [[1.0, 2.0], [0.5, "x"]]}, fh)
    with pytest.raises(TelemetryFileError, match="bad.json.gz.*power_w"):
        load_recording(bad)
    with pytest.raises(TelemetryFileError, match="not found"):
        load_recording(tmp_path / "missing.json")


def test_save_and_load_roundtrip(tmp_path):
    rec = load_recording(STEPS)
    arr = rec.samples[0][:50]
    p = save_recording(tmp_path / "x.json.gz", {"name": "h100"}, {0: arr, 1: arr}, note="hi")
    back = load_recording(p)
    assert set(back.samples) == {0, 1}
    np.testing.assert_allclose(back.samples[1][:, 1], arr[:, 1], atol=1e-3)
    assert back.extra["note"] == "hi"


def test_nvml_absent_gives_clear_error():
    from llm_cluster_gym.envs.real.telemetry import NvmlGpuDevice

    try:
        NvmlGpuDevice(0)
    except GpuUnavailableError as exc:
        assert "NVML" in str(exc)
    else:  # pragma: no cover - only on GPU machines
        pytest.skip("a GPU is present")


# ------------------------------------------------------------------ actuators
def test_actuators_off_by_default_and_dry_run_logs():
    dev = ReplayGpuDevice(STEPS)
    off = GpuActuators([dev])
    assert off.lock_sm_clocks_mhz(0, 1200.0) is False
    assert off.log[-1].note.startswith("actuators disabled")
    dry = GpuActuators([dev], enable=True, dry_run=True, install_signal_handlers=False)
    assert dry.set_power_limit_w(0, 400.0) is False
    assert dry.log[-1].note == "dry run"
    with pytest.raises(ActuatorError, match="power_limit_w"):
        dry.set_power_limit_w(0, 5000.0)


class RecordingDevice(ReplayGpuDevice):
    """A replayed GPU whose settings live in memory (to test restore paths)."""

    def __init__(self) -> None:
        super().__init__(STEPS)
        self.limit_mw = 700_000
        self.locked = None

    def power_limit_mw(self) -> int:
        return self.limit_mw

    def set_power_limit_mw(self, limit_mw: int) -> None:
        self.limit_mw = limit_mw

    def set_locked_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        self.locked = (min_mhz, max_mhz)

    def reset_locked_sm_clocks(self) -> None:
        self.locked = None


def test_actuators_restore_on_exception_and_signal():
    dev = RecordingDevice()
    with pytest.raises(RuntimeError):
        with GpuActuators([dev], enable=True, install_signal_handlers=False) as act:
            assert act.set_power_limit_w(0, 400.0)
            assert act.lock_sm_clocks_mhz(0, 1500.0, 1500.0) is True
            assert dev.locked == (1500.0, 1500.0)
            raise RuntimeError("boom")
    assert dev.limit_mw == 700_000 and dev.locked is None
    act = GpuActuators([dev], enable=True, install_signal_handlers=True)
    act.set_power_limit_w(0, 300.0)
    prev = signal.getsignal(signal.SIGTERM)
    hit = []
    act._old_handlers[signal.SIGTERM] = lambda s, f: hit.append(s)
    act._on_signal(signal.SIGTERM, None)
    assert dev.limit_mw == 700_000 and hit == [signal.SIGTERM]
    act._old_handlers[signal.SIGTERM] = prev
    act.close()


# ------------------------------------------------------------------ worker
def test_decode_matches_prefill_and_slot_moves_keep_sequences():
    e = InferenceEngine(TINY)
    import torch

    torch.manual_seed(0)
    prompts = [torch.randint(0, 512, (n,)) for n in (9, 17, 5)]
    with torch.inference_mode():
        for s, p in enumerate(prompts):
            e.passes.tok[s] = e.prefill(p, s)
            e.passes.pos[s] = len(p)
        e.decode_step(3, 17)
        # Move slot 2 into slot 0 (what retiring sequence 0 does) and keep decoding it.
        seq2 = torch.cat([prompts[2], e.passes.tok[2:3].clone()])
        e.running = [type("S", (), {"prompt_tokens": 5, "generated": 1})()] * 3
        e._move_slot(2, 0)
        e.decode_step(1, int(e.passes.pos[0]))
        ref = e.prefill(torch.cat([seq2, e.passes.tok[0:1]])[:-1], 5)
    assert int(e.passes.tok[0]) == int(ref)


def test_chunk_table_lists_only_live_chunks():
    e = InferenceEngine(WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=256,
                                     kv_chunk_tokens=16, decode_attention="chunked"))
    assert e.passes.chunked
    assert not InferenceEngine(WorkerConfig(model="tiny", device="cpu")).passes.chunked
    tab = e.passes.chunk_table([0, 15, 16, 40])  # live lengths 1, 16, 17, 41
    assert tab[0].tolist() == [0, 1, 2, 2, 3, 3, 3]
    assert tab[1].tolist() == [0, 0, 0, 1, 0, 1, 2]
    assert tab[2].tolist() == [1, 16, 16, 1, 16, 16, 9]
    assert tab[2].sum() == 1 + 16 + 17 + 41
    assert e.runner.decode_buckets(4, 40, tab.shape[1]) == (4, 8)
    with pytest.raises(WorkerError, match="kv_chunk_tokens"):
        InferenceEngine(WorkerConfig(model="tiny", device="cpu", max_ctx=256, kv_chunk_tokens=24))
    with pytest.raises(WorkerError, match="decode_attention"):
        InferenceEngine(WorkerConfig(model="tiny", device="cpu", decode_attention="flash"))


def test_chunked_decode_attention_equals_padded_attention():
    import torch

    cfg = dict(model="tiny", device="cpu", max_slots=8, max_ctx=256, kv_chunk_tokens=16)
    ch = InferenceEngine(WorkerConfig(**cfg, decode_attention="chunked"))
    pa = InferenceEngine(WorkerConfig(**cfg, decode_attention="padded"))
    torch.manual_seed(1)
    lens = (3, 16, 17, 70, 129)  # inside one chunk, on chunk edges, many chunks
    prompts = [torch.randint(0, 512, (n,)) for n in lens]
    toks = []
    for e in (ch, pa):
        with torch.inference_mode():
            for s, p in enumerate(prompts):
                e.passes.tok[s] = e.prefill(p, s)
                e.passes.pos[s] = len(p)
            steps = []
            for _ in range(6):
                e.decode_step(len(lens))
                steps.append(e.passes.tok[: len(lens)].clone())
        toks.append(torch.stack(steps))
    assert torch.equal(toks[0], toks[1])
    # The attention outputs themselves agree (same caches, same queries).
    q = torch.randn(len(lens), 4 * 16)
    with torch.inference_mode():
        cp = ch.passes
        pos = cp.pos[: len(lens)].clone()
        cp.ch_meta.zero_()
        tab = torch.from_numpy(cp.chunk_table(pos.numpy()))
        cp.ch_meta[:, : tab.shape[1]] = tab
        keep = (cp.ctx_ar[:256][None, :] <= pos[:, None])[:, None, None, :]
        a = cp.attend_chunked(q, 1, len(lens), 32)  # 32 rows: padding rows included
        b = cp.attend_padded(q, 1, len(lens), 256, keep)
    assert torch.allclose(a, b, atol=1e-5)


def test_bucket_padded_prefill_equals_exact_prefill():
    import torch

    e = InferenceEngine(WorkerConfig(model="tiny", device="cpu", max_slots=4, max_ctx=256))
    torch.manual_seed(2)
    ids = torch.randint(0, 512, (45,))
    padded = torch.cat([ids, torch.randint(0, 512, (19,))])  # a 64-token bucket
    last = torch.tensor([44])
    with torch.inference_mode():
        ref = e.passes.prefill_pass(ids, torch.tensor([1]), last)
        k_ref = e.passes.k_cache[1][1, :, :45].clone()
        got = e.passes.prefill_pass(padded, torch.tensor([2]), last)
        k_got = e.passes.k_cache[1][2, :, :45]
    assert int(ref) == int(got)
    assert torch.allclose(k_ref, k_got, atol=1e-6)


def test_mixed_batch_decode_timing_accepts_per_sequence_lengths():
    e = InferenceEngine(WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=256))
    assert e.time_decode_s(4, [10, 200, 30, 5], repeats=2) > 0
    with pytest.raises(WorkerError, match="ctx_tokens"):
        e.time_decode_s(2, [10, 256], repeats=1)


def test_engine_continuous_batching_cap_admission_and_latencies():
    clock = FakeClock()
    e = InferenceEngine(TINY, clock=lambda: clock.t + time.perf_counter())
    e.set_control(max_batch=2)
    t0 = clock.t + time.perf_counter()
    for i in range(6):
        assert e.submit(Request(i, t0, 4 + i, 3)) is None
    seen_running = []
    done = []
    while e.busy:
        done += e.step()
        seen_running.append(len(e.running))
    assert max(seen_running) <= 2
    assert sorted(c.req_id for c in done) == list(range(6))
    assert all(c.ttft_s > 0 and c.tbt_s > 0 and c.output_tokens == 3 for c in done)
    # Later requests wait for the cap: their TTFT is longer.
    by_id = {c.req_id: c for c in done}
    assert by_id[5].ttft_s > by_id[0].ttft_s
    e.set_control(accepting=False)
    assert e.submit(Request(9, t0, 4, 3)).dropped
    with pytest.raises(WorkerError, match="max_batch"):
        e.set_control(max_batch=0)
    with pytest.raises(WorkerError, match="model"):
        InferenceEngine(WorkerConfig(model="nope", device="cpu"))


def test_time_measurements_scale_with_work():
    """A decode step of 64 sequences at 2,000 tokens takes longer than one of 1 at 100.

    Timed alternately and compared by their fastest rounds: the other test worker shares the
    two cores, and a round it disturbs only gets slower (once, a disturbed single-sequence
    median of 49 ms beat the large step's 16 ms).
    """
    e = InferenceEngine(WorkerConfig(model="tiny", device="cpu", max_slots=64, max_ctx=2048))
    large, small = [], []
    for _ in range(3):
        large.append(e.time_decode_s(64, 2000, repeats=3))
        small.append(e.time_decode_s(1, 100, repeats=3))
    assert min(large) > min(small)


# ------------------------------------------------------------------ cluster
def _cluster(**kw) -> RealCluster:
    # A 64-token context keeps every request short, so the test is quick on a loaded CPU.
    worker = WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=64)
    cfg = RealClusterConfig(worker=worker, duration_s=2.0, control_interval_s=1.0, rate_rps=10.0,
                            power_budget_w=300.0, sample_hz=25.0, **kw)
    # Start 29 s into the H100 recording: ~1 s idle, then sustained prefill at ~700 W. The
    # replay's clock stands still while the cluster is built (loading the worker on a busy CPU
    # took over a second in CI and ate the idle second the reset is checked against).
    clock = _HeldClock()
    cluster = RealCluster(cfg, devices=[ReplayGpuDevice(STEPS, start_offset_s=29.0, clock=clock)])
    clock.release()
    return cluster


class _HeldClock:
    """Monotonic time that stands at 0 until `release`, then runs."""

    def __init__(self) -> None:
        self._start: float | None = None

    def release(self) -> None:
        self._start = time.monotonic()

    def __call__(self) -> float:
        return 0.0 if self._start is None else time.monotonic() - self._start


@pytest.mark.slow
def test_real_cluster_protocol_metrics_and_budget_events():
    c = _cluster(budget_drills=((1.0, 1.0, 150.0),))
    assert isinstance(c, ClusterBackend)
    tel = c.reset(seed=3)
    assert tel.row_limit_w[0] == 300.0 and tel.gpu_power_w[0] < 200.0
    ms = []
    while not c.done:
        ms.append(c.advance())
    tel = c.telemetry()
    c.close()
    assert sum(m.arrived for m in ms) == len(c.trace) == 20
    assert sum(m.finished for m in ms) >= 3
    # Every finished request is in the interval's latency histograms (episode percentiles).
    assert all(m.ttft_hist.sum() == m.tbt_hist.sum() == m.finished for m in ms)
    assert sum(m.tokens_generated for m in ms) > 20
    assert all(m.energy_j > 100.0 for m in ms)
    # Replayed H100 prefill draws ~700 W > 300 W budget: one exceedance event; the drill's
    # lower budget is in force and reported as a power failure at the end.
    assert sum(m.power_throttle_events for m in ms) >= 1
    assert tel.row_power_w[0] > 500.0 and tel.gpu_power_capped[0]
    assert ms[-1].peak_row_power_w > 500.0
    assert c.log.intervals[-1]["budget_w"] == 150.0
    # The node's GPUs all serve the LLM: the harm is all SaaS; clock is lost only to thermal
    # slowdown, which the replayed recording never shows.
    for m in ms:
        assert (m.saas_capped_gpu_s, m.iaas_capped_gpu_s) == (m.power_capped_gpu_s, 0.0)
        assert (m.saas_throttled_gpu_s, m.iaas_throttled_gpu_s) == (m.thermal_throttled_gpu_s, 0.0)
        assert m.clock_lost_mhz_s == m.saas_clock_lost_mhz_s and m.iaas_clock_lost_mhz_s == 0.0
        assert (m.clock_lost_mhz_s > 0) <= (m.thermal_throttled_gpu_s > 0)
        assert m.saas_tokens_lost >= 0.0 and (m.saas_tokens_lost > 0) <= (m.thermal_throttled_gpu_s > 0)
    assert sum(m.power_capped_gpu_s for m in ms) > 0


@pytest.mark.slow
def test_real_cluster_counts_every_arrival_for_slo_attainment():
    """arrived = finished + dropped + in flight per episode; serving nothing attains 0."""
    from llm_cluster_gym.envs.episode import EpisodeRecorder

    c = _cluster()
    for seed, admit in ((0, 0.0), (1, 1.0)):  # the second episode starts after the first's
        c.reset(seed=seed)
        c.apply(ClusterAction(admit_fraction=admit))
        rec = EpisodeRecorder(c.describe(), seed, "held")
        ms = []
        while not c.done:
            ms.append(c.advance())
            rec.record(ms[-1], c.telemetry())
        arrived = np.cumsum([m.arrived for m in ms])
        out = np.cumsum([m.finished + m.dropped for m in ms])
        assert arrived.tolist() == (out + np.array([m.in_flight for m in ms])).tolist()
        s = rec.result().summary()
        assert s["requests_arrived"] == len(c.trace) > 0
        if admit == 0.0:
            assert s["requests_dropped"] == s["requests_arrived"] and s["slo_attainment"] == 0.0
        else:
            assert 0.0 <= s["slo_attainment"] <= s["requests_finished"] / s["requests_arrived"]
    c.close()


@pytest.mark.slow
def test_engine_step_log_and_interval_counters_agree():
    worker = WorkerConfig(model="tiny", device="cpu", max_slots=8, max_ctx=64, record_steps=True)
    cfg = RealClusterConfig(worker=worker, duration_s=2.0, control_interval_s=1.0, rate_rps=10.0,
                            sample_hz=25.0)
    c = RealCluster(cfg, devices=[ReplayGpuDevice(STEPS, start_offset_s=29.0)])
    c.reset(seed=1)
    while not c.done:
        c.advance()
    c.close()
    log = np.array(c.workers[0].engine.step_log)
    assert log.shape[1] == len(STEP_LOG_COLUMNS) and len(log) > 10
    col = {name: log[:, i] for i, name in enumerate(STEP_LOG_COLUMNS)}
    # Each step's wall time covers its prefill and decode work; host work is the rest.
    assert np.all(col["t_end_s"] - col["t_start_s"] >= col["prefill_s"] + col["decode_s"] - 1e-9)
    # A decode batch attends to at least one token per sequence.
    assert np.all(col["decode_ctx_tokens"] >= col["decode_batch"])
    rows = c.log.intervals
    assert sum(r["engine_steps"] for r in rows) == len(log)
    assert sum(r["engine_prefill_tokens"] for r in rows) == col["prefill_tokens"].sum() > 0
    assert sum(r["engine_prefill_passes"] for r in rows) == col["prefill_passes"].sum()
    assert sum(r["engine_decode_tokens"] for r in rows) == col["decode_batch"].sum()
    assert sum(r["engine_decode_ctx_tokens"] for r in rows) == col["decode_ctx_tokens"].sum()
    busy = sum(r["engine_step_busy_s"] for r in rows)
    assert busy == pytest.approx(float(np.sum(col["t_end_s"] - col["t_start_s"])), rel=1e-9)


@pytest.mark.slow
def test_real_cluster_admission_and_batch_cap_actions():
    c = _cluster()
    c.reset(seed=0)
    c.apply(ClusterAction(admit_fraction=0.0, pools=(PoolConfig(1, 1, 1400.0, 2),)))
    m = c.advance()
    assert m.dropped == m.arrived > 0
    assert c.workers[0].engine.max_batch == 2
    # Clock requests go to the disabled actuators: logged, not applied.
    assert c.log.controls[-1]["freq_applied"] is False
    with pytest.raises(RealClusterError, match="admit_fraction"):
        c.apply(ClusterAction(admit_fraction=1.5))
    with pytest.raises(RealClusterError, match="pools"):
        c.apply(ClusterAction(pools=(PoolConfig(1, 1, 1400.0, 2),) * 2))
    c.close()
    with pytest.raises(RealClusterError, match="mode"):
        RealClusterConfig(mode="threads").validate()


# ------------------------------------------------------------------ calibration
def test_node_fit_on_isolated_sweeps_is_the_shape_model_with_the_nodes_coefficients():
    """The node's profile is perf (the datacenter's model) with the worker's own efficiencies."""
    fit = fit_node(PROFILE)
    shipped = load_coefficients()["h100"]
    c = fit.coefficients
    assert isinstance(c, Coefficients)
    # Refitted: the worker's chunked split-K attention reads the KV cache far below the bandwidth
    # vLLM's kernels reach (the public calibration leaves e_kv unset: e_m).
    assert shipped.e_kv is None and c.e_kv < 0.5 * c.e_m
    # Not refitted: the terms that do not act on a dense BF16 model on one GPU keep the GPU's values.
    fitted = {name for name, _, _ in NODE_BOUNDS}
    for name, value in shipped.to_dict().items():
        if name not in fitted | {"idle_w", "host_s", "host_per_seq_s"}:
            assert c.to_dict()[name] == value, name
    assert 100.0 < c.idle_w < 150.0  # with the worker's context, measured
    prof = fit.profile()
    # Measured: 12.2-12.4 ms for one sequence at 128-2048 tokens (chunked-attention decode).
    assert prof.decode_iter_time_s(1, 1000, 1980.0) == pytest.approx(0.0124, rel=0.1)
    # Chunked attention: an iteration costs the summed context, so 64 x 2048 is ~3.5x 64 x 512.
    ratio = prof.decode_iter_time_s(64, 2048, 1980.0) / prof.decode_iter_time_s(64, 512, 1980.0)
    assert 2.0 < float(ratio) < 3.5
    for name, err in fit.fit_error.items():
        assert err["mape_pct"] < 10.0, name
        assert err["mape_pct"] < fit.start_error[name]["mape_pct"], name  # vLLM's coefficients: worse
    doc = profile_document(fit, prof, PROFILE)
    assert profile_object(doc).decode_d2_s_per_seq_token == prof.decode_d2_s_per_seq_token


def test_thermal_fit_on_h100_profile_recording():
    rec = load_recording(PROFILE)
    t = rec.column("t_s")
    _, pw, tt = power_windows(rec, t[0], t[-1], 0.25)
    params, off, rmse = fit_thermal(pw, tt)
    assert rmse < 1.5
    assert 0.01 < params.r_total_c_per_w < 0.1
    assert params.tau_die_s < params.tau_sink_s


@pytest.fixture(scope="module")
def served_node_fit():
    return fit_node(PROFILE, (CALIBRATION_RUN,))


@pytest.mark.slow
def test_node_fit_comes_from_the_shape_models_calibration_routine(served_node_fit):
    """fit_node is perf's own fitting routine on the node's figures, from the GPU's coefficients."""
    obs = node_observations(PROFILE, (CALIBRATION_RUN,))
    start = Coefficients(**{**load_coefficients()["h100"].to_dict(), "idle_w": obs.idle_w,
                            "host_s": 0.0, "host_per_seq_s": 0.0})
    again = fit_coefficients(obs.residuals, NODE_BOUNDS, start, iterations=60,
                             row_weights=obs.row_weights())
    assert again == served_node_fit.coefficients
    # The committed data file holds this fit, with its provenance: to within what other CPU code
    # paths move it (the file was fitted on numpy's AVX-512 loops; on the tests' baseline loops,
    # tests/golden/canonical_cpu.py, the 60 damped Gauss-Newton steps end up to 5e-5 apart).
    shipped = load_node_fit(NODE_COEFFICIENTS_FILE)
    _assert_fields_close(shipped.coefficients, served_node_fit.coefficients, rel=1e-3)
    assert [r["recording"] for r in shipped.recordings] == [PROFILE.name, CALIBRATION_RUN.name]
    assert all(r["command"] and r["date_utc"] for r in shipped.recordings)
    doc = json.loads(NODE_COEFFICIENTS_FILE.read_text())
    assert doc["built_by"].startswith("llm-cluster calibrate fit") and doc["built_on"]
    # And the profile RealCluster describes is the one derived from it.

    measured = profile_object(json.loads(MEASURED.read_text()))
    derived = shipped.profile()
    _assert_fields_close(replace(derived, source=measured.source), measured, rel=1e-9)


def _assert_fields_close(a, b, rel: float) -> None:
    """Two dataclasses equal field by field, their float fields to within `rel` (compared fields)."""
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not f.compare:
            continue
        if isinstance(x, float) and isinstance(y, float):
            assert math.isclose(x, y, rel_tol=rel), (f.name, x, y)
        else:
            assert x == y, (f.name, x, y)


def test_node_fit_matches_the_clock_measured_under_the_power_cap(served_node_fit):
    """Sustained prefill of 1,024-4,000 tokens ran at the 700 W cap with the SM clock at 1,710 MHz:
    the fit takes those clocks as figures (what the uncapped power would be, which readings
    pinned at the limit cannot say), and the fitted node lands within 3 % of them, nearer than the
    GPU type's shipped coefficients (4-5 % low) it starts from."""
    obs = node_observations(PROFILE, (CALIBRATION_RUN,))
    names = [s.name for s in obs.sources]
    assert "capped_phase_clock" in names
    src = obs.sources[names.index("capped_phase_clock")]
    assert src.measured.size == 3 and np.all(src.measured == 1710.0)
    fitted = obs.predict(served_node_fit.coefficients)[names.index("capped_phase_clock")]
    assert np.all(np.abs(fitted / src.measured - 1.0) < 0.03), fitted
    start = Coefficients(**{**load_coefficients()["h100"].to_dict(), "idle_w": obs.idle_w})
    shipped = obs.predict(start)[names.index("capped_phase_clock")]
    assert np.all(np.abs(shipped / src.measured - 1.0) > np.abs(fitted / src.measured - 1.0)), shipped


@pytest.mark.slow
def test_node_fit_on_one_recording_predicts_another(served_node_fit):
    """Fitted on the calibration window, the node's shape model predicts the held-out window's
    served steps: the time the engine spends within 2.5 % and its 1 s power within 5 % MAPE."""
    c = served_node_fit.coefficients
    obs = node_observations(PROFILE, (RUN,))
    pred = dict(zip([s.name for s in obs.sources], obs.predict(c), strict=True))
    meas = {s.name: s.measured for s in obs.sources}
    for name in ("served_prefill_time", "served_decode_time"):
        assert pred[name].sum() / meas[name].sum() == pytest.approx(1.0, abs=0.025), name
    assert float(np.mean(np.abs(pred["served_power_1s"] / meas["served_power_1s"] - 1))) < 0.05
    # The simulator replaying the held-out run with the node's profile: tokens within 5 %.
    served = compare(RUN, served_node_fit.profile(), ThermalParams.load())
    assert served["throughput_error"] < 0.05
    assert served["energy_error"] < 0.05
    sweep = compare(RUN, fit_node(PROFILE).profile(), ThermalParams.load())
    # The isolated sweeps miss the served engine's bucket padding and eager long prompts: the
    # simulator is >10 % too fast with them.
    assert sweep["throughput_error"] > 0.10


def _served_prefill_clock_mhz(path, min_tokens: float) -> np.ndarray:
    """SM clock samples taken during served steps whose prefill passes hold >= ``min_tokens``."""
    rec = json.loads(gzip.open(path, "rt").read())
    tel = np.asarray(rec["samples"], dtype=float)
    col = {c: i for i, c in enumerate(rec["columns"])}
    steps = np.asarray(rec["step_log"], dtype=float)
    sc = {c: i for i, c in enumerate(rec["step_columns"])}
    t = tel[:, col["t_s"]] - rec["t0_s"]
    k = np.searchsorted(steps[:, sc["t_start_s"]], t, side="right") - 1
    inside = (k >= 0) & (t < steps[np.maximum(k, 0), sc["t_end_s"]])
    long_pass = steps[np.maximum(k, 0), sc["prefill_tokens"]] >= min_tokens
    return tel[inside & long_pass, col["sm_clock_mhz"]]


@pytest.mark.slow
def test_served_prefill_passes_draw_less_than_sustained_and_keep_their_clock(served_node_fit):
    """Sustained prefill of >= 1,024 tokens holds the 700 W limit at 1,710 MHz, but the served runs
    kept the clock near its maximum through steps of >= 2,048 prompt tokens (the limit acts on
    averaged power): a pass between decode iterations draws less than the same work sustained. The
    node fit finds that share (`serial_prefill_power_ratio`) below 1, and with it the served 1 s
    power fits better than with passes drawing what sustained prefill draws."""
    for path in (CALIBRATION_RUN, RUN):
        assert np.median(_served_prefill_clock_mhz(path, 2048.0)) >= 1900.0
    c = served_node_fit.coefficients
    assert 0.3 < c.serial_prefill_power_ratio < 0.9
    obs = node_observations(PROFILE, (CALIBRATION_RUN,))
    names = [s.name for s in obs.sources]
    i = names.index("served_power_1s")
    src = obs.sources[i]
    heavy = src.spread[:, src.serial].sum(axis=1) >= 0.3  # seconds >= 30 % in prefill passes
    assert heavy.sum() >= 10

    def errors(coefficients) -> tuple[float, float]:
        rel = obs.predict(coefficients)[i] / src.measured - 1.0
        return float(np.mean(np.abs(rel))), float(np.mean(rel[heavy]))

    (mape, heavy_bias), (mape_1, heavy_bias_1) = errors(c), errors(replace(c, serial_prefill_power_ratio=1.0))
    assert mape < mape_1
    assert heavy_bias_1 > 0.03 and abs(heavy_bias) < heavy_bias_1 / 2  # passes drawing as sustained: too high
    # The simulator's profile carries the share; its serial passes keep a higher clock.
    prof = served_node_fit.profile()
    assert prof.prefill_serial_power_ratio == c.serial_prefill_power_ratio
    assert prof.serial_prefill_freq_at_limit_mhz(3000.0) > prof.prefill_freq_at_limit_mhz(3000.0) + 100.0


def test_node_fit_needs_a_step_log(tmp_path):
    rec = json.loads(gzip.open(CALIBRATION_RUN, "rt").read())
    rec.pop("step_log")
    bad = tmp_path / "old_run.json.gz"
    with gzip.open(bad, "wt") as fh:
        json.dump(rec, fh)
    with pytest.raises(FidelityError, match="step_log"):
        node_observations(PROFILE, (bad,))


@pytest.mark.parametrize("items", [["10:64"], ["0:64", "0:8"], ["0:0"], ["0-64"], [], ["0:64,60:8"]])
def test_calibrate_rejects_malformed_batch_schedules(items):
    with pytest.raises(UsageError, match="batch-steps"):
        parse_batch_steps(items)
    with pytest.raises(UsageError, match="batch-steps"):
        CalibrateRecordArgs(batch_steps=items)
    assert parse_batch_steps(["0:64", "60:8"]) == ((0.0, 64), (60.0, 8))


def _real_worker_thermal() -> ThermalParams:
    return ThermalParams.load(DATA / "real" / "h100_thermal_fit_real_worker.json")


@pytest.mark.parametrize("path", [RUN, CALIBRATION_RUN])
def test_served_recordings_hold_the_thermal_history_before_the_replay(path):
    """The recorder samples an idle GPU, then the worker's build and warm-up, then the run."""
    rec = load_recording(path)
    assert pre_history_s(rec) > 30.0
    lead = next(m for m in rec.extra["marks"] if m["phase"] == "idle_lead")
    t = rec.column("t_s")
    idle = rec.column("power_w")[(t > lead["t0"] + 2.0) & (t < lead["t1"])]
    assert idle.size > 100 and 60.0 < float(np.median(idle)) < 160.0


@pytest.mark.parametrize("path", [RUN, CALIBRATION_RUN])
def test_thermal_state_from_history_matches_the_model_run_over_it(path):
    """The replay starts where the thermal model, driven by the measured pre-history, ends."""
    rec = load_recording(path)
    thermal = _real_worker_thermal()
    t0 = float(rec.extra["t0_s"])
    # From the first sample, on the 0.25 s grid through t0.
    h0 = t0 - 0.25 * np.floor((t0 - float(rec.column("t_s")[0])) / 0.25)
    rel, pw, tt = power_windows(rec, h0, t0 + 60.0, 0.25)
    first = int(np.searchsorted(rel, t0 - h0 - 1e-9))
    _, inlet = thermal_rmse(thermal, pw, tt, score_from=first)
    st = initial_thermal_state(rec, thermal, inlet)
    at_t0 = inlet + float(st.x_die_c[0] + st.x_sink_c[0])
    # The same model over the same windows, written out by hand.
    x = np.array([thermal.r_die_c_per_w, thermal.r_sink_c_per_w]) * pw[0]
    a = np.exp(-0.25 / np.array([thermal.tau_die_s, thermal.tau_sink_s]))
    r = np.array([thermal.r_die_c_per_w, thermal.r_sink_c_per_w])
    for p in pw[:first]:
        x = r * p + (x - r * p) * a
    assert at_t0 == pytest.approx(inlet + x.sum(), abs=1e-6)
    # And it is close to what the GPU read at that moment (NVML reports whole degrees).
    measured = float(rec.column("temp_c")[np.searchsorted(rec.column("t_s"), t0)])
    assert abs(at_t0 - measured) < 2.0
    steady = initial_thermal_state(rec, thermal, inlet, use_history=False)
    assert inlet + float(steady.x_die_c[0] + steady.x_sink_c[0]) == pytest.approx(measured)


@pytest.mark.parametrize("lead_s", [-1.0, math.nan, math.inf])
def test_calibrate_rejects_bad_lead_seconds(lead_s):
    with pytest.raises(UsageError, match="--lead-s"):
        CalibrateRecordArgs(lead_s=lead_s)
    assert CalibrateRecordArgs(lead_s=20.0).lead_s == 20.0


@pytest.mark.parametrize("text", ["60:60", "60:60:250:1", "a:b:c", "60:0:250", "60:60:-5"])
def test_calibrate_rejects_malformed_budget_drills(text):
    with pytest.raises(UsageError, match="--budget"):
        parse_budget([text])
    assert parse_budget(["60:60:250", "130:5:300"]) == ((60.0, 60.0, 250.0), (130.0, 5.0, 300.0))


@pytest.mark.parametrize("path", OTHER_GPU_RUNS)
def test_fit_carries_over_to_other_h100s(path):
    """Fitted on one lent H100, the simulator reproduces the tokens served by two others (the
    test window again, and another window) and their energy within a few percent. (The
    prefill-heavy window on the third H100 passes since the replay serves prompts serially as
    the worker does: 1 s power MAPE 9.7 %, energy 6.1 %, tokens 4.7 % since the node fit also
    matches the clock measured under the power cap (2026-12-01; 9.5 %, 5.9 %, 3.0 % before);
    with vLLM-style chunked prefill 10.7 %.)"""
    prof = profile_object(json.loads(MEASURED.read_text()))
    c = compare(path, prof, _real_worker_thermal())
    assert c["throughput_error"] < 0.05
    assert c["finished_error"] < 0.05
    assert c["energy_error"] < 0.07
    assert c["power_mape"] < 0.10


def test_replay_latency_is_judged_on_the_same_bins_metric_by_metric():
    """A replay whose latencies are the real ones has no latency error (the bins' interpolation
    is the same on both sides); one with twice the TTFT and the same TBT shows a TTFT error of
    about 1 and no TBT error: each metric carries its own error."""
    from llm_cluster_gym.envs.latency import latency_histogram

    rng = np.random.default_rng(3)
    ttft, tbt = rng.lognormal(-2.0, 0.8, 400), rng.lognormal(-3.5, 0.3, 400)
    same = _latency_errors(ttft, tbt, {"ttft_hist": latency_histogram(ttft),
                                       "tbt_hist": latency_histogram(tbt)})
    assert all(same[f"{m}_p{q}_error"] == 0.0 for m in ("ttft", "tbt") for q in (50, 90))
    slow = _latency_errors(ttft, tbt, {"ttft_hist": latency_histogram(2 * ttft),
                                       "tbt_hist": latency_histogram(tbt)})
    assert slow["ttft_p50_error"] == pytest.approx(1.0, abs=0.15)
    assert slow["ttft_p90_error"] == pytest.approx(1.0, abs=0.15)
    assert slow["tbt_p50_error"] == 0.0 and slow["tbt_p90_error"] == 0.0
    assert slow["real_ttft_p50_binned_s"] == pytest.approx(np.median(ttft), rel=0.07)
    # The summary reports exactly these figures and the real medians, named once (no key picked
    # by its prefix).
    from llm_cluster_gym.envs.real.fidelity import LATENCY_SUMMARY_KEYS

    assert LATENCY_SUMMARY_KEYS == ("real_ttft_p50_s", "real_tbt_p50_s", *slow)


@pytest.mark.slow
def test_fidelity_picture_is_written_whole(tmp_path):
    from llm_cluster_gym.envs.real.fidelity_plot import write_comparison_png

    prof = profile_object(json.loads(MEASURED.read_text()))
    comp = compare(RUN, prof, _real_worker_thermal())
    out = write_comparison_png(comp, "test", tmp_path / "fidelity.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["fidelity.png"]  # no temporary left


def test_node_observations_pool_several_calibration_runs():
    """Two calibration windows (two lent H100s) pool into one fit: every second of both counts."""
    second = DATA / "real" / "h100_calibration_run_window1560.json.gz"
    one = {s.name: s for s in node_observations(PROFILE, (CALIBRATION_RUN,)).sources}
    two = {s.name: s for s in node_observations(PROFILE, (second,)).sources}
    both = node_observations(PROFILE, (CALIBRATION_RUN, second))
    assert [r["recording"] for r in both.recordings] == [PROFILE.name, CALIBRATION_RUN.name, second.name]
    for s in both.sources:
        if s.name.startswith("served"):
            assert len(s.measured) == len(one[s.name].measured) + len(two[s.name].measured), s.name
            assert len(s.records) == len(one[s.name].records) + len(two[s.name].records), s.name
