"""A columnar on-disk cache of parsed trace files, so that a CSV is parsed once per version.

Parsing the 2024 week-long CSVs takes tens of seconds (27.3M rows for the conversation week);
reading their three columns back from an uncompressed ``.npz`` (437 MB) took 1.4 s here.
Entries live in the user's cache folder (``$XDG_CACHE_HOME/llm-cluster-gym/traces``, else
``~/.cache/llm-cluster-gym/traces``), never inside the package. An entry is keyed by the
file's resolved path, size and modification time (ns): a changed file gets a new entry and
the old one of the same path is removed. Entries are written to a temporary file in the same
folder and renamed into place, so a reader never sees half an entry. A cache that cannot be
written (read-only home) or an entry that cannot be read is skipped with a warning: the
trace is then parsed as without a cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from llm_cluster_gym.envs.sim.workload import Trace, load_trace

__all__ = ["CACHE_MIN_BYTES", "cache_root", "cached_load", "entry_path", "trace_cache_dir"]

CACHE_FORMAT = 1
"""Version of the entry layout; an entry of another version is re-made."""

CACHE_MIN_BYTES = 1 << 20
"""Files smaller than this are parsed each time (a parse takes milliseconds)."""


def cache_root() -> Path:
    """The project's folder in the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "llm-cluster-gym"


def trace_cache_dir() -> Path:
    """Where parsed traces are cached (``cache_root() / "traces"``)."""
    return cache_root() / "traces"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_path(path: Path, directory: Path | None = None) -> Path:
    """The cache entry of the current version (size, modification time) of ``path``."""
    path = Path(path).resolve()
    st = path.stat()
    folder = trace_cache_dir() if directory is None else Path(directory)
    return folder / f"{_digest(str(path))}-{_digest(f'{st.st_size}:{st.st_mtime_ns}')}.npz"


def _read(entry: Path, path: Path, size: int, mtime_ns: int) -> Trace | None:
    """The cached trace, or None if the entry is missing or belongs to another file version."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as z:
            meta = (int(z["format"]), str(z["path"]), int(z["size"]), int(z["mtime_ns"]))
            if meta != (CACHE_FORMAT, str(path), size, mtime_ns):
                return None
            return Trace(arrival_s=z["arrival_s"], input_tokens=z["input_tokens"],
                         output_tokens=z["output_tokens"], duration_s=float(z["duration_s"]),
                         name=str(z["name"]), source=str(path))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        warnings.warn(f"trace cache entry {entry} unreadable ({exc}); parsing {path}",
                      RuntimeWarning, stacklevel=3)
        return None


def _write(entry: Path, trace: Trace, path: Path, size: int, mtime_ns: int) -> None:
    """Write ``entry`` atomically (temporary file, then rename) and drop the path's old entries."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=entry.stem + ".", suffix=".tmp", dir=entry.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, format=CACHE_FORMAT, path=str(path), size=size, mtime_ns=mtime_ns,
                     name=trace.name, duration_s=trace.duration_s, arrival_s=trace.arrival_s,
                     input_tokens=trace.input_tokens, output_tokens=trace.output_tokens)
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    prefix = entry.name.split("-", 1)[0] + "-"
    for old in entry.parent.glob(prefix + "*.npz"):
        if old != entry:
            old.unlink(missing_ok=True)


def cached_load(path: str | Path, *, directory: Path | None = None,
                min_bytes: int = CACHE_MIN_BYTES) -> Trace:
    """`load_trace` through the on-disk cache.

    Args:
        path: The CSV trace file.
        directory: Cache folder (default: :func:`trace_cache_dir`).
        min_bytes: Files smaller than this are parsed without the cache.

    Raises:
        TraceError: As `load_trace` (missing or malformed file).
    """
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError:
        return load_trace(path)  # raises the TraceError naming the file
    if st.st_size < min_bytes or not path.is_file():
        return load_trace(path)
    entry = entry_path(path, directory)
    trace = _read(entry, path, st.st_size, st.st_mtime_ns)
    if trace is not None:
        return trace
    trace = load_trace(path)
    try:
        _write(entry, trace, path, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        warnings.warn(f"trace cache not written ({exc}); {path} will be parsed again next time",
                      RuntimeWarning, stacklevel=2)
    return trace
