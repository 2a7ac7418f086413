"""Prometheus /metrics for the components that expose it (sensor, stream, controller): a
collector in its own registry, served over HTTP. Subclasses set their attributes, then call
`ServedCollector.__init__` (registering runs `collect` once), and implement `collect`."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

__all__ = ["ServedCollector", "serve_registry"]


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


class ServedCollector(Collector):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.port: int | None = None  # set by serve()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Callable[[], None]:
        """Expose /metrics over HTTP (port 0 picks a free one); returns a function that stops it."""
        self.port, stop = serve_registry(self.registry, port, addr)
        return stop
