"""Contrastive activation addition vectors from A/B pairs, with a held-out layer sweep (Rimsky et al. 2023).

Each pair is two texts that differ only in the answer: the vector at layer L is the mean over pairs of
(residual at the answer-letter token of the positive text) minus (the same for the negative text).
To say which layer separates the behaviour, the pairs are split: a direction is built from the training
pairs and scored on the held-out ones by how often the positive text projects above its negative
(pair accuracy) and by the effect size of the projection difference (mean / std of the per-pair
differences). The saved vector uses every pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steering.errors import invalid
from steering.vectors import SteeringVector, make_vector


@dataclass(frozen=True)
class LayerSeparation:
    """How well one layer's CAA direction separates held-out pairs."""

    layer: int
    pair_accuracy: float  # held-out pairs with proj(positive) > proj(negative)
    effect_size: float  # mean / std of the held-out projection differences
    norm: float  # norm of the full-data vector at this layer


@dataclass(frozen=True)
class CAAResult:
    vector: SteeringVector
    sweep: list[LayerSeparation]
    n_pairs: int
    n_heldout: int

    @property
    def best(self) -> LayerSeparation:
        return max(self.sweep, key=lambda s: (s.effect_size, s.pair_accuracy))


def ab_texts(question: str, matching: str, not_matching: str) -> tuple[str, str]:
    """The positive and negative texts of a Rimsky-format A/B item, ending on the answer letter.

    "(A)" -> "...\\n\\nAnswer: (A": the last token is the letter, the position CAA reads."""
    def letter(answer: str) -> str:
        return answer.strip().strip("()")

    base = f"{question.rstrip()}\n\nAnswer: ("
    return base + letter(matching), base + letter(not_matching)


def caa_vector(pos: dict[int, torch.Tensor], neg: dict[int, torch.Tensor], *, holdout: float = 0.25,
               seed: int = 0, model: str = "", source: str = "") -> CAAResult:
    """``pos[L]``/``neg[L]`` [n_pairs, d_model], row i of each from the same pair."""
    layers = sorted(pos)
    n = pos[layers[0]].shape[0]
    if n < 2:
        raise invalid("pairs", f"need at least 2 contrastive pairs, got {n}")
    if not 0.0 <= holdout < 1.0:
        raise invalid("holdout", f"{holdout} not allowed; use 0 <= holdout < 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * holdout))) if holdout > 0 else 0
    test, train = order[:n_test], order[n_test:]
    sweep = []
    for layer in layers:
        diff = pos[layer] - neg[layer]
        full = diff.mean(0)
        sweep.append(_separation(layer, diff[train].mean(0), diff[test], float(full.norm())))
    vector = make_vector({layer: (pos[layer] - neg[layer]).mean(0) for layer in layers}, model=model, method="caa",
                         source=source)
    return CAAResult(vector, sweep, n, n_test)


def _separation(layer: int, direction: torch.Tensor, test_diff: torch.Tensor, norm: float) -> LayerSeparation:
    if test_diff.shape[0] == 0:
        return LayerSeparation(layer, float("nan"), float("nan"), norm)
    unit = direction / direction.norm().clamp_min(1e-12)
    proj = test_diff @ unit
    std = float(proj.std()) if proj.numel() > 1 else 0.0
    effect = float(proj.mean()) / std if std > 0 else float("inf") * float(torch.sign(proj.mean()))
    return LayerSeparation(layer, float((proj > 0).float().mean()), effect, norm)


def last_token_starts(encode, texts: Sequence[str]) -> list[int]:  # noqa: ANN001 - Callable[[str], list[int]]
    """Start positions that keep only each text's final token (the answer letter)."""
    return [len(encode(t)) - 1 for t in texts]
