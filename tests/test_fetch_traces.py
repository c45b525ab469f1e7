"""`llm-cluster fetch-traces` against a local HTTP server serving files in the 2024 format."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.envs.sim.trace_cache import entry_path, trace_cache_dir
from llm_cluster_gym.envs.sim.workload import load_trace, resolve_trace
from llm_cluster_gym.scripts import cli
from llm_cluster_gym.scripts.fetch_traces import FILES, SUMS

CONV = FILES["conv"]


def week_csv(rows: int, seed: int = 0) -> bytes:
    """A small trace in the 2024 week-long format (tz-aware UTC timestamps, as upstream)."""
    rng = np.random.default_rng(seed)
    t_us = np.cumsum(rng.integers(1, 400_000, size=rows))
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for us, i, o in zip(t_us, rng.integers(1, 8000, rows), rng.integers(1, 900, rows), strict=True):
        s, frac = divmod(int(us), 1_000_000)
        lines.append(f"2024-05-12 {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{frac:06d}+00:00,{i},{o}")
    return ("\n".join(lines) + "\n").encode()


class Server:
    """A local HTTP server with byte ranges (none: ranges=False; wrong ones: "wrong"), logging each Range."""

    def __init__(self, files: dict[str, bytes], ranges: bool | str = True) -> None:
        self.files, self.ranges, self.requests = files, ranges, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = outer.files.get(self.path.rsplit("/", 1)[-1])
                outer.requests.append((self.path, self.headers.get("Range")))
                if body is None:
                    self.send_error(404)
                    return
                asked = self.headers.get("Range")
                if asked and outer.ranges:
                    start = int(asked.removeprefix("bytes=").split("-")[0])
                    start -= 10 if outer.ranges == "wrong" else 0  # a server answering another range
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/azurellminfererencetrace"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


@pytest.fixture
def body():
    return week_csv(3000)


@pytest.fixture
def server(body):
    srv = Server({CONV: body})
    yield srv
    srv.close()


def fetch(server, dest, *extra):
    return cli.main(["fetch-traces", "--which", "conv", "--url", server.url, "--dest", str(dest), *extra])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-cluster fetch-traces: error:"), lines
    return lines[0]


def test_download_records_the_checksum_and_fills_the_trace_cache(tmp_path, cache, server, body, capsys):
    dest = tmp_path / "traces"
    assert fetch(server, dest) == 0
    final = dest / CONV
    assert final.read_bytes() == body and not (dest / (CONV + ".part")).exists()
    assert (dest / SUMS).read_text() == f"{hashlib.sha256(body).hexdigest()}  {CONV}\n"
    assert server.requests == [(f"/azurellminfererencetrace/{CONV}", None)]
    entry = entry_path(final, trace_cache_dir())
    assert entry.is_file()  # converted once, into the user's cache
    assert "3,000 requests" in capsys.readouterr().out
    # run again: verified against the record, nothing downloaded
    assert fetch(server, dest) == 0 and len(server.requests) == 1
    # a scenario names the fetched 2024 file by path
    tr = resolve_trace(str(final))
    assert len(tr) == 3000 and np.array_equal(tr.arrival_s, load_trace(final).arrival_s)
    sc = load_scenario("small")
    sc = sc.with_overrides(workload=dataclasses.replace(sc.workload, trace=str(final)))
    assert sc.workload.trace == str(final)


@pytest.mark.parametrize("ranges", [True, False])
def test_a_partial_download_is_resumed(tmp_path, cache, body, ranges):
    srv = Server({CONV: body}, ranges=ranges)
    try:
        dest = tmp_path / "traces"
        dest.mkdir()
        (dest / (CONV + ".part")).write_bytes(body[: len(body) * 2 // 5])
        assert fetch(srv, dest, "--no-convert") == 0
    finally:
        srv.close()
    assert (dest / CONV).read_bytes() == body
    assert srv.requests == [(f"/azurellminfererencetrace/{CONV}", f"bytes={len(body) * 2 // 5}-")]
    # a part already holding the whole file: the server says so (416) and it is kept
    (dest / CONV).rename(dest / (CONV + ".part"))
    (dest / SUMS).unlink()
    srv = Server({CONV: body})
    try:
        assert fetch(srv, dest, "--no-convert") == 0
    finally:
        srv.close()
    assert (dest / CONV).read_bytes() == body


def test_a_server_answering_another_range_is_refused(tmp_path, cache, body, capsys):
    srv = Server({CONV: body}, ranges="wrong")
    try:
        dest = tmp_path / "traces"
        dest.mkdir()
        (dest / (CONV + ".part")).write_bytes(body[:1000])
        assert fetch(srv, dest, "--no-convert") == 2
    finally:
        srv.close()
    assert "instead of 1000-" in one_error_line(capsys)
    assert (dest / (CONV + ".part")).read_bytes() == body[:1000] and not (dest / CONV).exists()


def test_checksum_mismatch_exits_2_with_one_line(tmp_path, cache, server, body, capsys):
    dest = tmp_path / "traces"
    dest.mkdir()
    (dest / SUMS).write_text(f"{'0' * 64}  {CONV}\n")  # pinned in advance (a mirror's sums)
    assert fetch(server, dest) == 2
    line = one_error_line(capsys)
    assert "does not match" in line and "0" * 64 in line
    assert not (dest / CONV).exists() and not (dest / (CONV + ".part")).exists()
    # a file changed after its sum was recorded
    (dest / SUMS).unlink()
    assert fetch(server, dest, "--no-convert") == 0
    (dest / CONV).write_bytes(body.replace(b"2024-05-12 00", b"2024-05-12 01", 1))
    capsys.readouterr()
    assert fetch(server, dest, "--no-convert") == 2
    assert "delete the file" in one_error_line(capsys)


def test_unreachable_server_exits_2_with_one_line(tmp_path, cache, capsys):
    srv = Server({})
    url = srv.url
    srv.close()  # nothing listens there any more
    code = cli.main(["fetch-traces", "--which", "conv", "--url", url, "--dest", str(tmp_path),
                     "--timeout-s", "5"])
    assert code == 2 and "cannot download" in one_error_line(capsys)
    missing = Server({})
    try:
        assert fetch(missing, tmp_path) == 2 and "HTTP 404" in one_error_line(capsys)
    finally:
        missing.close()


@pytest.mark.parametrize("argv", [["--which"], ["--url", "ftp://x"], ["--timeout-s", "0"]])
def test_bad_options_exit_2(argv, capsys):
    assert cli.main(["fetch-traces", *argv]) == 2
    one_error_line(capsys)
