"""Shared pytest fixtures, and the CPU code paths every test runs on (set before numpy loads)."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_name("golden")))
import canonical_cpu  # noqa: E402

canonical_cpu.apply()  # numpy and OpenBLAS read it at their first import (canonical_cpu says why)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole pytest run (its start-up takes several seconds).

    Started the project's way (`agents.sweep.init_ray`: on 127.0.0.1, not the host's network
    address). Two CPUs (the test machine has two cores), no dashboard, worker logs not
    forwarded. Token authentication stays on as in any local Ray: a token made for this run only
    is passed in the environment, so the user's ``~/.ray/auth_token`` is neither read nor written.
    """
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_MODE"] = "token"  # read when ray is first imported
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    pytest.importorskip("ray")
    from llm_cluster_gym.agents.sweep import init_ray

    ray = init_ray(num_cpus=2, include_dashboard=False, quiet=True)
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
