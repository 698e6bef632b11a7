"""Turning per-token monitor readings into alerts: aggregation, threshold, one alert per episode.

A rule aggregates its monitor's per-token scores (``max``: the token itself; ``mean``: the mean of the
last ``window`` tokens) and fires when the aggregate rises above its threshold. It raises one alert per
episode: it re-arms only after the aggregate falls back to or below the threshold, so a monitor that
stays high for fifty tokens raises one alert, not fifty.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.policy import MonitorRule

PROMPT = -1  # token index used for spans on the prompt


@dataclass(frozen=True)
class Firing:
    """A rule started an episode: the monitor, its action, and where."""

    rule: MonitorRule
    score: float
    token_start: int
    token_end: int


@dataclass
class _State:
    window: deque[float]
    armed: bool = True
    fired: bool = False
    peak: float = float("-inf")
    peak_token: int = PROMPT
    episode_start: int = PROMPT
    firings: int = field(default=0)


class RuleSet:
    """Evaluates every rule of one generation; not thread-safe (one per request)."""

    def __init__(self, rules: list[MonitorRule]) -> None:
        self.rules = rules
        self._state = {r.name: _State(deque(maxlen=r.window)) for r in rules}

    def on_prompt(self, readings: dict[str, list[float]]) -> list[Firing]:
        """Prompt positions, for rules scoped to the prompt; at most one firing per rule."""
        out = []
        for rule in self.rules:
            if rule.scope == "generation" or rule.name not in readings:
                continue
            st = self._state[rule.name]
            for score in readings[rule.name]:
                st.window.append(score)
                if self._aggregate(rule, st) > rule.threshold and st.armed:
                    st.armed, st.fired = False, True
                    out.append(Firing(rule, self._aggregate(rule, st), PROMPT, PROMPT))
                    break
            st.window.clear()
            st.armed = True
        return out

    def on_token(self, index: int, readings: dict[str, float]) -> list[Firing]:
        """One generated token's readings; returns the rules that fire on it."""
        out = []
        for rule in self.rules:
            if rule.scope == "prompt" or rule.name not in readings:
                continue
            st = self._state[rule.name]
            score = readings[rule.name]
            st.window.append(score)
            if score > st.peak:
                st.peak, st.peak_token = score, index
            value = self._aggregate(rule, st)
            if value > rule.threshold:
                if st.armed:
                    st.armed, st.fired = False, True
                    st.episode_start = max(0, index - len(st.window) + 1)
                    st.firings += 1
                    out.append(Firing(rule, value, st.episode_start, index))
            else:
                st.armed = True
        return out

    def summary(self) -> list[tuple[MonitorRule, bool, float, int]]:
        """(rule, fired, peak score over generated tokens, token index of the peak) per rule."""
        return [(r, self._state[r.name].fired, self._peak(r), self._state[r.name].peak_token) for r in self.rules]

    def _peak(self, rule: MonitorRule) -> float:
        peak = self._state[rule.name].peak
        return peak if peak != float("-inf") else 0.0

    @staticmethod
    def _aggregate(rule: MonitorRule, st: _State) -> float:
        if rule.aggregation == "mean":
            return sum(st.window) / len(st.window)
        return st.window[-1]
