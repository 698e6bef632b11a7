"""``steerwatch inspect``: top SAE features per token and a logit-lens view of one prompt."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from monitors.capture import recording
from monitors.lens import logit_lens, top_features
from steering.errors import invalid
from steering.tensors import require_index


def run_inspect(args: argparse.Namespace) -> int:
    from service.models import encode_prompt, load_model

    lm = load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device, progress=not args.json)
    ids = encode_prompt(lm.tokenizer, args.prompt)
    pos = args.position if args.position >= 0 else len(ids) + args.position
    require_index(pos, len(ids), "--position")
    if args.top < 1 or args.top > 50:
        raise invalid("--top", f"{args.top} is out of range; allowed 1..50")
    with torch.inference_mode(), recording(lm.layers) as store:
        lm.model(input_ids=torch.tensor([ids], device=lm.device))
    tokens: list[str] = [str(lm.tokenizer.decode([t])) for t in ids]
    resid = torch.stack([store[layer][0, pos] for layer in range(lm.n_layers)])
    lens = logit_lens(resid, lm.final_norm, lm.lm_head, args.top)
    report: dict[str, Any] = {"model": lm.name, "tokens": tokens, "position": pos,
                              "logit_lens": [[{"token": lm.tokenizer.decode([c.token_id]), "prob": c.prob}
                                              for c in row] for row in lens]}
    if args.sae:
        report["sae"] = _sae_report(args, lm, store, tokens)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _sae_report(args: argparse.Namespace, lm: Any, store: dict[int, torch.Tensor], tokens: list[str]) -> dict[str, Any]:
    from monitors.sae import load_sae

    sae = load_sae(args.sae)
    layer = args.sae_layer if args.sae_layer is not None else sae.hook_layer
    if layer is None:
        raise invalid("--sae-layer", f"the SAE names no hook layer; give one in 0..{lm.n_layers - 1}")
    require_index(layer, lm.n_layers, "--sae-layer")
    if sae.d_in != lm.d_model:
        raise invalid("--sae", f"SAE d_in {sae.d_in} does not match the model's d_model {lm.d_model}")
    feats = top_features(sae, store[layer][0], args.top)
    return {"layer": layer, "per_token": [{"token": t, "features": [{"feature": i, "activation": a} for i, a in fs]}
                                          for t, fs in zip(tokens, feats, strict=True)]}


def _print(report: dict[str, Any]) -> None:
    console = Console(highlight=False)
    if "sae" in report:
        t = Table(title=f"top SAE features per token (layer {report['sae']['layer']})")
        t.add_column("#", justify="right")
        t.add_column("token")
        t.add_column("features (index: activation)")
        for i, row in enumerate(report["sae"]["per_token"]):
            t.add_row(str(i), repr(row["token"]), ", ".join(f"{f['feature']}: {f['activation']:.3g}" for f in row["features"]))
        console.print(t)
    t = Table(title=f"logit lens at position {report['position']} ({report['tokens'][report['position']]!r})")
    t.add_column("layer", justify="right")
    t.add_column("top next-token candidates")
    for layer, row in enumerate(report["logit_lens"]):
        t.add_row(str(layer), "  ".join(f"{c['token']!r} {c['prob']:.2f}" for c in row))
    console.print(t)
