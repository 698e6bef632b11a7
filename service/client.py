"""An async Python client for the steerwatch gRPC service.

    async with SteerwatchClient("127.0.0.1:50051", api_key) as sw:
        async for ev in sw.generate("Hello", steering=[add("weddings", 2.0, layers=[6])]):
            if ev.WhichOneof("event") == "token":
                print(ev.token.text, end="")

Every method returns the proto messages of ``proto/steerwatch/v1`` unchanged. A failed RPC raises
``grpc.aio.AioRpcError`` as grpc raised it: ``e.code()`` (a ``grpc.StatusCode``) and ``e.details()``
(the server's message, which names the offending field, e.g. ``steering[0].coef: ...``). The helpers
below (``add``, ``ablate``, ``clamp``, ``monitor``) raise ``steering.errors.InvalidArgument`` naming
the argument when given a value the proto cannot carry.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.health import client_identity
from service.protos import (
    alert_pb2,
    alert_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)
from steering.errors import invalid

PHASES = {"both": common_pb2.PHASE_BOTH, "prompt": common_pb2.PHASE_PROMPT,
          "generation": common_pb2.PHASE_GENERATION}
ROLES = {"system": chat_pb2.ROLE_SYSTEM, "user": chat_pb2.ROLE_USER, "assistant": chat_pb2.ROLE_ASSISTANT}
MessageLike = Any  # a ChatMessage, a (role, content) pair or a {"role": ..., "content": ...} mapping


# ---- building request parts from plain arguments -------------------------------------------
def _phase(phase: str) -> int:
    if phase not in PHASES:
        raise invalid("phase", f"{phase!r} is not one of {', '.join(PHASES)}")
    return PHASES[phase]


def add(vector_id: str, coef: float, layers: Iterable[int] = (), phase: str = "both", when: str = "") -> Any:
    """A SteeringEntry adding ``coef`` x the tenant's vector (layers: empty = the vector's own);
    ``when``: a steer monitor's name (off until it fires)."""
    return common_pb2.SteeringEntry(add=common_pb2.AddVector(
        vector_id=vector_id, coef=coef, layers=list(layers), phase=_phase(phase)), when=when)


def ablate(vector_id: str, layers: Iterable[int] | str = "all", phase: str = "both", when: str = "") -> Any:
    """A SteeringEntry removing the vector's direction at ``layers`` (or "all")."""
    every = layers == "all"
    if isinstance(layers, str) and not every:
        raise invalid("layers", f"{layers!r} is neither 'all' nor a list of layers")
    return common_pb2.SteeringEntry(ablate=common_pb2.Ablate(
        vector_id=vector_id, layers=[] if every else list(layers), all_layers=every, phase=_phase(phase)), when=when)


def clamp(sae_id: str, feature: int, value: float, *, max_multiple: bool = False, layer: int | None = None,
          phase: str = "both", when: str = "") -> Any:
    """A SteeringEntry clamping an SAE feature to ``value`` (or ``value`` x its recorded max)."""
    return common_pb2.SteeringEntry(clamp=common_pb2.Clamp(
        sae_id=sae_id, feature=feature, value=value, max_multiple=max_multiple, layer=layer or 0,
        has_layer=layer is not None, phase=_phase(phase)), when=when)


def monitor(name: str, kind: str, source: str, threshold: float, *, action: str = "annotate",
            layer: int | None = None, feature: int = 0, **rule: Any) -> Any:
    """A per-request MonitorSpec (kind: probe, direction or sae_feature; action: annotate, alert, stop,
    steer). ``rule``: aggregation, window, alpha, count, hysteresis, scope, metric, explain."""
    return chat_pb2.MonitorSpec(name=name, kind=kind, source=source, threshold=threshold, action=action,
                                layer=layer or 0, has_layer=layer is not None, feature=feature, **rule)


def message(role: str, content: str, *, field: str = "role") -> Any:
    """A ChatMessage; role is system, user or assistant."""
    if role not in ROLES:
        raise invalid(field, f"{role!r} is not one of {', '.join(ROLES)}")
    return chat_pb2.ChatMessage(role=ROLES[role], content=content)


def _message(m: MessageLike, i: int) -> Any:
    if isinstance(m, chat_pb2.ChatMessage):
        return m
    if isinstance(m, Mapping):
        return message(m.get("role", ""), m.get("content", ""), field=f"messages[{i}].role")
    if isinstance(m, tuple | list) and len(m) == 2:
        return message(m[0], m[1], field=f"messages[{i}].role")
    raise invalid(f"messages[{i}]", f"expected a ChatMessage, (role, content) or a mapping, got {type(m).__name__}")


def request(prompt: str | Sequence[MessageLike], *, policy: str = "", max_tokens: int = 0,
            temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, stop: Iterable[str] = (),
            seed: int | None = None, steering: Iterable[Any] = (), monitors: Iterable[Any] = (),
            include_readings: bool = False) -> Any:
    """The GenerateRequest ``SteerwatchClient.generate`` sends (a str is a raw prompt, else chat messages)."""
    sampling = chat_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                       stop=list(stop), seed=seed or 0, has_seed=seed is not None)
    req = chat_pb2.GenerateRequest(sampling=sampling, policy=policy, steering=list(steering),
                                   monitors=list(monitors), include_readings=include_readings)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.messages.extend(_message(m, i) for i, m in enumerate(prompt))
    return req


def _values(values: Any, layer: int) -> list[float]:
    """A tensor, array or sequence as floats (tensors via .tolist(), so torch is not needed here)."""
    raw = values.tolist() if hasattr(values, "tolist") else values
    try:
        return [float(v) for v in raw]
    except (TypeError, ValueError) as exc:
        raise invalid(f"layers[{layer}]", f"must be a flat sequence of numbers ({exc})") from exc


def _pair(p: Any, i: int) -> Any:
    if isinstance(p, vector_pb2.TextPair):
        return p
    if isinstance(p, Mapping):
        return vector_pb2.TextPair(positive=p.get("positive", ""), negative=p.get("negative", ""))
    if isinstance(p, tuple | list) and len(p) == 2:
        return vector_pb2.TextPair(positive=p[0], negative=p[1])
    raise invalid(f"pairs[{i}]", "expected (positive, negative), a mapping or a TextPair")


class SteerwatchClient:
    """One channel to a steerwatch server, authenticated with an API key (sent as ``x-api-key``).

    ``tls_root_cert`` (PEM bytes or a file path) switches to TLS; ``tls=True`` uses the system roots.
    ``tls_client_cert`` and ``tls_client_key`` (PEM files) present a client certificate (mutual TLS).
    ``timeout`` (seconds) is the deadline of every call except ``watch_alerts``, which runs until
    cancelled unless given a timeout of its own.
    """

    def __init__(self, target: str, api_key: str, *, tls_root_cert: bytes | str | os.PathLike[str] | None = None,
                 tls: bool = False, timeout: float | None = None,
                 tls_client_cert: str | os.PathLike[str] | None = None,
                 tls_client_key: str | os.PathLike[str] | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        if not api_key:
            raise invalid("api_key", "is empty; pass the key the server or `steerwatch keys create` gave you")
        self.target, self.timeout = target, timeout
        self._metadata = (("x-api-key", api_key),)
        if tls_root_cert is not None or tls:
            roots = tls_root_cert if isinstance(tls_root_cert, bytes | None) else Path(tls_root_cert).read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=roots, **client_identity(tls_client_cert,
                                                                                             tls_client_key))
            self.channel = grpc.aio.secure_channel(target, creds, options=list(options))
        else:
            self.channel = grpc.aio.insecure_channel(target, options=list(options))
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.policies = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.vectors = vector_pb2_grpc.VectorServiceStub(self.channel)
        self.alerts = alert_pb2_grpc.AlertServiceStub(self.channel)
        self.model = model_pb2_grpc.ModelServiceStub(self.channel)

    async def __aenter__(self) -> SteerwatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self.channel.close()

    def _kw(self) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self.timeout}

    # ---- chat --------------------------------------------------------------------------
    async def generate(self, prompt: str | Sequence[MessageLike], **options: Any) -> AsyncIterator[Any]:
        """Stream GenerateResponse events (token, alert, then one final); options as for ``request``.

        Leaving the loop early cancels the call on the server (its engine slot is freed at once).
        """
        call = self.chat.Generate(request(prompt, **options), **self._kw())
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    # ---- policies ----------------------------------------------------------------------
    async def put_policy(self, name: str, document: Mapping[str, Any] | str, make_default: bool = False,
                         tenant: str = "") -> Any:
        """Store a new version of a policy (a dict is sent as JSON); returns the PolicyRecord."""
        text = document if isinstance(document, str) else json.dumps(document)
        req = policy_pb2.PutPolicyRequest(name=name, policy_json=text, make_default=make_default, tenant=tenant)
        return await self.policies.PutPolicy(req, **self._kw())

    async def get_policy(self, name: str, version: int = 0, tenant: str = "") -> Any:
        """A PolicyRecord: the latest version, or ``version``."""
        req = policy_pb2.GetPolicyRequest(name=name, version=version, tenant=tenant)
        return await self.policies.GetPolicy(req, **self._kw())

    async def list_policies(self, tenant: str = "") -> list[Any]:
        """The latest version of each policy, sorted by name."""
        reply = await self.policies.ListPolicies(policy_pb2.ListPoliciesRequest(tenant=tenant), **self._kw())
        return list(reply.policies)

    async def delete_policy(self, name: str, tenant: str = "") -> bool:
        """Delete every version (NOT_FOUND when there is none)."""
        req = policy_pb2.DeletePolicyRequest(name=name, tenant=tenant)
        return bool((await self.policies.DeletePolicy(req, **self._kw())).deleted)

    # ---- vectors -----------------------------------------------------------------------
    async def upload_vector(self, vector_id: str, layers: Mapping[int, Any], *, method: str = "",
                            source: str = "", replace: bool = False, tenant: str = "") -> Any:
        """Upload ``{layer: values}`` (lists, tensors or arrays of d_model floats); returns VectorInfo."""
        entries = [vector_pb2.LayerValues(layer=int(k), values=_values(v, int(k))) for k, v in layers.items()]
        req = vector_pb2.UploadVectorRequest(vector_id=vector_id, layers=entries, method=method, source=source,
                                             replace=replace, tenant=tenant)
        return await self.vectors.UploadVector(req, **self._kw())

    async def create_vector_from_pairs(self, vector_id: str, pairs: Iterable[Any], layers: Iterable[int],
                                       position: str = "last", *, replace: bool = False, tenant: str = "") -> Any:
        """Difference of means over (positive, negative) text pairs, computed by the server; VectorInfo."""
        req = vector_pb2.CreateVectorFromPairsRequest(
            vector_id=vector_id, pairs=[_pair(p, i) for i, p in enumerate(pairs)], layers=list(layers),
            position=position, replace=replace, tenant=tenant)
        return await self.vectors.CreateVectorFromPairs(req, **self._kw())

    async def get_vector(self, vector_id: str, tenant: str = "") -> Any:
        """One vector's VectorInfo."""
        req = vector_pb2.GetVectorRequest(vector_id=vector_id, tenant=tenant)
        return await self.vectors.GetVector(req, **self._kw())

    async def list_vectors(self, tenant: str = "") -> list[Any]:
        """The tenant's vectors (metadata), sorted by id."""
        reply = await self.vectors.ListVectors(vector_pb2.ListVectorsRequest(tenant=tenant), **self._kw())
        return list(reply.vectors)

    async def delete_vector(self, vector_id: str, tenant: str = "") -> bool:
        """Delete a vector (NOT_FOUND when absent)."""
        req = vector_pb2.DeleteVectorRequest(vector_id=vector_id, tenant=tenant)
        return bool((await self.vectors.DeleteVector(req, **self._kw())).deleted)

    # ---- alerts, model, health ---------------------------------------------------------
    async def watch_alerts(self, after_id: str = "", tenant: str = "",
                           timeout: float | None = None) -> AsyncIterator[Any]:
        """AlertEvents as they are raised ("" = from now on, "0" = replay all kept, or after an alert id).

        Endless: it ends when the caller stops iterating (the call is then cancelled) or the server drains.
        """
        call = self.alerts.WatchAlerts(alert_pb2.WatchAlertsRequest(after_id=after_id, tenant=tenant),
                                       metadata=self._metadata, timeout=timeout)
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def info(self) -> Any:
        """The InfoResponse: model, layers, width, SAEs, probes, limits."""
        return await self.model.Info(model_pb2.InfoRequest(), **self._kw())

    async def health(self, service: str = "") -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of the server or one service; no key needed."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
