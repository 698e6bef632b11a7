"""Alert-rule semantics on deterministic readings, and the device gates agreeing with them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError

from monitors.gate import GateGroup, GateMember, GateSeries
from monitors.rules import RuleSet, RuleSpec


@dataclass(frozen=True)
class R:
    name: str
    spec: RuleSpec


def ruleset(**kw) -> RuleSet:
    return RuleSet([R("m", RuleSpec(**{"threshold": 0.5, **kw}))])


def feed(rs: RuleSet, scores: list[float]) -> list[int]:
    return [i for i, s in enumerate(scores) for _ in rs.on_token(i, {"m": s})]


def test_max_fires_once_per_episode_and_rearms():
    assert feed(ruleset(), [0.1, 0.6, 0.9, 0.7, 0.2, 0.8, 0.4]) == [1, 5]


def test_hysteresis_needs_a_real_drop_to_rearm():
    # 0.45 is below the threshold but not below 0.5 - 0.2: the episode goes on, no second alert
    assert feed(ruleset(hysteresis=0.2), [0.6, 0.45, 0.7, 0.29, 0.8]) == [0, 4]
    assert feed(ruleset(), [0.6, 0.45, 0.7]) == [0, 2]


def test_mean_window_smooths_spikes_and_spans_the_window():
    assert feed(ruleset(aggregation="mean", window=3), [0.0, 0.0, 0.9, 0.0, 0.0]) == []
    rs = ruleset(aggregation="mean", window=3)
    fired = [f for i, s in enumerate([0.0, 0.6, 0.7, 0.8]) for f in rs.on_token(i, {"m": s})]
    (f,) = fired
    assert (f.token_start, f.token_end, f.peak) == (1, 3, 0.8) and f.value == pytest.approx(0.7)


def test_ema_recurrence():
    # e: 0.4, 0.4*0.5+0.2... alpha 0.5: 0.4 -> 0.5 (=0.5 not >) -> 0.75 fires at 2
    assert feed(ruleset(aggregation="ema", alpha=0.5), [0.4, 0.6, 1.0, 0.0, 0.0]) == [2]
    # alpha 1 is max
    assert feed(ruleset(aggregation="ema", alpha=1.0), [0.1, 0.6, 0.9, 0.7, 0.2, 0.8]) == [1, 5]


def test_count_needs_enough_tokens_above_threshold_in_window():
    rs = ruleset(aggregation="count", window=4, count=2)
    assert feed(rs, [0.9, 0.1, 0.1, 0.1, 0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9]) == [6, 12]


def test_count_larger_than_window_is_refused():
    with pytest.raises(ValidationError, match="count 5 can never be reached"):
        RuleSpec(threshold=0.5, aggregation="count", window=4, count=5)


def test_prompt_scope_uses_prompt_positions_and_generation_starts_afresh():
    rs = RuleSet([R("m", RuleSpec(threshold=0.5, aggregation="mean", window=2, scope="both"))])
    (f,) = rs.on_prompt({"m": [0.1, 0.9, 0.95]})
    assert (f.phase, f.token_start, f.token_end) == ("prompt", 1, 2)
    # the generation series does not inherit the prompt's window: 0.2 alone is below the threshold
    assert rs.on_token(0, {"m": 0.2}) == []
    only_gen = RuleSet([R("m", RuleSpec(threshold=0.5))])
    assert only_gen.on_prompt({"m": [0.99]}) == []


# ---- the device gate agrees with the host rules -------------------------------------------------

def gate_first_firing(spec: RuleSpec, scores: list[float], chunks: list[int]) -> int:
    """Feed ``scores`` through a one-slot GateGroup in steps of ``chunks`` tokens (a prefill-like
    chunk then single tokens); returns the index where its latch first closed, or -1."""
    series = GateSeries.new(spec)
    pos = 0
    for size in chunks:
        group = GateGroup([GateMember(0, 0, 0, series)], torch.device("cpu"))
        reads = torch.tensor(scores[pos:pos + size], dtype=torch.float32)[:, None]
        rows = torch.full((size,), 2)  # generation row of slot 0
        fired = torch.zeros(2, 1, dtype=torch.bool)
        group.update(reads, rows, (1, size), fired)
        group.export()
        pos += size
    return int(series.fired_at) if bool(series.fired) else -1


@pytest.mark.parametrize("kw", [
    {"aggregation": "max"},
    {"aggregation": "mean", "window": 5},
    {"aggregation": "ema", "alpha": 0.3},
    {"aggregation": "count", "window": 6, "count": 3},
])
@pytest.mark.parametrize("seed", range(5))
def test_device_gate_fires_where_the_host_rule_first_fires(kw, seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(40, generator=g) * 0.9).tolist()
    spec = RuleSpec(threshold=0.6, **kw)
    host = feed(RuleSet([R("m", spec)]), scores)
    expected = host[0] if host else -1
    assert gate_first_firing(spec, scores, [17] + [1] * 23) == expected
    assert gate_first_firing(spec, scores, [1] * 40) == expected


def test_gate_ignores_padding_and_unwatched_phase():
    spec = RuleSpec(threshold=0.5, scope="generation")
    series = GateSeries.new(spec)
    group = GateGroup([GateMember(0, 0, 0, series)], torch.device("cpu"))
    fired = torch.zeros(2, 1, dtype=torch.bool)
    # prompt rows (1) and padding (0) with high scores: a generation-scoped gate must not latch
    group.update(torch.tensor([[0.9], [0.9], [0.9]]), torch.tensor([0, 1, 1]), (1, 3), fired)
    assert not bool(fired[0, 0]) and int(group.n[0]) == 0
    group.update(torch.tensor([[0.9]]), torch.tensor([2]), (1, 1), fired)
    assert bool(fired[0, 0])
