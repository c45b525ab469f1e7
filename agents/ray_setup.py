"""How this project starts or joins Ray safely: loopback for a local cluster, a private token file.

Two Ray defaults are unsafe for a one-machine run:

* a local cluster (``ray.init()`` without an address) takes the host's network address as its
  node address and its servers listen on every interface. Ray binds 127.0.0.1 only when it
  treats the machine as unable to host a multi-node cluster (its
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch, read at import into
  ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``); :func:`loopback_only` sets that switch
  around the start of a *local* cluster, for this process and the processes Ray starts. A
  cluster that other machines join cannot be loopback-only: ``ray start`` nodes bind the
  network, and token authentication is what guards them.
* with token authentication on (Ray's default for a new local cluster) Ray writes a new token
  to ``~/.ray/auth_token`` with the process umask, usually world-readable.
  :func:`private_token_file` creates that file first, readable by its owner only, or tightens
  the owner's existing file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLUSTERS_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch; ``0`` makes a local cluster's node address 127.0.0.1 (its servers bind it)."""


def token_path() -> Path | None:
    """The token file Ray reads, or None when the token comes from the environment or auth is off."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"


def private_token_file(create: bool) -> Path | None:
    """Make the token file Ray will read private (0600); create it when asked and missing.

    Args:
        create: Write a new token (``secrets.token_hex(32)``, as Ray makes them) when the file
            does not exist: a local start, where Ray would otherwise write it world-readable.
            Joining a cluster never creates one (its token must come from the head).

    Returns:
        The file, or None when Ray reads no file (token in ``RAY_AUTH_TOKEN``, or auth disabled).
    """
    path = token_path()
    if path is None:
        return None
    if path.exists():
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
        return path
    if create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within this block a new local Ray cluster takes 127.0.0.1 as its address and binds it.

    Sets Ray's multi-node switch off for this process (the imported constant) and for the
    processes Ray starts (the environment), and restores both afterwards.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(CLUSTERS_SWITCH)
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[CLUSTERS_SWITCH] = "0"
    if saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(CLUSTERS_SWITCH, None)
        else:
            os.environ[CLUSTERS_SWITCH] = saved_env
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved


def local_node_address(ray: Any) -> str:
    """The node address of the initialized Ray (``127.0.0.1`` for a local start here)."""
    return str(ray.get_runtime_context().gcs_address).rsplit(":", 1)[0]
