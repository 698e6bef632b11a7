"""One contract suite for both stores: MemoryStore and RedisStore (against a real Redis).

pytest-asyncio is not a dependency: each test runs its async body on a per-test event loop through the
``run`` fixture, and the ``store`` fixture opens its store on that same loop (redis.asyncio
connections belong to one loop). Redis stores get a unique key prefix and are wiped afterwards.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from service.store import MemoryStore, RedisStore, Store, StoredAlert, VectorRecord, open_store
from service.store.base import SUBSCRIBED
from service.store.common import hash_secret, parse_stream_id
from steering.errors import AlreadyExists, InvalidArgument, Unavailable
from tests.service.store_fixtures import (
    REDIS_URL,
    TEST_TIMEOUT_S,
    WAIT_S,
    delete_prefix,
    dump_prefix,
    eventually,
    unique_prefix,
    until_live,
)

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture
def run() -> Iterator[Run[Any]]:
    """Run a coroutine to completion on this test's own loop, failing it after TEST_TIMEOUT_S."""
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, TEST_TIMEOUT_S))
    loop.close()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, run: Run[Any]) -> Iterator[Store]:
    """A fresh, empty store of each kind."""
    if request.param == "memory":
        opened: Store = MemoryStore()
    else:
        try:
            opened = run(RedisStore.connect(REDIS_URL, prefix=unique_prefix()))
        except Unavailable as exc:
            pytest.fail(f"the store tests need Redis at STEERWATCH_TEST_REDIS_URL={REDIS_URL!r}: {exc}")
    yield opened
    run(opened.close())
    if isinstance(opened, RedisStore):
        run(delete_prefix(REDIS_URL, opened.prefix))  # siblings use sub-prefixes, so they go too


async def sibling(store: Store, *, alert_maxlen: int) -> Store:
    """Another store of the same kind (closed by the caller; its Redis keys go with the fixture's)."""
    if isinstance(store, RedisStore):
        return await RedisStore.connect(store.url, prefix=f"{store.prefix}sib:", alert_maxlen=alert_maxlen)
    return MemoryStore(alert_maxlen=alert_maxlen)


# ---- API keys ----


def test_created_key_authenticates_to_its_principal(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        secret, principal = await store.create_key("acme", "tenant")
        other_secret, other = await store.create_key("acme", "admin")
        assert secret.startswith("sw_") and len(secret) >= 40 and secret != other_secret
        assert (principal.tenant, principal.role) == ("acme", "tenant")
        assert principal.key_id != other.key_id and secret not in principal.key_id
        assert await store.authenticate(secret) == principal
        assert await store.authenticate(other_secret) == other
        for garbage in ["", "sw_", secret + "x", secret[:-1], "not a key", principal.key_id]:
            assert await store.authenticate(garbage) is None, garbage

    run(body())


def test_add_key_is_idempotent_and_checks_its_arguments(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        first = await store.add_key("bootstrap-admin-secret", "ops", "admin")
        assert await store.add_key("bootstrap-admin-secret", "ops", "admin") == first
        assert await store.authenticate("bootstrap-admin-secret") == first
        with pytest.raises(AlreadyExists):
            await store.add_key("bootstrap-admin-secret", "other", "admin")
        with pytest.raises(InvalidArgument):
            await store.add_key("", "ops", "admin")
        with pytest.raises(InvalidArgument):
            await store.add_key("x" * 40, "ops", "root")  # type: ignore[arg-type]

    run(body())


def test_revoke_works_only_within_the_tenant(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        secret, principal = await store.create_key("acme", "tenant")
        kept_secret, kept = await store.create_key("acme", "tenant")
        assert not await store.revoke_key("globex", principal.key_id)
        assert await store.authenticate(secret) == principal
        assert await store.revoke_key("acme", principal.key_id)
        assert await store.authenticate(secret) is None
        assert not await store.revoke_key("acme", principal.key_id)
        assert await store.authenticate(kept_secret) == kept

    run(body())


def test_the_secret_is_never_stored(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        secret, _ = await store.create_key("acme", "tenant")
        await store.add_key("chosen-bootstrap-secret", "ops", "admin")
        if isinstance(store, RedisStore):
            stored = (await dump_prefix(REDIS_URL, store.prefix)).decode(errors="replace")
        else:
            stored = repr(vars(store))
        assert hash_secret(secret) in stored  # the dump really holds the key records...
        assert secret not in stored and "chosen-bootstrap-secret" not in stored  # ...but no secret

    run(body())


# ---- policies ----


def test_policy_versions_increment_and_stay_readable(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        puts = [await store.put_policy("acme", "strict", f'{{"v": {i}}}') for i in range(1, 4)]
        assert [p.version for p in puts] == [1, 2, 3]
        latest = await store.get_policy("acme", "strict")
        assert latest is not None and (latest.version, latest.document) == (3, '{"v": 3}')
        for version in (1, 2, 3):
            record = await store.get_policy("acme", "strict", version)
            assert record is not None and record.document == f'{{"v": {version}}}' and record.tenant == "acme"
        assert [await store.get_policy("acme", "strict", v) for v in (0, -1, 4)] == [None, None, None]
        assert await store.get_policy("acme", "absent") is None
        assert 0 < puts[0].updated_at_ms <= puts[2].updated_at_ms

    run(body())


def test_list_and_default_policy(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        await store.put_policy("acme", "b", "b1")
        await store.put_policy("acme", "b", "b2")
        await store.put_policy("acme", "a", "a1")
        assert (await store.put_policy("acme", "c", "c1", make_default=True)).is_default
        listed = await store.list_policies("acme")
        assert [(p.name, p.version, p.document, p.is_default) for p in listed] == [
            ("a", 1, "a1", False), ("b", 2, "b2", False), ("c", 1, "c1", True),
        ]  # fmt: skip
        assert await store.default_policy("acme") == "c"
        await store.put_policy("acme", "a", "a2", make_default=True)
        assert await store.default_policy("acme") == "a"
        assert not (await store.get_policy("acme", "c")).is_default  # type: ignore[union-attr]
        assert await store.delete_policy("acme", "b")  # not the default: the default stays
        assert await store.default_policy("acme") == "a"
        assert await store.delete_policy("acme", "a")
        assert await store.default_policy("acme") is None
        assert not await store.delete_policy("acme", "a")
        assert [p.name for p in await store.list_policies("acme")] == ["c"]
        assert (await store.put_policy("acme", "a", "new")).version == 1  # history went with the delete

    run(body())


def test_concurrent_puts_get_distinct_versions(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        records = await asyncio.gather(*(store.put_policy("acme", "hot", f"doc-{i}") for i in range(20)))
        assert sorted(r.version for r in records) == list(range(1, 21))
        for record in records:
            stored = await store.get_policy("acme", "hot", record.version)
            assert stored is not None and stored.document == record.document

    run(body())


def test_policies_are_isolated_between_tenants(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        # With ':' as a naive separator, ("a", "b:c") and ("a:b", "c") would share a key.
        await store.put_policy("a", "b:c", "of a", make_default=True)
        await store.put_policy("a:b", "c", "of a:b")
        await store.put_policy("globex", "b:c", "of globex")
        assert [(p.name, p.document) for p in await store.list_policies("a")] == [("b:c", "of a")]
        assert [(p.name, p.document) for p in await store.list_policies("a:b")] == [("c", "of a:b")]
        assert (await store.get_policy("globex", "b:c")).version == 1  # type: ignore[union-attr]
        assert await store.default_policy("a:b") is None and await store.default_policy("globex") is None
        assert not await store.delete_policy("globex", "c")
        assert await store.get_policy("a", "c") is None and await store.list_policies("nobody") == []

    run(body())


# ---- vectors ----


def _vector(tenant: str, vector_id: str, blob: bytes, **meta: str) -> VectorRecord:
    return VectorRecord(tenant=tenant, vector_id=vector_id, blob=blob, meta=meta)


def test_vector_blobs_round_trip_exactly(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        blob = bytes(range(256)) + os.urandom(65536) + b"\x00\xff\xfe"  # not UTF-8, NULs included
        await store.put_vector(_vector("acme", "honesty:v2", blob, model="tiny", layers="3,4"))
        got = await store.get_vector("acme", "honesty:v2")
        assert got is not None and got.blob == blob and type(got.blob) is bytes
        assert (got.tenant, got.vector_id, got.meta) == (
            "acme",
            "honesty:v2",
            {"model": "tiny", "layers": "3,4"},
        )
        assert got.created_at_ms > 0

    run(body())


def test_vector_put_replace_delete_and_list(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        await store.put_vector(_vector("acme", "v1", b"first"))
        with pytest.raises(AlreadyExists):
            await store.put_vector(_vector("acme", "v1", b"second"))
        assert (await store.get_vector("acme", "v1")).blob == b"first"  # type: ignore[union-attr]
        await store.put_vector(_vector("acme", "v1", b"second", note="x"), replace=True)
        assert (await store.get_vector("acme", "v1")).meta == {"note": "x"}  # type: ignore[union-attr]
        await store.put_vector(_vector("acme", "v0", b"zero"))
        assert [(v.vector_id, v.blob) for v in await store.list_vectors("acme")] == [
            ("v0", b"zero"),
            ("v1", b"second"),
        ]
        assert await store.delete_vector("acme", "v1")
        assert await store.get_vector("acme", "v1") is None and not await store.delete_vector("acme", "v1")
        assert [v.vector_id for v in await store.list_vectors("acme")] == ["v0"]

    run(body())


def test_vectors_are_isolated_between_tenants(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        await store.put_vector(_vector("a", "b:c", b"of a"))
        await store.put_vector(_vector("a:b", "c", b"of a:b"))
        await store.put_vector(_vector("globex", "b:c", b"of globex"))  # same id, other tenant: no clash
        assert (await store.get_vector("a", "b:c")).blob == b"of a"  # type: ignore[union-attr]
        assert [v.blob for v in await store.list_vectors("a:b")] == [b"of a:b"]
        assert await store.get_vector("a", "c") is None
        assert not await store.delete_vector("globex", "c")
        assert await store.delete_vector("globex", "b:c")
        assert (await store.get_vector("a", "b:c")).blob == b"of a"  # type: ignore[union-attr]

    run(body())


# ---- alerts ----


async def _add_many(store: Store, tenant: str, n: int, tag: str = "n") -> list[str]:
    return [await store.add_alert(tenant, {tag: str(i), "monitor": "toxicity"}) for i in range(n)]


def test_read_alerts_pages_in_order(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        ids = await _add_many(store, "acme", 50)
        assert [parse_stream_id(i) for i in ids] == sorted({parse_stream_id(i) for i in ids})  # strictly up
        pages: list[StoredAlert] = []
        cursor = "0"
        while page := await store.read_alerts("acme", cursor, count=7):
            assert len(page) <= 7
            pages += page
            cursor = page[-1].alert_id
        assert [a.alert_id for a in pages] == ids
        assert [a.fields for a in pages] == [{"n": str(i), "monitor": "toxicity"} for i in range(50)]
        assert [a.alert_id for a in await store.read_alerts("acme", ids[9], count=3)] == ids[10:13]
        assert len(await store.read_alerts("acme")) == 50 and await store.read_alerts("globex") == []
        for bad in ["$", "abc", "1-x", "-1"]:
            with pytest.raises(InvalidArgument):
                await store.read_alerts("acme", bad)
        with pytest.raises(InvalidArgument):
            await store.add_alert("acme", {})

    run(body())


def test_latest_alerts_are_the_newest_oldest_first(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        ids = await _add_many(store, "acme", 12)
        await _add_many(store, "globex", 3)
        latest = await store.latest_alerts("acme", count=5)
        assert [a.alert_id for a in latest] == ids[-5:]
        assert [a.fields["n"] for a in latest] == ["7", "8", "9", "10", "11"]
        assert [a.alert_id for a in await store.latest_alerts("acme", count=100)] == ids
        assert await store.latest_alerts("initech") == []
        with pytest.raises(InvalidArgument):
            await store.latest_alerts("acme", count=0)

    run(body())


def test_alert_stream_is_trimmed_to_maxlen(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        # Exact MAXLEN in both stores (see redis_store.py), so the bound is tight.
        small = await sibling(store, alert_maxlen=10)
        try:
            ids = await _add_many(small, "acme", 50)
            assert [a.alert_id for a in await small.read_alerts("acme", count=1000)] == ids[-10:]
            later = await small.add_alert("acme", {"n": "late"})
            assert parse_stream_id(later) > parse_stream_id(ids[-1])  # trimming never reuses ids
        finally:
            await small.close()

    run(body())


def test_watch_from_now_gets_every_later_alert_in_order(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        before = await store.add_alert("acme", {"n": "before"})
        watcher = store.watch_alerts("acme")  # "$": only what comes after
        got: list[StoredAlert] = []
        consumer = asyncio.create_task(_collect(watcher, got))
        await until_live(lambda: store.add_alert("acme", {"probe": "1"}), lambda: bool(got), "the watcher")
        producer = asyncio.create_task(_add_many(store, "acme", 100))
        await asyncio.sleep(0)  # let the producer interleave with the consumer
        produced = await producer
        await eventually(_last_is(got, produced[-1]), "the 100th alert")
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        assert consumer.cancelled()  # CancelledError went through the generator, not swallowed
        ids = [a.alert_id for a in got]
        assert before not in ids and [i for i in ids if i in set(produced)] == produced
        rest = await store.read_alerts("acme", ids[0], count=1000)  # none lost: nothing in between
        assert ids == [ids[0]] + [a.alert_id for a in rest]

    run(body())


def test_watch_from_a_past_id_replays_then_continues_until_closed(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        ids = await _add_many(store, "acme", 5)
        watcher = store.watch_alerts("acme", ids[1])
        replay = [await asyncio.wait_for(anext(watcher), WAIT_S) for _ in range(3)]
        assert [a.alert_id for a in replay] == ids[2:]
        pending = asyncio.ensure_future(anext(watcher))  # now blocked waiting for new entries
        await asyncio.sleep(0.05)
        more = await _add_many(store, "acme", 3)
        assert (await asyncio.wait_for(pending, WAIT_S)).alert_id == more[0]
        assert [(await asyncio.wait_for(anext(watcher), WAIT_S)).alert_id for _ in range(2)] == more[1:]
        await watcher.aclose()  # type: ignore[attr-defined]
        with pytest.raises(StopAsyncIteration):
            await anext(watcher)
        from_start = store.watch_alerts("acme", "0")
        assert (await asyncio.wait_for(anext(from_start), WAIT_S)).alert_id == ids[0]
        await from_start.aclose()  # type: ignore[attr-defined]

    run(body())


def test_watch_sees_only_its_tenant(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        watcher = store.watch_alerts("a", "0")
        await store.add_alert("a:b", {"n": "other tenant"})
        await store.add_alert("globex", {"n": "other tenant"})
        mine = await store.add_alert("a", {"n": "mine"})
        got = await asyncio.wait_for(anext(watcher), WAIT_S)
        assert (got.alert_id, got.fields) == (mine, {"n": "mine"})
        await watcher.aclose()  # type: ignore[attr-defined]
        assert await store.read_alerts("a") == [got]

    run(body())


async def _collect(source: Any, into: list[Any]) -> None:
    async for item in source:
        into.append(item)


def _last_is(items: list[Any], expected: Any) -> Callable[[], bool]:
    """A check that ``items`` ends with ``expected`` (an alert id, or the item itself)."""
    return lambda: bool(items) and expected in (items[-1], getattr(items[-1], "alert_id", None))


def test_cancelling_a_watcher_always_ends_it(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        # Cancel right after a delivery, when the watcher is between reads: the window in which
        # redis-py with a socket_timeout lost the cancellation on Python 3.11 (see redis_store.py).
        for round_ in range(20):
            got: list[StoredAlert] = []
            consumer = asyncio.create_task(_collect(store.watch_alerts("acme", "0"), got))
            added = await store.add_alert("acme", {"round": str(round_)})
            await eventually(_last_is(got, added), "the alert")
            consumer.cancel()
            await asyncio.wait_for(asyncio.gather(consumer, return_exceptions=True), WAIT_S)
            assert consumer.cancelled()

    run(body())


# ---- invalidation ----


def test_every_subscriber_sees_invalidations_in_order(store: Store, run: Run[None]) -> None:
    async def body() -> None:
        inboxes: list[list[tuple[str, str, str]]] = [[], []]
        tasks = [asyncio.create_task(_collect(store.invalidations(), inbox)) for inbox in inboxes]
        for inbox in inboxes:
            await _until_subscribed(store, inbox)
        sent = [("acme", "policy", "strict"), ("a:b", "vector", "v:1"), ("acme", "vector", "v2")]
        for message in sent:
            await store.publish_invalidation(*message)
        for inbox in inboxes:
            await eventually(_last_is(inbox, sent[-1]), "the last invalidation")
            assert inbox[0] == SUBSCRIBED  # announced once the subscription is live
            assert [m for m in inbox if m[0] not in ("probe", "")] == sent
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(task.cancelled() for task in tasks)

    run(body())


async def _until_subscribed(store: Store, inbox: list[tuple[str, str, str]]) -> None:
    await until_live(
        lambda: store.publish_invalidation("probe", "policy", "p"), lambda: bool(inbox), "a subscriber"
    )


def test_open_store_and_connect_failures(run: Run[None]) -> None:
    async def body() -> None:
        memory = await open_store(None, alert_maxlen=5)
        assert isinstance(memory, MemoryStore) and await memory.ping()
        shared = await open_store(REDIS_URL, prefix=unique_prefix())
        assert isinstance(shared, RedisStore) and await shared.ping()
        await shared.close()
        with pytest.raises(Unavailable, match="127.0.0.1:1"):
            await RedisStore.connect("redis://:hunter2@127.0.0.1:1/0")
        try:
            await RedisStore.connect("redis://:hunter2@127.0.0.1:1/0")
        except Unavailable as exc:
            assert "hunter2" not in str(exc)

    run(body())
