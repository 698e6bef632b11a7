"""Explanations of fired monitors for the FinalRecord: which earlier tokens drove the score.

For a monitor with ``explain: true`` that fired, the sequence up to the position whose reading fired
it (the prompt, plus the generated tokens before the firing one) is run again on the engine thread,
between decode steps, with gradient × input attribution of the monitor's score at that position (occlusion for SAE
features; ``monitors.attribution``). The recomputation sees the model without this request's edits, so when
steering acted at earlier layers the explained score can differ from the streamed one; both are
reported (the alert's ``value``, the explanation's ``score``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from monitors.attribution import explain_top, reader_score_fn, sae_feature_score_fn
from service.policy import MonitorRule, read_of
from service.protos import chat_pb2
from steering.compile import compile_spec
from steering.errors import SteerwatchError
from steering.spec import InterventionSpec

log = logging.getLogger(__name__)
TOP_TOKENS = 8
EXPLAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Pending:
    """A fired monitor to explain: its rule, the series it fired in, and the token index there."""

    rule: MonitorRule
    phase: str
    index: int


def sequence_for(p: Pending, prompt_ids: list[int], generated: list[int]) -> list[int]:
    """The tokens whose last position produced the firing reading."""
    if p.phase == "prompt":
        return prompt_ids[:p.index + 1]
    return prompt_ids + generated[:p.index]  # token k was predicted by the position after gen[:k]


async def explain(engine: Any, tenant: str, pending: list[Pending], prompt_ids: list[int],
                  generated: list[int]) -> list[Any]:
    out = []
    for p in pending:
        msg = chat_pb2.Explanation(monitor=p.rule.name, method="grad_x_input")
        try:
            ids = sequence_for(p, prompt_ids, generated)
            fut = engine.call(lambda ids=ids, p=p: _attribute(engine, tenant, p.rule, ids))
            result = await asyncio.wait_for(asyncio.wrap_future(fut), EXPLAIN_TIMEOUT_S)
        except SteerwatchError as exc:
            msg.error = str(exc)
        except TimeoutError:
            msg.error = f"not computed within {EXPLAIN_TIMEOUT_S:g} s"
        except Exception:  # an explanation never fails the generation it explains
            log.exception("explanation of %s failed", p.rule.name)
            msg.error = "internal error while computing the explanation"
        else:
            _fill(msg, result, engine.lm.tokenizer)
        out.append(msg)
    return out


def _attribute(engine: Any, tenant: str, rule: MonitorRule, ids: list[int]) -> dict[str, Any]:
    """On the engine thread: resolve the monitor's reader and attribute its score at the last position."""
    compiled = compile_spec(InterventionSpec(reads=[read_of(rule, tenant)]), engine.registry, engine.shape)
    r = compiled.reads[0]
    if r.reader is not None:
        score_fn, method = reader_score_fn(r.reader), "grad_x_input"
    else:
        # SAE weights loaded under inference mode cannot enter autograd (TopK's encode needs them all):
        # occlusion needs forwards only
        assert r.feature is not None  # compile_spec requires a feature for SAE readings
        score_fn, method = sae_feature_score_fn(r.sae, r.feature), "occlusion"
    lm = engine.lm
    return explain_top(lm.model, lm.layers, ids, score_fn, r.layer, method=method, target=len(ids) - 1,
                       top=TOP_TOKENS)


def _fill(msg: Any, result: dict[str, Any], tokenizer: Any) -> None:
    msg.method, msg.target, msg.score = result["method"], result["target"], result["score"]
    for t in result["top"]:
        msg.top.add(position=t["position"], token_id=t["token_id"], text=tokenizer.decode([t["token_id"]]),
                    attribution=t["attribution"])
