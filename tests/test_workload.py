from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.sim.workload import (
    BUILTIN_TRACES,
    DEFAULT_POOLS,
    TRACES_DIR,
    LengthPools,
    Trace,
    TraceError,
    add_spike,
    arrivals_per_tick,
    builtin_trace,
    diurnal_trace,
    load_trace,
    merge,
    scale_to_rate,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _dispersion_index(trace: Trace, bin_s: float) -> float:
    counts = np.bincount((trace.arrival_s // bin_s).astype(np.int64))
    return float(counts.var() / counts.mean())


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("name", "rows", "mean_in", "mean_out"),
    [("azure_code_2023", 8819, 2048, 28), ("azure_conv_2023", 19366, 1155, 211)],
)
def test_builtin_traces_match_data_readme(name, rows, mean_in, mean_out):
    tr = builtin_trace(name)
    assert len(tr) == rows
    assert tr.input_tokens.mean() == pytest.approx(mean_in, abs=1)
    assert tr.output_tokens.mean() == pytest.approx(mean_out, abs=1)
    assert tr.input_tokens.dtype == np.int32 and tr.output_tokens.dtype == np.int32
    assert np.all(np.diff(tr.arrival_s) >= 0)
    assert 0 <= tr.arrival_s[0] < 1.0  # origin = first timestamp floored to the second
    assert tr.arrival_s[-1] < tr.duration_s
    # spans from the data README: 57.3 min and 58.4 min
    span_min = (tr.arrival_s[-1] - tr.arrival_s[0]) / 60
    assert span_min == pytest.approx(
        {"azure_code_2023": 57.3, "azure_conv_2023": 58.4}[name], abs=0.1
    )
    assert builtin_trace(name) is tr  # cached
    assert not tr.arrival_s.flags.writeable


def test_shipped_files_are_attributed():
    readme = (TRACES_DIR / "README.md").read_text()
    assert "b469a113cedca53ddc3bdea71a143dc4b7d8700c" in readme
    assert "CC-BY 4.0" in readme and "Splitwise" in readme and "DynamoLLM" in readme
    for filename in BUILTIN_TRACES.values():
        assert (TRACES_DIR / filename).is_file()
    assert (TRACES_DIR / "LICENSE_CC-BY-4.0.txt").is_file()


def test_unknown_builtin_trace():
    with pytest.raises(TraceError, match="nope"):
        builtin_trace("nope")


def test_load_2024_format_with_offsets(tmp_path):
    path = _write(
        tmp_path,
        "week.csv",
        HEADER
        + "2024-05-10 00:00:00.009930+00:00,10,5\n"
        + "2024-05-10 02:00:01.500000+02:00,20,6\n"  # 00:00:01.5 UTC
        + "2024-05-09 21:00:03.250000-03:00,30,7\n"  # 00:00:03.25 UTC
        + "2024-05-10 00:00:04+00:00,40,8\n",
    )
    tr = load_trace(path)
    np.testing.assert_allclose(tr.arrival_s, [0.00993, 1.5, 3.25, 4.0], atol=1e-9)
    np.testing.assert_array_equal(tr.input_tokens, [10, 20, 30, 40])
    np.testing.assert_array_equal(tr.output_tokens, [5, 6, 7, 8])
    assert tr.name == "week" and tr.source == str(path)
    # duration = last arrival + mean inter-arrival gap
    assert tr.duration_s == pytest.approx(4.0 + (4.0 - 0.00993) / 3)


def test_load_crlf_and_bom(tmp_path):
    path = tmp_path / "crlf.csv"
    path.write_bytes(
        b"\xef\xbb\xbfTIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        b"2023-11-16 18:17:03.9799600,4808,10\r\n2023-11-16 18:17:04.0319600,3180,8\r\n"
    )
    tr = load_trace(path)
    np.testing.assert_allclose(tr.arrival_s, [0.97996, 1.03196], atol=1e-9)
    np.testing.assert_array_equal(tr.output_tokens, [10, 8])


def test_load_vidur_format_matches_azure(tmp_path):
    azure = builtin_trace("azure_code_2023")
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens,extra"]
    lines += [
        f"{t - azure.arrival_s[0]:.6f},{i},{o},x"
        for t, i, o in zip(azure.arrival_s, azure.input_tokens, azure.output_tokens, strict=True)
    ]
    tr = load_trace(_write(tmp_path, "vidur.csv", "\n".join(lines) + "\n"), name="v")
    assert len(tr) == len(azure) and tr.name == "v"
    np.testing.assert_array_equal(tr.input_tokens, azure.input_tokens)
    np.testing.assert_allclose(tr.arrival_s, azure.arrival_s - azure.arrival_s[0], atol=1e-6)


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ("TIMESTAMP,ContextTokens\n2024-05-10 00:00:00,10\n", "GeneratedTokens", ""),
        (HEADER + "2024-05-10 00:00:00,10,5\n2024-05-10 00:00:01,-3,5\n", "ContextTokens", "-3"),
        (HEADER + "2024-05-10 00:00:00,10,5\n2024-05-10 00:00:01,0,5\n", "ContextTokens", "'0'"),
        (HEADER + "2024-05-10 00:00:00,10,5\n2024-05-10 00:00:01,10,0\n", "GeneratedTokens", "'0'"),
        (HEADER + "2024-05-10 00:00:00,10,5\n2024-05-10 00:00:01,2.5,5\n", "ContextTokens", "2.5"),
        (HEADER + "2024-05-10 00:00:00,10,5\n2024-05-10 00:00:01,ab,5\n", "ContextTokens", "ab"),
        (
            HEADER + "2024-05-10 00:00:00,10,5\n2024-05-1x 00:00:01,10,5\n",
            "TIMESTAMP",
            "2024-05-1x",
        ),
        (HEADER + "2024-05-10 00:00:00,10,5\n,10,5\n", "TIMESTAMP", "''"),
        (
            HEADER + "2024-05-10 00:00:05,10,5\n2024-05-10 00:00:01,10,5\n",
            "TIMESTAMP",
            "2024-05-10T00:00:01",
        ),
        (
            HEADER + "2024-05-10 00:00:00+00:00,10,5\n2024-05-10 01:00:00+02:00,10,5\n",
            "TIMESTAMP",
            "2024-05-09T23:00:00",  # unsorted once the offset is applied
        ),
    ],
)
def test_malformed_files_raise_trace_error(tmp_path, body, field, value):
    path = _write(tmp_path, "bad_trace.csv", body)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    msg = str(info.value)
    assert "bad_trace.csv" in msg and field in msg and value in msg
    if "missing" not in msg:
        assert "row 2" in msg
    assert isinstance(info.value, ValueError)


def test_empty_and_missing_files(tmp_path):
    for body in ["", HEADER]:
        with pytest.raises(TraceError, match="empty.csv.*empty"):
            load_trace(_write(tmp_path, "empty.csv", body))
    with pytest.raises(TraceError, match="nofile.csv"):
        load_trace(tmp_path / "nofile.csv")


# ---------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("name", list(BUILTIN_TRACES))
@pytest.mark.parametrize("target_rps", [2.0, 40.0])
def test_scale_to_rate_hits_rate_and_keeps_lengths(name, target_rps):
    # Over the full trace period (the default duration) every copy covers the whole trace, so
    # the length mix is the trace's; a shorter window would see the trace's time-local mix.
    tr = builtin_trace(name)
    out = scale_to_rate(tr, target_rps, np.random.default_rng(3))
    assert out.duration_s == tr.duration_s
    assert out.mean_rate_rps() == pytest.approx(target_rps, rel=0.01)
    assert np.all(np.diff(out.arrival_s) >= 0)
    assert out.input_tokens.mean() == pytest.approx(tr.input_tokens.mean(), rel=0.05)
    assert out.output_tokens.mean() == pytest.approx(tr.output_tokens.mean(), rel=0.05)
    # every (input, output) pair is a pair of the source trace (joint distribution kept)
    src_pairs = set(zip(tr.input_tokens.tolist(), tr.output_tokens.tolist(), strict=True))
    out_pairs = set(zip(out.input_tokens.tolist(), out.output_tokens.tolist(), strict=True))
    assert out_pairs <= src_pairs


def test_scale_to_rate_longer_than_trace_and_keeps_burstiness():
    tr = builtin_trace("azure_code_2023")
    out = scale_to_rate(tr, 100.0, np.random.default_rng(0), duration_s=2.5 * tr.duration_s)
    assert out.mean_rate_rps() == pytest.approx(100.0, rel=0.01)
    assert out.arrival_s[-1] < out.duration_s
    # the code trace is very bursty (1-s count dispersion ~13); a Poisson replay would be ~1
    assert _dispersion_index(tr, 1.0) > 5
    assert _dispersion_index(out, 1.0) > 5


def test_scale_to_rate_deterministic():
    tr = builtin_trace("azure_conv_2023")
    a = scale_to_rate(tr, 50.0, np.random.default_rng(7))
    b = scale_to_rate(tr, 50.0, np.random.default_rng(7))
    c = scale_to_rate(tr, 50.0, np.random.default_rng(8))
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.input_tokens, b.input_tokens)
    np.testing.assert_array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.arrival_s, c.arrival_s)


def test_scale_to_rate_makes_an_hour_at_1000_rps():
    """The hour `bench/week_trace_speed.py` times (its goal: under 2 s) has exactly the asked count."""
    tr = builtin_trace("azure_conv_2023")
    out = scale_to_rate(tr, 1000.0, np.random.default_rng(0), duration_s=3600.0)
    assert len(out) == 3_600_000
    assert np.all(np.diff(out.arrival_s) >= 0) and 0.0 <= out.arrival_s[0] and out.arrival_s[-1] < 3600.0


def test_scale_to_rate_rejects_bad_args():
    tr = builtin_trace("azure_code_2023")
    for bad in [0.0, -1.0, float("nan")]:
        with pytest.raises(TraceError, match="target_rps"):
            scale_to_rate(tr, bad, np.random.default_rng(0))


# ---------------------------------------------------------------------------- synthetic


def test_diurnal_trace_peaks_where_sinusoid_peaks():
    rng = np.random.default_rng(11)
    day_s = 86_400.0
    tr = diurnal_trace(
        duration_s=day_s,
        mean_rps=2.0,
        peak_to_mean=1.8,
        period_s=day_s,
        phase_s=15 * 3600.0,
        lengths_from=builtin_trace("azure_conv_2023"),
        rng=rng,
    )
    assert tr.mean_rate_rps() == pytest.approx(2.0, rel=0.02)
    hourly = np.bincount((tr.arrival_s // 3600).astype(np.int64), minlength=24)
    assert int(np.argmax(hourly)) in (14, 15)  # hour bins [14h,15h) and [15h,16h) straddle the peak
    assert int(np.argmin(hourly)) in (2, 3)  # trough 12 h later
    assert hourly.max() / 3600 == pytest.approx(2.0 * 1.8, rel=0.05)
    assert hourly.min() / 3600 == pytest.approx(2.0 * 0.2, rel=0.15)
    assert tr.output_tokens.mean() == pytest.approx(211, rel=0.05)
    with pytest.raises(TraceError, match="peak_to_mean"):
        diurnal_trace(10.0, 1.0, 2.5, 10.0, 0.0, builtin_trace("azure_conv_2023"), rng)


def test_add_spike_adds_expected_requests():
    tr = builtin_trace("azure_conv_2023")
    start_s, dur_s, mult = 600.0, 300.0, 4.0
    base_in_window = len(tr.window(start_s, dur_s))
    extras = []
    for seed in range(5):
        out = add_spike(tr, start_s, dur_s, mult, np.random.default_rng(seed))
        assert out.duration_s == tr.duration_s
        # nothing changes outside the window
        np.testing.assert_array_equal(
            out.window(0.0, start_s).arrival_s, tr.window(0.0, start_s).arrival_s
        )
        after = start_s + dur_s
        assert len(out.window(after, tr.duration_s)) == len(tr.window(after, tr.duration_s))
        extras.append(len(out) - len(tr))
        assert len(out.window(start_s, dur_s)) == base_in_window + extras[-1]
    expected = (mult - 1) * base_in_window
    # Poisson: mean of 5 draws within 4 standard errors
    assert abs(np.mean(extras) - expected) < 4 * np.sqrt(expected / 5)


def test_merge_and_window_basics():
    a = builtin_trace("azure_code_2023")
    b = builtin_trace("azure_conv_2023")
    m = merge([a, b])
    assert len(m) == len(a) + len(b)
    assert m.duration_s == max(a.duration_s, b.duration_s)
    assert np.all(np.diff(m.arrival_s) >= 0)
    assert m.input_tokens.sum() == a.input_tokens.sum() + b.input_tokens.sum()
    w = a.window(100.0, 60.0)
    assert w.duration_s == 60.0 and np.all((w.arrival_s >= 0) & (w.arrival_s < 60.0))
    with pytest.raises(TraceError):
        merge([])
    with pytest.raises(TraceError):
        a.window(-1.0, 10.0)


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.floats(min_value=1.0, max_value=3400.0), min_size=0, max_size=6, unique=True),
    rate=st.floats(min_value=0.5, max_value=30.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_windows_partition_and_merge_conserve_requests(cuts, rate, seed):
    tr = scale_to_rate(builtin_trace("azure_code_2023"), rate, np.random.default_rng(seed), 3500.0)
    edges = [0.0, *sorted(cuts), tr.duration_s]
    parts = [tr.window(lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    assert sum(len(p) for p in parts) == len(tr)
    # shifting parts back and merging reproduces the trace
    shifted = [
        Trace(p.arrival_s + lo, p.input_tokens, p.output_tokens, tr.duration_s, p.name, p.source)
        for p, lo in zip(parts, edges[:-1], strict=True)
    ]
    back = merge(shifted)
    np.testing.assert_allclose(back.arrival_s, tr.arrival_s, atol=1e-9)
    np.testing.assert_array_equal(back.input_tokens, tr.input_tokens)
    np.testing.assert_array_equal(back.output_tokens, tr.output_tokens)


# ---------------------------------------------------------------------------- pools and ticks


def test_pools_assign_each_request_to_one_pool():
    tr = merge([builtin_trace(n) for n in BUILTIN_TRACES])
    pools = DEFAULT_POOLS
    ids = pools.assign(tr.input_tokens, tr.output_tokens)
    assert ids.shape == (len(tr),) and ids.min() >= 0 and ids.max() < pools.n_pools
    shares = np.bincount(ids, minlength=pools.n_pools) / len(tr)
    assert np.all(shares > 0.02)  # every pool is populated on the real traces
    # edges: below the first edge is S, at the edge starts M, at the second edge starts L
    ids = pools.assign(np.array([449, 450, 1249, 1250, 1]), np.array([49, 50, 139, 140, 10_000]))
    assert [pools.names[i] for i in ids] == ["SS", "MM", "MM", "LL", "SL"]
    assert pools.n_pools == 9


def test_pools_reject_bad_edges():
    with pytest.raises(TraceError, match="input_edges"):
        LengthPools(input_edges=(100, 50), output_edges=(10,), names=tuple("abcdef"))
    with pytest.raises(TraceError, match="names"):
        LengthPools(input_edges=(100,), output_edges=(10,), names=("a", "b"))


@pytest.mark.slow
def test_arrivals_per_tick_counts_and_means():
    tr = scale_to_rate(builtin_trace("azure_conv_2023"), 20.0, np.random.default_rng(5), 900.0)
    tick_s, n_ticks = 2.0, 300
    counts, mean_in, mean_out = arrivals_per_tick(tr, tick_s, n_ticks, DEFAULT_POOLS)
    assert counts.shape == mean_in.shape == mean_out.shape == (n_ticks, DEFAULT_POOLS.n_pools)
    win = tr.window(0.0, tick_s * n_ticks)
    assert counts.sum() == len(win)
    assert np.all(mean_in[counts == 0] == 0) and np.all(mean_out[counts == 0] == 0)
    # total tokens agree with the window's
    assert (counts * mean_in).sum() == pytest.approx(win.input_tokens.sum(), rel=1e-9)
    assert (counts * mean_out).sum() == pytest.approx(win.output_tokens.sum(), rel=1e-9)
    # one cell checked directly
    j = 17
    sel = (win.arrival_s >= j * tick_s) & (win.arrival_s < (j + 1) * tick_s)
    ids = DEFAULT_POOLS.assign(win.input_tokens[sel], win.output_tokens[sel])
    np.testing.assert_array_equal(counts[j], np.bincount(ids, minlength=DEFAULT_POOLS.n_pools))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.float32, np.float64])
def test_pool_assignment_is_the_same_for_every_token_dtype(dtype):
    """`LengthPools.assign` gives the classes ``searchsorted(edges, tokens, "right")`` gives, whatever
    the tokens' dtype (the edges are cast to it where they fit), at and around every edge."""
    pools = LengthPools(input_edges=(450, 1250), output_edges=(50, 140), names=tuple("abcdefghi"))
    near = np.array([0, 1, 49, 50, 51, 139, 140, 141, 449, 450, 451, 1249, 1250, 1251, 30000])
    inp, out = np.meshgrid(near, near)
    inp, out = inp.ravel().astype(dtype), out.ravel().astype(dtype)
    want = (np.searchsorted(np.array([450, 1250]), inp.astype(np.float64), side="right") * 3
            + np.searchsorted(np.array([50, 140]), out.astype(np.float64), side="right"))
    np.testing.assert_array_equal(pools.assign(inp, out), want)


@settings(max_examples=80, deadline=None)
@given(data=st.data(),
       dtype=st.sampled_from([np.int16, np.int32, np.int64, np.uint16, np.float64]),
       input_edges=st.lists(st.integers(1, 40_000), min_size=0, max_size=3, unique=True),
       output_edges=st.lists(st.integers(1, 40_000), min_size=0, max_size=3, unique=True))
def test_pool_assignment_is_searchsorted_of_each_field_for_every_token_dtype(data, dtype, input_edges,
                                                                           output_edges):
    """`LengthPools.assign`'s compiled pass (integer tokens, edges that fit their dtype) and
    its numpy fallback give the pool ids of the definition: input class times the number of
    output classes plus output class, a class being ``searchsorted(edges, tokens, "right")``,
    with tokens at, below and above every edge."""
    from llm_cluster_gym.envs.sim.workload import LengthPools

    ie, oe = tuple(sorted(input_edges)), tuple(sorted(output_edges))
    names = tuple(f"p{i}" for i in range((len(ie) + 1) * (len(oe) + 1)))
    pools = LengthPools(input_edges=ie, output_edges=oe, names=names)
    hi = 40_001 if dtype != np.int16 else np.iinfo(np.int16).max
    near = [v + d for v in (*ie, *oe) for d in (-1, 0, 1) if 0 <= v + d <= hi]
    values = st.one_of(st.integers(0, hi), st.sampled_from(near or [0]))
    n = data.draw(st.integers(0, 60))
    inp = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    out = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    want = (np.searchsorted(np.array(ie, dtype=float), inp.astype(float), side="right") * (len(oe) + 1)
            + np.searchsorted(np.array(oe, dtype=float), out.astype(float), side="right"))
    got = pools.assign(inp, out)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
