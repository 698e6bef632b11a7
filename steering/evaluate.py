"""What a steering vector does to behaviour, measured on held-out data: effect size versus coefficient.

- ``ab_choice``: for A/B questions (Rimsky et al.), the probability the model puts on the behaviour's
  answer letter relative to the other letter, with ``coef * v`` added after ``layer`` at every position;
  the reported rate is the mean of p(match) / (p(match) + p(other)), so 0.5 is indifference.
- ``refusal_scores``: the mean refusal log-odds (see ``steering.refusal``) of prompts under an edit.
- ``NeutralKL``: the mean KL(plain || steered) of next-token distributions over the last positions of
  neutral texts: how much the edit disturbs text it should leave alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from steering.refusal import Runner, adding, mean_kl, refusal_score

Edit = Callable[[], AbstractContextManager[None]]


def no_edit() -> AbstractContextManager[None]:
    return nullcontext()


def add_edit(runner: Runner, layer: int, vector: torch.Tensor, coef: float) -> Edit:
    return lambda: adding(runner.layers, layer, vector * coef)


def ab_choice(runner: Runner, prompts: Sequence[str], match_ids: Sequence[int], other_ids: Sequence[int],
              edit: Edit = no_edit) -> float:
    """Mean p(match) / (p(match) + p(other)) at the next token of each prompt (ending in "(")."""
    with edit():
        logp = runner.last_logprobs(prompts)
    rows = torch.arange(len(prompts))
    lm = logp[rows, torch.tensor(list(match_ids))]
    lo = logp[rows, torch.tensor(list(other_ids))]
    return float(torch.sigmoid(lm - lo).mean())


def refusal_scores(runner: Runner, prompts: Sequence[str], refusal_ids: Sequence[int], edit: Edit = no_edit) -> float:
    with edit():
        return float(refusal_score(runner.last_logprobs(prompts), refusal_ids).mean())


class NeutralKL:
    """KL(plain || edited) over the last ``last`` positions of neutral texts, averaged per batch. The
    plain pass runs once, at construction, for every edit measured against it."""

    def __init__(self, runner: Runner, texts: Sequence[str], last: int = 8) -> None:
        self.runner, self.texts, self.last = runner, texts, last
        self.plain = runner.tail_logprobs(texts, last)

    def __call__(self, edit: Edit) -> float:
        if edit is no_edit:
            return 0.0
        with edit():
            edited = self.runner.tail_logprobs(self.texts, self.last)
        return sum(mean_kl(p, q) for p, q in zip(self.plain, edited, strict=True)) / len(self.plain)


def sweep_coefficients(measure: Callable[[Edit], float], make: Callable[[float], Edit],
                       coefs: Sequence[float]) -> list[tuple[float, float]]:
    """(coef, measure under that coefficient) for each coefficient; coef 0 is the unedited model."""
    return [(c, measure(no_edit if c == 0 else make(c))) for c in coefs]
