"""Prometheus metrics of one server, on a registry of its own (tests build several side by side).

Label values come only from bounded sets: RPC method names, status code names, the ids of monitor
sources the operator loaded (or ``_tenant`` / ``_request``), actions, steering kinds and finish reasons.
Never a tenant, key, request id or any other tenant-chosen string: each distinct value is a new time
series kept forever.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]

# Whole RPCs: a health check takes ~1 ms, a long generation minutes.
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time to first token: queueing plus prefill.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# Per output token: one decode step of the batch.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class Metrics:
    """The server's metrics and the /metrics endpoint that serves them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("steerwatch_requests_total", "RPCs finished, by method and final status code",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("steerwatch_request_duration_seconds", "RPC duration, stream included",
                                          ["method"], buckets=RPC_BUCKETS, registry=r)
        self.ttft = Histogram("steerwatch_time_to_first_token_seconds", "time from request to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("steerwatch_time_per_output_token_seconds", "time per generated token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.generated_tokens = Counter("steerwatch_generated_tokens_total", "tokens generated", registry=r)
        self.serving = Gauge("steerwatch_serving", "1 while the health service says SERVING (model loaded, warm-up "
                             "done, not draining), else 0", registry=r)
        self.batch_size = Gauge("steerwatch_batch_size", "requests in the running batch", registry=r)
        self.queue_depth = Gauge("steerwatch_queue_depth", "requests waiting for a batch slot", registry=r)
        self.alerts = Counter("steerwatch_alerts_total", "monitor firings, by monitor and action",
                              ["monitor", "action"], registry=r)
        self.responses = Counter("steerwatch_responses_total", "finished generations, by finish reason and whether "
                                 "any monitor fired on them", ["finish_reason", "alerted"], registry=r)
        self.alert_backlog = Gauge("steerwatch_alert_backlog", "alerts waiting for the store (it was unavailable)",
                                   registry=r)
        self.store_errors = Counter("steerwatch_store_errors_total", "store calls that failed (Redis down or "
                                    "unreachable), by operation", ["operation"], registry=r)
        self.interventions = Counter("steerwatch_interventions_total", "steering edits applied to generations, by kind",
                                     ["kind"], registry=r)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # ---- recording helpers (short names for the servicers) ------------------------------
    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC."""
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method).observe(seconds)

    def observe_engine(self, running: int, queued: int) -> None:
        """The engine's current load."""
        self.batch_size.set(running)
        self.queue_depth.set(queued)

    def observe_generation(self, ttft_seconds: float | None, tokens: int, decode_seconds: float) -> None:
        """One finished generation: TTFT, token count, and mean time per token after the first."""
        if ttft_seconds is not None:
            self.ttft.observe(ttft_seconds)
        self.generated_tokens.inc(max(tokens, 0))
        if tokens > 1:
            self.tpot.observe(decode_seconds / (tokens - 1))

    def observe_response(self, finish_reason: str, alerted: bool) -> None:
        """A generation's final record went out (the denominator of "share of responses with alerts")."""
        self.responses.labels(finish_reason=finish_reason, alerted="true" if alerted else "false").inc()

    def observe_alert(self, monitor: str, action: str) -> None:
        """A monitor fired; ``monitor`` is an operator-loaded source id, ``_tenant`` or ``_request``."""
        self.alerts.labels(monitor=monitor, action=action).inc()

    def observe_intervention(self, kind: str) -> None:
        """A steering edit (add, ablate, clamp) was applied to a generation."""
        self.interventions.labels(kind=kind).inc()

    # ---- /metrics --------------------------------------------------------------------
    def start_http(self, port: int, host: str = "0.0.0.0", routes: dict[str, WsgiApp] | None = None,
                   tls: ssl.SSLContext | None = None) -> int:
        """Serve /metrics (and ``routes``: path prefix -> WSGI app) on daemon threads; returns the bound
        port (port 0 = any free)."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        app = _dispatch(make_wsgi_app(self.registry), routes or {})
        server_class = type("Server", (_BoundedServer,), {"address_family": _family(host)})
        server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        if tls is not None:
            # the handshake happens in the request's own thread: done at accept(), one silent client
            # would block every other connection
            server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        thread = threading.Thread(target=server.serve_forever, name="steerwatch-http", daemon=True)
        thread.start()
        self._http = (server, thread)
        return int(server.server_port)

    def stop_http(self) -> None:
        """Stop the /metrics server (no-op when not started)."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _dispatch(metrics: WsgiApp, routes: dict[str, WsgiApp]) -> WsgiApp:
    """/metrics (and / for old scrape configs) to Prometheus; a path under a route's prefix (``/alerts``
    owns ``/alerts`` and ``/alerts/...``) to that route; anything else 404."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path in ("/metrics", "/"):
            return metrics(environ, start_response)
        for prefix, routed in routes.items():
            if path == prefix or path.startswith(prefix + "/"):
                return routed(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return [b"not found\n"]
    return app


def _family(host: str) -> socket.AddressFamily:
    """IPv6 hosts ("::") need an AF_INET6 socket; everything else binds IPv4."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most ``max_connections`` at once: beyond that a connection is answered
    503 and closed on the spot, so a flood of (idle) connections cannot pile up threads without end."""

    max_connections = 64
    request_queue_size = 128  # the listen backlog (socketserver's 5 drops SYNs under a burst of scrapes)

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not isinstance(request, ssl.SSLSocket):  # over TLS a write would wait for the handshake
                try:
                    request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass  # the peer is gone already
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes every few seconds would drown the server's own log."""

    timeout = 30  # seconds a connection may sit silent before its thread gives up on it

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass
