"""Helpers for the store contract tests: the test Redis, raw key dumps and cleanup."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

T = TypeVar("T")
REDIS_URL = os.environ.get("STEERWATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_TIMEOUT_S = 15.0  # one test body; a hang (a lost wake-up, a swallowed cancel) fails instead of stalling
WAIT_S = 3.0  # how long a test waits for something that should happen at once


def unique_prefix() -> str:
    """A key prefix no other run or test shares."""
    return f"swtest:{uuid.uuid4().hex}:"


async def _raw_keys(url: str, prefix: str) -> AsyncIterator[tuple[aioredis.Redis, bytes]]:
    client = aioredis.Redis.from_url(url, decode_responses=False)
    try:
        async for key in client.scan_iter(match=prefix.encode() + b"*", count=500):
            yield client, key
    finally:
        await client.aclose()


async def dump_prefix(url: str, prefix: str) -> bytes:
    """Every key name and value under ``prefix`` as one blob, for "is this string stored anywhere"."""
    parts: list[bytes] = []
    async for client, key in _raw_keys(url, prefix):
        parts += [key, repr(await _value(client, key)).encode()]
    return b"\n".join(parts)


async def _value(client: aioredis.Redis, key: bytes) -> Any:
    """The whole value of one key, whatever its type."""
    kind = (await client.type(key)).decode()  # type: ignore[union-attr]  # bytes: decode_responses=False
    if kind == "string":
        return await client.get(key)
    if kind == "hash":
        return await client.hgetall(key)
    if kind == "set":
        return await client.smembers(key)
    if kind == "list":
        return await client.lrange(key, 0, -1)
    if kind == "stream":
        return await client.xrange(key)
    raise AssertionError(f"unexpected Redis type {kind!r} at {key!r}")


async def delete_prefix(url: str, prefix: str) -> None:
    """Remove every key under ``prefix``."""
    async for client, key in _raw_keys(url, prefix):
        await client.delete(key)


async def eventually(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Wait until ``check()`` holds; fail naming ``what`` otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def until_live(poke: Callable[[], Awaitable[Any]], seen: Callable[[], bool], what: str) -> None:
    """Poke (publish / add a probe) until the listener shows it received something.

    Subscriptions and "$" watches start on the listener's first iteration, in another task; probing
    proves it is live without guessing a sleep. Tests then check only what came after the first probe.
    """
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not seen():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} never became live")
        await poke()
        await asyncio.sleep(0.01)
