"""Hostile input (issue 7, part 3): property-based fuzzing of every RPC against a real replica.

One replica (tiny random LLaMA, 3 layers, d_model 64, Redis store) serves the whole module, and a second
one on the in-memory store serves the management fuzzing; each runs on an event loop in a background
thread, and each hypothesis example runs its calls on that loop. Inputs are request messages built field
by field from hostile values (NaN and inf, wrong widths, huge norms, coefficients at and beyond the
limits, int32 extremes, unknown enum values, prompts around the context limit, NUL, RTL overrides,
combining marks, emoji, odd ids and tenants, strings past the message size), policy JSON (random
documents, deep nesting, huge literals, lone surrogate escapes, valid policies with one poisoned field),
metadata (request ids, API key headers) and raw wire bytes. For every example:

1. the status is OK or one of the client-error codes (never INTERNAL or UNKNOWN; the one exception,
   request bytes that do not parse at all, is the strict xfail below), and an error's details start
   with the field it is about (``steering[0].coef: ...``); the targeted cases also check the field and
   the allowed range;
2. the replica keeps serving others: a well-formed greedy Generate of another tenant, sent *together*
   with the hostile call (so it may share its batch), ends with a final record and the same tokens it
   generates alone;
3. nothing is lost or corrupted: a tenant's stored policy and vector are byte-for-byte unchanged after
   every failing write.

The last test checks health (server and every service SERVING), the engine thread, and that the
replica's metrics counted no INTERNAL or UNKNOWN status for the whole module.

Examples are derandomized (the same inputs every run, for CI); ``STEERWATCH_FUZZ_EXPLORE=1`` draws fresh
ones and ``STEERWATCH_FUZZ_SCALE=N`` multiplies every example count.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument as HypothesisInvalidArgument

from service.models import encode_prompt
from service.models.tiny import byte_tokenizer
from service.protos import alert_pb2, chat_pb2, common_pb2, model_pb2, policy_pb2, vector_pb2
from steering.errors import InvalidArgument
from tests.loop_thread import LoopThread
from tests.service.grpc_harness import (
    D_MODEL,
    N_LAYERS,
    Client,
    Result,
    Rig,
    add_steering,
    direction_monitor,
    random_vector,
    rig,
)

T = TypeVar("T")
Code = grpc.StatusCode

MAX_PROMPT = 64  # limits.max_prompt_tokens of the replica
MAX_NEW = 32  # limits.max_new_tokens
MAX_MESSAGE = 1024 * 1024  # limits.max_message_bytes (1 MiB: over-size requests stay cheap to send)
SERVER_COEF = 16.0  # limits.max_abs_coef (the default)
POLICY_COEF = 4.0  # a policy's default limits.max_abs_coef
KEEP_POLICY, KEEP_VECTOR = "keep", "keep-v"  # acme's state that must survive every failed write
HUGE_VECTOR = "huge"  # finite values whose float32 norm overflows (64 x 3e38)
KEPT = {KEEP_POLICY, KEEP_VECTOR, "wide", HUGE_VECTOR}  # what the fuzzed writes and deletes never name
BYSTANDER_PROMPT, BYSTANDER_TOKENS = "zzz", 6

ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED,
           Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION}
# "steering[0].coef: ...", "policy_json.monitors[1].name: ...", "layers[0].values: ...", 'policy_json["a b"]: ...'
FIELD_FIRST = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\[\d+\]|\["(?:[^"\\]|\\.)*"\]|\.[A-Za-z_][A-Za-z0-9_]*)*: \S')
# grpc's own refusal of an over-size message, before any servicer runs
TOO_LARGE = re.compile(r"^(SERVER: )?Received message larger than max \(\d+ vs\. \d+\)$")

SCALE = float(os.environ.get("STEERWATCH_FUZZ_SCALE", "1"))
EXPLORE = bool(os.environ.get("STEERWATCH_FUZZ_EXPLORE"))


def fuzz(n: int) -> Any:
    """Hypothesis settings for one property: ``n`` examples (times STEERWATCH_FUZZ_SCALE), no deadline
    (a replica answers in milliseconds but a loaded 2-core machine can stall one call), no database,
    the same examples on every run unless STEERWATCH_FUZZ_EXPLORE is set."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, derandomize=not EXPLORE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], print_blob=True)


# ---- the replica, on a loop in a background thread ------------------------------------------------------
@dataclass
class Outcome:
    """What one call answered: a status, its details, and (streams) the messages received."""

    code: grpc.StatusCode
    details: str
    messages: list[Any] = field(default_factory=list)


@dataclass(repr=False)
class Env:
    """The running replica, its clients and what must never change."""

    lt: LoopThread
    rig: Rig
    acme: Client  # tenant key: the hostile caller, owner of the kept policies and vectors
    bystander: Client  # tenant key of another tenant: one plain request with every hostile call
    plain: Client  # tenant key of a tenant nobody else touches (no policy: the server's defaults)
    admin: Client  # admin key (tenant "ops"): may name any tenant
    baseline: list[int]
    tokenizer: Any  # the server's tokenizer's twin (a fast tokenizer is not to be shared across threads)
    kept_policy: Any
    kept_vector: Any
    kept_blob: bytes
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (test, status) -> calls
    notes: list[str] = field(default_factory=list)  # made on the loop, noted on the test's thread

    def __repr__(self) -> str:
        return "Env(replica on a loop thread)"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' printer of failing examples
        p.text(repr(self))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        self.notes.clear()
        try:
            return self.lt.run(coro, timeout)
        finally:
            for text in self.notes:
                try:
                    note(text)
                except HypothesisInvalidArgument:  # a plain test, not a hypothesis example
                    pass

    async def hostile(self, call: Awaitable[Outcome], *, check: bool = True) -> Outcome:
        """Run one hostile call together with the bystander's request; check properties 1 and 2."""
        return (await self.hostile_all([call], check=check))[0]

    async def hostile_all(self, calls: list[Awaitable[Outcome]], *, check: bool = True) -> list[Outcome]:
        """Run hostile calls at once, together with the bystander's request; check properties 1 and 2."""
        results = await asyncio.gather(*calls, self.bystander.generate(BYSTANDER_PROMPT, BYSTANDER_TOKENS))
        got: list[Outcome] = list(results[:-1])  # type: ignore[arg-type]
        bystander: Result = results[-1]  # type: ignore[assignment]
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split("[")[0].split(" ")[0]
        for o in got:
            self.codes[test, o.code.name] += 1
            self.notes.append(f"-> {o.code.name}: {o.details[:300]!r}")
        if check:
            for o in got:
                assert_client_error_or_ok(o)
        assert bystander.final.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
        assert bystander.token_ids == self.baseline, "a hostile request changed another tenant's generation"
        return got

    async def kept_intact(self) -> None:
        """Property 3: acme's policy and vector exactly as stored before the fuzzing began."""
        assert await self.acme.get_policy(KEEP_POLICY) == self.kept_policy
        assert await self.acme.get_vector(KEEP_VECTOR) == self.kept_vector
        record = await self.rig.store.get_vector("acme", KEEP_VECTOR)
        assert record is not None and record.blob == self.kept_blob

    async def sweep(self) -> None:
        """Delete what a fuzzed write of acme stored (a mutated request may store under any name)."""
        for p in await self.acme.list_policies():
            if p.name not in KEPT:
                await self.acme.delete_policy(p.name)
        for v in await self.acme.list_vectors():
            if v.vector_id not in KEPT:
                await self.acme.delete_vector(v.vector_id)


def assert_client_error_or_ok(o: Outcome) -> None:
    """Property 1: OK or a client-error code, and an error names its field first."""
    assert o.code in ALLOWED, f"{o.code.name}: {o.details}"
    if o.code is not Code.OK:
        assert o.details, f"{o.code.name} without details"
        assert FIELD_FIRST.match(o.details) or TOO_LARGE.match(o.details), \
            f"{o.code.name} details do not start with a field: {o.details!r}"


async def unary(call: Awaitable[Any]) -> Outcome:
    try:
        return Outcome(Code.OK, "", [await call])
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code(), e.details() or "")


async def stream(call: Any, idle: float | None = None) -> Outcome:
    """Read a server stream to its end; with ``idle``, a stream still open after that long counts as OK
    (WatchAlerts is endless) and is cancelled."""
    got: list[Any] = []

    async def read() -> None:
        async for m in call:
            got.append(m)

    try:
        if idle is None:
            await read()
        else:
            try:
                await asyncio.wait_for(read(), idle)
            except TimeoutError:
                call.cancel()
        return Outcome(Code.OK, "", got)
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code(), e.details() or "", got)


def check_generation(o: Outcome) -> None:
    """An OK Generate stream holds exactly one FinalRecord, as its last message."""
    if o.code is Code.OK:
        finals = [m for m in o.messages if m.WhichOneof("event") == "final"]
        assert len(finals) == 1 and o.messages[-1].WhichOneof("event") == "final", o.messages[-3:]


def _replica(store_kind: str, lm_copy: int) -> Iterator[Env]:
    """A replica with the kept state, on its own loop thread; prints the status codes it answered."""
    lt = LoopThread()
    stack = AsyncExitStack()

    async def start() -> Env:
        r = await stack.enter_async_context(rig(store_kind, lm_copy=lm_copy, max_prompt_tokens=MAX_PROMPT,
                                                max_new_tokens=MAX_NEW, default_max_tokens=4,
                                                max_message_bytes=MAX_MESSAGE))
        acme = r.client
        bystander, plain = await r.tenant_client("bystander"), await r.tenant_client("plain")
        admin = await r.tenant_client("ops", role="admin")
        await acme.upload_vector(KEEP_VECTOR, {layer: random_vector(10 + layer, 4.0) for layer in range(N_LAYERS)})
        await acme.upload_vector(HUGE_VECTOR, {layer: [3e38] * D_MODEL for layer in range(N_LAYERS)})
        await plain.upload_vector(KEEP_VECTOR, {layer: random_vector(3 + layer, 4.0) for layer in range(N_LAYERS)})
        await plain.upload_vector(HUGE_VECTOR, {layer: [3e38] * D_MODEL for layer in range(N_LAYERS)})
        await acme.put_policy(KEEP_POLICY, json.dumps({
            "description": "kept: must survive every hostile write",
            "monitors": [direction_monitor("keepmon", KEEP_VECTOR, 1e9, action="annotate", layer=2)],
            "steering": [add_steering(KEEP_VECTOR, 1.0, [1])]}))
        await acme.put_policy("wide", json.dumps({"limits": {"max_abs_coef": 1000.0, "max_tokens": MAX_NEW,
                                                                 "default_max_tokens": 4}}))
        baseline = await bystander.generate(BYSTANDER_PROMPT, BYSTANDER_TOKENS)
        record = await r.store.get_vector("acme", KEEP_VECTOR)
        assert record is not None
        tokenizer = byte_tokenizer(chat_template=r.app.engine.lm.tokenizer.chat_template)
        return Env(lt, r, acme, bystander, plain, admin, baseline.token_ids, tokenizer, await acme.get_policy(KEEP_POLICY),
                   await acme.get_vector(KEEP_VECTOR), record.blob)

    e: Env | None = None
    try:
        e = lt.run(start(), timeout=120)
        yield e
    finally:
        if e is not None:
            print(f"\nhostile input ({store_kind} store): {e.codes.total()} hostile calls; status codes per test:")
            for test in sorted({t for t, _ in e.codes}):
                print(f"  {test}: " + ", ".join(f"{c} {n}" for (t, c), n in sorted(e.codes.items()) if t == test))
        lt.run(stack.aclose(), timeout=60)
        lt.close()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """The replica most of the fuzzing runs against: Redis store (shared state, as in production)."""
    yield from _replica("redis", lm_copy=7)


@pytest.fixture(scope="module")
def memory_env() -> Iterator[Env]:
    """A second replica on the in-memory store (single-replica deployments), for the management RPCs."""
    yield from _replica("memory", lm_copy=8)


# ---- strategies -----------------------------------------------------------------------------------------
ODD = ["\x00", "\x01", "\x1b[2J", "\x7f", "\u202e", "\u200f", "\u200b", "\u2028", "\u0301", "\u0336\u0336",
       "\ufeff", "\ufffd", "\uffff", "\U0001F600", "\U0001F469\u200d\U0001F469\u200d\U0001F467", "\U0001F1FA\U0001F1F8",
       "\U000E0001", "\U0010FFFF", "\u00e9", "e\u0301", "\ufdfa", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
       "\u4e2d\u6587", "\n", "\r\n", "\t", " ", "/", "{", "}", ":", "*", "?", "%s%n", "'", '"', "\\", "..", "-", "_",
       ".", "pack:", "$", "0", "-0", "\u0661\u0662", "\u00b2"]
odd_text = st.lists(st.one_of(st.sampled_from(ODD), st.text(max_size=4)), max_size=10).map("".join)
valid_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,16}", fullmatch=True)
EDGE_IDS = ["", "a" * 128, "a" * 129, "pack:x", "pack:refusal", "-a", ".a", "a/b", "a{b}", "a b", "a\x00", "A" * 1000,
            "nope", "\u202eevil", "a:b:c", "0", "_"]
any_id = st.one_of(valid_id, odd_text, st.sampled_from(EDGE_IDS))
fuzz_id = any_id.filter(lambda s: s not in KEPT)  # writes never target the kept state by a valid request


def huge_text(max_reps: int = 400_000) -> st.SearchStrategy[str]:
    """A unit repeated up to ``max_reps`` times: up to ~1.6 MB, past the 1 MiB message limit."""
    return st.tuples(st.sampled_from(["a", "\u00e9", "\U0001F600", "\x00", "e\u0301", "\u202e", " "]),
                     st.integers(0, max_reps)).map(lambda t: t[0] * t[1])


texts = st.one_of(odd_text, st.text(max_size=80), huge_text(),
                  st.integers(MAX_PROMPT - 8, MAX_PROMPT + 8).map(lambda n: "a" * n))
INT32_EDGES = [-2**31, -2**31 + 1, -1, 0, 1, 2, 3, 4, 31, 32, 33, 63, 64, 65, 255, 1023, 1024, 1025, 2**31 - 1]
int32 = st.one_of(st.sampled_from(INT32_EDGES), st.integers(-2**31, 2**31 - 1))
layer_ints = st.one_of(st.integers(-1, N_LAYERS + 1), st.sampled_from(INT32_EDGES))
FLOAT_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-45, 1e-8, 0.5, 1.0, 4.0, 4.000001, -4.0, -4.000001,
               5.0, 16.0, 16.000001, -16.000001, 1000.0, 1000.0001, 1e6, 3e38, 3.4028235e38, 1e39, 1e308, -1e308]
floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True, allow_infinity=True))
enum_ints = st.one_of(st.integers(-1, 5), st.sampled_from([99, 2**31 - 1, -2**31]))
vector_refs = st.one_of(st.sampled_from([KEEP_VECTOR, HUGE_VECTOR, "nope", "", "pack:refusal"]), any_id)
names = st.one_of(st.sampled_from(["m", "m2", "keepmon", "", "x" * 64, "x" * 65]), odd_text)

add_msgs = st.builds(common_pb2.AddVector, vector_id=vector_refs, coef=floats,
                     layers=st.lists(layer_ints, max_size=4), phase=enum_ints)
ablate_msgs = st.builds(common_pb2.Ablate, vector_id=vector_refs, layers=st.lists(layer_ints, max_size=4),
                        all_layers=st.booleans(), phase=enum_ints)
clamp_msgs = st.builds(common_pb2.Clamp, sae_id=any_id, feature=int32, value=floats, max_multiple=st.booleans(),
                       layer=layer_ints, has_layer=st.booleans(), phase=enum_ints)
whens = st.one_of(st.just(""), names)
steering_entries = st.one_of(
    st.builds(lambda a, w: common_pb2.SteeringEntry(add=a, when=w), add_msgs, whens),
    st.builds(lambda a, w: common_pb2.SteeringEntry(ablate=a, when=w), ablate_msgs, whens),
    st.builds(lambda c, w: common_pb2.SteeringEntry(clamp=c, when=w), clamp_msgs, whens),
    st.builds(lambda w: common_pb2.SteeringEntry(when=w), whens))
KINDS = ["probe", "direction", "sae_feature", "", "DIRECTION", "direction\x00", "pack:deception"]
monitor_specs = st.builds(
    chat_pb2.MonitorSpec, name=names, kind=st.one_of(st.sampled_from(KINDS), odd_text), source=vector_refs,
    layer=layer_ints, has_layer=st.booleans(), feature=int32, threshold=floats,
    action=st.sampled_from(["", "annotate", "alert", "stop", "steer", "STOP", "\u202estop"]),
    aggregation=st.sampled_from(["", "max", "mean", "ema", "count", "median"]), window=int32, alpha=floats,
    count=int32, hysteresis=floats, scope=st.sampled_from(["", "prompt", "generation", "both", "all"]),
    metric=st.sampled_from(["", "dot", "cosine", "l2"]), explain=st.booleans())
sampling = st.builds(
    chat_pb2.SamplingParams, temperature=floats, top_p=floats, top_k=int32,
    max_tokens=st.sampled_from([-2**31, -1, 0, 1, 2, 3, 4, 5, MAX_NEW, MAX_NEW + 1, 2**31 - 1]),
    stop=st.lists(st.one_of(odd_text, st.sampled_from(["", "x" * 64, "x" * 65])), max_size=10),
    seed=st.one_of(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    has_seed=st.booleans())
messages = st.lists(st.builds(chat_pb2.ChatMessage, role=enum_ints, content=texts), max_size=3)
generate_requests = st.builds(
    chat_pb2.GenerateRequest, messages=messages, prompt=texts, sampling=st.one_of(st.none(), sampling),
    policy=st.one_of(st.sampled_from(["", KEEP_POLICY, "wide", "nope"]), any_id),
    steering=st.lists(steering_entries, max_size=3), monitors=st.lists(monitor_specs, max_size=3),
    include_readings=st.booleans())



@st.composite
def near_valid_generate(draw: st.DrawFn) -> Any:
    """A request that passes every check (short prompt, sampling in range, steering and monitors on the
    tenant's vectors, a gate now and then), then maybe one field replaced by a hostile value: the fuzzing
    reaches the engine, the batch tables and the monitors, not only the validation."""
    vectors = st.sampled_from([KEEP_VECTOR, HUGE_VECTOR])
    layers = st.lists(st.integers(0, N_LAYERS - 1), max_size=N_LAYERS, unique=True)
    entries = draw(st.lists(st.one_of(
        st.builds(lambda v, c, ls, ph: common_pb2.SteeringEntry(add=common_pb2.AddVector(vector_id=v, coef=c, layers=ls, phase=ph)),
                  vectors, st.floats(-POLICY_COEF, POLICY_COEF), layers, st.integers(0, 3)),
        st.builds(lambda v, a, ls, ph: common_pb2.SteeringEntry(ablate=common_pb2.Ablate(vector_id=v, all_layers=a, layers=ls, phase=ph)),
                  vectors, st.booleans(), layers.filter(bool), st.integers(0, 3))), max_size=3))
    monitors = draw(st.lists(st.builds(
        lambda v, layer, thr, action, agg, window, alpha, scope, metric, explain: chat_pb2.MonitorSpec(
            kind="direction", source=v, layer=layer, has_layer=True, threshold=thr, action=action, aggregation=agg,
            window=window, alpha=alpha, count=1, scope=scope, metric=metric, explain=explain),
        vectors, st.integers(0, N_LAYERS - 1), st.floats(-50, 50), st.sampled_from(["annotate", "alert", "stop"]),
        st.sampled_from(["max", "mean", "ema", "count"]), st.integers(1, 8), st.floats(0.01, 1.0),
        st.sampled_from(["prompt", "generation", "both"]), st.sampled_from(["dot", "cosine"]), st.booleans()), max_size=3))
    for i, m in enumerate(monitors):
        m.name = f"m{i}"
    gate: bool = draw(st.booleans())
    if monitors and gate:  # a gate: the first monitor switches an addition on
        monitors[0].action = "steer"
        entries.append(common_pb2.SteeringEntry(add=common_pb2.AddVector(vector_id=KEEP_VECTOR, coef=2.0, layers=[1],
                                                                         phase=common_pb2.PHASE_GENERATION), when="m0"))
    req = chat_pb2.GenerateRequest(
        prompt=draw(st.text(min_size=1, max_size=40).filter(str.strip)), steering=entries, monitors=monitors,
        sampling=chat_pb2.SamplingParams(max_tokens=draw(st.integers(1, 8)), temperature=draw(st.sampled_from([0.0, 0.7])),
                                         seed=draw(st.integers(0, 2**63 - 1)), has_seed=True),
        include_readings=draw(st.booleans()), policy=draw(st.sampled_from(["", KEEP_POLICY])))
    spoil = draw(st.sampled_from(["none"] * 6 + ["prompt", "sampling", "steering", "monitors", "policy", "messages"]))
    if spoil == "prompt":
        req.prompt = draw(texts)
    elif spoil == "sampling":
        req.sampling.CopyFrom(draw(sampling))
    elif spoil == "steering":
        req.steering.append(draw(steering_entries))
    elif spoil == "monitors":
        req.monitors.append(draw(monitor_specs))
    elif spoil == "policy":
        req.policy = draw(any_id)
    elif spoil == "messages":
        req.messages.extend(draw(messages))
    return req


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10**30, -(10**30)]), floats,
                         odd_text, st.sampled_from(["probe", "direction", "add", "ablate", "clamp", KEEP_VECTOR, "all"]))
json_keys = st.one_of(st.sampled_from(["monitors", "steering", "limits", "description", "name", "kind", "source",
                                       "layer", "layers", "threshold", "vector", "coef", "feature", "when", "action",
                                       "max_abs_coef", "allowed_vectors", "window", "alpha"]), odd_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(json_keys, inner, max_size=5)), max_leaves=25)


def deep(depth: int, opener: str) -> str:
    closer = {"[": "]", "{\"a\":": "}"}[opener]
    return opener * depth + "0" + closer * depth


raw_documents = st.one_of(
    st.dictionaries(json_keys, json_values, max_size=6).map(lambda d: json.dumps(d)),  # NaN/Infinity literals too
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.tuples(st.integers(1, 30_000), st.sampled_from(["[", "{\"a\":"])).map(lambda t: deep(*t)),
    st.tuples(st.integers(1, 30_000), st.sampled_from(["monitors", "description", "limits"])).map(
        lambda t: f'{{"{t[1]}": {deep(t[0], "[")}}}'),
    st.integers(1, 20_000).map(lambda n: '{"limits": {"max_tokens": ' + "9" * n + "}}"),
    st.sampled_from(['{"description": "\\ud800"}', '{"\\udfff": 1}', '{"limits": {"allowed_vectors": ["\\ud800"]}}',
                     '{"monitors": [{"name": "a", "kind": "probe", "source": "\\udbff\\udbff", "threshold": 1}]}',
                     '{"steering": [{"kind": "add", "vector": "\\ud800", "coef": 1}]}', "", "null", "[]", "{",
                     '{"description": "' + "x" * 5000 + '"}', "\ufeff{}", '{"monitors": [' + ",".join(["{}"] * 5000) + "]}"]),
    huge_text().map(lambda s: json.dumps({"description": s})))


# ---- 1. ChatService.Generate ----------------------------------------------------------------------------
@fuzz(150)
@given(reqs=st.lists(st.one_of(generate_requests, near_valid_generate()), min_size=1, max_size=3))
def test_generate_fuzz(env: Env, reqs: list[Any]) -> None:
    """Any GenerateRequests, up to three at once (they may share a batch with each other and with the
    bystander): each a client-error status or a well-formed stream; the bystander is untouched."""
    for req in reqs:
        note(f"request: {str(req)[:2000]}")

    async def body() -> None:
        for o in await env.hostile_all([stream(env.acme.chat.Generate(req, metadata=env.acme.md())) for req in reqs]):
            check_generation(o)
    env.run(body())


@fuzz(60)
@given(coef=floats, policy=st.sampled_from(["", KEEP_POLICY, "wide"]), layers=st.lists(layer_ints, max_size=2),
       kind=st.sampled_from(["add", "ablate"]))
def test_generate_coefficients_and_layers_at_the_limits(env: Env, coef: float, policy: str, layers: list[int],
                                                        kind: str) -> None:
    """The targeted checks: a non-finite coef, one beyond the policy's or the server's limit, or a layer
    out of range is refused with the field and the allowed range in the details; anything else runs."""
    # no policy: the server's limits (a fallback policy); "keep": a policy's default; "wide": 1000, over the server's
    policy_limit = {"": SERVER_COEF, KEEP_POLICY: POLICY_COEF, "wide": 1000.0}[policy]
    client = env.plain if policy == "" else env.acme  # "plain" has no default policy: the defaults apply
    if kind == "add":
        entry = common_pb2.SteeringEntry(add=common_pb2.AddVector(vector_id=KEEP_VECTOR, coef=coef, layers=layers))
    else:
        entry = common_pb2.SteeringEntry(ablate=common_pb2.Ablate(vector_id=KEEP_VECTOR, layers=layers))
    req = chat_pb2.GenerateRequest(prompt="abc", sampling=chat_pb2.SamplingParams(max_tokens=2), policy=policy,
                                   steering=[entry])
    bad_layer = next((x for x in layers if not 0 <= x < N_LAYERS), None)
    if kind == "ablate" and not layers:
        bad_layer = None  # empty list with all_layers false: nothing to ablate; accepted or refused, both fine

    async def body() -> None:
        o = await env.hostile(stream(client.chat.Generate(req, metadata=client.md())))
        check_generation(o)
        if kind == "add" and not math.isfinite(coef):
            assert (o.code, o.details.startswith("steering[0].coef:"), "finite" in o.details) == \
                (Code.INVALID_ARGUMENT, True, True), o.details
        elif kind == "add" and abs(coef) > min(policy_limit, SERVER_COEF):
            limit = policy_limit if abs(coef) > policy_limit else SERVER_COEF  # the policy's check comes first
            assert o.code is Code.RESOURCE_EXHAUSTED, o.details
            assert o.details.startswith("steering[0].coef:") and f"allowed -{limit}..{limit}" in o.details, o.details
        elif bad_layer is not None:
            assert o.code is Code.INVALID_ARGUMENT, o.details
            assert o.details.startswith("steering[0].layers:") and f"allowed 0..{N_LAYERS - 1}" in o.details, o.details
        elif kind == "add" or layers:
            assert o.code is Code.OK, o.details
    env.run(body())


@fuzz(40)
@given(unit=st.sampled_from(["a", "\u00e9", "\U0001F600", "\x00", "e\u0301", "\u202e", "\u0627", " a"]),
       n=st.integers(1, 2 * MAX_PROMPT), as_message=st.booleans())
def test_prompts_at_and_beyond_the_context_limit(env: Env, unit: str, n: int, as_message: bool) -> None:
    """Exactly the prompts longer than limits.max_prompt_tokens are refused (RESOURCE_EXHAUSTED on
    ``prompt``, naming the count and the limit); the rest generate."""
    text = unit * n
    rendered: Any = [{"role": "user", "content": text}] if as_message else text
    try:
        expected = len(encode_prompt(env.tokenizer, rendered))
    except InvalidArgument:
        expected = -1  # whitespace only
    if as_message:
        req = chat_pb2.GenerateRequest(messages=[chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=text)],
                                       sampling=chat_pb2.SamplingParams(max_tokens=1))
    else:
        req = chat_pb2.GenerateRequest(prompt=text, sampling=chat_pb2.SamplingParams(max_tokens=1))

    async def body() -> None:
        o = await env.hostile(stream(env.acme.chat.Generate(req, metadata=env.acme.md())))
        check_generation(o)
        if expected == -1:
            assert o.code is Code.INVALID_ARGUMENT and o.details.startswith("prompt:"), o.details
        elif expected > MAX_PROMPT:
            assert o.code is Code.RESOURCE_EXHAUSTED, o.details
            assert o.details == f"prompt: {expected} tokens is beyond the limit; allowed 1..{MAX_PROMPT}", o.details
        else:
            assert o.code is Code.OK, o.details
            assert o.messages[-1].final.usage.prompt_tokens == expected
    env.run(body())


# ---- 2. PolicyService ---------------------------------------------------------------------------------------
@fuzz(150)
@given(name=st.one_of(valid_id.filter(lambda s: s not in KEPT), fuzz_id), document=raw_documents,
       make_default=st.booleans(), tenant=st.sampled_from(["", "acme", "ops", "other"]))
def test_put_policy_fuzz(env: Env, name: str, document: str, make_default: bool, tenant: str) -> None:
    """Random and malformed policy documents: refused naming ``policy_json...`` (or ``name``), or stored;
    a stored one reads back as the validated document."""
    note(f"name={name!r} tenant={tenant!r} document={document[:500]!r} ({len(document)} chars)")
    client = env.admin if tenant in ("ops", "other") else env.acme
    req = policy_pb2.PutPolicyRequest(name=name, policy_json=document, make_default=make_default, tenant=tenant)

    async def body() -> None:
        o = await env.hostile(unary(client.policies.PutPolicy(req, metadata=client.md())))
        if o.code is Code.INVALID_ARGUMENT:
            assert o.details.startswith(("policy_json", "name:")), o.details
        if o.code is Code.OK:
            stored = o.messages[0]
            assert stored.name == name and json.loads(stored.policy_json).keys() >= {"monitors", "steering", "limits"}
            assert await client.get_policy(name, tenant=tenant) == stored
            await client.delete_policy(name, tenant=tenant)
        await env.kept_intact()
        await env.sweep()
    env.run(body())


def _base_policies() -> st.SearchStrategy[dict[str, Any]]:
    """Valid documents: direction monitors and additions of the kept vector within every limit."""
    monitor = st.builds(lambda i, layer, thr, agg: {"name": f"m{i}", "kind": "direction", "source": KEEP_VECTOR,
                                                    "layer": layer, "threshold": thr, "aggregation": agg},
                        st.integers(0, 999), st.integers(0, N_LAYERS - 1), st.floats(-1e6, 1e6), st.sampled_from(["max", "ema"]))
    add = st.builds(lambda coef, layer: add_steering(KEEP_VECTOR, coef, [layer]), st.floats(-POLICY_COEF, POLICY_COEF),
                    st.integers(0, N_LAYERS - 1))
    return st.builds(lambda ms, ss, d: {"description": d, "monitors": list({m["name"]: m for m in ms}.values()),
                                        "steering": ss},
                     st.lists(monitor, max_size=3), st.lists(add, max_size=3), odd_text.map(lambda s: s[:100]))


def _monitor(**kw: Any) -> dict[str, Any]:
    return {"name": "poison", "kind": "direction", "source": KEEP_VECTOR, "layer": 1, "threshold": 1.0, **kw}


# (what, how the document is spoiled, status, the details start with, and contain); "{m}"/"{s}" = the
# index of the appended monitor/steering entry
POISONS: list[tuple[str, Callable[[dict[str, Any]], str], grpc.StatusCode, str, str]] = [
    ("NaN threshold", lambda d: json.dumps({**d, "monitors": [*d["monitors"], _monitor(threshold=math.nan)]}),
     Code.INVALID_ARGUMENT, "policy_json.monitors[{m}].threshold:", "finite"),
    ("Infinity coef", lambda d: json.dumps({**d, "steering": [*d["steering"], add_steering(KEEP_VECTOR, math.inf)]}),
     Code.INVALID_ARGUMENT, "policy_json.steering[{s}].coef:", "finite"),
    ("coef beyond the policy's limit", lambda d: json.dumps({**d, "steering": [*d["steering"], add_steering(KEEP_VECTOR, 4.5)]}),
     Code.INVALID_ARGUMENT, "policy_json", "steering[{s}].coef 4.5 is beyond limits.max_abs_coef 4.0"),
    ("coef beyond the server's limit", lambda d: json.dumps({**d, "limits": {"max_abs_coef": 1000},
                                                              "steering": [*d["steering"], add_steering(KEEP_VECTOR, -17.0)]}),
     Code.RESOURCE_EXHAUSTED, "policy_json.steering[{s}].coef:", "allowed -16.0..16.0"),
    ("policy limit beyond its range", lambda d: json.dumps({**d, "limits": {"max_abs_coef": 1000.5}}),
     Code.INVALID_ARGUMENT, "policy_json.limits.max_abs_coef:", "1000"),
    ("steering layer out of range", lambda d: json.dumps({**d, "steering": [*d["steering"], add_steering(KEEP_VECTOR, 1.0, [N_LAYERS])]}),
     Code.INVALID_ARGUMENT, "policy_json.steering[{s}].layers:", f"allowed 0..{N_LAYERS - 1}"),
    ("monitor layer 2**40", lambda d: json.dumps({**d, "monitors": [*d["monitors"], _monitor(layer=2**40)]}),
     Code.INVALID_ARGUMENT, "policy_json.monitors[{m}].layer:", f"allowed 0..{N_LAYERS - 1}"),
    ("unknown vector", lambda d: json.dumps({**d, "steering": [*d["steering"], add_steering("nope", 1.0)]}),
     Code.NOT_FOUND, "policy_json.steering[{s}].vector:", "'nope'"),
    ("vector id with a NUL", lambda d: json.dumps({**d, "steering": [*d["steering"], add_steering("a\x00", 1.0)]}),
     Code.INVALID_ARGUMENT, "policy_json.steering[{s}].vector:", "not a valid id"),
    ("unknown field", lambda d: json.dumps({**d, "bogus\u202e": 1}), Code.INVALID_ARGUMENT, 'policy_json["bogus\\u202e"]:',
     "Extra"),
    ("non-printable monitor name", lambda d: json.dumps({**d, "monitors": [*d["monitors"], _monitor(name="a\x00b")]}),
     Code.INVALID_ARGUMENT, "policy_json.monitors[{m}].name:", "printable"),
    ("window 0", lambda d: json.dumps({**d, "monitors": [*d["monitors"], _monitor(aggregation="mean", window=0)]}),
     Code.INVALID_ARGUMENT, "policy_json.monitors[{m}].window:", "1"),
    ("33 monitors", lambda d: json.dumps({**d, "monitors": [_monitor(name=f"p{i}") for i in range(33)]}),
     Code.INVALID_ARGUMENT, "policy_json.monitors:", "at most 32"),
    ("lone surrogate", lambda d: json.dumps(d)[:-1] + ', "description": "\\udc80"}', Code.INVALID_ARGUMENT,
     "policy_json.description:", "surrogate"),
    ("10k-deep nesting", lambda d: json.dumps(d)[:-1] + ', "limits": ' + deep(10_000, "[") + "}", Code.INVALID_ARGUMENT,
     "policy_json:", "deeply"),
    ("5000-digit integer", lambda d: json.dumps(d)[:-1] + ', "limits": {"max_tokens": ' + "9" * 5000 + "}}",
     Code.INVALID_ARGUMENT, "policy_json:", "not valid JSON"),
    ("truncated", lambda d: json.dumps(d)[:-1], Code.INVALID_ARGUMENT, "policy_json:", "not valid JSON"),
    ("not an object", lambda d: json.dumps([d]), Code.INVALID_ARGUMENT, "policy_json:", "object"),
    ("unknown steering kind", lambda d: json.dumps({**d, "steering": [*d["steering"], {"kind": "boost", "vector": KEEP_VECTOR}]}),
     Code.INVALID_ARGUMENT, "policy_json.steering[{s}]", "'add', 'ablate', 'clamp'"),
]


@fuzz(80)
@given(base=_base_policies(), poison=st.sampled_from(POISONS), make_default=st.booleans())
def test_put_policy_poisoned_leaves_the_stored_policy(env: Env, base: dict[str, Any],
                                                      poison: tuple[Any, ...], make_default: bool) -> None:
    """A valid policy with one spoiled field, written over the kept policy: refused with the field and the
    allowed range in the details, and the stored policy (every version, the default) is unchanged."""
    what, spoil, code, prefix, fragment = poison
    m, s = len(base["monitors"]), len(base["steering"])
    prefix, fragment = prefix.format(m=m, s=s), fragment.format(m=m, s=s)
    document = spoil(base)
    note(f"{what}: {document[:400]!r}")

    async def body() -> None:
        before = await env.acme.list_policies()
        o = await env.hostile(unary(env.acme.put_policy(KEEP_POLICY, document, make_default=make_default)))
        assert (o.code, o.details.startswith(prefix), fragment in o.details) == (code, True, True), o.details
        assert await env.acme.list_policies() == before
        await env.kept_intact()
    env.run(body())


@fuzz(80)
@given(op=st.sampled_from(["get", "list", "delete"]), name=any_id, version=int32,
       who=st.sampled_from(["acme", "admin"]), tenant=st.one_of(st.sampled_from(["", "acme", "other", "ops"]), any_id))
def test_policy_reads_and_deletes_fuzz(env: Env, op: str, name: str, version: int, who: str, tenant: str) -> None:
    """GetPolicy / ListPolicies / DeletePolicy with odd names, versions and tenants; a tenant key naming
    another tenant is PERMISSION_DENIED. Deletes never reach the kept policy."""
    assume(not (op == "delete" and name in KEPT and tenant in ("", "acme")))
    assume(tenant != "bystander" and tenant != "plain")
    client = env.admin if who == "admin" else env.acme
    stub, md = client.policies, client.md()
    def call() -> Awaitable[Any]:  # made on the loop's thread: grpc.aio calls belong to the running loop
        if op == "get":
            return stub.GetPolicy(policy_pb2.GetPolicyRequest(name=name, version=version, tenant=tenant), metadata=md)
        if op == "list":
            return stub.ListPolicies(policy_pb2.ListPoliciesRequest(tenant=tenant), metadata=md)
        return stub.DeletePolicy(policy_pb2.DeletePolicyRequest(name=name, tenant=tenant), metadata=md)

    async def body() -> None:
        o = await env.hostile(unary(call()))
        if who == "acme" and tenant not in ("", "acme"):
            assert o.code in (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT), o.details
        if op == "get" and version < 0 and o.code is Code.INVALID_ARGUMENT:
            assert o.details.startswith(("version:", "name:", "tenant:")), o.details
        await env.kept_intact()
    env.run(body())


# ---- 3. VectorService -------------------------------------------------------------------------------------
def _values(width: int, fill: str, at: int, x: float) -> list[float]:
    vals = (random_vector(width) * (width // D_MODEL + 1))[:width]
    if fill == "constant":
        vals = [x] * width
    elif fill == "one" and width:
        vals[at % width] = x
    return vals


layer_values = st.builds(lambda layer, width, fill, at, x: vector_pb2.LayerValues(layer=layer, values=_values(width, fill, at, x)),
                         layer_ints, st.sampled_from([D_MODEL] * 6 + [0, 1, D_MODEL - 1, D_MODEL + 1, 1000]),
                         st.sampled_from(["random", "constant", "one"]), st.integers(0, 10**6),
                         st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(FLOAT_EDGES)))
upload_requests = st.builds(
    vector_pb2.UploadVectorRequest, vector_id=fuzz_id, layers=st.lists(layer_values, max_size=4),
    method=st.one_of(odd_text, huge_text(300_000)), source=st.one_of(odd_text, huge_text(300_000)),
    replace=st.booleans(), tenant=st.sampled_from(["", "acme", "other"]))
# mostly valid: d_model finite values at distinct valid layers, then maybe one hostile value or layer
near_valid_uploads = st.builds(
    lambda vid, layers, spoil, x, where: vector_pb2.UploadVectorRequest(vector_id=vid, replace=True, layers=[
        vector_pb2.LayerValues(layer=layer, values=[x if (spoil and i == where) else v
                                                    for i, v in enumerate(random_vector(layer + where))])
        for layer in layers]),
    valid_id.filter(lambda s: s not in KEPT), st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=N_LAYERS, unique=True),
    st.booleans(), st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(FLOAT_EDGES)),
    st.integers(0, D_MODEL - 1))


@fuzz(100)
@given(req=st.one_of(upload_requests, near_valid_uploads))
def test_upload_vector_fuzz(env: Env, req: Any) -> None:
    """Any UploadVectorRequest: refused naming its field, or stored as sent (finite float32 values of
    width d_model at valid layers)."""
    note(f"vector_id={req.vector_id!r} layers={[(lv.layer, len(lv.values)) for lv in req.layers]} "
         f"method/source lengths {len(req.method)}/{len(req.source)} replace={req.replace} tenant={req.tenant!r}")
    client = env.acme

    async def body() -> None:
        o = await env.hostile(unary(client.vectors.UploadVector(req, metadata=client.md())))
        if o.code is Code.OK:
            info = o.messages[0]
            assert sorted(info.layers) == sorted(lv.layer for lv in req.layers) and info.d_model == D_MODEL
            assert all(0 <= lv.layer < N_LAYERS and len(lv.values) == D_MODEL for lv in req.layers)
            assert all(math.isfinite(v) for lv in req.layers for v in lv.values)
            assert await client.get_vector(req.vector_id) == info
            await client.delete_vector(req.vector_id)
        elif req.tenant == "other":
            assert o.code in (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), o.details
        await env.kept_intact()
    env.run(body())


@fuzz(60)
@given(layer=st.sampled_from([-2**31, -1, 0, 1, N_LAYERS - 1, N_LAYERS, 2**31 - 1]),
       width=st.sampled_from([0, 1, D_MODEL - 1, D_MODEL, D_MODEL, D_MODEL + 1]),
       fill=st.sampled_from(["random", "nan", "inf", "-inf", "huge", "zero", "denormal"]),
       at=st.integers(0, D_MODEL - 1))
def test_upload_vector_rejections_name_the_field(env: Env, layer: int, width: int, fill: str, at: int) -> None:
    """The targeted checks: a NaN or infinite value, a wrong width or a layer out of range is refused
    with ``layers[0]...`` and what is allowed; written over the kept vector (replace), it stays as it was."""
    values = (random_vector(at + 100) * 2)[:width]
    bad_value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(fill)
    if bad_value is not None and width:
        values[at % width] = bad_value
    elif fill in ("huge", "zero", "denormal"):
        values = [{"huge": 3e38, "zero": 0.0, "denormal": 1e-45}[fill]] * width
    valid = 0 <= layer < N_LAYERS and width == D_MODEL and (bad_value is None)
    target = "scratch" if valid else KEEP_VECTOR
    req = vector_pb2.UploadVectorRequest(vector_id=target, layers=[vector_pb2.LayerValues(layer=layer, values=values)],
                                         replace=True)

    async def body() -> None:
        o = await env.hostile(unary(env.acme.vectors.UploadVector(req, metadata=env.acme.md())))
        if not 0 <= layer < N_LAYERS:
            assert o.code is Code.INVALID_ARGUMENT, o.details
            assert o.details.startswith("layers[0].layer:") and f"allowed 0..{N_LAYERS - 1}" in o.details, o.details
        elif width != D_MODEL:
            assert o.code is Code.INVALID_ARGUMENT, o.details
            assert o.details == f"layers[0].values: has {width} values; this model needs d_model={D_MODEL}"
        elif bad_value is not None:
            assert o.code is Code.INVALID_ARGUMENT, o.details
            assert o.details.startswith("layers[0].values: contains 1 non-finite value(s)"), o.details
            assert f"first at flat index {at}" in o.details and "must be finite" in o.details, o.details
        else:
            assert o.code is Code.OK, o.details
            norm = float(torch.tensor(values, dtype=torch.float32).norm())
            got = o.messages[0].norm
            assert got == pytest.approx(norm, rel=1e-5, abs=1e-30) or (math.isinf(norm) and math.isinf(got)), (got, norm)
            await env.acme.delete_vector(target)
        await env.kept_intact()
    env.run(body())


pair_texts = st.one_of(odd_text, st.sampled_from(["", " ", "\x00", "a" * (MAX_PROMPT - 1), "a" * MAX_PROMPT,
                                                  "a" * (MAX_PROMPT + 50)]), huge_text(300_000))
pairs_requests = st.builds(
    vector_pb2.CreateVectorFromPairsRequest, vector_id=st.one_of(st.just(KEEP_VECTOR), fuzz_id),
    pairs=st.one_of(st.lists(st.builds(vector_pb2.TextPair, positive=pair_texts, negative=pair_texts), max_size=3),
                    st.sampled_from([257, 256]).map(lambda n: [vector_pb2.TextPair(positive="a", negative="b")] * n)),
    layers=st.lists(layer_ints, max_size=4), position=st.sampled_from(["", "last", "mean", "LAST", "first", "\x00"]),
    replace=st.booleans(), tenant=st.sampled_from(["", "acme", "other"]))
near_valid_pairs = st.builds(
    lambda vid, pairs, layers, position: vector_pb2.CreateVectorFromPairsRequest(
        vector_id=vid, pairs=[vector_pb2.TextPair(positive=p, negative=n) for p, n in pairs], layers=layers,
        position=position),
    valid_id.filter(lambda s: s not in KEPT),
    st.lists(st.tuples(*[st.one_of(odd_text, st.text(max_size=30)).filter(str.strip)] * 2), min_size=1, max_size=3),
    st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=4), st.sampled_from(["", "last", "mean"]))


@fuzz(40)
@given(req=st.one_of(pairs_requests, near_valid_pairs))
def test_create_vector_from_pairs_fuzz(env: Env, req: Any) -> None:
    """CreateVectorFromPairs with odd texts (empty, whitespace, NUL, beyond the prompt limit), counts,
    layers and positions: refused naming the field, or a vector of the requested layers."""
    note(f"vector_id={req.vector_id!r} {len(req.pairs)} pairs, lengths "
         f"{[(len(p.positive), len(p.negative)) for p in req.pairs][:5]}, layers={list(req.layers)}, "
         f"position={req.position!r} replace={req.replace} tenant={req.tenant!r}")
    over = [f"pairs[{i}].{side}" for i, p in enumerate(req.pairs) for side, t in (("positive", p.positive), ("negative", p.negative))
            if t.strip() and len(encode_prompt(env.tokenizer, t)) > MAX_PROMPT]
    # a valid request with replace=True may legitimately replace the kept vector: spoil it or skip it
    if req.vector_id == KEEP_VECTOR and req.replace:
        assume(not (req.pairs and all(p.positive.strip() and p.negative.strip() for p in req.pairs)
                    and req.layers and all(0 <= x < N_LAYERS for x in req.layers)
                    and req.position in ("", "last", "mean") and not over and req.tenant in ("", "acme")
                    and len(req.pairs) <= 256))

    async def body() -> None:
        o = await env.hostile(unary(env.acme.vectors.CreateVectorFromPairs(req, metadata=env.acme.md())))
        if o.code is Code.RESOURCE_EXHAUSTED and not TOO_LARGE.match(o.details):
            assert over and o.details.startswith(over[0] + ":") and f"allowed 1..{MAX_PROMPT}" in o.details, o.details
        if o.code is Code.OK:
            assert req.vector_id != KEEP_VECTOR, "replaced the kept vector"  # such requests are left out above
            assert sorted(o.messages[0].layers) == sorted(set(req.layers))
            await env.acme.delete_vector(req.vector_id)
        await env.kept_intact()
    env.run(body())


@fuzz(60)
@given(op=st.sampled_from(["get", "list", "delete"]), vector_id=any_id, who=st.sampled_from(["acme", "admin"]),
       tenant=st.one_of(st.sampled_from(["", "acme", "other", "ops"]), any_id))
def test_vector_reads_and_deletes_fuzz(env: Env, op: str, vector_id: str, who: str, tenant: str) -> None:
    assume(not (op == "delete" and vector_id in KEPT and tenant in ("", "acme")))
    assume(tenant not in ("bystander", "plain"))
    client = env.admin if who == "admin" else env.acme
    stub, md = client.vectors, client.md()
    def call() -> Awaitable[Any]:  # made on the loop's thread: grpc.aio calls belong to the running loop
        if op == "get":
            return stub.GetVector(vector_pb2.GetVectorRequest(vector_id=vector_id, tenant=tenant), metadata=md)
        if op == "list":
            return stub.ListVectors(vector_pb2.ListVectorsRequest(tenant=tenant), metadata=md)
        return stub.DeleteVector(vector_pb2.DeleteVectorRequest(vector_id=vector_id, tenant=tenant), metadata=md)

    async def body() -> None:
        o = await env.hostile(unary(call()))
        if who == "acme" and tenant not in ("", "acme"):
            assert o.code in (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT), o.details
        await env.kept_intact()
    env.run(body())


# ---- 4. AlertService.WatchAlerts, ModelService.Info, health ---------------------------------------------
after_ids = st.one_of(st.sampled_from(["", "0", "$", "-", "0-0", "1-1", "1700000000000-0", "18446744073709551615-0",
                                       "18446744073709551616-0", "1-18446744073709551616", "99999999999999999999999-0",
                                       "\u00b2-0", "\u0661\u0662\u0663-\u0660", "1-", "-1", "+1-0", " 1-0", "1-0 ",
                                       "0x10-0", "1e3-0", "1_000-0"]),
                      st.from_regex(r"[0-9]{1,25}(-[0-9]{1,25})?", fullmatch=True), odd_text)


@fuzz(40)
@given(after_id=after_ids, who=st.sampled_from(["acme", "admin"]),
       tenant=st.one_of(st.sampled_from(["", "acme", "other"]), any_id))
def test_watch_alerts_fuzz(env: Env, after_id: str, who: str, tenant: str) -> None:
    """A malformed after_id is INVALID_ARGUMENT on ``after_id``; a valid one opens the stream."""
    client = env.admin if who == "admin" else env.acme
    req = alert_pb2.WatchAlertsRequest(after_id=after_id, tenant=tenant)

    async def body() -> None:
        o = await env.hostile(stream(client.alerts.WatchAlerts(req, metadata=client.md()), idle=0.15))
        if o.code is Code.INVALID_ARGUMENT:
            assert o.details.startswith(("after_id:", "tenant:")), o.details
        if o.code is Code.OK and after_id not in ("", "0", "$"):
            assert re.fullmatch(r"[0-9]+(-[0-9]+)?", after_id), f"accepted {after_id!r}"
    env.run(body())


@fuzz(30)
@given(service=st.one_of(st.sampled_from(["", "steerwatch.v1.ChatService", "steerwatch.v1.PolicyService", "nope"]),
                         odd_text, huge_text(2000)),
       unknown=st.binary(max_size=64))
def test_info_and_health_fuzz(env: Env, service: str, unknown: bytes) -> None:
    """Health with any service name answers SERVING or NOT_FOUND; Info ignores unknown fields."""
    async def body() -> None:
        o = await env.hostile(unary(env.acme.health.Check(health_pb2.HealthCheckRequest(service=service))), check=False)
        assert o.code in (Code.OK, Code.NOT_FOUND), o
        if o.code is Code.OK:
            assert o.messages[0].status == health_pb2.HealthCheckResponse.SERVING
        raw = env.acme.channel.unary_unary("/steerwatch.v1.ModelService/Info")
        # field 15 (unknown to InfoRequest) as length-delimited bytes: always decodable
        data = b"\x7a" + bytes([len(unknown)]) + unknown
        info = await env.hostile(unary(raw(data, metadata=env.acme.md())))
        assert info.code is Code.OK
        parsed = model_pb2.InfoResponse.FromString(info.messages[0])
        assert (parsed.n_layers, parsed.d_model, parsed.max_prompt_tokens) == (N_LAYERS, D_MODEL, MAX_PROMPT)
    env.run(body())


@fuzz(80)
@given(op=st.sampled_from(["put_policy", "get_policy", "list_policies", "delete_policy", "upload", "get_vector",
                           "list_vectors", "delete_vector", "watch"]),
       name=any_id.filter(lambda s: s not in KEPT), tenant=st.one_of(st.sampled_from(["", "acme", "other"]), any_id),
       after_id=after_ids, who=st.sampled_from(["acme", "admin"]))
def test_memory_store_management_fuzz(memory_env: Env, op: str, name: str, tenant: str, after_id: str, who: str) -> None:
    """The management RPCs with odd ids, tenants and alert ids on the in-memory store, which (unlike
    Redis keys) has no separator characters to refuse: the same properties hold."""
    env = memory_env
    assume(tenant not in ("bystander", "plain"))
    c = env.admin if who == "admin" else env.acme
    md = c.md()
    calls: dict[str, Callable[[], Awaitable[Outcome]]] = {
        "put_policy": lambda: unary(c.put_policy(name, "{}", tenant=tenant)),
        "get_policy": lambda: unary(c.get_policy(name, tenant=tenant)),
        "list_policies": lambda: unary(c.policies.ListPolicies(policy_pb2.ListPoliciesRequest(tenant=tenant), metadata=md)),
        "delete_policy": lambda: unary(c.delete_policy(name, tenant=tenant)),
        "upload": lambda: unary(c.upload_vector(name, {1: random_vector(1)}, replace=True, tenant=tenant)),
        "get_vector": lambda: unary(c.get_vector(name, tenant=tenant)),
        "list_vectors": lambda: unary(c.vectors.ListVectors(vector_pb2.ListVectorsRequest(tenant=tenant), metadata=md)),
        "delete_vector": lambda: unary(c.delete_vector(name, tenant=tenant)),
        "watch": lambda: stream(c.watch(after_id, tenant=tenant), idle=0.1),
    }

    async def body() -> None:
        o = await env.hostile(calls[op]())
        if who == "acme" and tenant not in ("", "acme"):
            assert o.code in (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT), o.details
        await env.kept_intact()
        await env.sweep()
    env.run(body())


header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@fuzz(40)
@given(request_id=st.one_of(header_text, st.sampled_from(["a" * 64, "a" * 65, "a.b_c-D", "../x", "a b", ""])),
       auth=st.sampled_from(["key", "key+spaces", "bearer", "bearer-lower", "basic", "junk", "junk-bearer", "none"]),
       junk=header_text)
def test_metadata_fuzz(env: Env, request_id: str, auth: str, junk: str) -> None:
    """Odd x-request-id and API key headers: a valid key (also as ``Bearer`` in any case, padded) works,
    anything else is UNAUTHENTICATED; the x-request-id echoed is the client's when valid, else a uuid."""
    key = env.acme.key
    headers = {"key": [("x-api-key", key)], "key+spaces": [("x-api-key", f"  {key} ")],
               "bearer": [("authorization", f"Bearer {key}")], "bearer-lower": [("authorization", f"bEaReR   {key}")],
               "basic": [("authorization", f"Basic {key}")], "junk": [("x-api-key", junk)],
               "junk-bearer": [("authorization", f"Bearer {junk}")], "none": []}[auth]
    md = tuple(headers) + ((("x-request-id", request_id),) if request_id else ())
    valid_key = auth in ("key", "key+spaces", "bearer", "bearer-lower")

    async def body() -> None:
        call = env.acme.model.Info(model_pb2.InfoRequest(), metadata=md)
        o = await env.hostile(unary(call), check=False)
        assert o.code is (Code.OK if valid_key else Code.UNAUTHENTICATED), (o.code, o.details)
        echoed = dict(await call.initial_metadata()).get("x-request-id", "")
        sent = request_id.strip()
        if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", sent):
            assert echoed == sent
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
    env.run(body())


# ---- 5. raw wire bytes --------------------------------------------------------------------------------------
UNARY_METHODS = ["/steerwatch.v1.PolicyService/PutPolicy", "/steerwatch.v1.PolicyService/GetPolicy",
                 "/steerwatch.v1.PolicyService/ListPolicies", "/steerwatch.v1.PolicyService/DeletePolicy",
                 "/steerwatch.v1.VectorService/UploadVector", "/steerwatch.v1.VectorService/CreateVectorFromPairs",
                 "/steerwatch.v1.VectorService/ListVectors", "/steerwatch.v1.VectorService/GetVector",
                 "/steerwatch.v1.VectorService/DeleteVector", "/steerwatch.v1.ModelService/Info"]
STREAM_METHODS = ["/steerwatch.v1.ChatService/Generate", "/steerwatch.v1.AlertService/WatchAlerts"]
# valid encodings of a few messages, to mutate: a Generate asking for 2 tokens, a PutPolicy, a vector upload
SEEDS = [chat_pb2.GenerateRequest(prompt="hi", sampling=chat_pb2.SamplingParams(max_tokens=2)).SerializeToString(),
         policy_pb2.PutPolicyRequest(name="fz", policy_json="{}").SerializeToString(),
         vector_pb2.UploadVectorRequest(vector_id="fz", layers=[vector_pb2.LayerValues(layer=1, values=[1.0] * D_MODEL)],
                                        ).SerializeToString()]


def _mutate(seed: bytes, at: int, data: bytes, cut: int) -> bytes:
    at %= len(seed) + 1
    return (seed[:at] + data + seed[at:])[: max(cut, 0) or None]


def _varint(n: int) -> bytes:
    n &= 2**64 - 1  # negative int32/int64 values go on the wire as 10-byte two's complement
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _field(number: int, kind: str, value: Any) -> bytes:
    """One well-formed wire field; whether its number and type fit the message is up to the server."""
    if kind == "varint":
        return _varint(number << 3) + _varint(value)
    if kind == "fixed64":
        return _varint(number << 3 | 1) + (value & (2**64 - 1)).to_bytes(8, "little")
    if kind == "fixed32":
        return _varint(number << 3 | 5) + (value & (2**32 - 1)).to_bytes(4, "little")
    data = value if isinstance(value, bytes) else value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


wire_fields = st.lists(st.one_of(
    st.builds(_field, st.integers(1, 20), st.just("varint"), st.one_of(st.sampled_from(INT32_EDGES), st.integers(-2**63, 2**64 - 1))),
    st.builds(_field, st.integers(1, 20), st.sampled_from(["fixed64", "fixed32"]), st.integers(0, 2**64 - 1)),
    st.builds(_field, st.integers(1, 20), st.just("len"), st.one_of(odd_text, st.binary(max_size=16)))),
    max_size=8).map(b"".join)
wire_bytes = st.one_of(st.binary(max_size=200), wire_fields, wire_fields,
                       st.builds(_mutate, st.sampled_from(SEEDS), st.integers(0, 10**4), st.binary(max_size=8),
                                 st.integers(-5, 300)))


@fuzz(100)
@given(method=st.sampled_from(UNARY_METHODS + STREAM_METHODS), data=wire_bytes)
def test_raw_wire_bytes_fuzz(env: Env, method: str, data: bytes) -> None:
    """Arbitrary and mutated request bytes on every method: a client-error status or OK, bytes that do
    not decode included (INVALID_ARGUMENT on `request`)."""
    assume(not any(name.encode() in data for name in KEPT))
    note(f"{method} {data!r}")
    ch, md = env.acme.channel, env.acme.md()

    async def body() -> None:
        if method in STREAM_METHODS:
            o = await env.hostile(stream(ch.unary_stream(method)(data, metadata=md), idle=0.15), check=False)
        else:
            o = await env.hostile(unary(ch.unary_unary(method)(data, metadata=md)), check=False)
        assert_client_error_or_ok(o)
        await env.kept_intact()
        await env.sweep()
    env.run(body())


def test_undecodable_request_bytes_are_invalid_argument(env: Env) -> None:
    cases = [("/steerwatch.v1.PolicyService/PutPolicy", b"\x0a\x02\xff\xfe"),  # invalid UTF-8 in name
             ("/steerwatch.v1.VectorService/GetVector", b"\x0a\x03\xed\xa0\x80"),  # an encoded surrogate (CESU-8)
             ("/steerwatch.v1.ModelService/Info", b"\x0a\x05ab")]  # truncated

    async def body() -> list[Outcome]:
        return [await env.hostile(unary(env.acme.channel.unary_unary(m)(d, metadata=env.acme.md())), check=False)
                for m, d in cases]

    got = env.run(body())
    assert [o.code for o in got] == [Code.INVALID_ARGUMENT] * len(cases), [(o.code.name, o.details) for o in got]


# ---- regressions: the bugs this fuzzing found -------------------------------------------------------------
@pytest.mark.parametrize(("what", "document", "details"), [
    ("10k-deep arrays", "[" * 10_000 + "]" * 10_000, "policy_json: nests too deeply to parse"),
    ("10k-deep objects", '{"a":' * 10_000 + "0" + "}" * 10_000, "policy_json: nests too deeply to parse"),
    ("5000-digit integer", '{"limits": {"max_tokens": ' + "9" * 5000 + "}}", "policy_json: is not valid JSON"),
    ("lone surrogate in allowed_vectors", '{"limits": {"allowed_vectors": ["ok", "\\ud800"]}}',
     "policy_json.limits.allowed_vectors[1]: contains a lone surrogate"),
    ("lone surrogate in a probe source",
     '{"monitors": [{"name": "a", "kind": "probe", "source": "x\\udfff", "threshold": 1}]}',
     "policy_json.monitors[0].source: contains a lone surrogate"),
    ("non-printable monitor name", json.dumps({"monitors": [_monitor(name="a\x00")]}),
     "policy_json.monitors[0].name: must be printable text"),
    ("union tag in the path", json.dumps({"steering": [add_steering(KEEP_VECTOR, math.inf)]}),
     "policy_json.steering[0].coef: Input should be a finite number"),
    ("a million monitors", '{"monitors": [' + ",".join(["{}"] * 100_000) + "]}",
     "policy_json.monitors: has 100000 entries; allowed at most 32"),
])
def test_policy_documents_that_were_internal_errors(env: Env, what: str, document: str, details: str) -> None:
    """Each was INTERNAL (RecursionError, ValueError, a PydanticSerializationError when storing) or named
    the wrong field before; now INVALID_ARGUMENT naming the JSON path."""
    async def body() -> None:
        o = await env.hostile(unary(env.acme.put_policy(KEEP_POLICY, document)))
        assert (o.code, o.details.startswith(details)) == (Code.INVALID_ARGUMENT, True), o.details
        await env.kept_intact()
    env.run(body())


@pytest.mark.parametrize("phase", [4, 99, -7, 2**31 - 1])
@pytest.mark.parametrize("kind", ["add", "ablate", "clamp"])
def test_unknown_phase_enum_is_invalid_argument(env: Env, kind: str, phase: int) -> None:
    """proto3 enums are open: an unknown Phase was a KeyError (INTERNAL)."""
    entry = {"add": common_pb2.SteeringEntry(add=common_pb2.AddVector(vector_id=KEEP_VECTOR, coef=1.0, phase=phase)),
             "ablate": common_pb2.SteeringEntry(ablate=common_pb2.Ablate(vector_id=KEEP_VECTOR, all_layers=True, phase=phase)),
             "clamp": common_pb2.SteeringEntry(clamp=common_pb2.Clamp(sae_id="s", feature=1, value=1.0, phase=phase))}[kind]

    async def body() -> None:
        o = await env.hostile(stream(env.plain.generate_call("abc", 2, steering=[entry])))
        assert o.code is Code.INVALID_ARGUMENT, o.details
        assert o.details.startswith(f"steering[0].phase: {phase} is not a Phase; allowed PHASE_UNSPECIFIED"), o.details
    env.run(body())


@pytest.mark.parametrize("use", ["ablate", "dot", "cosine", "add"])
def test_a_vector_whose_norm_overflows_float32_fails_alone(env: Env, use: str) -> None:
    """64 values of 3e38 are finite, but their float32 norm is inf: ablating that direction made a NaN
    basis and an empty Gram-Schmidt result, which raised inside the engine step and left the request (and
    any batched with it) waiting forever; direction monitors read 0. Now the direction is normalised in
    float64: the ablation and the monitors run, an addition ends alone with FINISH_REASON_ERROR."""
    if use == "ablate":
        fields: dict[str, Any] = {"steering": [common_pb2.SteeringEntry(ablate=common_pb2.Ablate(vector_id=HUGE_VECTOR,
                                                                                                 all_layers=True))]}
    elif use == "add":
        fields = {"steering": [common_pb2.SteeringEntry(add=common_pb2.AddVector(vector_id=HUGE_VECTOR, coef=1.0))]}
    else:
        fields = {"monitors": [chat_pb2.MonitorSpec(name="m", kind="direction", source=HUGE_VECTOR, layer=1,
                                                    has_layer=True, threshold=1e9, metric=use)],
                  "include_readings": True}

    async def body() -> None:
        o = await env.hostile(stream(env.plain.generate_call("abc", 4, **fields)))
        assert o.code is Code.OK, o.details
        res = Result(o.messages, {})
        if use == "add":
            assert res.final.finish_reason == chat_pb2.FINISH_REASON_ERROR
        else:
            assert res.final.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
        if use in ("dot", "cosine"):
            readings = [t.readings["m"] for t in res.tokens]
            assert readings and all(math.isfinite(x) and x != 0.0 for x in readings), readings
    env.run(body())


@pytest.mark.parametrize(("pairs", "field"), [
    ([("a" * (MAX_PROMPT + 10), "b")], "pairs[0].positive"),
    ([("a", "b"), ("c", "\U0001F600" * 20)], "pairs[1].negative"),  # 80 bytes: 81 tokens
])
def test_pairs_beyond_the_prompt_limit_are_refused(env: Env, pairs: list[tuple[str, str]], field: str) -> None:
    """CreateVectorFromPairs ran any text, so one text of a 4 MiB request held the engine thread (every
    generation) for minutes; now each text is held to limits.max_prompt_tokens, as Generate's prompt is."""
    req = vector_pb2.CreateVectorFromPairsRequest(
        vector_id=KEEP_VECTOR, pairs=[vector_pb2.TextPair(positive=p, negative=n) for p, n in pairs], layers=[1],
        replace=True)

    async def body() -> None:
        o = await env.hostile(unary(env.acme.vectors.CreateVectorFromPairs(req, metadata=env.acme.md())))
        assert o.code is Code.RESOURCE_EXHAUSTED, o.details
        assert o.details.startswith(f"{field}: ") and f"allowed 1..{MAX_PROMPT}" in o.details, o.details
        blank = vector_pb2.CreateVectorFromPairsRequest(vector_id=KEEP_VECTOR, layers=[1], replace=True,
                                                        pairs=[vector_pb2.TextPair(positive="a", negative="  ")])
        o = await env.hostile(unary(env.acme.vectors.CreateVectorFromPairs(blank, metadata=env.acme.md())))
        assert (o.code, o.details) == (Code.INVALID_ARGUMENT, "pairs[0].negative: must not be empty")
        await env.kept_intact()
    env.run(body())


# ---- the biggest inputs ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fifty_megabyte_strings_are_resource_exhausted(env: Env) -> None:
    """50 MB in a policy document, a prompt, a vector's source and a pair: grpc refuses each message
    past limits.max_message_bytes with RESOURCE_EXHAUSTED before any servicer runs; the replica serves on."""
    big = "\U0001F600" * (50 * 1024 * 1024 // 4)
    c = env.acme
    calls: list[Callable[[], Awaitable[Outcome]]] = [
        lambda: unary(c.put_policy(KEEP_POLICY, json.dumps({"description": big}))),
        lambda: stream(c.generate_call(big, 2)),
        lambda: unary(c.upload_vector(KEEP_VECTOR, {1: random_vector(1)}, replace=True, source=big)),
        lambda: unary(c.vectors.CreateVectorFromPairs(vector_pb2.CreateVectorFromPairsRequest(
            vector_id=KEEP_VECTOR, pairs=[vector_pb2.TextPair(positive=big, negative="b")], layers=[1], replace=True),
            metadata=c.md())),
        lambda: unary(c.put_policy(KEEP_POLICY, "[" * (MAX_MESSAGE - 64))),  # just under the limit: parsed, refused
    ]

    async def body() -> None:
        for i, make in enumerate(calls):
            o = await env.hostile(make())
            if i < 4:
                assert o.code is Code.RESOURCE_EXHAUSTED and TOO_LARGE.match(o.details), o.details
            else:
                assert (o.code, o.details.startswith("policy_json: nests too deeply")) == (Code.INVALID_ARGUMENT, True)
            await env.kept_intact()
    env.run(body(), timeout=300)


@pytest.mark.slow
@fuzz(300)
@given(reqs=st.lists(st.one_of(generate_requests, near_valid_generate()), min_size=1, max_size=3))
def test_generate_fuzz_long(env: Env, reqs: list[Any]) -> None:
    """test_generate_fuzz with twice as many examples (slow suite only)."""
    async def body() -> None:
        for o in await env.hostile_all([stream(env.acme.chat.Generate(req, metadata=env.acme.md())) for req in reqs]):
            check_generation(o)
    env.run(body())


# ---- after everything: the replica is healthy ------------------------------------------------------------
@pytest.mark.parametrize("which", ["env", "memory_env"])
def test_zz_the_replica_is_healthy_after_the_fuzzing(which: str, request: pytest.FixtureRequest) -> None:
    """Every health status SERVING, the engine thread alive, the kept state intact, and no INTERNAL or
    UNKNOWN status counted by the replica's own metrics over the whole module."""
    env: Env = request.getfixturevalue(which)
    services = ["", "steerwatch.v1.ChatService", "steerwatch.v1.PolicyService", "steerwatch.v1.VectorService",
                "steerwatch.v1.AlertService", "steerwatch.v1.ModelService"]

    async def body() -> None:
        for s in services:
            assert await env.acme.health_status(s) == health_pb2.HealthCheckResponse.SERVING, s
        await env.kept_intact()
        res = await env.bystander.generate(BYSTANDER_PROMPT, BYSTANDER_TOKENS)
        assert res.token_ids == env.baseline
    env.run(body())
    assert env.rig.app.engine.alive
    counted = [line for line in env.rig.metrics_text().splitlines() if line.startswith("steerwatch_requests_total{")]
    assert counted  # the metric is there, so its absence of bad codes means something
    bad = [line for line in counted if re.search(r'code="(INTERNAL|UNKNOWN)"', line) and not line.rstrip().endswith(" 0.0")]
    assert not bad, bad
