"""The refusal direction (Arditi et al. 2024): difference of means at post-instruction positions, with
the (layer, position) chosen by what ablating and adding it does.

Candidates: r[L, p] = mean over harmful instructions of the residual after layer L at the p-th token
from the end of the prompt template, minus the same over harmless ones. Each candidate is scored on
held-out instructions by

- ``ablated_refusal``: the refusal score on harmful prompts with r removed from every layer's output
  (x <- x - (x.r^) r^); lower is better;
- ``kl``: KL(plain || ablated) of the next-token distribution on harmless prompts; must stay small;
- ``induced_refusal``: the refusal score on harmless prompts with r added after layer L.

The refusal score is Arditi's: log p(R) - log(1 - p(R)) at the first response position, where R is
the set of first tokens of typical refusals. The choice keeps candidates with L < 0.8 depth, KL below
``max_kl`` and an induced score above the harmless baseline, and takes the lowest ablated score. When
no candidate passes both filters it falls back to the KL filter alone, then to the lowest KL (a model
without refusal behaviour, such as a small base model, has no candidate that passes); ``selection``
says which rule chose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from monitors.capture import recording
from steering.errors import invalid
from steering.vectors import SteeringVector, make_vector

Encode = Callable[[str], list[int]]
BASE_TEMPLATE = "Instruction: {instruction}\nResponse:"
REFUSAL_PREFIXES = ("I'm sorry", "I am sorry", "I cannot", "I can't", "Sorry", "As an AI", "I apologize",
                    "I won't", "Unfortunately")


@dataclass(frozen=True)
class Candidate:
    layer: int
    position: int  # from the end of the prompt: -1 is the last token
    ablated_refusal: float
    kl: float
    induced_refusal: float
    norm: float


@dataclass(frozen=True)
class RefusalResult:
    vector: SteeringVector  # the chosen r at every layer (ablation reads it per layer)
    chosen: Candidate
    candidates: list[Candidate]
    baseline_harmful: float  # refusal score without edits
    baseline_harmless: float
    ablated_all_layers: float  # the chosen direction ablated: refusal score on harmful prompts
    selection: str  # "kl+induce" (Arditi's filters), "kl only", or "lowest kl" (no candidate passed)


def refusal_token_ids(encode_plain: Encode, prefixes: Sequence[str] = REFUSAL_PREFIXES) -> list[int]:
    """First token of each refusal phrase (as it follows the template, after a space)."""
    ids = {tokens[0] for tokens in (encode_plain(" " + p) for p in prefixes) if tokens}
    if not ids:
        raise invalid("refusal_prefixes", "no refusal phrase encodes to a token")
    return sorted(ids)


def refusal_score(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log p(R) - log(1 - p(R)) per row of next-token logits [n, vocab]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p_r = logp[:, list(refusal_ids)].logsumexp(-1)
    return p_r - torch.log1p(-p_r.exp().clamp(max=1 - 1e-7))


class Runner:
    """Batched left-padded forwards of prompts on one model: last-position logits and residuals."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, encode: Encode, pad_id: int, batch_size: int = 16):
        self.model, self.layers, self.encode, self.pad_id, self.batch_size = model, layers, encode, pad_id, batch_size

    def _batches(self, prompts: Sequence[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        dev = next(self.model.parameters()).device
        for lo in range(0, len(prompts), self.batch_size):
            ids = [self.encode(p) for p in prompts[lo:lo + self.batch_size]]
            width = max(len(x) for x in ids)
            t = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(t)
            for i, x in enumerate(ids):
                t[i, width - len(x):] = torch.tensor(x)
                mask[i, width - len(x):] = 1
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            yield t.to(dev), mask.to(dev), pos.to(dev)

    def tail_logprobs(self, prompts: Sequence[str], last: int) -> list[torch.Tensor]:
        """Next-token log-probabilities at the last ``last`` positions, one [batch, last, vocab] per batch
        (kept per batch: the vocabulary makes one tensor for every prompt large)."""
        out = []
        with torch.inference_mode():
            for ids, mask, pos in self._batches(prompts):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=last).logits
                out.append(torch.log_softmax(logits.float(), -1).cpu())
        return out

    def last_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token log-probabilities [n, vocab] at each prompt's last position."""
        return torch.cat([x[:, -1] for x in self.tail_logprobs(prompts, 1)])

    def tail_residuals(self, prompts: Sequence[str], which: Sequence[int], n_positions: int) -> dict[int, torch.Tensor]:
        """Residuals [n, n_positions, d] after each layer at the last ``n_positions`` prompt tokens."""
        out: dict[int, list[torch.Tensor]] = {layer: [] for layer in which}
        with torch.inference_mode(), recording(self.layers, list(which)) as store:
            for ids, mask, pos in self._batches(prompts):
                self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
                for layer in which:
                    out[layer].append(store[layer][:, -n_positions:].cpu())
        return {layer: torch.cat(v) for layer, v in out.items()}


@contextmanager
def ablating(layers: nn.ModuleList, direction: torch.Tensor) -> Iterator[None]:
    """Remove ``direction`` from every decoder layer's output."""
    unit = direction / direction.norm()
    handles = [layer.register_forward_hook(_edit(lambda h: h - (h @ unit.to(h))[..., None] * unit.to(h)))
               for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def adding(layers: nn.ModuleList, layer: int, vector: torch.Tensor) -> Iterator[None]:
    handle = layers[layer].register_forward_hook(_edit(lambda h: h + vector.to(h)))
    try:
        yield
    finally:
        handle.remove()


def _edit(fn: Callable[[torch.Tensor], torch.Tensor]):  # noqa: ANN202 - torch hook
    def hook(module: nn.Module, args: object, output: object) -> object:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)  # type: ignore[arg-type]

    return hook


def mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q), both log-probabilities [..., vocab]."""
    return float((p.exp() * (p - q)).sum(-1).mean())


def find_refusal_direction(runner: Runner, harmful: Sequence[str], harmless: Sequence[str],
                           harmful_val: Sequence[str], harmless_val: Sequence[str], refusal_ids: Sequence[int], *,
                           layers: Sequence[int], n_positions: int = 3, max_kl: float = 0.1,
                           max_layer_fraction: float = 0.8, model: str = "", source: str = "",
                           progress: Callable[[int, int], None] | None = None) -> RefusalResult:
    """Build every (layer, position) candidate from the training instructions and choose one."""
    if not harmful or not harmless:
        raise invalid("instructions", f"need harmful and harmless instructions; got {len(harmful)} harmful, "
                      f"{len(harmless)} harmless")
    n_layers = len(runner.layers)
    layers = [layer for layer in layers if layer < max_layer_fraction * n_layers] or list(layers)
    mean_h = {k: v.mean(0) for k, v in runner.tail_residuals(harmful, layers, n_positions).items()}
    mean_s = {k: v.mean(0) for k, v in runner.tail_residuals(harmless, layers, n_positions).items()}
    plain_harmful = runner.last_logprobs(harmful_val)
    plain_harmless = runner.last_logprobs(harmless_val)
    base_h = float(refusal_score(plain_harmful, refusal_ids).mean())
    base_s = float(refusal_score(plain_harmless, refusal_ids).mean())
    cands = []
    total = len(layers) * n_positions
    for layer in layers:
        for p in range(n_positions):
            r = mean_h[layer][p] - mean_s[layer][p]
            cands.append(_score(runner, r, layer, p - n_positions, harmful_val, harmless_val, plain_harmless, refusal_ids))
            if progress is not None:
                progress(len(cands), total)
    chosen, selection = _choose(cands, max_kl, base_s)
    r = mean_h[chosen.layer][chosen.position + n_positions] - mean_s[chosen.layer][chosen.position + n_positions]
    vec = make_vector({layer: r.clone() for layer in range(n_layers)}, model=model, method="refusal-direction",
                      source=source)
    return RefusalResult(vec, chosen, cands, base_h, base_s, chosen.ablated_refusal, selection)


def _choose(cands: list[Candidate], max_kl: float, base_harmless: float) -> tuple[Candidate, str]:
    both = [c for c in cands if c.kl < max_kl and c.induced_refusal > base_harmless]
    if both:
        return min(both, key=lambda c: c.ablated_refusal), "kl+induce"
    low_kl = [c for c in cands if c.kl < max_kl]
    if low_kl:
        return min(low_kl, key=lambda c: c.ablated_refusal), "kl only"
    return min(cands, key=lambda c: c.kl), "lowest kl"


def _score(runner: Runner, r: torch.Tensor, layer: int, position: int, harmful_val: Sequence[str],
           harmless_val: Sequence[str], plain_harmless: torch.Tensor, refusal_ids: Sequence[int]) -> Candidate:
    with ablating(runner.layers, r):
        ablated_h = float(refusal_score(runner.last_logprobs(harmful_val), refusal_ids).mean())
        kl = mean_kl(plain_harmless, runner.last_logprobs(harmless_val))
    with adding(runner.layers, layer, r):
        induced = float(refusal_score(runner.last_logprobs(harmless_val), refusal_ids).mean())
    return Candidate(layer, position, ablated_h, kl, induced, float(r.norm()))
