"""ChatService.Generate: resolve the tenant's policy, stream tokens, evaluate monitors, raise alerts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from monitors.rules import Firing, RuleSet
from service.app import App
from service.context import current_principal, current_request_id
from service.convert import (
    FINISH,
    applied_to_proto,
    edits_from_proto,
    monitors_from_proto,
    prompt_from_proto,
    sampling_from_proto,
)
from service.engines.types import FinalEvent, GenerationRequest, PromptEvent, TokenEvent
from service.explain import Pending, explain
from service.policy import MonitorRule, rename_field, resolve, unscoped
from service.protos import chat_pb2, chat_pb2_grpc
from steering.errors import DeadlineExceeded, SteerwatchError
from steering.spec import AblateEdit, AddEdit

EXCERPT_CHARS = 120


@dataclass
class Prepared:
    """A request resolved against its policy."""

    request: GenerationRequest
    rules: list[MonitorRule]
    origins: list[str]
    policy: str
    version: int
    request_monitors: set[str]


_ChatServicerBase: Any = chat_pb2_grpc.ChatServiceServicer  # generated module: opaque to mypy


class ChatServicer(_ChatServicerBase):
    def __init__(self, app: App) -> None:
        self.app = app

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802 - gRPC name
        tenant = current_principal().tenant
        with self.app.streams.slot(tenant):
            async for response in self._generate(tenant, request):
                yield response

    async def _generate(self, tenant: str, request: Any) -> AsyncIterator[Any]:
        prepared = await self._prepare(tenant, request)
        session = Session(self.app, tenant, prepared, request.include_readings)
        try:
            stream = self.app.engine.open_stream(prepared.request)
        except SteerwatchError as exc:
            raise _in_request_terms(exc, prepared) from exc
        self.app.metrics.observe_engine(self.app.engine.running, self.app.engine.queued)
        try:
            async for ev in _until_deadline(stream, self.app.request_timeout_s):
                for resp in await session.on_event(ev):
                    yield resp
                if session.stopped:
                    stream.cancel()
        finally:
            stream.cancel()  # client gone, deadline or error: free the engine slot now
            self.app.metrics.observe_engine(self.app.engine.running, self.app.engine.queued)

    async def _prepare(self, tenant: str, request: Any) -> Prepared:
        name, version, policy = await self.app.policies.resolve(tenant, request.policy)
        extra_monitors = monitors_from_proto(request.monitors)
        spec, rules, origins = resolve(policy, tenant, edits_from_proto(request.steering), extra_monitors)
        await self.app.vectors.ensure(tenant, _vector_ids(spec, rules))
        sampling = sampling_from_proto(request.sampling, policy.limits)
        gen = GenerationRequest(prompt=prompt_from_proto(request), sampling=sampling, interventions=spec,
                                request_id=current_request_id())
        return Prepared(gen, rules, origins, name, version, {m.name for m in extra_monitors})


async def _until_deadline(stream: Any, timeout_s: float | None) -> AsyncIterator[Any]:
    """The engine's events, with the server's own time limit on waiting for them. The limit covers
    only the engine, never the writes to the client: a timeout raised while a write waits on a slow
    reader would end the call as a bare cancellation, with no status for the client."""
    if timeout_s is None:
        async for ev in stream:
            yield ev
        return
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            ev = await asyncio.wait_for(anext(stream), max(remaining, 0.0))
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise DeadlineExceeded(f"request_timeout_seconds: the generation ran past the server's limit of "
                                   f"{timeout_s} s", field="request_timeout_seconds") from exc
        yield ev


def _in_request_terms(exc: SteerwatchError, prepared: Prepared) -> SteerwatchError:
    """The engine names ``edits[i]``/``reads[i]`` of the merged spec; the client sent policy entries and
    request entries, so say which one (``policy.steering[1]`` or ``steering[0]``)."""
    n_edits = prepared.origins.count("policy")
    n_reads = len(prepared.rules) - len(prepared.request_monitors)

    def rename(kind: str, index: int) -> str:
        name, n = ("steering", n_edits) if kind == "edits" else ("monitors", n_reads)
        return f"policy.{name}[{index}]" if index < n else f"{name}[{index - n}]"

    return rename_field(exc, rename)


def _vector_ids(spec: Any, rules: list[MonitorRule]) -> set[str]:
    ids = {unscoped(e.vector) for e in spec.edits if isinstance(e, AddEdit | AblateEdit)}
    return ids | {r.source for r in rules if r.kind == "direction"}


class Session:
    """One generation's stream: monitors evaluated per token, alerts raised, the audit record built."""

    def __init__(self, app: App, tenant: str, prepared: Prepared, include_readings: bool) -> None:
        self.app, self.tenant, self.prepared = app, tenant, prepared
        self.include_readings = include_readings
        self.rules: RuleSet[MonitorRule] = RuleSet(prepared.rules, external={r.name for r in prepared.rules if r.action == "steer"})
        self.text = ""
        self.stopped = False
        self.alerted = False  # any monitor fired (any action): the "responses with alerts" metric
        self.prompt_ids: list[int] = []
        self.generated: list[int] = []
        self.delivered = 0  # token deltas sent: a stopped response's usage counts only these
        self.to_explain: dict[str, Pending] = {}  # first firing of each monitor with explain: true

    async def on_event(self, ev: Any) -> list[Any]:
        if isinstance(ev, PromptEvent):
            self.prompt_ids = list(ev.token_ids)
            return [await self._alert(f) for f in self.rules.on_prompt(ev.readings, ev.gates)]
        if isinstance(ev, TokenEvent):
            out = await self._token(ev)
            self.generated.append(ev.token_id)
            return out
        if isinstance(ev, FinalEvent):
            pending = list(self.to_explain.values())
            explanations = await explain(self.app.engine, self.tenant, pending, self.prompt_ids, self.generated) \
                if pending else []
            return [self._final(ev, explanations)]
        return []

    async def _token(self, ev: TokenEvent) -> list[Any]:
        if self.stopped:  # the engine may emit one more token before the cancel lands
            return []
        firings = self.rules.on_token(ev.index, ev.readings, ev.gates)
        # a stop monitor fired on the state that chose this token: withhold it, from excerpts too
        withheld = any(f.rule.action == "stop" for f in firings)
        out = [await self._alert(f, "" if withheld else ev.text) for f in firings]
        if self.stopped:
            return out
        self.text += ev.text
        readings = ev.readings if self.include_readings else {}
        self.delivered += 1
        out.append(chat_pb2.GenerateResponse(token=chat_pb2.TokenDelta(
            index=ev.index, text=ev.text, token=ev.token, token_id=ev.token_id, readings=readings)))
        return out

    async def _alert(self, f: Firing[MonitorRule], pending: str = "") -> Any:
        action = f.rule.action
        if f.rule.explain and f.rule.name not in self.to_explain:
            self.to_explain[f.rule.name] = Pending(f.rule, f.phase, f.token_end)
        self.stopped = self.stopped or action == "stop"
        self.alerted = True
        event = chat_pb2.AlertEvent(
            monitor=f.rule.name, action=action, peak_score=f.peak, threshold=f.rule.threshold,
            token_start=f.token_start, token_end=f.token_end, excerpt=(self.text + pending)[-EXCERPT_CHARS:],
            timestamp_ms=int(time.time() * 1000), request_id=current_request_id(), policy=self.prepared.policy,
            value=f.value, phase=f.phase, aggregation=f.rule.aggregation)
        if action != "annotate":
            event.alert_id = await self.app.alerts.add(self.tenant, _fields(event))  # "" = queued: store down
        self.app.metrics.observe_alert(self._label(f.rule), action)
        return chat_pb2.GenerateResponse(alert=event)

    def _label(self, rule: MonitorRule) -> str:
        """The monitor's metric label: never a tenant-chosen string (names, vector ids), which would make
        one time series per tenant whim. An operator-loaded source (``pack:deception``, a server probe
        or SAE id) names itself; other policy monitors are ``_tenant``, request monitors ``_request``."""
        if rule.name in self.prepared.request_monitors:
            return "_request"
        source = unscoped(rule.source)
        return source if source in self.app.label_sources else "_tenant"

    def _final(self, ev: FinalEvent, explanations: list[Any]) -> Any:
        reason = "policy" if self.stopped else ev.finish_reason
        self._observe(ev, reason)
        return chat_pb2.GenerateResponse(final=chat_pb2.FinalRecord(
            finish_reason=FINISH[reason],
            # stopped by policy: the engine also counted the withheld token and any sampled before the
            # cancel landed; the client got (and is accounted) only the delivered ones
            usage=chat_pb2.Usage(prompt_tokens=ev.prompt_tokens,
                                 completion_tokens=self.delivered if self.stopped else ev.completion_tokens),
            monitors=[chat_pb2.MonitorSummary(monitor=r.name, fired=fired, peak_score=peak, peak_token=at,
                                              action=r.action, threshold=r.threshold)
                      for r, fired, peak, at in self.rules.summary()],
            steering=applied_to_proto(ev.applied, self.prepared.origins),
            model=self.app.model_name,
            timings=chat_pb2.Timings(queue_seconds=ev.queue_s, ttft_seconds=ev.ttft_s or 0.0, total_seconds=ev.total_s),
            text=self.text if self.stopped else ev.text, tail="" if self.stopped else ev.tail,
            policy=self.prepared.policy, policy_version=self.prepared.version, request_id=current_request_id(),
            explanations=explanations, error=ev.error or ""))

    def _observe(self, ev: FinalEvent, reason: str) -> None:
        m = self.app.metrics
        m.observe_response(reason, self.alerted)
        decode_s = ev.total_s - ev.ttft_s if ev.ttft_s is not None else 0.0
        m.observe_generation(ev.ttft_s, ev.completion_tokens, decode_s)
        for entry in ev.applied:
            m.observe_intervention(entry["kind"])


def _fields(event: Any) -> dict[str, str]:
    """An alert as flat string fields for the tenant's stream."""
    return {"monitor": event.monitor, "action": event.action, "peak_score": repr(event.peak_score),
            "threshold": repr(event.threshold), "token_start": str(event.token_start),
            "token_end": str(event.token_end), "excerpt": event.excerpt, "timestamp_ms": str(event.timestamp_ms),
            "request_id": event.request_id, "policy": event.policy, "value": repr(event.value),
            "phase": event.phase, "aggregation": event.aggregation}


def alert_from_fields(alert_id: str, fields: dict[str, str]) -> Any:
    """The inverse of ``_fields``: a stored alert as an AlertEvent."""
    return chat_pb2.AlertEvent(
        alert_id=alert_id, monitor=fields.get("monitor", ""), action=fields.get("action", ""),
        peak_score=float(fields.get("peak_score", 0) or 0), threshold=float(fields.get("threshold", 0) or 0),
        token_start=int(fields.get("token_start", 0)), token_end=int(fields.get("token_end", 0)),
        excerpt=fields.get("excerpt", ""), timestamp_ms=int(fields.get("timestamp_ms", 0)),
        request_id=fields.get("request_id", ""), policy=fields.get("policy", ""),
        value=float(fields.get("value", 0) or 0), phase=fields.get("phase", ""),
        aggregation=fields.get("aggregation", ""))
