"""Terminal views: generated text coloured by a monitor's per-token score, and summary tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


class HeatView:
    """Streams tokens with a background whose intensity follows one reading's score.

    Scores are scaled to [0, 1] by ``lo``/``hi``: probes are probabilities already; for projections and
    SAE features the scale adapts to the largest magnitude seen so far in this generation.
    """

    def __init__(self, console: Console, monitor: str | None, bounded: bool) -> None:
        self.console, self.monitor, self.bounded = console, monitor, bounded
        self.hi = 1e-9

    def token(self, text: str, readings: dict[str, float]) -> None:
        if not text:
            return
        if self.monitor is None or self.monitor not in readings:
            self.console.print(Text(text), end="")
            return
        self.console.print(Text(text, style=self.style(readings[self.monitor])), end="")

    def style(self, score: float) -> str:
        if self.bounded:
            level = min(max(score, 0.0), 1.0)
        else:
            self.hi = max(self.hi, abs(score))
            level = abs(score) / self.hi
        red = int(40 + 200 * level)
        return f"on rgb({red},{int(40 * (1 - level))},{int(40 * (1 - level))})"


def peaks_table(tokens: list[dict[str, Any]], names: list[str]) -> Table:
    """Peak, mean and where the peak was, per reading, over generated tokens."""
    table = Table(title="monitor summary (generated tokens)")
    for col in ("monitor", "peak", "at token", "mean", "min"):
        table.add_column(col, justify="right" if col != "monitor" else "left")
    for name in names:
        values = [(t["readings"][name], i, t["token"]) for i, t in enumerate(tokens) if name in t["readings"]]
        if not values:
            continue
        peak = max(values)
        mean = sum(v for v, _, _ in values) / len(values)
        table.add_row(name, f"{peak[0]:.4g}", f"#{peak[1]} {peak[2]!r}", f"{mean:.4g}", f"{min(values)[0]:.4g}")
    return table
