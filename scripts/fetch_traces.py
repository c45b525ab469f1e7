r"""`llm-cluster fetch-traces`: download the Azure LLM inference 2024 week-long traces.

Usage::

    llm-cluster fetch-traces [--which code conv] [--dest DIR] [--url BASE] [--no-progress]

Downloads ``AzureLLMInferenceTrace_code_1week.csv`` (about 0.8 GB, 16.8M requests) and
``AzureLLMInferenceTrace_conv_1week.csv`` (about 1.3 GB, 27.3M requests) from the address the
dataset card (``envs/data/traces/AzureLLMInferenceDataset2024.md``) gives, into ``--dest``
(default: ``$XDG_CACHE_HOME/llm-cluster-gym/azure2024``, else ``~/.cache/...``).

* **Resumable**: bytes go to ``<file>.part``; a later run asks the server for the rest (HTTP
  ``Range``) and appends it, or starts over if the server ignores the range.
* **Checksummed**: upstream publishes no checksums, so the sha256 of each completed download
  is recorded in ``<dest>/SHA256SUMS`` (``sha256sum`` format) and verified on every later
  run; a download or a file that does not match a recorded sum is an error (exit status 2,
  one line; a mismatching download is deleted). To pin the sums in advance (a mirror), write
  ``SHA256SUMS`` into ``--dest`` first.
* **Converted once**: each file is parsed and its columns stored in the trace cache
  (``trace_cache``), so that a scenario naming the file by path
  (``workload.trace: ~/.cache/llm-cluster-gym/azure2024/AzureLLMInferenceTrace_conv_1week.csv``)
  reads its columns back (about 1.5 s) instead of parsing 27 million rows (about 40 s).

A network failure or a server error ends with one line (exit status 2); the partial file is
kept for the next run.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_cluster_gym.scripts.usage import UsageError, check_number

DEFAULT_URL = "https://azurepublicdatasettraces.blob.core.windows.net/azurellminfererencetrace"
"""Where the dataset card (AzureLLMInferenceDataset2024.md) links the two files."""

FILES = {"code": "AzureLLMInferenceTrace_code_1week.csv", "conv": "AzureLLMInferenceTrace_conv_1week.csv"}
"""The file of each service."""

SUMS = "SHA256SUMS"
"""Checksum file in the destination folder (``<hex>  <name>`` lines, as sha256sum writes)."""

_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")


class FetchError(RuntimeError):
    """A download failed, or a file does not match its recorded checksum (the message says which)."""


@dataclass
class FetchTracesArgs:
    """Download the 2024 week-long Azure traces (resumable, checksummed) and cache their columns."""

    which: tuple[Literal["code", "conv"], ...] = ("code", "conv")
    """Services whose week to fetch: code, conv or both."""
    dest: Path | None = None
    """Folder for the CSV files (default: $XDG_CACHE_HOME/llm-cluster-gym/azure2024 or ~/.cache/...)."""
    url: str = DEFAULT_URL
    """Base address of the files, each file name appended (a mirror, or a local test server)."""
    timeout_s: float = 60.0
    """Seconds to wait for the server before giving up (a later run resumes)."""
    no_convert: bool = False
    """Only download and check; do not parse the files into the trace cache."""
    no_progress: bool = False
    """Hide the progress bars."""

    def __post_init__(self) -> None:
        if not self.which:
            raise UsageError("--which needs at least one of code, conv")
        if not re.match(r"^https?://", self.url):
            raise UsageError(f"--url must start with http:// or https://, got {self.url!r}")
        check_number("--timeout-s", self.timeout_s, above=0)


def default_dest() -> Path:
    """Where the CSVs go by default: ``azure2024`` in the project's user cache folder."""
    from llm_cluster_gym.envs.sim.trace_cache import cache_root

    return cache_root() / "azure2024"


def sha256_of(path: Path, progress: bool) -> str:
    """The sha256 of a file, hex (read in 1 MiB chunks)."""
    from tqdm import tqdm

    h = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                    desc=f"sha256 {path.name}", disable=None if progress else True) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def read_sums(folder: Path) -> dict[str, str]:
    """File name -> recorded sha256 (hex, lower case) from ``folder/SHA256SUMS`` (none: empty)."""
    path = folder / SUMS
    if not path.is_file():
        return {}
    sums = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if not m:
            raise FetchError(f"{path}: line {n} is not '<sha256 hex>  <file name>': {line!r}")
        sums[m.group(2)] = m.group(1).lower()
    return sums


def record_sum(folder: Path, name: str, digest: str) -> None:
    """Add (or replace) ``name``'s line in ``SHA256SUMS``, written atomically."""
    sums = read_sums(folder)
    sums[name] = digest
    fd, tmp = tempfile.mkstemp(prefix=SUMS + ".", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{d}  {n}\n" for n, d in sorted(sums.items()))
    os.replace(tmp, folder / SUMS)


def download(url: str, part: Path, *, timeout_s: float, progress: bool) -> None:
    """Fetch ``url`` into ``part``, resuming from what ``part`` already holds.

    Raises:
        FetchError: Connection failure, an HTTP error, or fewer bytes than announced.
    """
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "llm-cluster-gym fetch-traces"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after what we hold: it may be the whole file
            m = _UNSATISFIED.fullmatch(exc.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == have:
                return
            part.unlink()  # longer than the file: start over
            return download(url, part, timeout_s=timeout_s, progress=progress)
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"{url}: cannot download ({reason}); run again to resume") from None
    with resp:
        total = resp.headers.get("Content-Length")
        total = int(total) if total is not None and total.isdigit() else None
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range") or "")
        if resp.status == 206:
            if not (have and m and int(m.group(1)) == have):
                raise FetchError(f"{url}: the server sent bytes {m.group(1) if m else '?'}- instead of "
                                 f"{have}- (delete {part} to start over)")
            mode = "ab"
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:  # the server sent the whole file: start over
            have, mode = 0, "wb"
        try:
            with part.open(mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                            desc=part.name.removesuffix(".part"),
                                            disable=None if progress else True) as bar:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"{url}: download interrupted ({exc}); run again to resume") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise FetchError(f"{url}: {size:,} of {total:,} bytes arrived; run again to resume")


def fetch_one(name: str, args: FetchTracesArgs, dest: Path) -> Path:
    """Download (or check) one file; returns its path. Raises `FetchError` on a checksum mismatch."""
    final = dest / name
    progress = not args.no_progress
    sums_path = dest / SUMS
    expected = read_sums(dest).get(name)
    if final.is_file():
        digest = sha256_of(final, progress)
        if expected is not None and digest != expected:
            raise FetchError(f"{final}: sha256 {digest} does not match {expected} recorded in {sums_path} "
                             f"(delete the file to download it again)")
        print(f"{final}: present, sha256 {digest}{' (matches SHA256SUMS)' if expected else ''}")
    else:
        part = final.with_name(name + ".part")
        url = args.url.rstrip("/") + "/" + name
        resume = f" (resuming at {part.stat().st_size:,} bytes)" if part.exists() else ""
        print(f"{url} -> {final}{resume}")
        download(url, part, timeout_s=args.timeout_s, progress=progress)
        digest = sha256_of(part, progress)
        if expected is not None and digest != expected:
            part.unlink()
            raise FetchError(f"{url}: sha256 {digest} of the download does not match {expected} recorded in "
                             f"{sums_path}; the download was deleted")
        os.replace(part, final)
        print(f"{final}: sha256 {digest}")
    if expected is None:
        record_sum(dest, name, digest)
        print(f"  recorded in {sums_path} (upstream publishes no checksums)")
    return final


def run(args: FetchTracesArgs, command: str = "llm-cluster fetch-traces") -> int:
    """Fetch, check and convert the chosen files; returns the exit status.

    Raises:
        FetchError: A failed download or a checksum mismatch (one line, exit status 2).
    """
    from llm_cluster_gym.envs.sim.trace_cache import cached_load

    dest = (args.dest if args.dest is not None else default_dest()).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--dest {dest}: cannot create the folder ({exc.strerror or exc})") from None
    for which in dict.fromkeys(args.which):
        path = fetch_one(FILES[which], args, dest)
        if not args.no_convert:
            print(f"  parsing {path.name} into the trace cache (once; tens of seconds for a week) ...")
            trace = cached_load(path, min_bytes=0)
            print(f"  {len(trace):,} requests over {trace.duration_s / 86400:.2f} days; scenarios name it as "
                  f"workload.trace: {path}")
    return 0
