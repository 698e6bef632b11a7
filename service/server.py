"""The gRPC server: interceptors, limits, health, reflection, TLS, and a graceful drain.

Lifecycle: ``build_server`` -> ``await handle.start()`` (health NOT_SERVING) -> load the model ->
``await handle.set_serving()`` -> ... -> SIGTERM -> ``drain_and_stop``: health NOT_SERVING everywhere
first (load balancers stop routing), then ``server.stop(grace)``: new RPCs are refused, in-flight ones
get the grace period, then are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor, RequestIdInterceptor
from service.metrics import Metrics
from service.outage import KeyMemory
from service.settings import Settings
from service.store.base import Store

log = logging.getLogger(__name__)

HEALTH_SERVICE = health.SERVICE_NAME
BOOTSTRAP_TENANT = "admin"  # tenant of the bootstrap admin key from settings
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerHandle:
    """A built server: start it, mark it serving, drain and stop it."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int,
                 services: list[str], settings: Settings, store: Store, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics
        self.health = health_servicer
        self.port = port  # the bound port (the real one when settings.port is 0)
        self.services = services  # the app's full service names (health and reflection excluded)
        self.settings = settings
        self.store = store
        self._stopping: asyncio.Task[None] | None = None
        # Set when the drain starts: endless streams (alert watches) end on it instead of holding the grace.
        self.draining = asyncio.Event()

    async def start(self) -> None:
        """Add the bootstrap admin key, then accept RPCs; health stays NOT_SERVING until set_serving()."""
        await self._report(_NOT_SERVING)
        key = self.settings.bootstrap_admin_key
        if key is not None:
            await self.store.add_key(key.get_secret_value(), BOOTSTRAP_TENANT, "admin")
        await self.server.start()
        log.info("gRPC server listening on %s:%d (%s)", self.settings.host, self.port,
                 "TLS" if self.settings.tls else "plaintext")

    async def set_serving(self) -> None:
        """Report SERVING for the server ("") and every app service; ignored once draining."""
        await self._report(_SERVING)

    async def set_not_serving(self) -> None:
        """Report NOT_SERVING everywhere (the engine died); the server keeps answering health and refusals."""
        await self._report(_NOT_SERVING)

    async def _report(self, status: Any) -> None:
        for name in ("", *self.services):
            await self.health.set(name, status)
        if not self.draining.is_set():  # a drain already reported NOT_SERVING, and set() ignores the rest
            self.metrics.serving.set(1 if status == _SERVING else 0)

    async def drain_and_stop(self, grace_seconds: float | None = None) -> None:
        """Health NOT_SERVING, then stop with a grace period (settings' grace when None). Idempotent."""
        # Shielded: a caller cancelled mid-drain (a signal handler's task, a test) must not abort the stop.
        await asyncio.shield(self._begin_drain(grace_seconds))

    def _begin_drain(self, grace_seconds: float | None) -> asyncio.Task[None]:
        """The one drain task, started by the first caller; later callers join it."""
        if self._stopping is None:
            grace = self.settings.limits.grace_seconds if grace_seconds is None else grace_seconds
            self._stopping = asyncio.ensure_future(self._drain(grace))
        return self._stopping

    async def _drain(self, grace: float) -> None:
        log.info("draining: health NOT_SERVING, %.1f s grace for in-flight RPCs", grace)
        self.draining.set()
        self.metrics.serving.set(0)
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING; later set() calls ignored
        await self.server.stop(grace)
        log.info("gRPC server stopped")

    async def wait_for_termination(self) -> None:
        """Return when the server has stopped."""
        await self.server.wait_for_termination()

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """SIGTERM and SIGINT start one drain_and_stop; later signals are logged and ignored."""
        loop = loop or asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping is not None:
            log.warning("%s: already draining", sig.name)
            return
        log.info("%s: draining", sig.name)
        self._begin_drain(None)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server."""
    size = settings.limits.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # grpc sets SO_REUSEPORT by default: a second server on the same port would start silently.
        ("grpc.so_reuseport", 0),
    ]


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    if settings.tls_client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    # mutual TLS: the handshake itself refuses a client without a certificate from this CA
    return grpc.ssl_server_credentials([pair], root_certificates=settings.tls_client_ca_file.read_bytes(),
                                       require_client_auth=True)


def build_server(settings: Settings, store: Store, metrics: Metrics,
                 add_servicers: Callable[[grpc.aio.Server], list[str]]) -> ServerHandle:
    """A server with interceptors, health, reflection and the app's servicers, bound but not started.

    ``add_servicers`` registers the app's servicers and returns their full service names. Call it in
    the running event loop that will serve (grpc.aio binds the server to it).
    """
    interceptors = [  # outermost first; see service/interceptors.py for why this order
        MetricsInterceptor(metrics),
        RequestIdInterceptor(),
        ErrorInterceptor(),
        AuthInterceptor(KeyMemory(store, settings.store_outage, metrics)),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings),
                             maximum_concurrent_rpcs=settings.limits.max_concurrent_rpcs)
    services = list(add_servicers(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, HEALTH_SERVICE, reflection.SERVICE_NAME], server)

    address = _address(settings.host, settings.port)
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind the gRPC server to {address}")
    return ServerHandle(server, health_servicer, port, services, settings, store, metrics)
