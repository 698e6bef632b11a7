"""Alert rules: turning a monitor's per-token scores into episodes, on the host.

A rule aggregates its monitor's per-token scores into one value per token and fires when that value
crosses its trigger:

- ``max``: the token's own score; fires when it exceeds ``threshold``.
- ``mean``: the mean of the last ``window`` scores (fewer at the start); fires above ``threshold``.
- ``ema``: e_t = alpha * s_t + (1 - alpha) * e_(t-1), e_0 = s_0; fires above ``threshold``.
- ``count``: how many of the last ``window`` scores exceed ``threshold``; fires at ``count`` or more.

Hysteresis makes one alert per episode, not per token: after firing, a rule re-arms only once the
aggregate has fallen to ``threshold - hysteresis`` or below (``count``: once fewer than ``count`` of the
window exceed the threshold). The prompt and the generation are separate series: a rule scoped to
``both`` starts afresh on the first generated token.

The same semantics run on the device for conditional steering (``monitors.gate``), where a firing must
switch steering on inside the forward pass; ``tests/monitors/test_gate.py`` holds the two together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

Aggregation = Literal["max", "mean", "ema", "count"]
AGGREGATIONS = ("max", "mean", "ema", "count")
Scope = Literal["prompt", "generation", "both"]
MAX_WINDOW = 1024


class RuleSpec(BaseModel):
    """How per-token scores become firings; the fields every monitor rule shares."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    threshold: float = Field(description="per-token score bound: the aggregate (or, for count, each score) must exceed it")
    aggregation: Aggregation = Field("max", description="max | mean (last `window`) | ema (`alpha`) | count (`count` of last `window`)")
    window: int = Field(1, ge=1, le=MAX_WINDOW, description="tokens considered by mean and count")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="weight of the newest score in ema")
    count: int = Field(1, ge=1, le=MAX_WINDOW, description="count: scores above threshold needed within the window")
    hysteresis: float = Field(0.0, ge=0.0, description="re-arm only when the aggregate falls to threshold - hysteresis")
    scope: Scope = Field("generation", description="prompt tokens, generated tokens, or both (separate series)")

    @model_validator(mode="after")
    def _count_fits_window(self) -> RuleSpec:
        if self.aggregation == "count" and self.count > self.window:
            raise ValueError(f"count {self.count} can never be reached in a window of {self.window}; "
                             f"allowed 1..{self.window}")
        return self

    def watches(self, phase: str) -> bool:
        """Whether tokens of ``phase`` ("prompt" or "generation") feed this rule."""
        return self.scope in (phase, "both")


class Series:
    """One rule's aggregate over one series of tokens (a prompt, or a generation)."""

    def __init__(self, spec: RuleSpec) -> None:
        self.spec = spec
        self.scores: deque[float] = deque(maxlen=spec.window)
        self.ema: float | None = None

    def push(self, score: float) -> float:
        """Add one token's score; returns the aggregate after it."""
        s = self.spec
        self.scores.append(score)
        if s.aggregation == "mean":
            return sum(self.scores) / len(self.scores)
        if s.aggregation == "ema":
            self.ema = score if self.ema is None else s.alpha * score + (1.0 - s.alpha) * self.ema
            return self.ema
        if s.aggregation == "count":
            return float(sum(1 for v in self.scores if v > s.threshold))
        return score

    def triggers(self, value: float) -> bool:
        s = self.spec
        return value >= s.count if s.aggregation == "count" else value > s.threshold

    def rearms(self, value: float) -> bool:
        s = self.spec
        return value < s.count if s.aggregation == "count" else value <= s.threshold - s.hysteresis


class Rule(Protocol):
    """What the rule set needs of a monitor rule (the policy's MonitorRule satisfies it)."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> RuleSpec: ...


RuleT = TypeVar("RuleT", bound=Rule)


@dataclass(frozen=True)
class Firing(Generic[RuleT]):
    """A rule started an episode: its aggregate, the highest token score in the span, and where.

    ``phase`` says which series the token indices count: prompt positions or generated tokens."""

    rule: RuleT
    value: float
    peak: float
    phase: str
    token_start: int
    token_end: int


@dataclass
class _State:
    series: Series
    armed: bool = True
    fired: bool = False
    peak: float = float("-inf")
    peak_token: int = -1


class RuleSet(Generic[RuleT]):
    """Evaluates every rule of one request; not thread-safe (one per request).

    Rules named in ``external`` are decided elsewhere (the device gates of ``steer`` rules, which latch
    inside the forward pass): the set tracks their scores and builds their firing where it is told
    they fired, so the alert reports the same window, value and peak as any other rule's."""

    def __init__(self, rules: Sequence[RuleT], external: set[str] | frozenset[str] = frozenset()) -> None:
        self.rules = list(rules)
        self.external = set(external)
        self._state = {r.name: _State(Series(r.spec)) for r in self.rules}

    def on_prompt(self, readings: dict[str, list[float]], fired_at: dict[str, int] | None = None
                  ) -> list[Firing[RuleT]]:
        """The prompt's scores, one series per rule scoped to it; at most one firing per rule.
        ``fired_at``: prompt positions where external rules fired."""
        fired_at = fired_at or {}
        out = []
        for rule in self.rules:
            if not rule.spec.watches("prompt") or rule.name not in readings:
                continue
            series = Series(rule.spec)
            for pos, score in enumerate(readings[rule.name]):
                value = series.push(score)
                hit = fired_at.get(rule.name) == pos if rule.name in self.external else series.triggers(value)
                if hit:
                    self._state[rule.name].fired = True
                    out.append(_firing(rule, value, series, "prompt", pos))
                    break
        return out

    def on_token(self, index: int, readings: dict[str, float], fired: Sequence[str] = ()) -> list[Firing[RuleT]]:
        """One generated token's scores; returns the rules that start an episode on it. ``fired``:
        external rules that fired on this token."""
        out = []
        for rule in self.rules:
            if not rule.spec.watches("generation") or rule.name not in readings:
                continue
            st = self._state[rule.name]
            score = readings[rule.name]
            if score > st.peak:
                st.peak, st.peak_token = score, index
            value = st.series.push(score)
            hit = rule.name in fired if rule.name in self.external else st.armed and st.series.triggers(value)
            if hit:
                st.armed, st.fired = False, True
                out.append(_firing(rule, value, st.series, "generation", index))
            elif not st.armed and st.series.rearms(value):
                st.armed = True
        return out

    def summary(self) -> list[tuple[RuleT, bool, float, int]]:
        """(rule, fired, peak score over generated tokens, token index of the peak) per rule."""
        out = []
        for r in self.rules:
            st = self._state[r.name]
            out.append((r, st.fired, st.peak if st.peak != float("-inf") else 0.0, st.peak_token))
        return out


def _firing(rule: RuleT, value: float, series: Series, phase: str, end: int) -> Firing[RuleT]:
    """The span is the tokens the aggregate looked at (the window; the token alone for max and ema)."""
    span = len(series.scores) if rule.spec.aggregation in ("mean", "count") else 1
    recent = list(series.scores)[-span:]
    return Firing(rule, value, max(recent), phase, end - span + 1, end)
