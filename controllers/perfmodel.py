"""Steady-state prediction of one pool's latency and power for a configuration (DynamoLLM).

From the profile tables only (no simulator internals): for a pool receiving ``rate_rps``
requests with known mean lengths, served by ``n`` instances of TP ``tp`` at clock ``freq`` and
batch cap ``batch``, predict TTFT and TBT and the GPU power. The queueing is a fluid
approximation, good enough to rank configurations and to find the slowest safe clock:

* prefill utilization ``u = lambda_i * t_prefill(mean input)`` per instance;
* decode concurrency from Little's law, ``c = lambda_i * out * t_iter(c) / (1 - u)`` (decode
  runs between prefill passes), solved in closed form because ``t_iter`` is linear in ``c``
  (a mixture-of-experts model adds the experts its batch touches, concave in ``c``: a few
  fixed-point steps from the closed form without them, `MOE_FIXED_POINT_STEPS`);
* TBT ``= t_iter(c) / (1 - u)``; TTFT ``= t_prefill(P90 input) + M/D/1 wait x safety``;
* power per GPU ``= idle + u (P_prefill - idle) + (1 - u) min(1, c) (P_decode(c) - idle)``.

Every function is vectorized over candidate arrays (numpy broadcasting). `PoolModel.within_slo`
is the one test of a configuration against a pool's SLOs (the manager, the hindsight plan's
tables and the week's provisioning all use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_gym.envs.sim.profiles import Profile, moe_experts_touched

if TYPE_CHECKING:
    from llm_cluster_gym.controllers.context import ControllerContext

WAIT_SAFETY = 3.0
"""Multiplier on the mean M/D/1 prefill wait to approximate its tail (modelling assumption)."""

MAX_UTIL = 0.85
"""Prefill utilization above which a configuration is treated as overloaded."""

MOE_FIXED_POINT_STEPS = 4
"""Fixed-point steps for the decode concurrency of a mixture-of-experts pool (the expert term
is concave and small next to the rest: the iterates rise monotonically and settle in a few)."""


@dataclass(frozen=True)
class PoolPrediction:
    """Predicted steady state of a pool under candidate configurations (arrays broadcast)."""

    ttft_s: np.ndarray
    tbt_s: np.ndarray
    gpu_power_w: np.ndarray
    pool_power_w: np.ndarray
    feasible: np.ndarray


@dataclass(frozen=True)
class _LoadFreeTerms:
    """The terms of `predict_pool` that do not depend on the load (rate, instances, batch cap)."""

    prof: Profile
    freq_mhz: np.ndarray
    prefill_s: np.ndarray
    prefill_p90_s: np.ndarray
    prefill_power_w: np.ndarray
    decode_slowdown: np.ndarray
    decode_s_per_seq: float
    mean_input: float
    mean_output: float


def _load_free_terms(prof: Profile, freq_mhz: np.ndarray | float, mean_input: float, p90_input: float,
                     mean_output: float, mean_input_all: float) -> _LoadFreeTerms:
    f = np.asarray(freq_mhz, dtype=float)
    f_pre = np.minimum(f, prof.prefill_freq_at_limit_mhz(mean_input_all))
    t_pre = prof.prefill_time_s(mean_input, f_pre)
    t_pre90 = prof.prefill_time_s(p90_input, f_pre)
    slow_d = prof.decode_phi * (prof.max_freq_mhz / f) + 1.0 - prof.decode_phi
    k = prof.decode_d1_s_per_seq + prof.decode_d2_s_per_seq_token * (mean_input + 0.5 * mean_output)
    p_pre = np.minimum(prof.prefill_power_w(mean_input, f_pre), prof.gpu_power_limit_w)
    return _LoadFreeTerms(prof, f, t_pre, t_pre90, p_pre, slow_d, k, mean_input, mean_output)


def _predict_loaded(terms: _LoadFreeTerms, rate_rps: np.ndarray | float, n_instances: np.ndarray | int,
                    max_batch: np.ndarray | int) -> PoolPrediction:
    prof, f, t_pre = terms.prof, terms.freq_mhz, terms.prefill_s
    k, slow_d = terms.decode_s_per_seq, terms.decode_slowdown
    rate = np.asarray(rate_rps, dtype=float)
    n = np.asarray(n_instances, dtype=float)
    b = np.asarray(max_batch, dtype=float)
    lam = np.where(n > 0, rate / np.maximum(n, 1.0), np.where(rate > 0, np.inf, 0.0))
    u = lam * t_pre
    ok_u = u < MAX_UTIL
    u_c = np.clip(u, 0.0, MAX_UTIL)
    a = np.where(np.isfinite(lam), lam, 0.0) * terms.mean_output * slow_d / (1.0 - u_c)
    ak = a * k
    ok_d = ak < 0.9
    denom = np.maximum(1.0 - ak, 0.1)
    c = a * prof.decode_d0_s / denom
    d3 = prof.decode_d3_s_per_expert
    if d3 > 0.0:  # c = a (d0 + c k + d3 g(c)): iterate from the closed form without g
        s = prof.decode_moe_experts_per_active
        for _ in range(MOE_FIXED_POINT_STEPS):
            c = a * (prof.decode_d0_s + d3 * moe_experts_touched(c, s)) / denom
        iter_s = (prof.decode_d0_s + c * k + d3 * moe_experts_touched(c, s)) * slow_d
    else:
        iter_s = (prof.decode_d0_s + c * k) * slow_d
    tbt = iter_s / (1.0 - u_c)
    wait = t_pre * u_c / (2.0 * (1.0 - u_c)) * WAIT_SAFETY
    ttft = terms.prefill_p90_s + wait
    kv_ok = c * (terms.mean_input + terms.mean_output) <= 0.9 * prof.kv_capacity_tokens
    feasible = ok_u & ok_d & (c <= 0.9 * b) & kv_ok & np.isfinite(lam)
    idle = prof.idle_power_w
    p_pre = terms.prefill_power_w
    ctx = terms.mean_input + 0.5 * terms.mean_output  # a decoding request's mean context
    p_dec = np.minimum(prof.decode_power_w(np.maximum(c, 1e-9), f, ctx), prof.gpu_power_limit_w)
    gpu_w = idle + u_c * (p_pre - idle) + (1.0 - u_c) * np.minimum(1.0, c) * (p_dec - idle)
    pool_w = n * prof.tp * gpu_w
    return PoolPrediction(ttft, tbt, gpu_w, pool_w, feasible)


def predict_pool(
    prof: Profile,
    rate_rps: np.ndarray | float,
    n_instances: np.ndarray | int,
    freq_mhz: np.ndarray | float,
    max_batch: np.ndarray | int,
    mean_input: float,
    p90_input: float,
    mean_output: float,
    mean_input_all: float,
) -> PoolPrediction:
    """Predict latency and power of a pool (see the module docstring for the model).

    Args:
        prof: Profile of the instance type (model, GPU, TP).
        rate_rps: Arrival rate of the pool (req/s).
        n_instances: Instances serving it (0 means infeasible unless the rate is 0).
        freq_mhz: SM clock set point.
        max_batch: Batch cap per instance.
        mean_input: Mean prompt tokens of the pool.
        p90_input: P90 prompt tokens of the pool.
        mean_output: Mean output tokens of the pool.
        mean_input_all: Mean prompt tokens over all pools (sets the prefill clock under the
            GPU power limit, as in the simulator).

    Returns:
        A `PoolPrediction` broadcast over the array arguments.
    """
    terms = _load_free_terms(prof, freq_mhz, mean_input, p90_input, mean_output, mean_input_all)
    return _predict_loaded(terms, rate_rps, n_instances, max_batch)


class PoolModel:
    """`predict_pool` for one pool of a controller context at one TP over candidate clocks.

    The clock-dependent terms that do not depend on the load (prefill times and power at the
    power-capped clock, the decode slowdown) are computed once here, so a controller that asks
    the same (pool, TP, clocks) at every interval pays only for the load-dependent part.

    Args:
        ctx: Controller context (profiles per TP, pool statistics, SLOs).
        pool: Pool index.
        tp: Tensor-parallel degree (a key of ``ctx.profiles``).
        freq_mhz: SM clock set points (an array broadcasts against the load arguments).
        p90_input_tokens: With `slo_s`, one request class inside the pool (per-request SLO
            classes, `serving.slo_classes`): its P90 prompt sizes the TTFT instead of the pool's
            (the queueing wait stays the pool's) ...
        slo_s: ... and its (TTFT, TBT) SLOs replace the pool's. None: the pool's own.
    """

    def __init__(self, ctx: ControllerContext, pool: int, tp: int, freq_mhz: np.ndarray | float,
                 p90_input_tokens: float | None = None, slo_s: tuple[float, float] | None = None) -> None:
        st = ctx.pool_stats
        p90 = st.p90_input_tokens[pool] if p90_input_tokens is None else p90_input_tokens
        self._terms = _load_free_terms(ctx.profiles[tp], freq_mhz, st.mean_input_tokens[pool],
                                       p90, st.mean_output_tokens[pool], st.mean_input_all)
        self._slo_ttft_s, self._slo_tbt_s = ((ctx.layout.slo_ttft_s[pool], ctx.layout.slo_tbt_s[pool])
                                             if slo_s is None else slo_s)

    def predict(self, rate_rps: np.ndarray | float, n_instances: np.ndarray | int,
                max_batch: np.ndarray | int) -> PoolPrediction:
        """The pool's steady state at this load (arrays broadcast as in `predict_pool`)."""
        return _predict_loaded(self._terms, rate_rps, n_instances, max_batch)

    def within_slo(self, rate_rps: np.ndarray | float, n_instances: np.ndarray | int,
                   max_batch: np.ndarray | int, slo_margin: float) -> tuple[np.ndarray, PoolPrediction]:
        """(feasible with TTFT and TBT within ``slo_margin`` x the pool's SLOs, the prediction)."""
        pred = self.predict(rate_rps, n_instances, max_batch)
        ok = (pred.feasible & (pred.ttft_s <= slo_margin * self._slo_ttft_s)
              & (pred.tbt_s <= slo_margin * self._slo_tbt_s))
        return ok, pred


def worst_gpu_power_w(prof: Profile, freq_mhz: np.ndarray | float) -> np.ndarray:
    """Upper bound of a serving GPU's power at a clock ceiling (saturated prefill, W)."""
    f = np.asarray(freq_mhz, dtype=float)
    p = prof.prefill_power_w(1e9, f)
    return np.minimum(np.maximum(p, prof.decode_power_w(1e9, f)), prof.gpu_power_limit_w)
