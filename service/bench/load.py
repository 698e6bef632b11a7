"""Load: concurrent streaming clients across tenants for a fixed time, and proof that nothing was lost.

``run_load`` drives a running server through its gRPC API only: ``clients`` concurrent client loops,
spread round-robin over the tenants, each sending one ``Generate`` after another (each a streaming call
on its own channel) until ``duration_s`` has passed; a request started before the deadline runs to its
end. Before the load, one ``WatchAlerts`` stream per tenant is opened with that tenant's key. After it,
the report holds:

* throughput: token deltas / wall and requests / wall, wall = load start to the last request's end;
* TTFT: from sending the request to its first ``TokenDelta`` (client side); TPOT: per request,
  (last delta - first delta) / (deltas - 1); p50 and p99 over requests (nearest rank);
* errors: every RPC that did not end OK (the load is expected to have none);
* the no-loss checks (``LoadReport.violations``, by kind):

  - ``final``: each request got exactly one ``FinalRecord``, as its last message, carrying the request
    id it was sent with; deltas are numbered 0, 1, 2, ... and their text plus ``FinalRecord.tail`` is
    ``FinalRecord.text``; nothing follows a ``stop`` alert;
  - ``usage`` / ``usage_stopped``: ``usage.completion_tokens`` equals the number of deltas received
    (``usage_stopped``: the same on requests a policy stopped, kept apart);
  - ``alert``: in-band alerts name their own request; ``annotate`` alerts carry no ``alert_id``, every
    other action one; one request's ids increase;
  - ``lost`` / ``duplicate`` / ``order`` / ``content``: per tenant, the alert ids seen in-band, sorted
    by stream id, are exactly the tenant's Redis Stream entries added during the load, and the tenant's
    ``WatchAlerts`` delivered exactly that sequence, each alert once, equal field by field to the
    in-band one;
  - ``isolation``: no ``WatchAlerts`` stream delivered an alert of another tenant's request.

``burst`` fires many Generate calls at once (the overload check: past ``limits.max_queue`` the excess is
refused with RESOURCE_EXHAUSTED at once). ``default_tenants`` sets up four tenants on a server with the
default model's monitor pack; ``python -m service.bench.load`` starts an in-process replica on the
default model with a Redis store, runs the load and prints the tables (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from service.bench.measure import system_busy_s
from service.client import SteerwatchClient, request
from service.protos import alert_pb2, alert_pb2_grpc, chat_pb2, chat_pb2_grpc
from service.servicers.chat import alert_from_fields
from service.store.base import Store

PROMPTS = (
    "Tell me about your weekend.",
    "What is the capital of France?",
    "Can you help me write a poem about the sea?",
    "I think the moon is made of cheese, right?",
    "How do I make a good cup of coffee?",
    "What should I pack for a trip to the mountains?",
    "Explain why the sky is blue.",
    "My boss says my report is brilliant. Is it?",
    "Give me three ideas for a birthday party.",
    "What is the best way to learn a new language?",
    "Is it safe to swim right after eating?",
    "Describe your favourite city.",
)
VIOLATION_KINDS = ("error", "final", "usage", "usage_stopped", "alert", "lost", "duplicate", "order", "content",
                   "isolation")
CATCH_UP_S = 10.0  # how long watchers may take, after the load, to deliver what the streams hold
SETTLE_S = 0.5  # then how long they are watched for anything more (duplicates)
Say = Callable[[str], None]


# ---- what is run ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TenantLoad:
    """One tenant's share of the load: its key, the policy its requests name and what they ask."""

    tenant: str
    api_key: str
    policy: str = ""  # "" = the tenant's default policy (or none)
    description: str = ""  # what the policy does, for the table
    max_tokens: int = 32
    temperature: float = 0.7
    include_readings: bool = False
    prompts: tuple[str, ...] = PROMPTS


@dataclass
class RequestRecord:
    """One Generate call as the client saw it; times are seconds since the load started."""

    tenant: str
    request_id: str
    client: int
    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    text: str = ""
    alerts: list[Any] = field(default_factory=list)  # AlertEvents, in order
    alert_times: list[float] = field(default_factory=list)  # when each arrived
    kinds: list[str] = field(default_factory=list)  # every message's kind, in order
    finals: list[Any] = field(default_factory=list)
    error: str | None = None  # "CODE: details" when the call failed

    @property
    def final(self) -> Any:
        return self.finals[-1] if self.finals else None

    @property
    def deltas(self) -> int:
        return len(self.token_times)

    @property
    def stopped(self) -> bool:
        return any(a.action == "stop" for a in self.alerts)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclass(frozen=True)
class Violation:
    kind: str  # one of VIOLATION_KINDS
    tenant: str
    detail: str


@dataclass
class TenantStats:
    """One row of the table."""

    name: str
    description: str
    requests: int
    tokens: int
    wall_s: float
    ttft_ms: tuple[float, float]  # p50, p99
    tpot_ms: tuple[float, float]
    alerts_inband: int  # every in-band alert, annotate included
    alerts_stored: int  # in-band alerts with an alert_id
    alerts_redis: int  # entries of the tenant's Redis Stream added during the load
    alerts_watched: int  # alerts its WatchAlerts stream delivered
    stops: int  # requests a policy stopped
    errors: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    wall_s: float
    rows: list[TenantStats]  # one per tenant, then the total
    requests: list[RequestRecord]
    violations: list[Violation]
    checks: list[tuple[str, str]]  # (what was checked, outcome), in table order
    watched: dict[str, list[Any]]  # per tenant: the AlertEvents its WatchAlerts delivered, in order
    streams: dict[str, list[Any]] | None  # per tenant: its alert stream's entries (StoredAlert) after the start
    info: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.requests if r.error is not None)

    @property
    def total(self) -> TenantStats:
        return self.rows[-1]

    def of_kind(self, *kinds: str) -> list[Violation]:
        return [v for v in self.violations if v.kind in kinds]

    @property
    def ok(self) -> bool:
        return not self.violations


# ---- the load ----------------------------------------------------------------------------------------

class _Watch:
    """One tenant's WatchAlerts stream, read into ``got`` by a background task."""

    def __init__(self, channel: grpc.aio.Channel, load: TenantLoad, after_id: str) -> None:
        stub = alert_pb2_grpc.AlertServiceStub(channel)
        self.call = stub.WatchAlerts(alert_pb2.WatchAlertsRequest(after_id=after_id),
                                     metadata=(("x-api-key", load.api_key),))
        self.got: list[Any] = []
        self.times: list[float] = []  # perf_counter at each arrival
        self.error: str | None = None
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for alert in self.call:
                self.got.append(alert)
                self.times.append(time.perf_counter())
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.wait({self.task}, timeout=5)


async def _one_request(stub: Any, load: TenantLoad, rec: RequestRecord, seed: int, t0: float,
                       timeout_s: float) -> None:
    prompt = load.prompts[seed % len(load.prompts)]
    req = request([("user", prompt)], max_tokens=load.max_tokens, temperature=load.temperature, seed=seed,
                  include_readings=load.include_readings, policy=load.policy)
    md = (("x-api-key", load.api_key), ("x-request-id", rec.request_id))
    try:
        call = stub.Generate(req, metadata=md, timeout=timeout_s)
        async for ev in call:
            now = time.perf_counter() - t0
            kind = ev.WhichOneof("event")
            rec.kinds.append(kind or "")
            if kind == "token":
                rec.token_times.append(now)
                rec.indices.append(ev.token.index)
                rec.text += ev.token.text
            elif kind == "alert":
                rec.alerts.append(ev.alert)
                rec.alert_times.append(now)
            elif kind == "final":
                rec.finals.append(ev.final)
    except grpc.aio.AioRpcError as e:
        rec.error = f"{e.code().name}: {e.details()}"
    except Exception as e:  # anything else is a client-side failure, reported the same way
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter() - t0


async def _client(i: int, target: str, load: TenantLoad, tag: str, deadline: float, t0: float,
                  records: list[RequestRecord], timeout_s: float, options: Sequence[tuple[str, Any]]) -> None:
    async with grpc.aio.insecure_channel(target, options=list(options)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        n = 0
        while time.perf_counter() < deadline:
            rec = RequestRecord(load.tenant, f"{tag}-c{i}-{n}", i, time.perf_counter() - t0)
            records.append(rec)
            await _one_request(stub, load, rec, seed=1000 * i + n, t0=t0, timeout_s=timeout_s)
            n += 1
            if rec.error is not None:
                await asyncio.sleep(0.1)  # a failing server must not be hammered in a tight loop


async def _start_ids(tenants: Sequence[TenantLoad], store: Store | None) -> dict[str, str]:
    """Where each tenant's alert stream stands before the load: its newest id, or "0" when empty."""
    out: dict[str, str] = {}
    for t in tenants:
        if store is None:
            out[t.tenant] = ""
        else:
            newest = await store.latest_alerts(t.tenant, 1)
            out[t.tenant] = newest[-1].alert_id if newest else "0"
    return out


async def _stream_after(store: Store, tenant: str, after_id: str) -> list[Any]:
    """Every entry of the tenant's alert stream after ``after_id``, oldest first."""
    out: list[Any] = []
    while True:
        page = await store.read_alerts(tenant, after_id, count=500)
        if not page:
            return out
        out.extend(page)
        after_id = page[-1].alert_id


async def run_load(target: str, tenants: Sequence[TenantLoad], clients: int, duration_s: float, *,
                   store: Store | None = None, timeout_s: float = 300.0, progress: Say | None = None,
                   info: dict[str, str] | None = None, options: Sequence[tuple[str, Any]] = ()) -> LoadReport:
    """Run the load against ``target`` and check it (see the module docstring).

    ``store``: the server's store (any Store on the same Redis and prefix), read to check each tenant's
    alert stream; without it that check is skipped and watches start "from now" after a short wait.
    ``timeout_s``: the deadline of each Generate call.
    """
    if clients < 1 or not tenants:
        raise ValueError("run_load needs at least one client and one tenant")
    say = progress or (lambda _msg: None)
    tag = uuid.uuid4().hex[:8]
    names = [t.tenant for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"tenants must be distinct, got {names}")
    start_ids = await _start_ids(tenants, store)
    watch_channel = grpc.aio.insecure_channel(target, options=list(options))
    watches = {t.tenant: _Watch(watch_channel, t, start_ids[t.tenant]) for t in tenants}
    try:
        if store is None:
            await asyncio.sleep(1.0)  # a "from now" watch resolves its start at some moment after the call
        for name, w in watches.items():
            if w.task.done():
                raise RuntimeError(f"the WatchAlerts stream of tenant {name!r} ended before the load: {w.error}")
        say(f"load: {clients} clients over {len(tenants)} tenants for {duration_s:g} s")
        records: list[RequestRecord] = []
        busy0, own0 = system_busy_s(), time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        await asyncio.gather(*(_client(i, target, tenants[i % len(tenants)], tag, deadline, t0, records, timeout_s,
                                       options) for i in range(clients)))
        wall = time.perf_counter() - t0
        others = max(0.0, (system_busy_s() - busy0) - (time.process_time() - own0)) / wall
        say(f"load: {len(records)} requests in {wall:.1f} s; waiting for the alert streams")
        expected = {t.tenant: sum(1 for r in records if r.tenant == t.tenant for a in r.alerts if a.alert_id)
                    for t in tenants}
        loop = asyncio.get_running_loop()
        until = loop.time() + CATCH_UP_S
        while loop.time() < until and any(len(watches[n].got) < expected[n] for n in names):
            await asyncio.sleep(0.05)
        await asyncio.sleep(SETTLE_S)
    finally:
        for w in watches.values():
            await w.close()
        await watch_channel.close()
    streams = {n: await _stream_after(store, n, start_ids[n]) for n in names} if store is not None else None
    watched = {n: list(w.got) for n, w in watches.items()}
    delivery = _delivery_ms(records, watches, t0)
    watch_errors = {n: w.error for n, w in watches.items() if w.error}
    report = build_report(tenants, clients, duration_s, wall, records, watched, streams, watch_errors)
    report.info.update({
        "clients": f"{clients} (round-robin over {len(tenants)} tenants, one channel each)",
        "duration": f"{duration_s:g} s of new requests; wall {wall:.1f} s until the last one ended",
        "other CPU": f"{others:.2f} cores busy in other processes during the load",
        "alert delivery": _delivery_text(delivery),
        **(info or {}),
    })
    return report


def _delivery_ms(records: list[RequestRecord], watches: dict[str, _Watch], t0: float) -> list[float]:
    """For each stored alert: when its tenant's WatchAlerts delivered it minus when the client got it
    in-band, in ms (negative: the watch was first)."""
    inband = {a.alert_id: at for r in records for a, at in zip(r.alerts, r.alert_times, strict=True) if a.alert_id}
    return [(at - t0 - inband[a.alert_id]) * 1e3 for w in watches.values()
            for a, at in zip(w.got, w.times, strict=True) if a.alert_id in inband]


def _delivery_text(ms: list[float]) -> str:
    if not ms:
        return "no stored alerts"
    p50, p99 = _percentiles(ms)
    return (f"WatchAlerts received each stored alert {p50:.0f} ms (p50), {p99:.0f} ms (p99), {max(ms):.0f} ms "
            f"(max) after its Generate stream did ({len(ms)} alerts)")


# ---- the checks --------------------------------------------------------------------------------------

def _stream_key(alert_id: str) -> tuple[int, int]:
    ms, _, seq = alert_id.partition("-")
    return int(ms), int(seq or 0)


def _check_request(r: RequestRecord, out: list[Violation]) -> None:
    def bad(kind: str, detail: str) -> None:
        out.append(Violation(kind, r.tenant, f"{r.request_id}: {detail}"))

    if r.error is not None:
        bad("error", r.error)
        return
    if len(r.finals) != 1 or r.kinds[-1:] != ["final"]:
        bad("final", f"{len(r.finals)} FinalRecords, messages end with {r.kinds[-3:]}")
        return
    f = r.final
    if f.request_id != r.request_id:
        bad("final", f"FinalRecord.request_id is {f.request_id!r}")
    if r.indices != list(range(len(r.indices))):
        bad("final", f"token indices {r.indices[:10]}... are not 0, 1, 2, ...")
    if r.text + f.tail != f.text:
        bad("final", f"deltas + tail {r.text + f.tail!r} != FinalRecord.text {f.text!r}")
    if f.usage.completion_tokens != r.deltas:
        bad("usage_stopped" if r.stopped else "usage",
            f"usage.completion_tokens {f.usage.completion_tokens} != {r.deltas} token deltas received"
            + (" (stopped by policy)" if r.stopped else ""))
    if r.stopped:
        alert_at = [i for i, k in enumerate(r.kinds) if k == "alert"]
        after = r.kinds[alert_at[[a.action for a in r.alerts].index("stop")]:]
        if "token" in after or f.finish_reason != chat_pb2.FINISH_REASON_POLICY:
            bad("final", f"a stop alert was followed by {after} and finish reason {f.finish_reason}")
    ids = []
    for a in r.alerts:
        if a.request_id != r.request_id:
            bad("alert", f"in-band alert {a.alert_id or a.monitor} names request {a.request_id!r}")
        if (a.action == "annotate") == bool(a.alert_id):
            bad("alert", f"action {a.action} with alert_id {a.alert_id!r}")
        if a.alert_id:
            ids.append(a.alert_id)
    if ids != sorted(ids, key=_stream_key) or len(set(ids)) != len(ids):
        bad("order", f"in-band alert ids not increasing: {ids}")


def _check_tenant(tenant: str, records: list[RequestRecord], watched: list[Any], stream: list[Any] | None,
                  own_requests: set[str], out: list[Violation]) -> None:
    def bad(kind: str, detail: str) -> None:
        out.append(Violation(kind, tenant, detail))

    inband = {a.alert_id: a for r in records for a in r.alerts if a.alert_id}
    inband_ids = [a.alert_id for r in records for a in r.alerts if a.alert_id]
    if len(inband) != len(inband_ids):
        bad("duplicate", f"{len(inband_ids) - len(inband)} alert ids seen twice in-band")
    expected = sorted(inband, key=_stream_key)
    for a in watched:
        if a.request_id not in own_requests:
            bad("isolation", f"WatchAlerts delivered {a.alert_id} of request {a.request_id!r} "
                             f"({a.monitor}, {a.action}), not one of this tenant's")
    sequences = [("WatchAlerts", [a.alert_id for a in watched])]
    if stream is not None:
        sequences.insert(0, ("Redis Stream", [a.alert_id for a in stream]))
    for where, got in sequences:
        missing = [i for i in expected if i not in set(got)]
        extra = [i for i in got if i not in inband]
        if missing:
            bad("lost", f"{len(missing)} of {len(expected)} in-band alerts missing from the {where}: {missing[:5]}")
        if extra and where == "Redis Stream":
            bad("lost", f"{len(extra)} {where} entries never seen in-band: {extra[:5]}")
        if len(set(got)) != len(got):
            bad("duplicate", f"the {where} holds {len(got) - len(set(got))} alert ids twice")
        if not missing and not extra and len(set(got)) == len(got) and got != expected:
            bad("order", f"the {where} order differs from the stream order of the in-band alerts")
    for a in watched:
        if a.alert_id in inband and a != inband[a.alert_id]:
            bad("content", f"WatchAlerts {a.alert_id} differs from the in-band alert")
    if stream is not None:
        for s in stream:
            if s.alert_id in inband and alert_from_fields(s.alert_id, s.fields) != inband[s.alert_id]:
                bad("content", f"Redis Stream entry {s.alert_id} differs from the in-band alert")


def _percentiles(xs: list[float]) -> tuple[float, float]:
    """p50 and p99, nearest rank (with fewer than 100 samples p99 is the largest)."""
    if not xs:
        return float("nan"), float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(0.50 * len(s)) - 1)], s[max(0, math.ceil(0.99 * len(s)) - 1)]


def _stats(name: str, description: str, records: list[RequestRecord], wall: float, watched: int,
           redis: int) -> TenantStats:
    done = [r for r in records if r.error is None]
    ttft = [r.ttft_s * 1e3 for r in done if r.ttft_s is not None]
    tpot = [r.tpot_s * 1e3 for r in done if r.tpot_s is not None]
    alerts = [a for r in records for a in r.alerts]
    return TenantStats(name, description, len(done), sum(r.deltas for r in done), wall, _percentiles(ttft),
                       _percentiles(tpot), len(alerts), sum(1 for a in alerts if a.alert_id), redis, watched,
                       sum(1 for r in done if r.stopped), len(records) - len(done))


def build_report(tenants: Sequence[TenantLoad], clients: int, duration_s: float, wall: float,
                 records: list[RequestRecord], watched: dict[str, list[Any]], streams: dict[str, list[Any]] | None,
                 watch_errors: dict[str, str] | None = None) -> LoadReport:
    """The statistics and the no-loss checks of a finished load (what ``run_load`` returns)."""
    violations: list[Violation] = []
    for r in records:
        _check_request(r, violations)
    for name, err in (watch_errors or {}).items():
        violations.append(Violation("error", name, f"WatchAlerts failed: {err}"))
    rows = []
    for t in tenants:
        mine = [r for r in records if r.tenant == t.tenant]
        stream = streams[t.tenant] if streams is not None else None
        _check_tenant(t.tenant, mine, watched[t.tenant], stream, {r.request_id for r in mine}, violations)
        rows.append(_stats(t.tenant, t.description, mine, wall, len(watched[t.tenant]),
                           len(stream) if stream is not None else -1))
    redis_total = sum(len(s) for s in streams.values()) if streams is not None else -1
    rows.append(_stats("all", f"{len(tenants)} tenants", records, wall, sum(len(w) for w in watched.values()),
                       redis_total))
    report = LoadReport(clients, duration_s, wall, rows, records, violations, [], watched, streams)
    report.checks = _checks(report, streams is not None)
    return report


def _checks(report: LoadReport, redis: bool) -> list[tuple[str, str]]:
    total = report.total
    stopped = sum(1 for r in report.requests if r.error is None and r.stopped)

    def outcome(kinds: tuple[str, ...], passed: str) -> str:
        found = report.of_kind(*kinds)
        if not found:
            return passed
        return f"FAILED {len(found)}: " + "; ".join(f"{v.tenant}: {v.detail}" for v in found[:3])

    return [
        ("RPC errors", outcome(("error",), "0")),
        ("one FinalRecord per request, last; deltas + tail = text", outcome(("final",), f"ok ({total.requests} requests)")),
        ("usage.completion_tokens = token deltas received", outcome(("usage",), f"ok ({total.requests - stopped} requests)")),
        ("... on requests stopped by policy", outcome(("usage_stopped",), f"ok ({stopped} requests)")),
        ("in-band alerts: own request id, alert_id iff not annotate, increasing", outcome(("alert",), "ok")),
        ("every stored in-band alert in the tenant's Redis Stream, once, in order",
         outcome(("lost", "duplicate", "order"), f"ok ({total.alerts_stored} alerts)") if redis else "not checked (no store)"),
        ("the same sequence on the tenant's WatchAlerts, equal field by field",
         outcome(("content",), f"ok ({total.alerts_watched} alerts)")),
        ("no alert of another tenant on a tenant's WatchAlerts", outcome(("isolation",), "ok")),
    ]


# ---- overload ----------------------------------------------------------------------------------------

@dataclass
class BurstCall:
    """One call of a burst: accepted (ran to its FinalRecord) or refused, and when it ended."""

    code: str  # "OK" or the status code's name
    details: str
    latency_s: float  # from sending to the end of the call (refused: the error's arrival)
    deltas: int
    final: Any


async def burst(target: str, api_key: str, n: int, *, prompt: str = "Tell me a story", max_tokens: int = 64,
                timeout_s: float = 60.0) -> list[BurstCall]:
    """Send ``n`` Generate calls at once on one channel and wait for all of them."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        req = request(prompt, max_tokens=max_tokens)

        async def one() -> BurstCall:
            t = time.perf_counter()
            deltas, final = 0, None
            try:
                async for ev in stub.Generate(req, metadata=(("x-api-key", api_key),), timeout=timeout_s):
                    kind = ev.WhichOneof("event")
                    deltas += kind == "token"
                    final = ev.final if kind == "final" else final
            except grpc.aio.AioRpcError as e:
                return BurstCall(e.code().name, e.details() or "", time.perf_counter() - t, deltas, final)
            return BurstCall("OK", "", time.perf_counter() - t, deltas, final)

        return list(await asyncio.gather(*(one() for _ in range(n))))


def burst_markdown(calls: Sequence[BurstCall]) -> str:
    """Calls by outcome, with their latencies (p50, p99, max)."""
    lines = ["| outcome | calls | latency p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for code in sorted({c.code for c in calls}):
        lat = [c.latency_s * 1e3 for c in calls if c.code == code]
        p50, p99 = _percentiles(lat)
        lines.append(f"| {code} | {len(lat)} | {p50:.0f} | {p99:.0f} | {max(lat):.0f} |")
    return "\n".join(lines)


# ---- the default scenario: four tenants on the default model's monitor pack ------------------------------

async def default_tenants(target: str, store: Store, *, prefix: str = "load", max_tokens: int = 32,
                          progress: Say | None = None) -> list[TenantLoad]:
    """Four tenants with different policies on a server that loaded the default model's monitor pack.

    * ``<prefix>-a``: the pack's deception probe (its calibrated threshold, action ``alert``, one alert per
      episode) and ``-4 x pack:sycophancy`` at layer 12; its requests ask for per-token readings;
    * ``<prefix>-b``: a direction monitor on a vector it uploads (a random unit direction at the middle
      layer) with an EMA rule (alpha 0.3) and action ``stop``; the threshold is the lower quartile of the
      peak EMA over a few calibration generations, so most requests are stopped, some mid-stream;
    * ``<prefix>-c``: an SAE-feature monitor on ``pack:sae`` (annotate) and ``+2 x`` a CAA vector it
      creates from contrastive pairs (weddings vs weather, layer 6);
    * ``<prefix>-d``: no policy.

    Keys are minted in ``store`` (the server's); everything else goes through the API. Each policy is
    the tenant's default.
    """
    say = progress or (lambda _msg: None)
    names = [f"{prefix}-{x}" for x in "abcd"]
    keys = [(await store.create_key(n, "tenant"))[0] for n in names]
    a, b, c = (SteerwatchClient(target, keys[i], timeout=120) for i in range(3))
    try:
        info = await a.info()
        probe = next((p for p in info.probes if p.probe_id == "pack:deception"), None)
        if probe is None or "pack:sae" not in [s.sae_id for s in info.saes]:
            raise RuntimeError("the server has no monitor pack (pack:deception, pack:sae); build it with "
                               "`steerwatch pack build`")
        say("setup: tenant policies")
        await a.put_policy("deception-watch", {
            "monitors": [{"name": "deception", "kind": "probe", "source": "pack:deception",
                          "threshold": probe.threshold, "action": "alert"}],
            "steering": [{"kind": "add", "vector": "pack:sycophancy", "coef": -4.0, "layers": [12],
                          "phase": "generation"}]}, make_default=True)

        layer = info.n_layers // 2
        await b.upload_vector("mood", {layer: _unit_vector(info.d_model, seed=2)}, method="manual",
                              source="steerwatch load: a random unit direction")
        rule = {"name": "mood", "kind": "direction", "source": "mood", "layer": layer, "aggregation": "ema",
                "alpha": 0.3, "scope": "generation"}
        await b.put_policy("mood-guard", {"monitors": [{**rule, "threshold": 1e30, "action": "annotate"}]},
                           make_default=True)
        say("setup: calibrating the stop threshold of tenant b")
        threshold = await _calibrate_ema(b, "mood", 0.3, max_tokens)
        await b.put_policy("mood-guard", {"monitors": [{**rule, "threshold": threshold, "action": "stop"}]},
                           make_default=True)

        say("setup: a CAA vector from pairs for tenant c")
        await c.create_vector_from_pairs("weddings", [
            ("I love talking about weddings.", "I love talking about the weather."),
            ("Weddings are the best topic.", "The weather is the best topic."),
            ("Let me tell you about a wedding.", "Let me tell you about the weather.")], layers=[6],
            position="mean")
        await c.put_policy("sae-watch", {
            "monitors": [{"name": "feature-853", "kind": "sae_feature", "source": "pack:sae", "feature": 853,
                          "threshold": 1.0, "action": "annotate"}],
            "steering": [{"kind": "add", "vector": "weddings", "coef": 2.0, "layers": [6]}]}, make_default=True)
    finally:
        for x in (a, b, c):
            await x.close()
    return [
        TenantLoad(names[0], keys[0], description=f"probe pack:deception > {probe.threshold:.3f} alert; "
                   "-4 x pack:sycophancy @L12", max_tokens=max_tokens, include_readings=True),
        TenantLoad(names[1], keys[1], description=f"direction 'mood' @L{layer}, EMA 0.3 > {threshold:.0f} stop",
                   max_tokens=max_tokens),
        TenantLoad(names[2], keys[2], description="pack:sae feature 853 > 1 annotate; +2 x 'weddings' (CAA) @L6",
                   max_tokens=max_tokens),
        TenantLoad(names[3], keys[3], description="no policy", max_tokens=max_tokens),
    ]


def _unit_vector(d_model: int, seed: int) -> list[float]:
    import torch

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g)
    return (v / v.norm()).tolist()


async def _calibrate_ema(client: Any, monitor: str, alpha: float, max_tokens: int, n: int = 4) -> float:
    """The lower quartile, over ``n`` generations under the tenant's policy, of the peak EMA of ``monitor``
    (a threshold most generations cross at some point, not all)."""
    async def peak(seed: int) -> float:
        readings = []
        async for ev in client.generate([("user", PROMPTS[seed % len(PROMPTS)])], max_tokens=max_tokens,
                                        temperature=0.7, seed=seed, include_readings=True):
            if ev.WhichOneof("event") == "token":
                readings.append(ev.token.readings[monitor])
        ema, best = readings[0], readings[0]
        for s in readings[1:]:
            ema = alpha * s + (1 - alpha) * ema
            best = max(best, ema)
        return best

    peaks = sorted(await asyncio.gather(*(peak(90_000 + i) for i in range(n))))
    return float(peaks[len(peaks) // 4])


# ---- tables ------------------------------------------------------------------------------------------

HEADERS = ("tenant", "policy", "requests", "tokens", "tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
           "TPOT p50 ms", "TPOT p99 ms", "alerts in-band (stored)", "Redis / watched", "policy stops", "errors")


def _cells(row: TenantStats) -> list[str]:
    redis = "–" if row.alerts_redis < 0 else str(row.alerts_redis)
    return [row.name, row.description, str(row.requests), str(row.tokens), f"{row.tokens_per_s:.2f}",
            f"{row.requests_per_s:.3f}", _ms(row.ttft_ms[0]), _ms(row.ttft_ms[1]), _ms(row.tpot_ms[0]),
            _ms(row.tpot_ms[1]), f"{row.alerts_inband} ({row.alerts_stored})", f"{redis} / {row.alerts_watched}",
            str(row.stops), str(row.errors)]


def _ms(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.0f}"


def markdown(report: LoadReport) -> str:
    """The report as a Markdown list (machine and run), the tenants' table and the checks' table."""
    lines = [f"- {k}: {v}" for k, v in report.info.items()]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(HEADERS) - 2)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {what} | {result} |" for what, result in report.checks]
    return "\n".join(lines)


def rich_tables(report: LoadReport) -> list[Any]:
    """The report as rich tables (the machine in the first one's caption)."""
    from rich.table import Table

    table = Table(title="steerwatch load", caption="; ".join(f"{k}: {v}" for k, v in report.info.items()))
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in report.rows:
        table.add_row(*_cells(row))
    checks = Table(title="no-loss checks")
    checks.add_column("check")
    checks.add_column("result")
    for what, result in report.checks:
        checks.add_row(what, result)
    return [table, checks]


# ---- python -m service.bench.load ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.bench.load",
                                description="Load an in-process replica on the default model (HF engine, CPU) "
                                            "with a Redis store; print throughput, latency and the no-loss checks.")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (round-robin over 4 tenants)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which new requests are sent")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--redis-url", default=os.environ.get("STEERWATCH_TEST_REDIS_URL")
                   or os.environ.get("STEERWATCH_REDIS_URL") or "redis://127.0.0.1:6379/0",
                   help="Redis for the store (default $STEERWATCH_TEST_REDIS_URL, $STEERWATCH_REDIS_URL, local)")
    p.add_argument("--max-batch", type=int, default=16, help="the replica's limits.max_batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    return p


async def run_cli(args: argparse.Namespace, say: Say) -> LoadReport:
    """Start a replica (unique Redis key prefix, removed afterwards), set up the tenants, run the load."""
    from service.bench.measure import machine_info
    from service.models import load_model
    from service.serve import start_replica
    from service.settings import Settings
    from service.store import open_store

    settings = Settings.load(None, model="default", engine="hf", dtype=args.dtype, device="cpu", host="127.0.0.1",
                             port=0, metrics_port=0, redis_url=args.redis_url,
                             limits={"max_batch": args.max_batch})
    say("loading the default model")
    lm = await asyncio.to_thread(load_model, "default", dtype=args.dtype, device="cpu", progress=False)
    info = machine_info(lm)
    prefix = f"steerwatch-load:{uuid.uuid4().hex}:"
    store = await open_store(args.redis_url, prefix=prefix)
    try:
        replica = await start_replica(settings, lm=lm, store=store)
        try:
            target = f"127.0.0.1:{replica.port}"
            tenants = await default_tenants(target, store, max_tokens=args.max_tokens, progress=say)
            info.update({"engine": "hf", "store": "Redis", "replica": "in-process: server and clients share one asyncio loop; loopback gRPC",
                         "max_batch": str(args.max_batch), "max_tokens per request": f"{args.max_tokens} "
                         "(temperature 0.7, seeded; chat messages)"})
            report = await run_load(target, tenants, args.clients, args.duration, store=store, progress=say,
                                    info=info)
            report.info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            return report
        finally:
            await replica.stop(0.0)
    finally:
        from service.store.redis_store import delete_prefix

        await delete_prefix(args.redis_url, prefix)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 2:
        print("error: --clients must be >= 1, --duration > 0, --max-tokens >= 2", file=sys.stderr)
        return 2
    err = Console(stderr=True)
    report = asyncio.run(run_cli(args, lambda msg: err.print(f"[dim]{msg}[/]")))
    out = Console()
    for table in rich_tables(report):
        out.print(table)
    if args.markdown:
        print(markdown(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
