"""Golden rollouts: every registered id and every rule-based controller, bit for bit.

The digests in `tests/golden/rollouts.json` were recorded by `tests/golden/record.py`; a change
meant to keep behaviour (a refactor) must keep each one. A change meant to alter behaviour
records them again and says why in its commit. Both record and check on the CPU code paths of
`golden/canonical_cpu.py` (set by `conftest.py` before numpy loads), so that the digests do not
depend on the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).with_name("golden")
sys.path.insert(0, str(GOLDEN_DIR))
import canonical_cpu  # noqa: E402
import golden_digests  # noqa: E402

EXPECTED = json.loads((GOLDEN_DIR / "rollouts.json").read_text())
ENV_KEYS = sorted(k for k in EXPECTED if k.startswith("env:"))
CONTROLLER_KEYS = sorted(k for k in EXPECTED if k.startswith("controller:"))
FIXED_KEYS = sorted(k for k in EXPECTED if k.startswith("fixed:"))
ENGINE_KEYS = sorted(k for k in EXPECTED if k.startswith("engine:"))


def test_numpy_runs_on_the_canonical_cpu_paths():
    """The digests hold on every x86-64 CPU only on these paths (`canonical_cpu` says why)."""
    import numpy  # noqa: F401  (the check reads the loaded numpy's dispatch)

    assert canonical_cpu.check() is None


def test_golden_covers_every_registered_id():
    import llm_cluster_gym

    assert {k.removeprefix("env:") for k in ENV_KEYS} == set(llm_cluster_gym.TASK_IDS)


@pytest.mark.parametrize("key", ENV_KEYS)
def test_env_rollout_is_bit_identical(key):
    assert golden_digests.env_digest(key.removeprefix("env:")) == EXPECTED[key]


@pytest.mark.parametrize("key", CONTROLLER_KEYS)
@pytest.mark.slow
def test_controller_rollout_is_bit_identical(key):
    _, task, scenario, name = key.split(":", 3)
    assert golden_digests.controller_digest(task, scenario, name) == EXPECTED[key]


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_fixed_configuration_rollout_is_bit_identical(key):
    _, scenario, serving = key.split(":")
    assert golden_digests.fixed_digest(scenario, serving) == EXPECTED[key]


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_request_engine_under_kv_pressure_is_bit_identical(key):
    assert golden_digests.engine_digest(key.removeprefix("engine:")) == EXPECTED[key]
