"""What a steering vector does to behaviour, measured on held-out data: effect size versus coefficient.

- ``ab_choice``: for A/B questions (Rimsky et al.), the probability the model puts on the behaviour's
  answer letter relative to the other letter, with ``coef * v`` added after ``layer`` at every position;
  the reported rate is the mean of p(match) / (p(match) + p(other)), so 0.5 is indifference.
- ``refusal_scores``: the mean refusal log-odds (see ``steering.refusal``) of prompts under an edit.
- ``neutral_kl``: the mean KL(plain || steered) of next-token distributions over the last positions of
  neutral texts: how much the edit disturbs text it should leave alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from steering.refusal import Runner, adding, refusal_score

Edit = Callable[[], AbstractContextManager[None]]


def no_edit() -> AbstractContextManager[None]:
    return nullcontext()


def add_edit(runner: Runner, layer: int, vector: torch.Tensor, coef: float) -> Edit:
    return lambda: adding(runner.layers, layer, vector * coef)


def ab_choice(runner: Runner, prompts: Sequence[str], match_ids: Sequence[int], other_ids: Sequence[int],
              edit: Edit = no_edit) -> float:
    """Mean p(match) / (p(match) + p(other)) at the next token of each prompt (ending in "(")."""
    with edit():
        logits = runner.last_logits(prompts)
    logp = torch.log_softmax(logits, -1)
    rows = torch.arange(len(prompts))
    lm = logp[rows, torch.tensor(list(match_ids))]
    lo = logp[rows, torch.tensor(list(other_ids))]
    return float(torch.sigmoid(lm - lo).mean())


def refusal_scores(runner: Runner, prompts: Sequence[str], refusal_ids: Sequence[int], edit: Edit = no_edit) -> float:
    with edit():
        return float(refusal_score(runner.last_logits(prompts), refusal_ids).mean())


def neutral_kl(runner: Runner, texts: Sequence[str], edit: Edit, last: int = 8) -> float:
    """Mean KL(plain || edited) over the last ``last`` positions of each text."""
    plain = _tail_logprobs(runner, texts, last, no_edit)
    edited = _tail_logprobs(runner, texts, last, edit)
    return float(sum((p.exp() * (p - q)).sum(-1).mean() for p, q in zip(plain, edited, strict=True)) / len(plain))


def _tail_logprobs(runner: Runner, texts: Sequence[str], last: int, edit: Edit) -> list[torch.Tensor]:
    out = []
    with edit(), torch.inference_mode():
        for ids, mask, pos in _batches(runner, texts):
            logits = runner.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=last).logits
            out.append(torch.log_softmax(logits.float(), -1).cpu())
    return out


def _batches(runner: Runner, texts: Sequence[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return runner._batches(texts)  # noqa: SLF001 - same padding rules as the runner's own passes


def sweep_coefficients(measure: Callable[[Edit], float], make: Callable[[float], Edit],
                       coefs: Sequence[float]) -> list[tuple[float, float]]:
    """(coef, measure under that coefficient) for each coefficient; coef 0 is the unedited model."""
    return [(c, measure(no_edit if c == 0 else make(c))) for c in coefs]
