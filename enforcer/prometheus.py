"""Serving a Prometheus registry over HTTP, for the components that expose /metrics
(sensor, stream): one place for the start/stop dance around prometheus_client."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

__all__ = ["serve_registry"]


def serve_registry(
    registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"
) -> tuple[int, Callable[[], None]]:
    """Serve `registry` at http://addr:port/metrics (port 0 picks a free one); returns the port
    and a function that stops the server."""
    server, thread = start_http_server(port, addr, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return int(server.server_port), stop
