"""``steerwatch explain``: which prompt tokens drove one monitor's score (see docs/explain.md).

  steerwatch explain PROMPT (--probe FILE[@LAYER] | --watch FILE[@LAYER] | --sae-monitor SAE_DIR:FEATURE[@LAYER])
                     [--target POS] [--method grad_x_input|occlusion] [--baseline pad|zero|ID] [--logit]
                     [--top N] [--json] [--model default|DIR] [--dtype ...] [--device ...]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from monitors.attribution import (
    METHODS,
    Attribution,
    ScoreFn,
    attribute,
    reader_score_fn,
    sae_feature_score_fn,
)
from service.cli_args import _int, _split_at
from steering.errors import InvalidArgument, invalid
from steering.tensors import require_index

MAX_TOP = 50


@dataclass(frozen=True)
class Monitor:
    """The monitor being explained, resolved against the loaded model."""

    name: str
    layer: int
    score_fn: ScoreFn
    bounded: bool  # a probability (sigmoid probe without --logit)


def add_explain_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand to ``sub`` (the result of ``add_subparsers``)."""
    p = sub.add_parser("explain", help="which prompt tokens drove a monitor's score (gradient x input or occlusion)")
    p.add_argument("prompt")
    p.add_argument("--model", default="default", help="'default' (Gemma 3 270M, embedded) or a local HF checkpoint dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--probe", metavar="FILE[@LAYER]", help="a linear probe file")
    which.add_argument("--watch", metavar="FILE[@LAYER]", help="a vector file: explain the projection (dot) on it")
    which.add_argument("--sae-monitor", metavar="SAE_DIR:FEATURE[@LAYER]", help="one SAE feature's activation")
    p.add_argument("--target", type=int, default=None,
                   help="token position to explain (negative counts from the end; default: the highest score)")
    p.add_argument("--method", default="grad_x_input", choices=list(METHODS))
    p.add_argument("--baseline", default="pad",
                   help="occlusion replacement: 'pad' (the tokenizer's pad, else unk, else zero), 'zero' "
                        "(a zero embedding) or a token id")
    p.add_argument("--logit", action="store_true", help="for a probe, explain the logit w·x+b instead of the sigmoid")
    p.add_argument("--top", type=int, default=8, help=f"rows in the table of top tokens (1..{MAX_TOP})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the coloured view")
    return p


def run_explain(args: argparse.Namespace, console: Console | None = None) -> int:
    """Load the model and monitor, attribute, print. Errors are SteerwatchError (the CLI maps them to exit 2)."""
    from service.models import encode_prompt, load_model

    if not 1 <= args.top <= MAX_TOP:
        raise invalid("--top", f"{args.top} is out of range; allowed 1..{MAX_TOP}")
    lm = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.json)
    monitor = resolve_monitor(args, lm.n_layers, lm.d_model)
    ids = encode_prompt(lm.tokenizer, args.prompt)
    baseline = _baseline(args.baseline, lm.tokenizer, lm.vocab_size) if args.method == "occlusion" else None
    try:
        a = attribute(lm.model, lm.layers, ids, monitor.score_fn, monitor.layer, target=args.target,
                      method=args.method, baseline_id=baseline)
    except InvalidArgument as exc:  # name the CLI flag rather than the library argument
        flag = {"target": "--target", "baseline_id": "--baseline"}.get(exc.field or "")
        if flag is None:
            raise
        raise invalid(flag, str(exc).removeprefix(f"{exc.field}: ")) from exc
    texts = [str(lm.tokenizer.decode([t])) for t in ids]
    if args.json:
        print(json.dumps(explain_json(a, texts, monitor, args.top)))
    else:
        print_explanation(console or Console(highlight=False), a, texts, monitor, args.top)
    return 0


def resolve_monitor(args: argparse.Namespace, n_layers: int, d_model: int) -> Monitor:
    """The monitor named by --probe, --watch or --sae-monitor, with its layer checked against the model."""
    if args.probe:
        from monitors.probes import load_probe

        path, at = _split_at(args.probe)
        probe = load_probe(path, "--probe")
        _same_width(probe.d_model, d_model, "--probe")
        layer = _layer(at, probe.layer, n_layers, "--probe", "the probe file records no layer")
        return Monitor(probe.name or Path(path).stem, layer, reader_score_fn(probe, logit=args.logit),
                       bounded=not args.logit)
    if args.logit:
        raise invalid("--logit", "applies to --probe only (a projection or SAE feature has no sigmoid)")
    if args.watch:
        from monitors.probes import make_direction
        from steering.vectors import load_vector

        path, at = _split_at(args.watch)
        vec = load_vector(path, "--watch")
        _same_width(vec.d_model, d_model, "--watch")
        only = vec.layers[0] if len(vec.layers) == 1 else None
        layer = _layer(at, only, n_layers, "--watch", f"the vector has layers {vec.layers}; pick one")
        reader = make_direction(vec.at(layer, "--watch"), layer=layer, field_name="--watch")
        return Monitor(Path(path).stem, layer, reader_score_fn(reader), bounded=False)
    from monitors.sae import load_sae

    body, at = _split_at(args.sae_monitor)
    path, sep, feat = body.rpartition(":")
    if not sep:
        raise invalid("--sae-monitor", f"{args.sae_monitor!r} must look like SAE_DIR:FEATURE[@LAYER]")
    sae = load_sae(path)
    _same_width(sae.d_in, d_model, "--sae-monitor")
    feature = _int(feat, "--sae-monitor")
    require_index(feature, sae.d_sae, "--sae-monitor")
    layer = _layer(at, sae.hook_layer, n_layers, "--sae-monitor", "the SAE's config names no hook layer")
    return Monitor(f"{Path(path).name}#{feature}", layer, sae_feature_score_fn(sae, feature), bounded=False)


def explain_json(a: Attribution, texts: list[str], monitor: Monitor, top: int) -> dict[str, Any]:
    """The --json report."""
    return {"method": a.method, "target": a.target, "score": a.score, "monitor": monitor.name,
            "layer": monitor.layer, "top": [pos for pos, _ in a.top(top)],
            "tokens": [{"pos": i, "text": t, "attribution": v}
                       for i, (t, v) in enumerate(zip(texts, a.per_token, strict=True))]}


def print_explanation(console: Console, a: Attribution, texts: list[str], monitor: Monitor, top: int) -> None:
    """The prompt coloured by attribution (red raises the score, blue lowers it), then the top tokens."""
    scale = max((abs(v) for _, v in a.top(len(texts))), default=0.0) or 1.0
    line = Text()
    for i, (t, v) in enumerate(zip(texts, a.per_token, strict=True)):
        if i > a.target or (a.bos and i == 0):
            line.append(t, style="dim")
            continue
        style = heat(v / scale) + (" bold underline" if i == a.target else "")
        line.append(t, style=style)
    console.print(line)
    what = "probability" if monitor.bounded else "score"
    console.print(f"[bold]{monitor.name}[/] (layer {monitor.layer}) {what} [bold]{a.score:.4g}[/] at position "
                  f"{a.target} ({texts[a.target]!r}); attribution by {a.method}")
    table = Table(title=f"top {min(top, a.target + 1)} tokens")
    for col in ("rank", "pos", "token", "attribution", "share"):
        table.add_column(col, justify="left" if col == "token" else "right")
    total = sum(abs(v) for _, v in a.top(len(texts))) or 1.0
    for rank, (pos, v) in enumerate(a.top(top), 1):
        table.add_row(str(rank), str(pos), repr(texts[pos]), Text(f"{v:+.4g}", style=heat(v / scale)),
                      f"{abs(v) / total:.0%}")
    console.print(table)


def heat(level: float) -> str:
    """A background for a signed level in [-1, 1]: red for positive, blue for negative. The intensity
    follows sqrt(|level|) so that tokens beside a dominant one stay visible."""
    x = min(abs(level), 1.0) ** 0.5
    strong, weak = int(40 + 200 * x), int(40 * (1 - x))
    return f"on rgb({strong},{weak},{weak})" if level >= 0 else f"on rgb({weak},{weak},{strong})"


def _layer(text: str | None, default: int | None, n_layers: int, flag: str, why: str) -> int:
    if text is not None:
        return require_index(_int(text, flag), n_layers, flag)
    if default is None:
        raise invalid(flag, f"{why}; add @LAYER with LAYER in 0..{n_layers - 1}")
    return require_index(default, n_layers, flag)


def _same_width(width: int, d_model: int, flag: str) -> None:
    if width != d_model:
        raise invalid(flag, f"has width {width}; this model's residual stream has d_model={d_model}")


def _baseline(text: str, tokenizer: Any, vocab: int) -> int | None:
    if text == "zero":
        return None
    if text == "pad":
        for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None)):
            if isinstance(tid, int):
                return tid
        return None
    return require_index(_int(text, "--baseline"), vocab, "--baseline")
