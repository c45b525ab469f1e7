"""The on-disk columnar cache of parsed trace files (envs/sim/trace_cache.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from llm_cluster_gym.envs.sim import trace_cache
from llm_cluster_gym.envs.sim.trace_cache import cache_root, cached_load, entry_path
from llm_cluster_gym.envs.sim.workload import TRACES_DIR, load_trace, resolve_trace


def write_2024_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A trace in the 2024 week-long format (tz-aware timestamps)."""
    rng = np.random.default_rng(seed)
    t_us = np.cumsum(rng.integers(1, 200_000, size=rows))
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for us, i, o in zip(t_us, rng.integers(1, 8000, rows), rng.integers(1, 900, rows), strict=True):
        s, frac = divmod(int(us), 1_000_000)
        lines.append(f"2024-05-12 {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{frac:06d}+00:00,{i},{o}")
    path.write_text("\n".join(lines) + "\n")
    return path


def same(a, b) -> bool:
    return (np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.input_tokens, b.input_tokens)
            and np.array_equal(a.output_tokens, b.output_tokens) and a.duration_s == b.duration_s)


def test_round_trip_reads_the_entry_back(tmp_path):
    csv = write_2024_csv(tmp_path / "week.csv", 3000)
    cache = tmp_path / "cache"
    first = cached_load(csv, directory=cache, min_bytes=0)
    assert same(first, load_trace(csv)) and first.name == "week"
    entry = entry_path(csv, cache)
    assert [p.name for p in cache.iterdir()] == [entry.name]  # written whole: no temporary left
    again = cached_load(csv, directory=cache, min_bytes=0)
    assert same(again, first) and again.source == str(csv.resolve())
    # the second load really reads the entry: an entry with other columns (same file version) wins
    with np.load(entry) as z:
        fields = dict(z)
    fields["input_tokens"] = fields["input_tokens"] + 1
    with entry.open("wb") as f:
        np.savez(f, **fields)
    assert np.array_equal(cached_load(csv, directory=cache, min_bytes=0).input_tokens, first.input_tokens + 1)


def test_a_changed_file_is_parsed_again_and_its_old_entry_removed(tmp_path):
    csv = write_2024_csv(tmp_path / "week.csv", 2000)
    cache = tmp_path / "cache"
    old = cached_load(csv, directory=cache, min_bytes=0)
    old_entry = entry_path(csv, cache)
    write_2024_csv(csv, 2500, seed=1)
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later version
    new = cached_load(csv, directory=cache, min_bytes=0)
    assert len(new) == 2500 and len(old) == 2000 and same(new, load_trace(csv))
    assert not old_entry.exists() and [p.name for p in cache.iterdir()] == [entry_path(csv, cache).name]


def test_unreadable_entry_or_unwritable_cache_falls_back_to_parsing(tmp_path):
    csv = write_2024_csv(tmp_path / "week.csv", 500)
    cache = tmp_path / "cache"
    cache.mkdir()
    entry_path(csv, cache).write_bytes(b"not an npz file")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        tr = cached_load(csv, directory=cache, min_bytes=0)
    assert same(tr, load_trace(csv))
    assert same(cached_load(csv, directory=cache, min_bytes=0), tr)  # re-written, read silently
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="not written"):
        tr = cached_load(csv, directory=blocker / "cache", min_bytes=0)
    assert same(tr, load_trace(csv))


def test_small_files_are_not_cached(tmp_path):
    csv = write_2024_csv(tmp_path / "small.csv", 100)
    cached_load(csv, directory=tmp_path / "cache")  # default threshold: 1 MiB
    assert not (tmp_path / "cache").exists()


def test_cache_lives_in_the_users_cache_never_in_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llm-cluster-gym"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored (XDG spec)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "llm-cluster-gym"
    package = TRACES_DIR.parents[1]
    assert package not in cache_root().parents


def test_resolve_trace_goes_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    csv = write_2024_csv(tmp_path / "big.csv", 26_000)  # over 1 MiB
    assert csv.stat().st_size >= trace_cache.CACHE_MIN_BYTES
    tr = resolve_trace(str(csv))
    entries = list((tmp_path / "xdg" / "llm-cluster-gym" / "traces").glob("*.npz"))
    assert len(entries) == 1 and same(tr, load_trace(csv))
    assert resolve_trace(str(csv)) is tr  # once per process
