"""AlertService.WatchAlerts end to end: a live watch sees every alert of several generations, in order,
identical to the in-band AlertEvents and to the tenant's stored stream; resuming replays the rest."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.protos import chat_pb2
from tests.service.grpc_harness import (
    STORES,
    Client,
    Result,
    Watcher,
    direction_monitor,
    eventually,
    live_watch,
    policy_doc,
    random_vector,
    rig,
    rpc_error,
    run,
)

PROMPTS = ["abc", "1234", "zzz"]  # readings of both monitors cross 0 several times on each
N = 16
# (monitor, vector, layer, threshold, window of aggregation "mean"; 1 = "max", the token itself)
RULES = [("a", "va", 1, 0.0, 1), ("b", "vb", 2, 0.0, 1), ("c", "va", 1, -0.01, 3)]


def _expected_firings(res: Result) -> list[tuple[int, int, str, float, float]]:
    """(first token, last token, monitor, aggregate, peak token score) of every episode, from the readings in the stream itself:
    a rule fires when its aggregate rises above the threshold, and re-arms once it falls back to or below."""
    armed = {name: True for name, *_ in RULES}
    seen: dict[str, list[float]] = {name: [] for name, *_ in RULES}
    out = []
    for t in res.tokens:
        for name, _, _, threshold, window in RULES:
            seen[name].append(t.readings[name])
            last = seen[name][-window:]
            value = sum(last) / len(last)
            if value > threshold:
                if armed[name]:
                    out.append((t.index - len(last) + 1, t.index, name, value, max(last)))
                armed[name] = False
            else:
                armed[name] = True
    return out


@pytest.mark.parametrize("store_kind", STORES)
def test_watch_sees_every_alert_in_order_and_resumes(store_kind: str) -> None:
    async def body() -> None:
        async with rig(store_kind) as r:
            c = r.client
            await c.upload_vector("va", {1: random_vector(1)})
            await c.upload_vector("vb", {2: random_vector(2)})
            monitors = [direction_monitor(name, vid, thr, action="alert", layer=layer, aggregation="mean",
                                          window=window) for name, vid, layer, thr, window in RULES]
            await c.put_policy("watched", policy_doc(monitors), make_default=True)

            watcher = await live_watch(r.store, "acme", c.watch())
            in_band = []
            for prompt in PROMPTS:
                res = await c.generate(prompt, N, include_readings=True)
                assert res.final.finish_reason == chat_pb2.FINISH_REASON_LENGTH
                expected = _expected_firings(res)
                assert len(expected) >= 3, f"{prompt!r} should fire several times"
                assert [(a.token_start, a.token_end, a.monitor) for a in res.alerts] == [e[:3] for e in expected]
                for a, (*_, value, peak) in zip(res.alerts, expected, strict=True):
                    assert a.value == pytest.approx(value, abs=1e-9) and a.peak_score == pytest.approx(peak, abs=1e-9)
                    assert (a.phase, a.aggregation) == ("generation", "mean")
                    # the excerpt ends with the text up to and including the token that fired
                    assert a.excerpt == "".join(t.text for t in res.tokens[:a.token_end + 1])[-120:]
                # each alert comes right before the token it fired on
                kinds = [(e.WhichOneof("event"), e.alert.token_end if e.HasField("alert") else e.token.index)
                         for e in res.events[:-1]]
                for i, (kind, at) in enumerate(kinds):
                    if kind == "alert":
                        assert kinds[i + 1][1] == at
                summaries = {m.monitor: m for m in res.final.monitors}
                for name, *_ in RULES:
                    assert summaries[name].fired == any(e[2] == name for e in expected)
                for a in res.alerts:
                    assert a.action == "alert" and a.alert_id and a.policy == "watched"
                    assert a.request_id == res.final.request_id and a.peak_score > a.threshold
                in_band += res.alerts

            assert {a.monitor for a in in_band} == {name for name, *_ in RULES}  # every rule fired somewhere
            assert any(a.token_start < a.token_end for a in in_band)  # a mean over a window spans tokens
            await eventually(lambda: len(watcher.got) >= len(in_band), "the watch to see every alert")
            await asyncio.sleep(0.1)  # nothing more may arrive
            assert watcher.error is None
            assert list(watcher.got) == in_band  # every field, every alert, in order, none lost or repeated
            ids = [a.alert_id for a in in_band]
            assert len(set(ids)) == len(ids)
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

            stored = await r.store.read_alerts("acme", "0", count=1000)
            stored = [s for s in stored if s.fields["monitor"] != "marker"]
            assert [s.alert_id for s in stored] == ids
            for s, a in zip(stored, in_band, strict=True):
                assert (s.fields["monitor"], s.fields["action"], s.fields["request_id"]) == (a.monitor, a.action,
                                                                                             a.request_id)
                assert float(s.fields["peak_score"]) == a.peak_score
                assert (int(s.fields["token_start"]), int(s.fields["token_end"])) == (a.token_start, a.token_end)
            await watcher.close()

            # resume after the k-th alert: exactly the rest is replayed, then the watch stays live
            k = len(in_band) // 2
            resumed = await watch_from(c, in_band[k].alert_id, len(in_band) - k - 1)
            assert resumed.got == in_band[k + 1:]
            late = await c.generate(PROMPTS[0], N)
            assert late.alerts
            await eventually(lambda: len(resumed.got) == len(in_band) - k - 1 + len(late.alerts), "the late alerts")
            assert resumed.got[len(in_band) - k - 1:] == list(late.alerts)
            await resumed.close()

            # "0" replays everything kept, markers included
            kept = await r.store.read_alerts("acme", "0", count=1000)
            everything = await watch_from(c, "0", len(kept))
            assert [a.alert_id for a in everything.got] == [s.alert_id for s in kept]
            assert [a for a in everything.got if a.monitor != "marker"] == in_band + list(late.alerts)
            await everything.close()

            code, details = await rpc_error(c.watch(after_id="yesterday"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("after_id:")
    run(body(), timeout=40)


async def watch_from(c: Client, after_id: str, count: int) -> Watcher:
    """A watch resuming after ``after_id`` that has replayed ``count`` alerts (and no more)."""
    w = Watcher(c.watch(after_id=after_id))
    await eventually(lambda: len(w.got) >= count or w.error is not None, f"{count} replayed alerts")
    await asyncio.sleep(0.05)
    assert w.error is None, w.error
    assert len(w.got) == count
    return w
