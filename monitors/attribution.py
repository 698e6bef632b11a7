"""Explain an alert: which prompt tokens drove a monitor's score at one position.

Two methods, both on the embeddings of the input tokens:

* ``grad_x_input`` -- one forward and one backward. ``per_token[i] = grad_i · e_i`` where ``e_i`` is the
  input embedding of token i (what the model's embedding module returns, so scaled embeddings such as
  Gemma's are taken as they enter the first layer) and ``grad_i`` the gradient of the score at
  ``target`` with respect to it. A first-order estimate of how much of the score token i carries.
* ``occlusion`` -- one extra forward per position. ``per_token[i] = score - score_without_i``, where
  token i is replaced by ``baseline_id`` (or, without one, by a zero embedding). Exact for that one
  counterfactual, blind to interactions between tokens.

Only tokens ``0..target`` can matter (the models are causal), so later positions get exactly 0 and the
forwards are cut at ``target + 1`` tokens. Forwards also stop at the hooked ``layer``: the layers after
it cannot change the residual stream there, so they are never run.

BOS. When ``input_ids[0]`` is the model's BOS token (``model.config.bos_token_id``) position 0 is an
attention sink rather than content: replacing it throws the model off its distribution (Gemma's BOS
residual is ~100x the norm of other positions), so occlusion does not perturb it (its value is 0),
the default target never lands on it, and :meth:`Attribution.top` leaves it out. grad_x_input still
reports its value in ``per_token``.

``score_fn`` must be token-wise: row t of its output depends on row t of its input only (every
steerwatch monitor is: probes, projections, SAE features). Occlusion relies on it to score a whole
batch of perturbed sequences in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monitors.probes import LinearReader, apply_transform
from monitors.sae.base import SAE
from steering.errors import FailedPrecondition, invalid
from steering.tensors import require_index

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""Residual stream [T, d_model] at the monitored layer -> per-token monitor scores [T]."""

METHODS: tuple[str, ...] = ("grad_x_input", "occlusion")


@dataclass(frozen=True)
class Attribution:
    """How much each input token contributed to the monitor's score at ``target``.

    ``per_token`` has one value per input token; positions after ``target`` are 0. ``bos`` says that
    position 0 is the model's BOS token, which :meth:`top` leaves out (see the module docstring).
    """

    method: str
    target: int
    score: float
    per_token: list[float]
    bos: bool = False

    def top(self, n: int) -> list[tuple[int, float]]:
        """Up to ``n`` (position, value) pairs with the largest |value|, among positions 0..target
        (1..target when position 0 is BOS); ties go to the earlier position."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise invalid("top", f"{n!r} is not allowed; give a count >= 0")
        start = 1 if self.bos else 0
        candidates = [(i, self.per_token[i]) for i in range(start, self.target + 1)]
        candidates.sort(key=lambda item: (-abs(item[1]), item[0]))
        return candidates[:n]


def attribute(model: nn.Module, layers: nn.ModuleList, input_ids: Sequence[int], score_fn: ScoreFn,
              layer: int, *, target: int | None = None, method: str = "grad_x_input",
              baseline_id: int | None = None, batch_size: int = 16) -> Attribution:
    """Attribute ``score_fn``'s score at ``target`` (default: the highest-scoring position) to tokens.

    ``layers`` are the model's decoder blocks (``LoadedModel.layers``); the residual is their ``layer``-th
    output. ``target`` may count from the end (-1 = last). ``baseline_id`` and ``batch_size`` only matter
    for occlusion. Errors name the argument and the allowed range. Model parameters are left untouched:
    only the input embeddings require grad, and the gradient is taken with ``torch.autograd.grad``.
    """
    ids = _check_ids(input_ids, _embedding(model))
    require_index(layer, len(layers), "layer")
    if method not in METHODS:
        raise invalid("method", f"{method!r} not allowed; use one of {', '.join(METHODS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise invalid("batch_size", f"{batch_size!r} is not allowed; give an integer >= 1")
    if baseline_id is not None:
        require_index(baseline_id, _embedding(model).num_embeddings, "baseline_id")
    if target is not None:
        target = _check_target(target, len(ids))
    bos = len(ids) > 1 and _bos_id(model) is not None and ids[0] == _bos_id(model)
    if method == "grad_x_input":
        return _grad_x_input(model, layers, ids, score_fn, layer, target, bos)
    return _occlusion(model, layers, ids, score_fn, layer, target, bos, baseline_id, batch_size)


def explain_top(model: nn.Module, layers: nn.ModuleList, input_ids: Sequence[int], score_fn: ScoreFn,
                layer: int, *, method: str = "grad_x_input", target: int | None = None, top: int = 8,
                baseline_id: int | None = None) -> dict[str, Any]:
    """:func:`attribute` summarised as a small JSON-able dict for records and APIs::

        {"method", "target", "score", "top": [{"position", "token_id", "attribution"}, ...]}
    """
    a = attribute(model, layers, input_ids, score_fn, layer, target=target, method=method,
                  baseline_id=baseline_id)
    return {"method": a.method, "target": a.target, "score": a.score,
            "top": [{"position": pos, "token_id": int(input_ids[pos]), "attribution": value}
                    for pos, value in a.top(top)]}


def reader_score_fn(reader: LinearReader, *, logit: bool = False) -> ScoreFn:
    """The score of a probe or direction reader. ``logit=True`` explains the linear part ``w·x + b``
    before the transform: for a sigmoid probe the logit, whose gradient does not vanish when the
    probability saturates near 0 or 1; for a cosine reader the plain projection; a dot reader is
    unchanged."""

    def score(h: torch.Tensor) -> torch.Tensor:
        x = _at_least_float32(h)
        w = reader.weight.to(device=x.device, dtype=x.dtype)
        if w.is_inference():  # made under inference_mode: autograd may not save it for backward
            w = w.clone()
        z = x @ w + reader.bias
        return z if logit else apply_transform(z, x, reader.transform)

    return score


def sae_feature_score_fn(sae: SAE, feature: int) -> ScoreFn:
    """One SAE feature's activation per token, through the SAE's own normalise-and-encode path."""
    require_index(feature, sae.d_sae, "feature")

    def score(h: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([feature], dtype=torch.int64, device=sae.device)
        return sae.encode_features(h.to(sae.device), idx)[:, 0]

    return score


# ---- methods ---------------------------------------------------------------------------------------
def _grad_x_input(model: nn.Module, layers: nn.ModuleList, ids: list[int], score_fn: ScoreFn,
                  layer: int, target: int | None, bos: bool) -> Attribution:
    n = len(ids) if target is None else target + 1
    device = _device(model)
    with torch.inference_mode(False), torch.enable_grad():
        embeds = _embedding(model)(torch.tensor([ids[:n]], device=device)).detach().requires_grad_(True)
        try:
            scores = _scores(score_fn, _residual(model, layers, layer, embeds)[0], n)
            if target is None:
                target = _argmax(scores, bos)
            if not scores.requires_grad:
                raise invalid("score_fn", "its scores carry no gradient (detached or computed under no_grad); "
                              "make it differentiable or use method=occlusion")
            (grad,) = torch.autograd.grad(scores[target], embeds)
        except RuntimeError as exc:
            if "nference tensor" not in str(exc):
                raise
            raise FailedPrecondition(
                "score_fn: a tensor it uses was created under torch.inference_mode(), so autograd cannot "
                "differentiate through it; load the monitor outside inference mode or use method=occlusion",
                field="score_fn") from exc
    values = (_at_least_float32(grad[0]) * _at_least_float32(embeds[0].detach())).sum(-1)
    per_token = [float(v) for v in values[: target + 1]] + [0.0] * (len(ids) - target - 1)
    return Attribution("grad_x_input", target, float(scores[target].detach()), per_token, bos)


def _occlusion(model: nn.Module, layers: nn.ModuleList, ids: list[int], score_fn: ScoreFn, layer: int,
               target: int | None, bos: bool, baseline_id: int | None, batch_size: int) -> Attribution:
    device = _device(model)
    embed = _embedding(model)
    with torch.inference_mode():
        n = len(ids) if target is None else target + 1
        base = embed(torch.tensor([ids[:n]], device=device))
        scores = _scores(score_fn, _residual(model, layers, layer, base)[0], n)
        if target is None:
            target = _argmax(scores, bos)
        original = float(scores[target])
        base = base[:, : target + 1]
        fill = (embed(torch.tensor([baseline_id], device=device))[0] if baseline_id is not None
                else torch.zeros_like(base[0, 0]))
        positions = list(range(1 if bos else 0, target + 1))
        per_token = [0.0] * len(ids)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            batch = base.expand(len(chunk), -1, -1).clone()
            batch[torch.arange(len(chunk), device=device), torch.tensor(chunk, device=device)] = fill
            perturbed = _scores(score_fn, _residual(model, layers, layer, batch)[:, target], len(chunk))
            for pos, value in zip(chunk, perturbed.tolist(), strict=True):
                per_token[pos] = original - value
    return Attribution("occlusion", target, original, per_token, bos)


# ---- plumbing --------------------------------------------------------------------------------------
class _Reached(Exception):
    """Raised by the capture hook to end the forward once the monitored layer has run."""


def _residual(model: nn.Module, layers: nn.ModuleList, layer: int, embeds: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s output [B, T, d_model] for ``inputs_embeds`` (later layers are skipped)."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = layers[layer].register_forward_hook(hook)
    try:
        model(inputs_embeds=embeds, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise FailedPrecondition(f"layer: decoder layer {layer} did not run in the forward pass", field="layer")
    return captured[0]


def _scores(score_fn: ScoreFn, h: torch.Tensor, rows: int) -> torch.Tensor:
    out = score_fn(h)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows,):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise invalid("score_fn", f"returned {shape}; it must map a residual [T, d_model] to scores [T] "
                      f"(here T={rows})")
    return out


def _argmax(scores: torch.Tensor, bos: bool) -> int:
    start = 1 if bos else 0
    return start + int(scores[start:].detach().float().argmax())


def _check_ids(input_ids: Sequence[int], embed: nn.Embedding) -> list[int]:
    ids = [int(t) for t in input_ids]
    if not ids:
        raise invalid("input_ids", "is empty; give at least one token")
    vocab = embed.num_embeddings
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise invalid(f"input_ids[{i}]", f"token id {t} is out of range; allowed 0..{vocab - 1}")
    return ids


def _check_target(target: int, length: int) -> int:
    pos = target + length if isinstance(target, int) and not isinstance(target, bool) and target < 0 else target
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < length:
        raise invalid("target", f"{target!r} is out of range; allowed 0..{length - 1} (or -{length}..-1 "
                      "counting from the end)")
    return pos


def _embedding(model: nn.Module) -> nn.Embedding:
    embed = model.get_input_embeddings()  # type: ignore[operator]
    if not isinstance(embed, nn.Embedding):
        raise FailedPrecondition(f"model: input embedding is {type(embed).__name__}, not an nn.Embedding",
                                 field="model")
    return embed


def _bos_id(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "bos_token_id", None)
    return value if isinstance(value, int) else None


def _device(model: nn.Module) -> torch.device:
    return _embedding(model).weight.device


def _at_least_float32(h: torch.Tensor) -> torch.Tensor:
    return h if h.dtype == torch.float64 else h.float()
