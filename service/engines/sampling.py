"""Per-request token sampling: greedy, temperature, top-k and top-p, each request with its own generator."""

from __future__ import annotations

import torch

from service.engines.types import Sampling


def make_generator(s: Sampling) -> torch.Generator:
    """A CPU generator seeded from the request (or from the OS when no seed was given)."""
    g = torch.Generator()
    if s.seed is None:
        g.seed()
    else:
        g.manual_seed(s.seed)
    return g


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """Pick the next token from logits [vocab] under ``s``."""
    if s.temperature == 0.0:
        return int(torch.argmax(logits))
    z = logits.float().cpu() / s.temperature
    if 0 < s.top_k < z.numel():
        kth = torch.topk(z, s.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        z = _top_p(z, s.top_p)
    probs = torch.softmax(z, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def _top_p(z: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p (always at least one)."""
    sorted_z, order = torch.sort(z, descending=True)
    cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
    drop = cum - torch.softmax(sorted_z, dim=-1) >= p
    sorted_z = sorted_z.masked_fill(drop, float("-inf"))
    return torch.empty_like(z).scatter_(0, order, sorted_z)
