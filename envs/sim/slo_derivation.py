"""Latency SLOs of a scenario's pools, derived from the physics (the rule its files cite).

The rule is the one Splitwise and DynamoLLM use: an SLO is a multiple (5x) of the latency a
request sees on an *uncontended* instance. Here that is the scenario's fastest configuration for
the metric (the TP degree among its choices with the lowest latency, at the maximum SM clock: the
largest degree for a dense 70B, not always for a small model whose step is host-bound) with
nothing else running:

* TTFT SLO of a pool = 5 x the prefill of the pool's P90 prompt (the whole prompt in chunks of
  up to ``max_prefill_tokens``, the step's fixed cost paid once per chunk);
* TBT SLO of a pool = 5 x one decode iteration of a lone request whose context is the pool's
  mean prompt plus half its mean output.

Pool statistics come from the whole source trace split into the scenario's pool set
(`envs.sim.description.trace_pool_stats`, the statistics controllers see). The figures are
rounded to two significant digits. `llm-cluster derive-slos` prints them and the YAML lines; a
test checks that every shipped scenario carries exactly these values, so the SLOs follow the
physics whenever the physics change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llm_cluster_gym.envs.sim.description import trace_pool_stats
from llm_cluster_gym.envs.sim.profiles import Profile, ProfileLibrary
from llm_cluster_gym.envs.sim.scenario import Scenario

SLO_MULTIPLE = 5.0
"""SLO = this multiple of the uncontended latency (Splitwise, ISCA 2024; DynamoLLM, HPCA 2025)."""


@dataclass(frozen=True)
class PoolSlo:
    """The derived SLOs of one pool and the figures they come from."""

    pool: str
    p90_input_tokens: float
    decode_context_tokens: float
    uncontended_ttft_s: float
    uncontended_tbt_s: float
    slo_ttft_s: float
    slo_tbt_s: float


def round_sig(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits."""
    if x <= 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(x)))


def uncontended_prefill_s(prof: Profile, prompt_tokens: float, chunk_tokens: int) -> float:
    """Seconds to prefill one prompt alone, in chunks of at most ``chunk_tokens`` at max clock."""
    full, rest = divmod(int(math.ceil(prompt_tokens)), chunk_tokens)
    t = full * float(prof.prefill_time_s(chunk_tokens, prof.max_freq_mhz))
    if rest:
        t += float(prof.prefill_time_s(rest, prof.max_freq_mhz))
    return t


def candidate_profiles(s: Scenario, library: ProfileLibrary | None = None) -> list[Profile]:
    """The profiles of the scenario's model and GPU at each of its TP choices."""
    lib = library or ProfileLibrary.load()
    sv = s.serving
    return [lib.get(sv.model, sv.gpu, tp) for tp in sv.tp_choices]


def derive_slos(s: Scenario, library: ProfileLibrary | None = None) -> list[PoolSlo]:
    """The SLOs of each pool of ``s`` by the rule of this module."""
    from llm_cluster_gym.envs.sim.demand import pools_for

    profs = candidate_profiles(s, library)
    stats = trace_pool_stats(s.workload.trace, s.workload.pools)
    names = pools_for(s.workload.pools).names
    out = []
    for p, name in enumerate(names):
        p90_in = float(stats.p90_input_tokens[p])
        ctx = float(stats.mean_input_tokens[p] + 0.5 * stats.mean_output_tokens[p])
        ttft = min(uncontended_prefill_s(pr, p90_in, s.serving.max_prefill_tokens) for pr in profs)
        tbt = min(float(pr.decode_iter_time_s(1.0, ctx, pr.max_freq_mhz)) for pr in profs)
        out.append(PoolSlo(name, p90_in, ctx, ttft, tbt, round_sig(SLO_MULTIPLE * ttft),
                           round_sig(SLO_MULTIPLE * tbt)))
    return out


def derivation_comment(s: Scenario, slos: list[PoolSlo]) -> str:
    """The YAML comment lines that record the derivation in a scenario file."""
    sv = s.serving
    tps = "/".join(str(t) for t in sv.tp_choices)
    lines = [
        f"SLOs (llm-cluster derive-slos --scenario {s.name}): {SLO_MULTIPLE:g}x the uncontended",
        f"latency of {sv.model} on {sv.gpu} (fastest of TP {tps} at the maximum clock; the",
        "Splitwise/DynamoLLM rule), from the shape-based physics (envs/sim/slo_derivation.py):",
    ]
    for x in slos:
        lines.append(
            f"  pool {x.pool}: TTFT {x.uncontended_ttft_s * 1e3:.1f} ms (P90 prompt "
            f"{x.p90_input_tokens:.0f} tok) -> {x.slo_ttft_s:g} s; TBT {x.uncontended_tbt_s * 1e3:.2f} ms "
            f"(batch 1, context {x.decode_context_tokens:.0f}) -> {x.slo_tbt_s:g} s")
    return "\n".join("# " + line for line in lines)
