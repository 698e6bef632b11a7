"""PolicyService, VectorService, AlertService and ModelService: tenant-scoped management and dashboards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from service.app import App
from service.context import tenant_for
from service.pack import PACK_PREFIX, is_pack_id
from service.policy import parse_policy, rename_field, resolve
from service.protos import (
    alert_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)
from service.servicers.chat import alert_from_fields
from service.store.base import PolicyRecord, VectorRecord
from steering.compile import compile_spec
from steering.errors import InvalidArgument, LimitExceeded, NotFound, SteerwatchError, invalid
from steering.extract import mean_difference
from steering.registry import check_id
from steering.tensors import require_finite, require_index
from steering.vectors import SteeringVector, make_vector, vector_metadata, vector_to_bytes

MAX_PAIRS = 256


def _policy_proto(r: PolicyRecord) -> Any:
    return policy_pb2.PolicyRecord(name=r.name, version=r.version, policy_json=r.document, is_default=r.is_default,
                                   updated_at_ms=r.updated_at_ms, tenant=r.tenant)


_PolicyServicerBase: Any = policy_pb2_grpc.PolicyServiceServicer  # generated module: opaque to mypy


class PolicyServicer(_PolicyServicerBase):
    def __init__(self, app: App) -> None:
        self.app = app

    async def PutPolicy(self, request: Any, context: Any) -> Any:  # noqa: N802
        tenant = tenant_for(request.tenant)
        check_id(request.name, "name")
        policy = parse_policy(request.policy_json)
        await self._check_references(tenant, policy)
        record = await self.app.store.put_policy(tenant, request.name, policy.model_dump_json(),
                                                 make_default=request.make_default)
        await self.app.store.publish_invalidation(tenant, "policy", request.name)
        self.app.policies.invalidate(tenant, request.name)
        return _policy_proto(record)

    async def _check_references(self, tenant: str, policy: Any) -> None:
        """Refuse a policy whose vectors, layers, features or SAEs cannot be used on this model; errors
        name the policy's own entry (``policy_json.steering[1].layers``)."""
        for i, e in enumerate(policy.steering):
            if getattr(e, "vector", None) is not None:
                await self.app.vectors.ensure(tenant, {e.vector}, field=f"policy_json.steering[{i}].vector")
        for i, m in enumerate(policy.monitors):
            if m.kind == "direction":
                await self.app.vectors.ensure(tenant, {m.source}, field=f"policy_json.monitors[{i}].source")
        spec, _, _ = resolve(policy, tenant, [], [])
        try:
            compile_spec(spec, self.app.registry, self.app.engine.shape, self.app.engine.limits)
        except SteerwatchError as exc:
            names = {"edits": "steering", "reads": "monitors"}
            raise rename_field(exc, lambda kind, i: f"policy_json.{names[kind]}[{i}]") from exc

    async def GetPolicy(self, request: Any, context: Any) -> Any:  # noqa: N802
        tenant = tenant_for(request.tenant)
        check_id(request.name, "name")
        if request.version < 0:
            raise invalid("version", f"{request.version} is negative; 0 = latest, or a version >= 1")
        record = await self.app.store.get_policy(tenant, request.name, request.version or None)
        if record is None:
            raise NotFound(f"name: no policy {request.name!r}" + (f" version {request.version}" if request.version else ""),
                           field="name")
        return _policy_proto(record)

    async def ListPolicies(self, request: Any, context: Any) -> Any:  # noqa: N802
        records = await self.app.store.list_policies(tenant_for(request.tenant))
        return policy_pb2.ListPoliciesResponse(policies=[_policy_proto(r) for r in records])

    async def DeletePolicy(self, request: Any, context: Any) -> Any:  # noqa: N802
        tenant = tenant_for(request.tenant)
        check_id(request.name, "name")
        deleted = await self.app.store.delete_policy(tenant, request.name)
        if not deleted:
            raise NotFound(f"name: no policy {request.name!r}", field="name")
        await self.app.store.publish_invalidation(tenant, "policy", request.name)
        self.app.policies.invalidate(tenant, request.name)
        return policy_pb2.DeletePolicyResponse(deleted=True)


def _vector_info(r: VectorRecord) -> Any:
    meta = r.meta
    return vector_pb2.VectorInfo(
        vector_id=r.vector_id, layers=[int(x) for x in meta.get("layers", "").split(",") if x],
        d_model=int(meta.get("d_model", 0) or 0), norm=float(meta.get("norm", 0) or 0), method=meta.get("method", ""),
        source=meta.get("source", ""), model=meta.get("model", ""), created_at_ms=r.created_at_ms)


_VectorServicerBase: Any = vector_pb2_grpc.VectorServiceServicer  # generated module: opaque to mypy


class VectorServicer(_VectorServicerBase):
    def __init__(self, app: App) -> None:
        self.app = app

    async def UploadVector(self, request: Any, context: Any) -> Any:  # noqa: N802
        tenant = tenant_for(request.tenant)
        check_id(request.vector_id, "vector_id")
        if is_pack_id(request.vector_id):
            raise invalid("vector_id", f"{request.vector_id!r}: ids starting with {PACK_PREFIX!r} are reserved for "
                          "the server's monitor pack")
        if not request.layers:
            raise invalid("layers", "is empty; give at least one layer's values")
        per_layer = {}
        for i, lv in enumerate(request.layers):
            require_index(lv.layer, self.app.engine.shape.n_layers, f"layers[{i}].layer")
            if lv.layer in per_layer:
                raise invalid(f"layers[{i}].layer", f"layer {lv.layer} appears twice; give one entry per layer")
            if len(lv.values) != self.app.engine.shape.d_model:
                raise invalid(f"layers[{i}].values", f"has {len(lv.values)} values; this model needs d_model="
                              f"{self.app.engine.shape.d_model}")
            values = torch.tensor(list(lv.values), dtype=torch.float32)
            require_finite(values, f"layers[{i}].values")  # named as sent, not as the stored tensor
            per_layer[lv.layer] = values
        vec = make_vector(per_layer, model=self.app.model_name, method=request.method or "manual",
                          source=request.source, field_name="layers")
        return await self._store(tenant, request.vector_id, vec, request.replace)

    async def CreateVectorFromPairs(self, request: Any, context: Any) -> Any:  # noqa: N802
        tenant = tenant_for(request.tenant)
        check_id(request.vector_id, "vector_id")
        if not 1 <= len(request.pairs) <= MAX_PAIRS:
            raise invalid("pairs", f"has {len(request.pairs)} pairs; allowed 1..{MAX_PAIRS}")
        for i, p in enumerate(request.pairs):
            if not p.positive or not p.negative:
                raise invalid(f"pairs[{i}]", "positive and negative must both be non-empty")
        layers = list(request.layers)
        if not layers:
            raise invalid("layers", f"is empty; give layers in 0..{self.app.engine.shape.n_layers - 1}")
        for i, layer in enumerate(layers):
            require_index(layer, self.app.engine.shape.n_layers, f"layers[{i}]")
        position = request.position or "last"
        if position not in ("last", "mean"):
            raise invalid("position", f"{position!r} not allowed; use last or mean")
        vec = await self._extract(request, sorted(set(layers)), position)
        return await self._store(tenant, request.vector_id, vec, request.replace)

    async def _extract(self, request: Any, layers: list[int], position: str) -> SteeringVector:
        from service.models import encode_prompt

        lm = self.app.engine.lm
        pos = [p.positive for p in request.pairs]
        neg = [p.negative for p in request.pairs]
        max_tokens = self.app.engine.limits.max_prompt_tokens

        def encode_all() -> dict[str, list[int]]:
            """Every text's ids, each within the prompt limit: one forward per text, and a text Generate
            would refuse would hold the engine thread (every generation) for minutes."""
            ids: dict[str, list[int]] = {}
            for i, pair in enumerate(zip(pos, neg, strict=True)):
                for side, text in zip(("positive", "negative"), pair, strict=True):
                    if text in ids:
                        continue
                    where = f"pairs[{i}].{side}"
                    try:
                        got = encode_prompt(lm.tokenizer, text)
                    except InvalidArgument as exc:
                        raise invalid(where, str(exc).partition(": ")[2] or str(exc)) from exc
                    if len(got) > max_tokens:
                        raise LimitExceeded(f"{where}: {len(got)} tokens is beyond the limit; allowed "
                                            f"1..{max_tokens}", field=where)
                    ids[text] = got
            return ids

        def work() -> SteeringVector:  # runs on the engine thread: the model serves one forward at a time
            ids = encode_all()
            return mean_difference(lm.model, lm.layers, ids.__getitem__, pos, neg, layers,
                                   position=position, model_name=self.app.model_name,
                                   source=f"CreateVectorFromPairs: {len(pos)} pairs")

        return await asyncio.wrap_future(self.app.engine.call(work))

    async def _store(self, tenant: str, vector_id: str, vec: SteeringVector, replace: bool) -> Any:
        blob = vector_to_bytes(vec)
        meta = {k: v for k, v in vector_metadata(vec).items() if k != "steerwatch.kind"}
        record = VectorRecord(tenant, vector_id, blob, meta, int(time.time() * 1000))
        await self.app.store.put_vector(record, replace=replace)
        await self.app.store.publish_invalidation(tenant, "vector", vector_id)
        self.app.vectors.invalidate(tenant, vector_id)
        return _vector_info(record)

    async def ListVectors(self, request: Any, context: Any) -> Any:  # noqa: N802
        records = await self.app.store.list_vectors(tenant_for(request.tenant))
        return vector_pb2.ListVectorsResponse(vectors=[_vector_info(r) for r in records])

    async def GetVector(self, request: Any, context: Any) -> Any:  # noqa: N802
        check_id(request.vector_id, "vector_id")
        record = await self.app.store.get_vector(tenant_for(request.tenant), request.vector_id)
        if record is None:
            raise NotFound(f"vector_id: no vector {request.vector_id!r}", field="vector_id")
        return _vector_info(record)

    async def DeleteVector(self, request: Any, context: Any) -> Any:  # noqa: N802
        tenant = tenant_for(request.tenant)
        check_id(request.vector_id, "vector_id")
        if not await self.app.store.delete_vector(tenant, request.vector_id):
            raise NotFound(f"vector_id: no vector {request.vector_id!r}", field="vector_id")
        await self.app.store.publish_invalidation(tenant, "vector", request.vector_id)
        self.app.vectors.invalidate(tenant, request.vector_id)
        return vector_pb2.DeleteVectorResponse(deleted=True)


_AlertServicerBase: Any = alert_pb2_grpc.AlertServiceServicer  # generated module: opaque to mypy


class AlertServicer(_AlertServicerBase):
    def __init__(self, app: App) -> None:
        self.app = app

    async def WatchAlerts(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        tenant = tenant_for(request.tenant)
        after = request.after_id or "$"
        if after not in ("$", "0") and not _is_stream_id(after):
            raise invalid("after_id", f"{after!r} is not an alert id (<ms>-<seq>), '0' or empty")
        with self.app.streams.slot(tenant):
            async for alert in self._watch(tenant, after):
                yield alert

    async def _watch(self, tenant: str, after: str) -> AsyncIterator[Any]:
        # endless but bounded: it ends when the server drains (so it never holds shutdown for the full
        # grace) or after limits.max_watch_seconds (the client resumes from its last alert_id)
        alerts = self.app.store.watch_alerts(tenant, after).__aiter__()
        drain = asyncio.ensure_future(self.app.draining.wait())
        deadline = asyncio.get_running_loop().time() + self.app.max_watch_s
        nxt: asyncio.Future[Any] | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(alerts.__anext__())
                remaining = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait({nxt, drain}, timeout=max(remaining, 0.0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    return
                try:
                    alert = nxt.result()
                except StopAsyncIteration:
                    return
                yield alert_from_fields(alert.alert_id, alert.fields)
        finally:
            drain.cancel()
            if nxt is not None and not nxt.done():
                nxt.cancel()
                await asyncio.wait({nxt})  # the watcher must be idle before it can be closed
            aclose = getattr(alerts, "aclose", None)
            if aclose is not None:
                await aclose()


def _is_stream_id(text: str) -> bool:
    ms, sep, seq = text.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()


_ModelServicerBase: Any = model_pb2_grpc.ModelServiceServicer  # generated module: opaque to mypy


class ModelServicer(_ModelServicerBase):
    def __init__(self, app: App) -> None:
        self.app = app

    async def Info(self, request: Any, context: Any) -> Any:  # noqa: N802
        reg, eng = self.app.registry, self.app.engine
        saes = [model_pb2.SaeInfo(sae_id=i, layer=reg.sae(i).hook_layer or 0, d_sae=reg.sae(i).d_sae,
                                  architecture=reg.sae(i).architecture, has_feature_max=reg.sae(i).feature_max is not None)
                for i in self.app.sae_ids]
        probes = [_probe_info(i, reg.probe(i)) for i in self.app.probe_ids]
        return model_pb2.InfoResponse(
            model=self.app.model_name, n_layers=eng.shape.n_layers, d_model=eng.shape.d_model,
            engine=self.app.engine_kind, saes=saes, probes=probes,
            monitor_kinds=["probe", "direction", "sae_feature"], max_prompt_tokens=eng.limits.max_prompt_tokens,
            max_new_tokens=eng.limits.max_new_tokens, shared_vectors=self.app.shared_vectors)


def _probe_info(probe_id: str, p: Any) -> Any:
    return model_pb2.ProbeInfo(probe_id=probe_id, layer=p.layer or 0, threshold=p.threshold or 0.0,
                               has_threshold=p.threshold is not None)

