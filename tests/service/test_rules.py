"""Alert rules: thresholds, aggregation, one alert per episode, scopes."""

from __future__ import annotations

from service.policy import MonitorRule
from service.rules import PROMPT, RuleSet


def rule(**kw) -> MonitorRule:
    base = {"name": "m", "kind": "probe", "source": "p", "threshold": 0.5}
    return MonitorRule(**{**base, **kw})


def feed(rs: RuleSet, scores: list[float], name: str = "m") -> list[int]:
    fired = []
    for i, s in enumerate(scores):
        fired += [i for _ in rs.on_token(i, {name: s})]
    return fired


def test_one_alert_per_episode_and_rearm_after_dropping():
    rs = RuleSet([rule()])
    assert feed(rs, [0.1, 0.6, 0.9, 0.7, 0.2, 0.8, 0.4]) == [1, 5]
    (r, fired, peak, at), = rs.summary()
    assert fired and peak == 0.9 and at == 2


def test_mean_over_a_window_smooths_single_spikes():
    rs = RuleSet([rule(aggregation="mean", window=3)])
    assert feed(rs, [0.0, 0.0, 0.9, 0.0, 0.0]) == []  # mean 0.3 < 0.5
    rs = RuleSet([rule(aggregation="mean", window=3)])
    # mean(0.0, 0.6, 0.7) = 0.433: no; mean(0.6, 0.7, 0.8) = 0.7: fires at token 3, episode from token 1
    assert feed(rs, [0.0, 0.6, 0.7, 0.8]) == [3]


def test_prompt_scope_fires_on_prompt_readings_only():
    rs = RuleSet([rule(scope="prompt"), rule(name="g")])
    firings = rs.on_prompt({"m": [0.1, 0.9, 0.95], "g": [0.99]})
    assert [(f.rule.name, f.token_start) for f in firings] == [("m", PROMPT)]
    assert rs.on_token(0, {"m": 0.99, "g": 0.1}) == []


def test_below_or_equal_threshold_never_fires():
    rs = RuleSet([rule(threshold=0.5)])
    assert feed(rs, [0.5, 0.5, 0.49]) == []
    assert rs.summary()[0][1] is False
