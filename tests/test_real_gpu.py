"""Real-backend tests that need an NVIDIA GPU: run with ``pytest -m gpu tests/test_real_gpu.py``."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("no CUDA GPU", allow_module_level=True)

from envs.real.actuators import GpuActuators  # noqa: E402
from envs.real.cluster import RealCluster, RealClusterConfig  # noqa: E402
from envs.real.telemetry import NvmlGpuDevice, TelemetrySampler, column_index  # noqa: E402
from envs.real.worker import InferenceEngine, WorkerConfig  # noqa: E402


def test_nvml_sampler_rate_and_energy_cross_check():
    dev = NvmlGpuDevice(0)
    st = dev.static()
    assert st.power_limit_w > 100 and st.max_sm_clock_mhz > 500
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with TelemetrySampler([dev], rate_hz=25.0) as s:
        t0 = time.time()
        while time.time() - t0 < 6.0:
            for _ in range(20):
                x @ x
            torch.cuda.synchronize()
    assert s.achieved_rate_hz() >= 20.0
    t = s.samples()[:, 0]
    chk = s.energy_j(t[0] + 1.5, t[-1] - 0.5)
    assert chk.counter_j > 0
    # NVML's power reading lags the counter by ~1 s, so allow 15 % over a ~4 s window.
    assert abs(chk.rel_diff) < 0.15, chk
    assert np.nanmax(s.samples()[:, column_index("temp_c")]) > 20


def test_cuda_graph_decode_matches_eager_and_prefill():
    cfg = WorkerConfig(model="tiny", device="cuda:0", max_slots=8, max_ctx=256)
    g = InferenceEngine(cfg)
    e = InferenceEngine(WorkerConfig(**{**cfg.__dict__, "cuda_graphs": False}))
    assert g.use_graphs and not e.use_graphs
    ids = torch.randint(0, 512, (3, 30), device="cuda")
    for eng in (g, e):
        with torch.inference_mode():
            for s in range(3):
                eng._tok[s] = eng.prefill(ids[s, : 10 + 5 * s], s)
                eng._pos[s] = 10 + 5 * s
            for _ in range(4):
                eng.decode_step(3, int(eng._pos[:3].max()))
    assert torch.equal(g._tok[:3], e._tok[:3])
    assert torch.equal(g._pos[:3], e._pos[:3])


def test_actuators_dry_run_leaves_clocks_alone():
    dev = NvmlGpuDevice(0)
    before = dev.power_limit_mw()
    act = GpuActuators([dev], enable=True, dry_run=True, install_signal_handlers=False)
    assert act.lock_sm_clocks_mhz(0, 1200.0) is False
    assert act.set_power_limit_w(0, 400.0) is False
    assert dev.power_limit_mw() == before
    assert [ev.note for ev in act.log] == ["dry run", "dry run"]
    act.close()


def test_real_cluster_serves_on_gpu_with_nvml_telemetry():
    cfg = RealClusterConfig(worker=WorkerConfig(model="tiny", device="cuda:0", max_slots=16,
                                                max_ctx=1024),
                            duration_s=4.0, control_interval_s=2.0, rate_rps=20.0,
                            power_budget_w=60.0)
    with RealCluster(cfg) as c:
        c.reset(seed=1)
        ms = []
        while not c.done:
            ms.append(c.advance())
        tel = c.telemetry()
    assert sum(m.arrived for m in ms) > 40
    assert sum(m.finished for m in ms) > 20
    assert all(m.energy_j > 0 for m in ms)
    assert tel.gpu_power_w[0] > 30 and tel.gpu_temp_c[0] > 15
    # A 60 W budget is below an H100's idle-plus-load draw: exceedance is detected.
    assert sum(m.power_throttle_events for m in ms) >= 1
