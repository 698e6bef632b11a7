"""Every error path of Generate returns its status, and the replica keeps serving after each one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from service.protos import chat_pb2, common_pb2
from tests.service.grpc_harness import (
    STORES,
    Client,
    add_entry,
    engine_idle,
    monitor_spec,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
)

MAX_PROMPT = 64
MAX_NEW = 32


def _messages(*messages: tuple[int, str], max_tokens: int = 3) -> chat_pb2.GenerateRequest:
    return chat_pb2.GenerateRequest(messages=[chat_pb2.ChatMessage(role=role, content=text) for role, text in messages],
                                    sampling=chat_pb2.SamplingParams(max_tokens=max_tokens))


def _cases(c: Client) -> list[tuple[str, Callable[[], Any], grpc.StatusCode, str]]:
    """(what, make the call, status, the message starts with)."""
    raw = c.chat.Generate
    return [
        ("no key", lambda: c.with_key("").generate_call(), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
        ("wrong key", lambda: c.with_key("sw_not-a-key").generate_call(), grpc.StatusCode.UNAUTHENTICATED,
         "unknown or revoked"),
        ("bearer wrong key", lambda: raw(_messages((chat_pb2.ROLE_USER, "hi")),
                                         metadata=(("authorization", "Bearer sw_nope"),)),
         grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked"),
        ("empty prompt", lambda: c.generate_call(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt:"),
        ("oversized prompt", lambda: c.generate_call("x" * (MAX_PROMPT + 5)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "prompt:"),
        ("max_tokens over the server limit (no policy)", lambda: c.generate_call(max_tokens=MAX_NEW + 1),
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens:"),
        ("max_tokens over a named policy's limit", lambda: c.generate_call(max_tokens=9, policy="tight"),
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens:"),
        ("negative max_tokens", lambda: c.generate_call(max_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.max_tokens:"),
        ("temperature out of range", lambda: raw(chat_pb2.GenerateRequest(
            prompt="hi", sampling=chat_pb2.SamplingParams(max_tokens=2, temperature=9.0)), metadata=c.md()),
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature:"),
        ("unknown policy", lambda: c.generate_call(policy="nope"), grpc.StatusCode.NOT_FOUND, "policy:"),
        ("ROLE_UNSPECIFIED", lambda: raw(_messages((chat_pb2.ROLE_USER, "hi"), (chat_pb2.ROLE_UNSPECIFIED, "x")),
                                         metadata=c.md()),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[1].role:"),
        ("empty message", lambda: raw(_messages((chat_pb2.ROLE_USER, "")), metadata=c.md()),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content:"),
        ("steering entry without an edit", lambda: c.generate_call(steering=[common_pb2.SteeringEntry()]),
         grpc.StatusCode.INVALID_ARGUMENT, "steering[0]:"),
    ]


@pytest.mark.parametrize("store_kind", STORES)
def test_generate_error_paths_and_the_server_keeps_serving(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind, max_prompt_tokens=MAX_PROMPT, max_new_tokens=MAX_NEW, default_max_tokens=4) as r:
            c = r.client
            await c.put_policy("tight", policy_doc(max_tokens=8, default_max_tokens=4))
            good = await c.generate("abc", 3)
            assert good.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
            for what, call, code, prefix in _cases(c):
                got, details = await rpc_error(call())
                assert (got, details.startswith(prefix)) == (code, True), (what, got, details)
                # nothing of the refused request runs (the engine drops a finished request on its next turn)
                await engine_idle(r.app, f"idle after {what}")
                again = await c.generate("abc", 3)  # a good request right after each bad one
                assert again.token_ids == good.token_ids, what
                assert again.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH, what
            chat = _messages((chat_pb2.ROLE_SYSTEM, "Be brief."), (chat_pb2.ROLE_USER, "hi"), max_tokens=3)
            events = [e async for e in c.chat.Generate(chat, metadata=c.md())]
            assert events[-1].final.usage.completion_tokens == 3 and events[-1].final.usage.prompt_tokens > 10

            # the key may also come as a bearer token; a revoked key stops working at once
            secret, principal = await r.store.create_key("acme", "tenant")
            bearer = (("authorization", f"Bearer {secret}"),)
            events = [e async for e in c.chat.Generate(chat, metadata=bearer)]
            assert events[-1].final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
            assert await r.store.revoke_key("acme", principal.key_id)
            code, details = await rpc_error(c.chat.Generate(chat, metadata=bearer))
            assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key")
            assert (await c.generate("abc", 3)).token_ids == good.token_ids  # other keys are unaffected
    run(body())


def test_policy_limits_on_request_additions() -> None:
    async def body() -> None:
        async with rig("memory") as r:
            c = r.client
            await c.upload_vector("v", {1: random_vector(1)})
            await c.upload_vector("w", {1: random_vector(2)})
            await c.put_policy("closed", policy_doc(allow_request_steering=False, allow_request_monitors=False))
            await c.put_policy("only-v", policy_doc(allowed_vectors=["v"], max_abs_coef=2.0))
            cases = [
                (c.generate_call(policy="closed", steering=[add_entry("v", 1.0)]), "steering:"),
                (c.generate_call(policy="closed", monitors=[monitor_spec("m", "v", 0.0)]), "monitors:"),
                (c.generate_call(policy="only-v", steering=[add_entry("v", 1.0), add_entry("w", 1.0)]),
                 "steering[1].vector_id:"),
            ]
            for call, prefix in cases:
                code, details = await rpc_error(call)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(prefix), details
            code, details = await rpc_error(c.generate_call(policy="only-v", steering=[add_entry("v", -2.5)]))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("steering[0].coef:"), details
            res = await c.generate("abc", 2, policy="only-v", steering=[add_entry("v", -2.0)])
            assert [(s.source, s.value, s.origin) for s in res.final.steering] == [("v", -2.0, "request")]
            res = await c.generate("abc", 2, policy="closed")
            assert res.final.policy == "closed"
    run(body())


def test_malformed_ids_get_the_same_status_on_both_stores() -> None:
    """An id that can never exist is INVALID_ARGUMENT naming the field, whatever the store (Redis key
    components must not hold '/', '{' or '}'; the memory store would just not find it)."""
    async def statuses(store_kind: str) -> list[tuple[str, grpc.StatusCode, str]]:
        async with rig(store_kind) as r:
            c = r.client
            calls = {
                "GetPolicy": lambda: c.get_policy("a/b"),
                "DeletePolicy": lambda: c.delete_policy("a/b"),
                "GetVector": lambda: c.get_vector("a/b"),
                "DeleteVector": lambda: c.delete_vector("a/b"),
                "Generate.policy": lambda: c.generate_call(policy="a/b"),
                "Generate.steering": lambda: c.generate_call(steering=[add_entry("a/b", 1.0)]),
            }
            out = []
            for name, call in calls.items():
                code, details = await rpc_error(call())
                out.append((name, code, details.split(":")[0]))
            return out

    memory, redis = run(statuses("memory")), run(statuses("redis"))
    assert memory == redis  # the store behind the replica makes no difference
    assert {code for _, code, _ in memory} == {grpc.StatusCode.INVALID_ARGUMENT}
    fields = {name: field for name, _, field in memory}
    assert fields == {"GetPolicy": "name", "DeletePolicy": "name", "GetVector": "vector_id",
                      "DeleteVector": "vector_id", "Generate.policy": "policy",
                      "Generate.steering": fields["Generate.steering"]}
    assert fields["Generate.steering"].endswith("vector_id")
