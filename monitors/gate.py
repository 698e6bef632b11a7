"""Rule evaluation on the device, for conditional steering: a firing switches steering on in-step.

A ``steer`` rule must act inside the forward pass that produced its reading, without the engine
waiting for the host each token. Its state therefore lives in tensors: the last ``window`` scores, how
many tokens the series has seen, the EMA, and a latched ``fired`` flag that gated edits read as their
gate. The aggregations are those of ``monitors.rules`` (max, mean, ema, count, thresholds) evaluated
token by token, so host and device agree on the token where a rule first fires; once fired, a gate
stays on for the rest of the generation (hysteresis has nothing to do on a latch).

All gates read at one layer in a batch form one ``GateGroup``: K (slot, gate) members updated together
with a handful of elementwise ops per token position, whatever their aggregations. A prefill step
feeds a slot's prompt tokens in order (a loop over positions of the padded [slots, width] layout); a
decode step is one iteration. As on the host, the prompt and the generation are separate series and
the last prompt position (which predicts generated token 0) belongs to both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitors.rules import RuleSpec

KIND = {"max": 0, "mean": 1, "ema": 2, "count": 3}


@dataclass
class GateSeries:
    """One request's state for one gate: tensors on the device (0-d except ``ring``)."""

    spec: RuleSpec
    ring: torch.Tensor  # [window] the last scores, newest last
    n: torch.Tensor  # long: tokens seen in this series
    ema: torch.Tensor  # float
    fired: torch.Tensor  # bool, latched
    fired_at: torch.Tensor  # long: index in its series of the token that fired it, -1 before
    fired_on_prompt: torch.Tensor  # bool: the latch closed in the prompt series (else the generation's)

    @classmethod
    def new(cls, spec: RuleSpec, device: torch.device | str = "cpu") -> GateSeries:
        dev = torch.device(device)
        return cls(spec, torch.zeros(spec.window, device=dev), torch.zeros((), dtype=torch.long, device=dev),
                   torch.zeros((), device=dev), torch.zeros((), dtype=torch.bool, device=dev),
                   torch.full((), -1, dtype=torch.long, device=dev), torch.zeros((), dtype=torch.bool, device=dev))


@dataclass(frozen=True)
class GateMember:
    """A gate of one slot read at this group's layer: which gate (j), which read column, its series."""

    slot: int
    gate: int
    column: int
    series: GateSeries


class GateGroup:
    """Every gate read at one (layer, before/after edits) of a batch, stacked into [K] tensors."""

    def __init__(self, members: list[GateMember], device: torch.device) -> None:
        self.members = members
        self.width = max(m.series.spec.window for m in members)
        specs = [m.series.spec for m in members]

        def vec(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.slot = vec([m.slot for m in members], torch.long)
        self.gate = vec([m.gate for m in members], torch.long)
        self.column = vec([m.column for m in members], torch.long)
        self.kind = vec([KIND[s.aggregation] for s in specs], torch.long)
        self.threshold = vec([s.threshold for s in specs])
        self.window = vec([s.window for s in specs], torch.long)
        self.alpha = vec([s.alpha for s in specs])
        self.count = vec([float(s.count) for s in specs])
        self.on_prompt = vec([s.watches("prompt") for s in specs], torch.bool)
        self.on_generation = vec([s.watches("generation") for s in specs], torch.bool)
        self.ring = torch.stack([_left_pad(m.series.ring, self.width) for m in members])
        self.n = torch.stack([m.series.n for m in members])
        self.ema = torch.stack([m.series.ema for m in members])
        self.fired = torch.stack([m.series.fired for m in members])
        self.fired_at = torch.stack([m.series.fired_at for m in members])
        self.fired_on_prompt = torch.stack([m.series.fired_on_prompt for m in members])
        self._ages = torch.arange(self.width - 1, -1, -1, device=device)  # age of each ring column
        # host-side facts that let a step skip work no member needs
        self.needs_window = any(s.aggregation in ("mean", "count") for s in specs)
        self.any_prompt = any(s.watches("prompt") for s in specs)

    def update(self, reads: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int], fired: torch.Tensor,
               prompt_ends: bool | torch.Tensor = False) -> None:
        """Feed this step's scores. reads [T, n_columns] for T = slots x width tokens laid out
        slot-major (``grid``), rows [T]; ``fired`` [slots + 1, gates] receives the latches.

        ``prompt_ends``: the last column holds each prompted slot's final prompt token. That position
        predicts the first generated token, so (as on the host) its score also opens the generation
        series, which starts afresh. A [slots] bool ``prompt_ends`` says it per slot (a ragged step
        mixing prompt chunks, final prompt tokens and decodes)."""
        n_slots, width = grid
        scores = reads.reshape(n_slots, width, -1)[self.slot, :, self.column]  # [K, width]
        token_rows = rows.reshape(n_slots, width)[self.slot]  # [K, width]
        is_prompt = (token_rows % 2) == 1  # slot s: prompt row 2s+1, generation row 2s+2, padding 0
        watched = torch.where(is_prompt, self.on_prompt[:, None], self.on_generation[:, None]) & (token_rows > 0)
        whole_prefill = prompt_ends is True
        if self.any_prompt or not whole_prefill:  # a whole-prompt prefill holds prompt tokens only
            for k in range(width):
                self._push(scores[:, k], watched[:, k], is_prompt[:, k])
        if prompt_ends is not False:
            last_prompt = is_prompt[:, -1] if whole_prefill else is_prompt[:, -1] & prompt_ends[self.slot]  # type: ignore[index]
            self._restart(last_prompt)
            self._push(scores[:, -1], last_prompt & self.on_generation, torch.zeros_like(last_prompt))
        fired[self.slot, self.gate] = self.fired

    def _restart(self, which: torch.Tensor) -> None:
        self.ring = torch.where(which[:, None], torch.zeros_like(self.ring), self.ring)
        self.n = torch.where(which, torch.zeros_like(self.n), self.n)
        self.ema = torch.where(which, torch.zeros_like(self.ema), self.ema)

    def _push(self, s: torch.Tensor, present: torch.Tensor, on_prompt: torch.Tensor) -> None:
        shifted = torch.cat([self.ring[:, 1:], s[:, None]], dim=1)
        self.ring = torch.where(present[:, None], shifted, self.ring)
        first = self.n == 0
        self.n = self.n + present.long()
        ema = torch.where(first, s, self.alpha * s + (1.0 - self.alpha) * self.ema)
        self.ema = torch.where(present, ema, self.ema)
        if self.needs_window:
            in_window = self._ages[None, :] < torch.minimum(self.window, self.n)[:, None]  # [K, width]
            mean = (self.ring * in_window).sum(1) / in_window.sum(1).clamp_min(1)
            above = ((self.ring > self.threshold[:, None]) & in_window).sum(1).float()
        else:
            mean = above = torch.zeros_like(s)
        value = torch.stack([s, mean, self.ema, above], 1).gather(1, self.kind[:, None])[:, 0]
        trigger = torch.where(self.kind == KIND["count"], value >= self.count, value > self.threshold)
        newly = present & trigger & ~self.fired
        self.fired_at = torch.where(newly, self.n - 1, self.fired_at)
        self.fired_on_prompt = torch.where(newly, on_prompt, self.fired_on_prompt)
        self.fired = self.fired | newly

    def export(self) -> None:
        """Write the stacked state back into each member's series (device ops; the plan is rebuilt
        whenever the batch changes, and a request's gates must outlive its plan)."""
        for i, m in enumerate(self.members):
            m.series.ring = self.ring[i, self.width - m.series.spec.window:].clone()
            m.series.n, m.series.ema = self.n[i].clone(), self.ema[i].clone()
            m.series.fired, m.series.fired_at = self.fired[i].clone(), self.fired_at[i].clone()
            m.series.fired_on_prompt = self.fired_on_prompt[i].clone()


def _left_pad(ring: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([ring.new_zeros(width - ring.numel()), ring]) if ring.numel() < width else ring
