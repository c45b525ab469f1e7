"""The backend protocol is the only door to a backend: an AST scan of the package.

Outside a backend's own package (``envs/sim/`` for SimCluster, ``envs/real/`` for
RealCluster; the report writer in ``envs/sim/`` consumes any backend and is scanned too) no
module may read a private attribute of a backend object or of ``env.backend``, read a public
attribute the `ClusterBackend` protocol does not have (``env.unwrapped.backend.trace``), or
use getattr/hasattr/setattr on a backend. A backend object is recognized by its name: a
variable named ``backend`` (or ``*_backend``), an attribute ``.backend`` (``env.backend``,
``self.backend``), or ``getattr(x, "backend")``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from llm_cluster_gym.envs.backend import ClusterBackend

PACKAGES = ("llm_cluster_gym", "llm_cluster_gym.envs", "llm_cluster_gym.agents",
            "llm_cluster_gym.controllers", "llm_cluster_gym.scripts")
BACKEND_PACKAGES = ("llm_cluster_gym.envs.sim", "llm_cluster_gym.envs.real")
CONSUMERS_IN_BACKEND_PACKAGES = ("report.py",)
"""Modules of a backend package that consume any backend (scanned like the rest)."""
REFLECTION = ("getattr", "hasattr", "setattr", "delattr")


def protocol_members() -> frozenset[str]:
    """Public attributes and methods of the ClusterBackend protocol."""
    names = {n for n in vars(ClusterBackend) if not n.startswith("_")}
    return frozenset(names | set(ClusterBackend.__annotations__))


def _is_backend(node: ast.AST) -> bool:
    """True for an expression that names a backend object."""
    if isinstance(node, ast.Name):
        return node.id == "backend" or node.id.endswith("_backend")
    if isinstance(node, ast.Attribute):
        return node.attr == "backend"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        return (len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "backend")
    return False


def violations(source: str, filename: str = "<string>") -> list[str]:
    """Every reach into a backend past the protocol in `source`, as ``file:line: what``."""
    allowed = protocol_members()
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and _is_backend(node.value):
            if node.attr.startswith("_"):
                out.append(f"{filename}:{node.lineno}: private attribute .{node.attr} of a backend")
            elif node.attr not in allowed:
                out.append(f"{filename}:{node.lineno}: .{node.attr} is not in the backend protocol")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in REFLECTION and node.args and _is_backend(node.args[0])):
            out.append(f"{filename}:{node.lineno}: {node.func.id}() on a backend")
    return out


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def package_modules() -> list[Path]:
    """Every module of the package outside the backends' own packages."""
    skip = [_package_dir(p) for p in BACKEND_PACKAGES]
    files: set[Path] = set()
    for pkg in PACKAGES:
        for f in _package_dir(pkg).rglob("*.py"):
            inside = any(f.is_relative_to(s) for s in skip)
            if not inside or f.name in CONSUMERS_IN_BACKEND_PACKAGES:
                files.add(f.resolve())
    return sorted(files)


@pytest.mark.parametrize("snippet", [
    "workers = backend._workers",
    "trace = env.unwrapped.backend.trace",
    "scenario = getattr(backend, 'scenario', None)",
    "inner = getattr(env.backend, 'inner', env.backend)",
    "ok = hasattr(self.backend, 'trace')",
    "s = getattr(getattr(base, 'backend', None), 'scenario', None)",
    "n = self.backend.inner.config",
    "x = real_backend._rng",
])
def test_scan_catches_reaches_past_the_protocol(snippet: str) -> None:
    assert violations(snippet)


@pytest.mark.parametrize("snippet", [
    "d = env.unwrapped.backend.describe()",
    "tel = base.backend.telemetry",
    "backend.apply(action); m = backend.advance(); done = backend.done",
    "lay = self.backend.layout; h = env.backend.tick_history(); env.backend.close()",
    "env = ClusterEnv(task='energy', backend=backend)",
])
def test_scan_allows_the_protocol(snippet: str) -> None:
    assert violations(snippet) == []


def test_scan_covers_the_package() -> None:
    files = package_modules()
    names = {f.name for f in files}
    assert {"cluster_env.py", "rollout.py", "context.py", "oracle.py", "loop.py", "deploy.py",
            "train.py", "report.py", "checkpoint.py", "policies.py"} <= names
    assert not any(f.name == "cluster.py" and f.parent.name in ("sim", "real") for f in files)


def test_no_module_reaches_past_the_backend_protocol() -> None:
    found = [v for f in package_modules() for v in violations(f.read_text(), str(f))]
    assert not found, "\n".join(found)
