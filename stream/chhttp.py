"""ClickHouse's HTTP interface over the embedded chdb store.

chdb runs in one process per data directory, so this endpoint is how other processes,
clickhouse-connect's HTTP client, curl and Grafana reach an embedded store, and how tests
exercise the HTTP path a real server uses. It implements the part of the protocol those
clients use (https://clickhouse.com/docs/interfaces/http):

- `GET/POST /?query=...`, or the query as the POST body; `database`, `default_format`,
  `query_id`, `param_<name>` (server-side parameters); every other URL parameter is a
  setting, applied to this request only.
- INSERT ... FORMAT <fmt> with the data in the body, streamed into chdb as it arrives:
  chunked transfer encoding, Content-Encoding lz4 (clickhouse-connect sends one LZ4 frame
  per block), zstd, gzip, deflate.
- Response compression when `enable_http_compression=1` and Accept-Encoding allows it;
  X-ClickHouse-Summary/-Format/-Timezone/-Query-Id headers; errors as ClickHouse sends
  them (X-ClickHouse-Exception-Code and a "Code: N. DB::Exception: ..." body).
- `/ping` answers "Ok.".

Each request runs on its own chdb connection handle: USE and SET never leak into the next
request, which is what a ClickHouse server does for session-less HTTP. Sessions
(`session_id`) and authentication are not implemented: bind to loopback.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import chdb
import lz4.frame

from enforcer.errors import ArmorstreamError
from stream.store.client import lock_directory, unlock_directory

try:  # Python 3.14 has it in the standard library
    from compression import zstd
except ImportError:
    from backports import zstd

__all__ = ["ChdbHttpServer", "EndpointError"]

log = logging.getLogger(__name__)

# URL parameters the HTTP layer consumes; every other one is a ClickHouse setting.
TRANSPORT_PARAMS = frozenset(
    {
        "query", "database", "default_format", "query_id", "user", "password", "quota_key",
        "session_id", "session_timeout", "session_check", "compress", "decompress",
        "buffer_size", "wait_end_of_query", "client_protocol_version", "role",
        "enable_http_compression", "send_progress_in_http_headers",
        "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    }
)  # fmt: skip
READ_CHUNK = 1 << 20
_INSERT_RE = re.compile(
    rb"^\s*(?P<head>INSERT\s+INTO\s.*?)\s+FORMAT\s+(?P<fmt>\w+)(?=\s)[ \t]*(?:\r?\n)?", re.I | re.S
)
_TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.I)
_CODE_RE = re.compile(r"Code: (\d+)\.")
_HTTP_STATUS = {62: 400, 60: 404, 81: 404, 115: 400, 47: 400, 516: 403}  # by ClickHouse code


class EndpointError(ArmorstreamError):
    """The HTTP endpoint cannot start (address in use, data directory locked)."""


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


_DECOMPRESSORS: dict[str, Callable[[], _Decompressor]] = {
    "lz4": lz4.frame.LZ4FrameDecompressor,
    "zstd": zstd.ZstdDecompressor,
    "gzip": lambda: zlib.decompressobj(wbits=31),
    "deflate": lambda: zlib.decompressobj(wbits=15),
}
_COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": lz4.frame.compress,
    "zstd": zstd.compress,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
}


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _decompressed(chunks: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    """Decode a stream of concatenated frames (several LZ4/zstd frames, gzip members)."""
    factory = _DECOMPRESSORS.get(encoding)
    if factory is None:
        raise _HttpError(
            400, f"Code: 1. DB::Exception: Unsupported Content-Encoding {encoding!r}. (UNSUPPORTED_METHOD)", 1
        )
    d = factory()
    for chunk in chunks:
        data = chunk
        while data:
            out = d.decompress(data)
            if out:
                yield out
            if not d.eof:
                break
            data = d.unused_data
            d = factory()


@dataclass
class _Request:
    params: dict[str, str]
    body: Iterator[bytes]


def _error_text(e: BaseException) -> tuple[int, str]:
    text = str(e)
    i = text.find("Code: ")
    text = text[i:] if i >= 0 else f"Code: 1000. DB::Exception: {text}"
    m = _CODE_RE.search(text)
    return (int(m.group(1)) if m else 1000), text.strip()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Small responses must not wait for the peer's delayed ACK (~40 ms per request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = self.rfile.read(min(left, READ_CHUNK))
                if not data:
                    return
                left -= len(data)
                yield data

    def _handle(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/ping", "/replicas_status"):
            self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        if url.path != "/":
            self._send(404, f"There is no handle {url.path}\n".encode(), {})
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        # Like ClickHouse, a POST body is query text or data whatever its Content-Type
        # (curl --data-binary says x-www-form-urlencoded).
        content_type = self.headers.get("Content-Type", "")
        body = self._body()
        encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            if content_type.startswith("multipart/"):
                raise _HttpError(
                    400,
                    "Code: 48. DB::Exception: multipart requests (external data) "
                    "are not supported by the embedded endpoint. (NOT_IMPLEMENTED)",
                    48,
                )
            if encoding and encoding != "identity":
                body = _decompressed(body, encoding)
            if "query" not in params and self.command == "GET":
                self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
                return
            with self.server.slots:
                out, fmt, summary = self.server.execute(_Request(params, body))
        except Exception as e:  # every failure becomes a ClickHouse-style error response
            status, code, text = (
                (e.status, e.code, str(e)) if isinstance(e, _HttpError) else (0, *_error_text(e))
            )
            if not status:
                status = _HTTP_STATUS.get(code, 500)
            self.close_connection = True  # the request body may be partly unread
            self._send(
                status,
                (text + "\n").encode(),
                {
                    "X-ClickHouse-Exception-Code": str(code),
                    "X-ClickHouse-Query-Id": query_id,
                    "Content-Type": "text/plain; charset=UTF-8",
                },
            )
            return
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Timezone": self.server.timezone,
            "X-ClickHouse-Server-Display-Name": "armorstream-chdb",
            "X-ClickHouse-Summary": json.dumps(summary, separators=(",", ":")),
            "Content-Type": "text/plain; charset=UTF-8"
            if fmt.startswith(("TabSeparated", "TSV", "CSV", "JSON", "Pretty"))
            else "application/octet-stream",
        }
        if params.get("enable_http_compression") in ("1", "true") and out:
            accepted = [a.split(";")[0].strip() for a in self.headers.get("Accept-Encoding", "").split(",")]
            chosen = next((a for a in accepted if a in _COMPRESSORS), None)
            if chosen:
                out = _COMPRESSORS[chosen](out)
                headers["Content-Encoding"] = chosen
        self._send(200, out, headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], conn_str: str, max_concurrent: int) -> None:
        self.conn_str = conn_str
        self.slots = threading.BoundedSemaphore(max_concurrent)
        # One handle held for the server's lifetime keeps the engine up between requests.
        self.anchor = _chdb_connect(conn_str)
        self.timezone = str(self.anchor.query("SELECT timezone()", "TabSeparated").bytes().decode().strip())
        super().__init__(addr, _Handler)

    def execute(self, req: _Request) -> tuple[bytes, str, dict[str, str]]:
        params = req.params
        default_fmt = params.get("default_format") or "TabSeparated"
        query_params = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {
            k: v for k, v in params.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")
        }
        conn = _chdb_connect(self.conn_str)
        try:
            if params.get("database"):
                conn.query(f"USE `{params['database'].replace('`', '')}`", "TabSeparated")
            for k, v in settings.items():
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                    raise _HttpError(
                        400, f"Code: 115. DB::Exception: Unknown setting {k}. (UNKNOWN_SETTING)", 115
                    )
                conn.query(
                    f"SET {k} = '{v.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'",
                    "TabSeparated",
                )
            start = time.perf_counter_ns()
            query = params.get("query", "").encode()
            body = req.body
            head = query
            if not query:
                head, body = _split_head(body)
            # The lookahead needs a character after the format name.
            m = _INSERT_RE.match(head + b"\n" if query else head)
            if m:
                data_start = b"" if query else head[m.end() :]
                res = _stream_insert(
                    conn, m.group("head").decode(), m.group("fmt").decode(), data_start, body
                )
                written = str(res.rows_written)
                return b"", default_fmt, {
                    "read_rows": written, "read_bytes": str(res.bytes_written),
                    "written_rows": written, "written_bytes": str(res.bytes_written),
                    "total_rows_to_read": "0", "result_rows": "0", "result_bytes": "0",
                    "elapsed_ns": str(time.perf_counter_ns() - start),
                }  # fmt: skip
            rest = b"".join(body)
            sql = (head + (b"\n" + rest if rest else b"")).decode()
            fm = _TRAILING_FORMAT_RE.search(sql)
            fmt = fm.group(1) if fm else default_fmt
            result = conn.query(sql, fmt, params=query_params) if query_params else conn.query(sql, fmt)
            out = bytes(result.bytes() or b"")
            return out, fmt, {
                "read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read()),
                "written_rows": str(result.rows_written()), "written_bytes": str(result.bytes_written()),
                "total_rows_to_read": "0", "result_rows": "0", "result_bytes": str(len(out)),
                "elapsed_ns": str(time.perf_counter_ns() - start),
            }  # fmt: skip
        finally:
            conn.close()

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(Exception):
            self.anchor.close()


def _chdb_connect(conn_str: str) -> Any:
    return chdb.connect(conn_str)  # type: ignore[no-untyped-call]


def _split_head(body: Iterator[bytes]) -> tuple[bytes, Iterator[bytes]]:
    """Read a POST body until the query text is known: an INSERT's data may follow it."""
    head = b""
    for chunk in body:
        head += chunk
        if _INSERT_RE.match(head) or len(head) > 64 * READ_CHUNK:
            break
    return head, body


def _stream_insert(conn: Any, head: str, fmt: str, first: bytes, rest: Iterator[bytes]) -> Any:
    with conn.send_insert(head, fmt) as ins:
        if first:
            ins.append(first)
        for chunk in rest:
            ins.append(chunk)
        return ins.finish()


class ChdbHttpServer:
    """Serve an embedded store directory over ClickHouse's HTTP interface."""

    def __init__(
        self, path: Path, host: str = "127.0.0.1", port: int = 8123, *, max_concurrent: int = 8
    ) -> None:
        self.path = Path(path)
        self._lock_key = lock_directory(self.path)  # StoreLocked if another process has it
        try:
            self._server = _Server((host, port), str(self._lock_key), max_concurrent)
        except OSError as e:
            unlock_directory(self._lock_key)
            raise EndpointError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        except RuntimeError as e:
            unlock_directory(self._lock_key)
            raise EndpointError(f"cannot open chdb at {self.path}: {e}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> ChdbHttpServer:
        """Serve from a background thread (tests, or a worker that also writes)."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="chhttp", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        unlock_directory(self._lock_key)

    def __enter__(self) -> ChdbHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
