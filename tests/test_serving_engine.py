"""The serving models follow vLLM V1's default scheduler: chunked prefill mixed into decode
steps under a token budget, paged KV allocated as tokens are generated, recompute preemption.

Each test drives `RequestLevelServing` (or `AggregateServing`) on a hand-made instance table
with constant step times, so the expected times and token counts are computed by hand from the
chain rule of `serving_request`: a prompt of ``x`` tokens costs ``o * x / m + p1 * x`` of chain
time (``o`` the step's fixed cost: the decode iteration, or p0 where nothing decodes; ``m`` the
prompt tokens a step carries: the budget less the decoding requests), and a decoding request
takes one token per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator
from llm_cluster_gym.envs.sim.serving_aggregate import AggregateServing
from llm_cluster_gym.envs.sim.serving_request import (
    BLOCK_TOKENS,
    RequestLevelServing,
    SlotModel,
)

P0_S = 0.02  # fixed cost of a prefill pass
P1_S = 1e-4  # prefill seconds per prompt token
ITER_S = 0.02  # one decode iteration, whatever the batch
BUDGET = 8192  # tokens per step (vLLM's max_num_batched_tokens)


def instance(max_batch: int = 64) -> InstanceTable:
    """One instance on one GPU, in pool 0."""
    inst = InstanceTable.empty(np.array([0]), gpus_per_server=1)
    inst.active[0], inst.pool[0], inst.max_batch[0] = True, 0, max_batch
    return inst


def model(kv_tokens: float = 1e9) -> SlotModel:
    """Constant step times: p0 + p1 x tokens per pass, a fixed decode iteration."""
    return SlotModel(
        prefill_time_s=lambda tok, i: P0_S + P1_S * np.asarray(tok, dtype=float),
        decode_iter_time_s=lambda b, c, i: np.full(len(b), ITER_S),
        kv_capacity_tokens=np.array([float(kv_tokens)]),
    )


class Engine:
    """A request-level serving model on `instance()`, ticked by hand."""

    def __init__(self, max_batch: int = 64, kv_tokens: float = 1e9, drop_after_s: float = 60.0,
                 dt_s: float = 0.5, prefill_mode: str = "chunked"):
        self.inst = instance(max_batch)
        self.model = model(kv_tokens)
        self.serving = RequestLevelServing(1, 1, BUDGET, drop_after_s, prefill_mode)
        self.acc = ServiceAccumulator(1)
        self.dt_s = dt_s
        self.t_s = 0.0
        self.loads = []

    def add(self, n: int, prompt: int, output: int, at_s: float | None = None) -> None:
        at = self.t_s if at_s is None else at_s
        self.serving.add_arrivals(np.full(n, at), np.full(n, prompt), np.full(n, output),
                                  np.zeros(n, dtype=np.int64))

    def tick(self):
        load = self.serving.tick(self.t_s, self.dt_s, self.inst, np.array([True]), self.model,
                                 np.ones(1), np.array([1e9]), np.array([1e9]), np.zeros(1),
                                 self.acc)
        assert load.prefill_busy_s[0] + load.decode_busy_s[0] <= self.dt_s + 1e-12
        self.loads.append(load)
        self.t_s += self.dt_s
        return load

    def ttft_s(self) -> np.ndarray:
        return np.concatenate(self.acc.ttft_s) if self.acc.ttft_s else np.zeros(0)

    def kv_held(self) -> float:
        r = self.serving.req
        run = r["admit_seq"] >= 0
        return float((r["input_tokens"][run] + r["done_tokens"][run] + BLOCK_TOKENS).sum())


def test_decode_continues_while_a_long_prompt_is_prefilled():
    """4 requests decode; a 40,000-token prompt arrives. It is prefilled in chunks of the budget
    less 4 tokens, one chunk per step, and every step also gives each decoding request a token:
    between t = 1 s and 5 s the chain is always busy, so 4 s / (o + m p1) steps run."""
    e = Engine()
    e.add(4, prompt=100, output=1000, at_s=0.0)
    e.tick()
    e.tick()
    before = e.serving.req["done_tokens"][:4].copy()
    e.add(1, prompt=40_000, output=1000, at_s=1.0)
    for _ in range(8):  # t = 1 .. 5 s
        load = e.tick()
        assert load.prefill_busy_s[0] > 0.45 and load.decode_busy_s[0] > 0
    m = BUDGET - 4
    step_s = ITER_S + m * P1_S
    steps = 4.0 / step_s
    np.testing.assert_allclose(e.serving.req["done_tokens"][:4] - before, steps, rtol=1e-9)
    np.testing.assert_allclose(e.serving.req["prefill_left"][4], 40_000 - steps * m, rtol=1e-9)
    # Serially (the old model) the decoding requests would have stopped for the whole prompt.
    while e.serving.req["prefill_left"][4] > 0:
        e.tick()
    # Its first token: after ceil(40,000 / m) = 5 steps of o plus its marginal time, within a
    # step (the chain is fluid: a step's fixed cost is shared by the tokens it carries).
    first = e.serving.req["first_token_s"][4]
    assert abs(first - (1.0 + 5 * ITER_S + 40_000 * P1_S)) < ITER_S


def test_fixed_cost_is_paid_per_step_not_per_prompt():
    """20 prompts of 200 tokens on an idle instance share one pass: the last first token comes
    after about p0 + 20 x 200 x p1, not 20 x (p0 + 200 p1)."""
    n, x = 20, 200
    e = Engine()
    e.add(n, prompt=x, output=5, at_s=0.0)
    load = e.tick()
    first = e.serving.req["first_token_s"]
    chain = n * x * (P0_S / BUDGET + P1_S)  # fluid chain time with p0 the step cost
    assert first.max() == pytest.approx(chain + P0_S * (1 - x / BUDGET), rel=1e-9)
    assert first.max() < P0_S + n * x * P1_S + P0_S * n * x / BUDGET + 1e-12
    assert first.max() < 0.6 * n * (P0_S + x * P1_S)
    # Power: the prompts' marginal time plus one pure pass's fixed cost, at the pass's tokens.
    assert load.prefill_busy_s[0] == pytest.approx(n * x * P1_S + P0_S, rel=1e-9)
    assert load.prefill_tokens[0] == pytest.approx(n * x)


def test_admission_needs_the_prompt_only_and_an_outgrown_request_is_preempted():
    """KV 1,000 tokens; a 600-token prompt with 800 output tokens (1,400 in all) is admitted,
    decodes until its context and a block no longer fit, is preempted, can never come back
    (its prompt and generated tokens exceed the memory) and is dropped `drop_after_s` later."""
    e = Engine(kv_tokens=1000.0, drop_after_s=5.0)
    e.add(1, prompt=600, output=800, at_s=0.0)
    e.tick()
    r = e.serving.req
    assert r["admit_seq"][0] >= 0 and np.isfinite(r["first_token_s"][0])
    ticks = 0
    while e.serving.preemptions == 0:
        e.tick()
        ticks += 1
        assert ticks < 20
    r = e.serving.req
    assert r["admit_seq"][0] < 0  # back to waiting
    assert r["done_tokens"][0] > 1000 - 600 - BLOCK_TOKENS  # it outgrew the memory
    assert e.kv_held() == 0.0
    preempted_at = e.t_s
    while e.serving.in_flight:
        e.tick()
        assert e.serving.preemptions == 1
    assert e.acc.dropped == 1 and e.acc.finished == 0
    # Dropped by the first tick that starts more than 5 s after the preemption.
    assert e.t_s - preempted_at == pytest.approx(5.5 + e.dt_s)


def test_preemption_frees_kv_and_the_request_finishes_later_with_its_first_ttft():
    """KV 1,000 tokens; A (600 + 300) and B (200 + 300) fit together at admission (616 + 216).
    As they grow, B (the newest) is preempted; A finishes; B is admitted again, recomputes its
    prompt and the tokens it had generated, and finishes with the TTFT its client saw first."""
    e = Engine(kv_tokens=1000.0)
    e.serving.add_arrivals(np.zeros(2), np.array([600, 200]), np.array([300, 300]),
                           np.zeros(2, dtype=np.int64))
    e.tick()
    r = e.serving.req
    assert (r["admit_seq"] >= 0).all()
    first_b = float(r["first_token_s"][1])
    # Both prefilled in one pure pass: B's chain ends after both prompts.
    assert first_b == pytest.approx(800 * (P0_S / BUDGET + P1_S) + P0_S * (1 - 200 / BUDGET))
    while e.serving.preemptions == 0:
        e.tick()
        assert e.kv_held() <= 1000.0
    r = e.serving.req
    assert r["admit_seq"][1] < 0 and r["admit_seq"][0] >= 0  # B preempted, A runs on
    gen_at_preemption = float(r["done_tokens"][1])
    assert r["first_token_s"][1] == first_b
    readmitted = None
    while e.serving.in_flight:
        b_waiting = e.serving.in_flight == 1 and e.serving.req["admit_seq"][0] < 0
        load = e.tick()
        assert e.kv_held() <= 1000.0
        if b_waiting and e.serving.req["admit_seq"][0] >= 0:
            readmitted = load
    assert e.acc.finished == 2 and e.serving.preemptions == 1
    # B came back on an idle instance: one pure pass over its prompt and generated tokens.
    assert readmitted is not None
    assert readmitted.prefill_busy_s[0] == pytest.approx(P1_S * (200 + gen_at_preemption) + P0_S)
    ttft = np.concatenate(e.acc.ttft_s)
    assert ttft[-1] == pytest.approx(first_b)  # B finished last, with its first TTFT


def test_a_batch_of_512_runs():
    """600 requests on an instance with max_batch 512: 512 run at once, the rest wait; all
    finish, every output token is generated."""
    e = Engine(max_batch=512)
    e.add(600, prompt=100, output=50, at_s=0.0)
    e.tick()
    waiting, running = e.serving.per_pool_counts()
    assert running[0] == 512 and waiting[0] == 88
    tokens = sum(ld.tokens_generated for ld in e.loads)
    for _ in range(100):
        if not e.serving.in_flight:
            break
        tokens += e.tick().tokens_generated
    assert e.acc.finished == 600
    assert tokens == pytest.approx(600 * 50)
    assert max(float(ld.decode_batch[0]) for ld in e.loads) > 500


def _preempting_run() -> tuple[list, ServiceAccumulator]:
    e = Engine(kv_tokens=3000.0, dt_s=0.25)
    rng = np.random.default_rng(5)
    for _ in range(40):
        n = int(rng.integers(0, 4))
        e.serving.add_arrivals(e.t_s + rng.random(n) * e.dt_s, rng.integers(50, 900, n),
                               rng.integers(5, 400, n), np.zeros(n, dtype=np.int64))
        e.tick()
    return e.loads, e.acc, e.serving.preemptions


def test_same_inputs_same_results_with_preemption():
    loads_a, acc_a, pre_a = _preempting_run()
    loads_b, acc_b, pre_b = _preempting_run()
    assert pre_a == pre_b > 0
    np.testing.assert_array_equal(np.concatenate(acc_a.ttft_s), np.concatenate(acc_b.ttft_s))
    np.testing.assert_array_equal(np.concatenate(acc_a.tbt_s), np.concatenate(acc_b.tbt_s))
    for x, y in zip(loads_a, loads_b, strict=True):
        for f in ("prefill_busy_s", "prefill_tokens", "decode_busy_s", "decode_batch"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


# ---------------------------------------------------------------------------- aggregate model


def _aggregate_ticks(kv_tokens: float, n: float, prompt: float, output: float, ticks: int,
                     dt_s: float = 5.0):
    agg = AggregateServing(1, 1, BUDGET, drop_after_s=600.0)
    inst, m, acc = instance(512), model(kv_tokens), ServiceAccumulator(1)
    loads, held = [], []
    for k in range(ticks):
        agg.add_arrivals(np.full(int(n), k * dt_s), np.full(int(n), prompt),
                         np.full(int(n), output), np.zeros(int(n), dtype=np.int64))
        ld = agg.tick(k * dt_s, dt_s, inst, np.array([True]), m, np.ones(1), np.array([1e9]),
                      np.array([1e9]), np.zeros(1), acc)
        assert ld.prefill_busy_s[0] + ld.decode_busy_s[0] <= dt_s + 1e-9
        loads.append(ld)
        held.append(float(agg.run[0] * (agg.run_ctx[0] + BLOCK_TOKENS)))
    return agg, loads, held, acc


def test_aggregate_decodes_during_chunked_prefill_and_pays_p0_per_step():
    """The fluid model's first tick on an idle instance: 10 prompts of 1,000 tokens take their
    marginal time plus one pure pass (not 10 x p0), and decoding fills the rest of the tick."""
    agg, loads, _, _ = _aggregate_ticks(1e9, n=10, prompt=1000, output=200, ticks=3)
    assert loads[0].prefill_busy_s[0] == pytest.approx(10 * 1000 * P1_S + P0_S, rel=1e-9)
    assert loads[0].decode_busy_s[0] == pytest.approx(5.0 - loads[0].prefill_busy_s[0])
    # Later ticks: mixed steps, prefill takes only its marginal share of the chain.
    s = ITER_S * 1000 / (BUDGET - agg.run[0]) + 1000 * P1_S
    assert loads[2].prefill_busy_s[0] < 10 * s + 1e-9
    assert loads[2].decode_busy_s[0] > 0


def test_aggregate_admits_on_the_prompt_and_preempts_what_outgrows_the_kv():
    """Requests of 500 + 2,000 tokens on 20,000 KV tokens: the fluid model admits on the prompt
    (more than 20,000 / 2,500 run at once at first), the running requests' KV is held within
    the memory at every tick's end, and what outgrows it is preempted."""
    agg, loads, held, _ = _aggregate_ticks(20_000.0, n=20, prompt=500, output=2000, ticks=20)
    assert agg.preemptions > 0
    assert max(held) <= 20_000.0 + 1e-6
    assert max(float(ld.decode_batch[0]) for ld in loads) > 20_000 / 2500


# ---------------------------------------------------------------------------------------------
# Serial prefill (serving.prefill_mode: serial): one prompt per pass, decoding stalled
# ---------------------------------------------------------------------------------------------


def _long_prompt_into_decoding(prefill_mode: str) -> tuple[Engine, np.ndarray, object]:
    """4 requests decode for 1 s; a 4,000-token prompt arrives at t = 1 s; one more tick."""
    e = Engine(prefill_mode=prefill_mode)
    e.add(4, prompt=100, output=1000, at_s=0.0)
    e.tick()
    e.tick()
    before = e.serving.req["done_tokens"][:4].copy()
    e.add(1, prompt=4000, output=1000, at_s=1.0)
    load = e.tick()
    return e, e.serving.req["done_tokens"][:4] - before, load


def test_serial_prefill_pass_stalls_decoding():
    """Serially the 4,000-token prompt runs in one pass of p0 + 4,000 p1 = 0.42 s (its first token
    when the pass ends); the decoding requests get tokens only in the rest of the 0.5 s tick. With
    chunked prefill they keep decoding through the prompt's steps (the pass's p0 is not paid)."""
    e, gained, load = _long_prompt_into_decoding("serial")
    pass_s = P0_S + 4000 * P1_S
    assert e.serving.req["first_token_s"][4] == pytest.approx(1.0 + pass_s, rel=1e-12)
    np.testing.assert_allclose(gained, (0.5 - pass_s) / ITER_S, rtol=1e-9)
    assert load.prefill_busy_s[0] == pytest.approx(pass_s, rel=1e-12)
    assert load.prefill_tokens[0] == pytest.approx(4000.0)
    _, gained_chunked, _ = _long_prompt_into_decoding("chunked")
    np.testing.assert_allclose(gained_chunked, (0.5 - 4000 * P1_S) / ITER_S, rtol=1e-9)
    assert (gained_chunked > gained + 0.9).all()


def test_serial_prefill_pays_p0_per_prompt():
    """10 prompts of 200 tokens on an idle instance: one pass each, back to back, so the k-th
    first token comes at k (p0 + 200 p1) (chunked: they share one step's p0)."""
    n, x = 10, 200
    e = Engine(prefill_mode="serial")
    e.add(n, prompt=x, output=1000, at_s=0.0)
    load = e.tick()
    first = np.sort(e.serving.req["first_token_s"])
    np.testing.assert_allclose(first, np.arange(1, n + 1) * (P0_S + x * P1_S), rtol=1e-12)
    assert load.prefill_busy_s[0] == pytest.approx(n * (P0_S + x * P1_S), rel=1e-12)
    c = Engine()
    c.add(n, prompt=x, output=1000, at_s=0.0)
    c.tick()
    assert c.serving.req["first_token_s"].max() < 0.6 * first.max()


def test_serial_prefill_runs_a_budget_of_prompts_between_decode_iterations():
    """With requests decoding and a backlog of prompts, each step runs passes of up to the budget
    in prompt tokens then one decode iteration: the chain takes each prompt's pass plus its share
    x / budget of an iteration, and the decoding requests get one token per iteration."""
    e = Engine(prefill_mode="serial", dt_s=2.0)
    e.add(2, prompt=100, output=10_000, at_s=0.0)
    e.tick()
    before = e.serving.req["done_tokens"][:2].copy()
    n, x = 8, 2048  # two budgets of prompts
    e.add(n, prompt=x, output=10_000, at_s=2.0)
    e.tick()
    svc = x * ITER_S / BUDGET + P0_S + x * P1_S
    first = np.sort(e.serving.req["first_token_s"][2:])
    np.testing.assert_allclose(first, 2.0 + np.arange(n) * svc + P0_S + x * P1_S, rtol=1e-12)
    passes_s = n * (P0_S + x * P1_S)
    np.testing.assert_allclose(e.serving.req["done_tokens"][:2] - before, (2.0 - passes_s) / ITER_S,
                               rtol=1e-9)


def test_serial_prefill_needs_the_request_level_model():
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario

    base = load_scenario("small")
    assert base.serving.prefill_mode == "chunked"
    s = base.with_overrides(serving=dataclasses.replace(base.serving, prefill_mode="serial"))
    with pytest.raises(ScenarioError, match="prefill_mode.*request-level"):
        SimCluster(s, serving_model="aggregate")
    SimCluster(s, serving_model="request")
    with pytest.raises(ScenarioError, match="prefill_mode"):
        base.with_overrides(serving=dataclasses.replace(base.serving, prefill_mode="eager"))


def test_serial_prefill_power_is_the_mean_of_each_pass_at_its_own_clock():
    """A tick with a long and a short pass draws the time-weighted mean of the two passes' power.

    Each pass runs at the clock its own prompt allows under the GPU power limit; the power model
    gets one (prompt, clock) pair per GPU that reproduces that mean, below what one pass of the
    tick's mean prompt would draw (the draw is concave in the prompt and capped).
    """
    from llm_cluster_gym.envs.real.fidelity import MODEL_NAME, _scenario
    from llm_cluster_gym.envs.sim.clocks import serial_prefill
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.profiles import ProfileLibrary, phase_power_w
    from llm_cluster_gym.envs.sim.serving import TickLoad

    prof = dataclasses.replace(ProfileLibrary.load().get("llama3-8b", "h100", 1), model=MODEL_NAME)
    sim = SimCluster(_scenario(60.0, 1.0, 0.2, 25.0, 8192, 60.0), serving_model="request",
                     profiles=ProfileLibrary([prof]))
    sim.reset(seed=0)
    sp, n = sim.slots.prof, sim.slots.prof.idle_power_w.size
    tok, sec = np.array([8000.0, 150.0]), np.array([0.15, 0.05])
    slot = np.zeros(2, dtype=np.int64)
    f_max = np.full(n, prof.max_freq_mhz)

    def draw(tokens, mhz):
        return np.minimum(phase_power_w(tokens, mhz, prof.idle_power_w, prof.prefill_max_power_w,
                                        prof.prefill_k_tokens, prof.power_freq_exponent,
                                        prof.max_freq_mhz, prof.prefill_busy_power_w),
                          prof.gpu_power_limit_w)

    own = prof.prefill_freq_at_limit_mhz(tok)
    expected = float(np.sum(sec * draw(tok, own)) / sec.sum())
    mean_tok = np.full(n, float(np.sum(sec * tok) / sec.sum()))
    load = TickLoad(np.zeros(n), mean_tok, np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n),
                    prefill_passes=(slot, tok, sec))
    gpu_mhz, tokens_eq = serial_prefill(load, sim.slots, f_max, f_max, prof.max_freq_mhz)
    got = float(draw(tokens_eq[0], gpu_mhz[0]))
    assert got == pytest.approx(expected, rel=1e-6)
    one_pass = float(draw(mean_tok[0], prof.prefill_freq_at_limit_mhz(mean_tok[0])))
    assert got < one_pass - 20.0  # the mean prompt's pass overstates the tick's draw
    assert sp.max_freq_mhz[0] >= gpu_mhz[0] >= min(own)


def test_serial_pass_draws_its_share_of_sustained_power_and_keeps_its_clock():
    """A serial pass of a profile whose passes draw a share r of the sustained power above idle
    (`Profile.prefill_serial_power_ratio`, fitted per node) runs where that share fits the power
    limit: a long prompt keeps a higher clock than sustained prefill, and the tick draws
    ``idle + r (sustained - idle)`` at that clock. With r = 1 it is the sustained cap."""
    from llm_cluster_gym.envs.real.fidelity import MODEL_NAME, _scenario
    from llm_cluster_gym.envs.sim.clocks import serial_prefill
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.profiles import ProfileLibrary, phase_power_w
    from llm_cluster_gym.envs.sim.serving import TickLoad

    base = dataclasses.replace(ProfileLibrary.load().get("llama3-8b", "h100", 1), model=MODEL_NAME)
    tok, sec = np.array([4000.0]), np.array([0.2])

    def tick(ratio: float) -> tuple[float, float]:
        prof = dataclasses.replace(base, prefill_serial_power_ratio=ratio)
        sim = SimCluster(_scenario(60.0, 1.0, 0.2, 25.0, 8192, 60.0), serving_model="request",
                         profiles=ProfileLibrary([prof]))
        sim.reset(seed=0)
        n = sim.slots.prof.idle_power_w.size
        f_max = np.full(n, prof.max_freq_mhz)
        load = TickLoad(np.zeros(n), np.full(n, tok[0]), np.zeros(n), np.zeros(n), np.zeros(n),
                        np.zeros(n), prefill_passes=(np.zeros(1, dtype=np.int64), tok, sec))
        gpu_mhz, tokens_eq = serial_prefill(load, sim.slots, f_max, f_max, prof.max_freq_mhz)
        drawn = phase_power_w(tokens_eq[0], gpu_mhz[0], prof.idle_power_w, prof.prefill_max_power_w,
                              prof.prefill_k_tokens, prof.power_freq_exponent, prof.max_freq_mhz,
                              prof.prefill_busy_power_w)
        assert gpu_mhz[0] == pytest.approx(float(prof.serial_prefill_freq_at_limit_mhz(tok[0])))
        return float(gpu_mhz[0]), float(drawn)

    f1, p1 = tick(1.0)
    assert f1 == pytest.approx(float(base.prefill_freq_at_limit_mhz(tok[0])))  # the sustained cap
    assert p1 == pytest.approx(base.gpu_power_limit_w, rel=1e-6)
    f6, p6 = tick(0.6)
    assert f6 > f1 + 100.0  # the share fits the limit at a higher clock
    sustained = phase_power_w(tok[0], f6, base.idle_power_w, base.prefill_max_power_w,
                              base.prefill_k_tokens, base.power_freq_exponent, base.max_freq_mhz,
                              base.prefill_busy_power_w)
    expected = min(base.idle_power_w + 0.6 * (sustained - base.idle_power_w), base.gpu_power_limit_w)
    assert p6 == pytest.approx(expected, rel=1e-6)
    assert p6 < p1
