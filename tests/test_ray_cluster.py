"""Ray as the README runs it: a local Ray on loopback with a private token, and the multi-node recipe.

The multi-node test runs the README's recipe on this one machine: ``ray start --head``, a second
node with ``ray start --address``, a sweep submitted with ``--address``, then both nodes
stopped; token authentication stays on throughout. Each node is a ``ray start --block``
process of its own with its own ``--temp-dir`` and ports, stopped by signalling that process
(which stops exactly its node, as ``ray stop`` does on a machine that runs nothing else: here
``ray stop`` would also stop every other Ray on the machine, such as the test session's own).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llm_cluster_gym.agents.ray_setup import private_token_file
from llm_cluster_gym.agents.sweep import SweepSpec, expand_grid, run_sweep

RAY = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
linux_only = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _ip(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # little-endian 32-bit words
    return socket.inet_ntop(socket.AF_INET6, words)


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of these processes (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                addr, port = f[1].split(":")
                out.append((_ip(addr), int(port, 16), inodes[f[9]]))
    return out


def cluster_pids(gcs_address: str) -> set[int]:
    """The processes of the Ray cluster at `gcs_address` (GCS, raylets, agents, workers).

    Those naming the address, and every process naming their session (the GCS names only that).
    """
    cmds = {pid: _cmdline(pid) for pid in _pids()}
    sessions = {m for cmd in cmds.values() if gcs_address in cmd
                for m in re.findall(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+_\d+", cmd)}
    return {pid for pid, cmd in cmds.items()
            if gcs_address in cmd or any(s in cmd for s in sessions)}


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from the parent ids in /proc/<pid>/stat)."""
    parent: dict[int, int] = {}
    for p in _pids():
        try:
            parent[p] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@linux_only
@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(ray_local):
    gcs = ray_local.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), gcs
    pids = cluster_pids(gcs)
    assert {"gcs_server", "raylet"} <= {Path(_cmdline(p).split(" ")[0]).name for p in pids}
    socks = listening(pids)
    assert len(socks) >= 3 and all(ip in LOOPBACK for ip, _, _ in socks), socks


def test_token_file_is_created_private_and_tightened(tmp_path, monkeypatch):
    token = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert private_token_file(create=False) == token and not token.exists()  # joining: never made
    assert private_token_file(create=True) == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    before = token.read_text()
    token.chmod(0o644)  # as Ray itself writes it under the usual umask
    assert private_token_file(create=True) == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == before
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)  # a token in the environment: no file
    assert private_token_file(create=True) is None
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert private_token_file(create=True) is None


@pytest.mark.slow
def test_unknown_names_fail_before_ray_starts(tmp_path):
    """A wrong scenario or policy name costs no Ray start (exit 2, one line, in a few seconds)."""
    for bad, what in ((["--scenarios", "no_such_scenario"], "no_such_scenario"),
                      (["--policies", "no_such_policy"], "no_such_policy")):
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "llm_cluster_gym", "sweep", *bad, "--out",
                              str(tmp_path / "out"), "--no-progress"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 2, out.stdout + out.stderr
        assert what in out.stderr and "Traceback" not in out.stderr
        assert "Ray:" not in out.stdout and not (tmp_path / "out").exists()
        assert time.monotonic() - t < 30
    # The library refuses the same names before starting Ray (a fresh process: no Ray yet).
    code = ("import ray\n"
            "from llm_cluster_gym.agents.sweep import Cell, SweepSpec, run_sweep\n"
            "for cell in (Cell('static', 'no_such_scenario', 0), Cell('no_such_policy', 'small', 0)):\n"
            "    try:\n"
            "        run_sweep([cell], SweepSpec(serving='aggregate'), progress=False)\n"
            "    except Exception as exc:\n"
            "        print(type(exc).__name__, ray.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[:2] == ["ScenarioError False", "PolicySpecError False"], (
        out.stdout + out.stderr)


class Node:
    """One ``ray start --block`` node in its own temp dir; stopping it stops exactly its processes."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.fh = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args],
                                     stdout=self.fh, stderr=subprocess.STDOUT, env=env)

    def wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.25)
        raise AssertionError(f"ray start did not finish in {timeout_s} s:\n{self.log.read_text()}")

    def processes(self) -> set[int]:
        return descendants(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fh.close()


@linux_only
@pytest.mark.integration
@pytest.mark.skipif(not RAY.exists(), reason="the ray command is not installed (extra [ray])")
def test_readme_multi_node_recipe_equals_the_local_sweep(ray_local):
    spec = SweepSpec(task="energy", serving="aggregate", warmup=4)
    cells = expand_grid(["static", "dynamo"], ["small"], [0])
    # A short temp dir: Ray's unix socket paths must stay under 108 characters.
    tmp = Path(tempfile.mkdtemp(prefix="llmgym-ray-"))
    token = tmp / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = worker = None
    try:
        head = Node(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                     "--include-dashboard=false", f"--temp-dir={tmp / 'head'}",
                     f"--ray-client-server-port={free_port()}",
                     f"--dashboard-agent-listen-port={free_port()}",
                     f"--metrics-export-port={free_port()}"], env, tmp / "head.log")
        head.wait_started(90)
        worker = Node([f"--address={address}", "--num-cpus=1", f"--temp-dir={tmp / 'worker'}",
                       f"--dashboard-agent-listen-port={free_port()}",
                       f"--metrics-export-port={free_port()}"], env, tmp / "worker.log")
        worker.wait_started(90)
        # Token authentication is on: a client with a wrong token is refused.
        bad = subprocess.run([str(RAY), "status", f"--address={address}"],
                             env={**env, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0 and "InvalidAuthToken" in bad.stdout + bad.stderr
        out_dir = tmp / "sweep"
        run = subprocess.run(
            [sys.executable, "-m", "llm_cluster_gym", "sweep", "--address", address,
             "--policies", "static", "dynamo", "--scenarios", "small", "--seeds", "0",
             "--serving", "aggregate", "--warmup", "4", "--reports", "none",
             "--out", str(out_dir), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Ray: 2 CPUs, 2 node(s)" in run.stdout, run.stdout
        nodes = head.processes() | worker.processes()
    finally:
        for node in (worker, head):
            if node is not None:
                node.stop()
    # Both nodes stopped, with every process they started; nothing written to /tmp/ray.
    time.sleep(1)
    assert len(nodes) >= 4 and not [p for p in nodes if alive(p)]
    assert (tmp / "head" / "ray_current_cluster").exists()
    # The cluster's results equal the local sweep's.
    cluster = {(c["policy"], c["seed"]): c["summary"]
               for c in json.loads((out_dir / "sweep.json").read_text())["cells"]}
    local = run_sweep(cells, spec, progress=False)
    assert not local.failures and len(cluster) == len(cells)
    for r in local.results:
        got = cluster[(r.cell.policy, r.cell.seed)]
        assert got.keys() == r.summary.keys()
        for k, v in r.summary.items():
            assert (got[k] is None and not math.isfinite(v)) or got[k] == v, (r.cell.name, k)
    shutil.rmtree(tmp, ignore_errors=True)
