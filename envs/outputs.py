"""Output folders and files that are complete or absent: never half-written, never mixed.

Every command that writes a folder (``simulate``, ``compare``, ``evaluate``/``main``,
``sweep``) writes it through `staged_folder`: the run writes into a hidden sibling
``.<name>.incomplete-<pid>-<id>`` and only when everything is written is that folder renamed
into place, replacing the previous run's folder as a whole. So

* a run that raises leaves the previous folder exactly as it was (its staging folder is
  removed); a run killed outright leaves only the hidden ``.incomplete`` folder, which says
  what it is and is cleared by the next run into the same place;
* a new run's files are never mixed with an old run's: the old folder is replaced, not
  written into;
* a finished folder carries `MANIFEST` (the command, the date and every file it holds).

To protect folders that are not ours, an existing target is replaced only when it is empty,
holds `MANIFEST`, or is a report folder written before manifests existed (only ``.md``,
``.json``, ``.png`` and ``.csv`` files, with a ``report.md`` or ``sweep.md``); anything else
is refused with `OutputFolderError` (a user error) before any work starts, see
`check_output_folder`. Single files (a recording, a plot) go through `staged_file` or
`write_file_atomic`: a temporary name in the same folder renamed over the target.

`safe_name` turns a scenario or policy name into one path component, so a default folder
derived from a name (``reports/sim-<scenario>``) stays inside its parent whatever the name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

MANIFEST = ".llm-cluster-output.json"
"""File a finished output folder holds (written last, just before the folder is renamed into place)."""

LEGACY_SUFFIXES = frozenset({".md", ".json", ".png", ".csv"})
"""What a report folder of an earlier version holds (such a folder may be replaced)."""

LEGACY_MARKERS = ("report.md", "sweep.md")
"""A folder without `MANIFEST` is an earlier report when it (or a subfolder) holds one of these."""

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>incomplete|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class OutputFolderError(ValueError):
    """An output path cannot be written safely (a file, or a folder holding someone else's files)."""


def safe_name(text: str, default: str = "unnamed", max_len: int = 80) -> str:
    """`text` as one harmless path component: letters, digits, ``._-`` (others become ``_``).

    Leading and trailing dots and underscores are dropped (no ``..``, no hidden names), so the
    result never leaves the folder it is joined to; an empty result is `default`.
    """
    name = _UNSAFE.sub("_", text)[:max_len].strip("_.")
    return name or default


def _is_previous_output(path: Path) -> bool:
    """Whether a non-empty folder holds a finished run's output (ours to replace)."""
    if (path / MANIFEST).is_file():
        return True
    files = [p for p in path.rglob("*") if not p.is_dir()]
    if any(p.is_symlink() or p.suffix not in LEGACY_SUFFIXES for p in files):
        return False
    return any(p.name in LEGACY_MARKERS and len(p.relative_to(path).parts) <= 2 for p in files)


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Check that `path` can take a run's output folder; return it.

    Fine: a path that does not exist yet, an empty folder, or a previous run's output folder
    (see the module docstring), which the new run will replace as a whole.

    Raises:
        OutputFolderError: `path` is a file, or a folder holding files no run of this project
            wrote (naming the option and the path).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputFolderError(f"{option} {str(p)!r} is a file, not a folder")
    if p.is_dir() and any(p.iterdir()) and not _is_previous_output(p):
        raise OutputFolderError(
            f"{option} {str(p)!r} already holds files that no llm-cluster run wrote (no {MANIFEST}); "
            "give a new or empty folder")
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _clear_leftovers(target: Path) -> None:
    """Remove staging folders of `target` left by runs that were killed (their process is gone)."""
    parent = target.parent
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        m = _STAGING.match(p.name)
        if m and m["name"] == target.name and p.is_dir() and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _staging_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    The file is created with ``open(..., "xb")``, so it honours the umask like any other output.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same name at its end, so same suffixes) renamed over it on success.

    On an exception the temporary file is removed and `path`, if it existed, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{path}: the writer produced no file")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(path: str | Path, command: str = "", option: str = "--out") -> Iterator[Path]:
    """Write a run's output folder all at once: yields an empty staging folder to write into.

    When the block ends normally, `MANIFEST` is written into the staging folder and the folder
    is renamed to `path`, replacing the previous run's folder (moved aside, then deleted). When
    the block raises, the staging folder is deleted and `path` is left as it was.

    Args:
        path: The output folder.
        command: The command line, recorded in the manifest.
        option: The option that named `path` (for error messages).

    Raises:
        OutputFolderError: `path` cannot be replaced (see `check_output_folder`).
    """
    target = check_output_folder(path, option)
    # Resolve a symlinked target to the folder it names: write where the user pointed.
    target = target.resolve() if target.is_symlink() else target
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    stage = _staging_path(target, "incomplete")
    stage.mkdir()
    try:
        yield stage
        files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        manifest = {"written_by": "llm-cluster-gym", "command": command,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": files}
        write_file_atomic(stage / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        check_output_folder(target, option)  # still ours (nobody filled it meanwhile)
        swap_folder(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def swap_folder(stage: Path, target: Path) -> None:
    """Rename the finished folder `stage` to `target`; a previous `target` is moved aside, then deleted.

    `stage` must be a sibling of `target` (same file system). If the rename fails, the previous
    `target` is put back.
    """
    old = None
    if target.exists():
        old = _staging_path(target, "old")
        target.rename(old)
    try:
        stage.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)  # put the previous run's folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
