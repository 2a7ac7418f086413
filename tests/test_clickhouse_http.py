"""The HTTP endpoint over chdb as plain HTTP clients see it: curl, raw chunked and
compressed requests, per-request settings, and the one-process-per-directory rule."""

from __future__ import annotations

import gzip
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lz4.frame
import pytest
from conftest import ROOT, need_tool

from stream.chhttp import ChdbHttpServer
from stream.store.schema import MIGRATIONS

pytestmark = pytest.mark.clickhouse


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbHttpServer]:
    s = ChdbHttpServer(tmp_path_factory.mktemp("chhttp"), port=0).start()
    yield s
    s.stop()


def _request(
    server: ChdbHttpServer,
    method: str,
    target: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        headers = headers or {}
        chunked = headers.get("Transfer-Encoding") == "chunked"
        conn.request(method, target, body=body, headers=headers, encode_chunked=chunked)  # type: ignore[arg-type]
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_curl_query(server: ChdbHttpServer) -> None:
    curl = need_tool("curl")
    out = subprocess.run(
        [curl, "-sS", f"{server.url}/?query=SELECT+1"], capture_output=True, text=True, timeout=30
    )
    assert out.stdout == "1\n"
    body = subprocess.run(
        [curl, "-sS", f"{server.url}/", "--data-binary", "SELECT number, toString(number * 2) FROM numbers(3)"],  # noqa: E501
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert body.stdout == "0\t0\n1\t2\n2\t4\n"
    ping = subprocess.run([curl, "-sS", f"{server.url}/ping"], capture_output=True, text=True, timeout=30)
    assert ping.stdout == "Ok.\n"


def test_error_is_reported_like_clickhouse(server: ChdbHttpServer) -> None:
    status, headers, body = _request(server, "GET", "/?query=SELEC+1")
    assert status == 400
    assert headers["X-ClickHouse-Exception-Code"] == "62"
    assert body.startswith(b"Code: 62. DB::Exception: Syntax error")
    status, headers, _ = _request(server, "GET", "/?query=SELECT+*+FROM+nope")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "60")


def test_chunked_multi_frame_lz4_insert(server: ChdbHttpServer) -> None:
    _request(
        server,
        "POST",
        "/",
        b"CREATE TABLE IF NOT EXISTS t_csv (a UInt32, b String) ENGINE = MergeTree ORDER BY a",
    )
    rows = [f"{i},v{i}\n".encode() for i in range(3000)]
    # One LZ4 frame per chunk, as clickhouse-connect sends its blocks; split across chunk borders.
    frames = b"".join(lz4.frame.compress(b"".join(rows[i : i + 500])) for i in range(0, 3000, 500))
    chunks = [frames[i : i + 777] for i in range(0, len(frames), 777)]
    status, headers, body = _request(
        server, "POST", "/?query=INSERT+INTO+t_csv+FORMAT+CSV", iter(chunks),
        {"Transfer-Encoding": "chunked", "Content-Encoding": "lz4"},
    )  # fmt: skip
    assert status == 200, body
    assert '"written_rows":"3000"' in headers["X-ClickHouse-Summary"]
    _, _, out = _request(server, "GET", "/?query=SELECT+count(),+sum(a),+max(b)+FROM+t_csv")
    assert out == f"3000\t{sum(range(3000))}\tv999\n".encode()


def test_insert_statement_in_body(server: ChdbHttpServer) -> None:
    _request(
        server, "POST", "/", b"CREATE TABLE IF NOT EXISTS t_body (a UInt32) ENGINE = MergeTree ORDER BY a"
    )
    status, _, body = _request(server, "POST", "/", b"INSERT INTO t_body FORMAT TSV\n1\n2\n3\n")
    assert status == 200, body
    _, _, out = _request(server, "GET", "/?query=SELECT+groupArray(a)+FROM+t_body")
    assert out == b"[1,2,3]\n"


def test_settings_and_database_do_not_leak(server: ChdbHttpServer) -> None:
    _request(server, "POST", "/", b"CREATE DATABASE IF NOT EXISTS other")
    q = "SELECT+currentDatabase(),+getSetting('max_threads')"
    _, _, scoped = _request(server, "GET", f"/?database=other&max_threads=3&query={q}")
    assert scoped == b"other\t3\n"
    _, _, plain = _request(server, "GET", f"/?query={q}")
    assert plain.split(b"\t")[0] == b"default" and plain != b"default\t3\n"
    status, headers, _ = _request(server, "GET", "/?no_such_setting=1&query=SELECT+1")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (400, "115")


def test_query_parameters_and_compressed_response(server: ChdbHttpServer) -> None:
    status, headers, body = _request(
        server,
        "GET",
        "/?param_n=4&enable_http_compression=1&query=SELECT+sum(number)+FROM+numbers({n:UInt32})",
        headers={"Accept-Encoding": "gzip"},
    )  # fmt: skip
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"6\n"
    _, headers, body = _request(server, "GET", "/?default_format=JSONEachRow&query=SELECT+1+AS+x")
    assert (headers["X-ClickHouse-Format"], body) == ("JSONEachRow", b'{"x":1}\n')


def test_clickhouse_connect_http_client(server: ChdbHttpServer) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=server.url, compress="lz4")
    try:
        client.command(
            "CREATE TABLE IF NOT EXISTS t_cc (a UInt64, s LowCardinality(String)) "
            "ENGINE = MergeTree ORDER BY a"
        )
        client.insert("t_cc", [[i, f"s{i % 3}"] for i in range(10_000)], column_names=["a", "s"])
        assert client.query("SELECT count(), uniqExact(s) FROM t_cc").result_rows == [(10_000, 3)]
        assert client.query("SELECT a FROM t_cc WHERE a = {a:UInt64}", parameters={"a": 42}).result_rows == [
            (42,)
        ]
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _armorstream(*args: str) -> list[str]:
    return [sys.executable, "-c", "from armorstream.cli import main; main()", *args]


def test_serve_command_and_second_process(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        _armorstream("clickhouse", "serve", "--path", str(tmp_path), "--listen", f"127.0.0.1:{port}"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    assert r.read() == b"Ok.\n"
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "serve did not come up"
                time.sleep(0.2)
        url = (
            f"http://127.0.0.1:{port}/?database=armorstream&query=SELECT+max(version)+FROM+schema_migrations"
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read() == f"{MIGRATIONS[-1].version}\n".encode()
        # A second process on the same directory fails with a message, not a traceback.
        second = subprocess.run(
            _armorstream("clickhouse", "migrate", "--path", str(tmp_path)),
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1
        assert f"in use by pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
