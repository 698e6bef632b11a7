"""A vLLM step's flat token layout, turned into what the batched core needs.

vLLM runs a step over one flat [T, d_model] tensor: request ``i`` of the persistent batch owns tokens
``qsl[i] <= t < qsl[i+1]`` and token ``t`` sits at absolute position ``computed[i] + (t - qsl[i])``.
The core (``steering.batch``) wants a row index per token -- slot ``i``'s prompt row for positions
before its prompt length, its generation row after -- and, for gates, a [slots, width] grid with each
slot's tokens right-aligned, so that the last column holds each slot's newest token. Everything here is
numpy on the host: the engine fills persistent device buffers from it once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steering.batch import ROWS_PER_SLOT


@dataclass(frozen=True)
class StepLayout:
    """One step. ``scheduled[i]`` tokens of slot i start at position ``computed[i]``."""

    scheduled: np.ndarray  # [slots] int
    computed: np.ndarray  # [slots] int
    prompt_lens: np.ndarray  # [slots] int
    active: np.ndarray  # [slots] bool: the slot's request reads or edits anything

    @property
    def starts(self) -> np.ndarray:
        """qsl[:-1]: first flat token of each slot."""
        return np.concatenate([[0], np.cumsum(self.scheduled)[:-1]]).astype(np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.scheduled.sum())

    def positions(self) -> np.ndarray:
        """[T] absolute position of every flat token."""
        slot = np.repeat(np.arange(len(self.scheduled)), self.scheduled)
        offset = np.arange(self.n_tokens) - np.repeat(self.starts, self.scheduled)
        return self.computed[slot] + offset

    def rows(self) -> np.ndarray:
        """[T] core row of every token: prompt or generation row of its slot, 0 for inactive slots."""
        slot = np.repeat(np.arange(len(self.scheduled)), self.scheduled)
        pos = self.positions()
        generation = pos >= self.prompt_lens[slot]
        rows = 1 + ROWS_PER_SLOT * slot + generation  # steering.batch.row_of, vectorised
        return np.where(self.active[slot], rows, 0).astype(np.int64)

    def grid(self) -> tuple[np.ndarray, int]:
        """([slots * width] flat token index per grid cell, -1 for padding; width): right-aligned."""
        width = int(self.scheduled.max()) if len(self.scheduled) else 1
        n = len(self.scheduled)
        col = np.arange(width)[None, :]
        first = width - self.scheduled[:, None]  # first occupied column of each slot
        index = self.starts[:, None] + (col - first)
        return np.where(col >= first, index, -1).reshape(-1).astype(np.int64), max(width, 1) if n else 1

    def prompt_ends(self) -> np.ndarray:
        """[slots] bool: this step's last token of the slot is its final prompt token (it predicts the
        first generated token, and opens the generation series)."""
        last = self.computed + self.scheduled - 1
        return (self.scheduled > 0) & (last == self.prompt_lens - 1)
