"""``steerwatch sae top-examples``: the top-activating corpus contexts of SAE features (logic:
monitors/train/top_examples.py).

Loads the SAE and the model, encodes the corpus with a progress bar, then prints one table per
feature or, with ``--json``, one JSON object. Registered and dispatched by service/cli_train.py
(:func:`add_sae_parsers`, :func:`run_sae`); heavy imports happen inside the handler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from service.cli_common import (
    add_data_args,
    add_model_args,
    checked_layers,
    emit_json,
    encoder,
    load_lm,
    pad_id,
    progress_bar,
    read_corpus,
)
from steering.errors import invalid


def add_sae_parsers(sub: Any) -> None:
    """Add ``sae`` (top-examples) to an argparse subparsers object."""
    a = sub.add_parser("sae", help="inspect sparse autoencoders")
    asub = a.add_subparsers(dest="sae_command", required=True)
    x = asub.add_parser("top-examples", help="top-activating corpus contexts per SAE feature")
    x.add_argument("sae_dir")
    add_model_args(x)
    x.add_argument("--corpus", default=None, help="JSONL of {\"text\": ...} (default: the packaged neutral_corpus)")
    feats = x.add_mutually_exclusive_group(required=True)
    feats.add_argument("--features", help="comma-separated feature indices")
    feats.add_argument("--all-top", type=int, metavar="M", help="the M features with the largest activations")
    x.add_argument("--layer", type=int, default=None, help="layer to read (default: the SAE's hook layer)")
    x.add_argument("--top", type=int, default=5, help="contexts per feature")
    x.add_argument("--window", type=int, default=8, help="tokens shown either side")
    x.add_argument("-o", "--output", default=None, help="also write the JSON here")
    add_data_args(x)


def run_sae(args: argparse.Namespace, console: Console) -> int:
    """Run a command added by :func:`add_sae_parsers`; SteerwatchError propagates to the caller."""
    if args.command == "sae" and args.sae_command == "top-examples":
        return _top_examples(args, console)
    raise invalid("command", f"{args.command!r} is not a training command")


def _top_examples(args: argparse.Namespace, console: Console) -> int:
    from monitors.sae import load_sae
    from monitors.train.activations import iter_activations
    from monitors.train.top_examples import render, strongest, track

    sae = load_sae(args.sae_dir)
    features: list[int] | None = None
    if args.features is not None:
        try:
            features = [int(f) for f in args.features.split(",") if f.strip()]
        except ValueError as exc:
            raise invalid("--features", f"{args.features!r} is not a comma-separated list of integers") from exc
    elif args.all_top < 1:
        raise invalid("--all-top", f"must be >= 1, got {args.all_top}")
    items, skipped, corpus = read_corpus(args, console)
    lm = load_lm(args)
    layer = args.layer if args.layer is not None else sae.hook_layer
    if layer is None:
        raise invalid("--layer", f"required: {args.sae_dir} does not say which layer it reads")
    checked_layers(argparse.Namespace(layer=layer, layers=None), lm.n_layers)
    if sae.d_in != lm.d_model:
        raise invalid("sae_dir", f"d_in {sae.d_in} does not match the model's d_model {lm.d_model}")
    sae.to(lm.device)
    texts = [it.text for it in items]
    encode = encoder(lm)
    with progress_bar(console, args.json) as bar:
        task = bar.add_task("encoding corpus", total=len(texts))
        batches = iter_activations(lm.model, lm.layers, encode, texts, [layer], pad_id=pad_id(lm),
                                   batch_size=args.text_batch, max_length=args.max_length,
                                   progress=lambda done, total: bar.update(task, completed=done))
        feats, tracker = track(sae, batches, layer, features=features, top=args.top, field="--features")
    columns = list(range(len(feats))) if features is not None else strongest(tracker, args.all_top)
    chosen = [feats[c] for c in columns]
    tok: Any = lm.tokenizer
    out = render(chosen, tracker, texts, encode, lambda ids: tok.decode(ids, skip_special_tokens=True),
                 window=args.window, text_ids=[it.id if it.id is not None else i for i, it in enumerate(items)],
                 feature_max=sae.feature_max.cpu() if sae.feature_max is not None else None, columns=columns)
    payload = {"sae": args.sae_dir, "model": lm.name, "layer": layer, "corpus": corpus, "top": args.top,
               "features": [fe.to_json() for fe in out], "skipped": skipped}
    if args.output:
        Path(args.output).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if args.json:
        emit_json(payload)
        return 0
    for fe in out:
        fmax = f", recorded max {fe.max_activation:.3g}" if fe.max_activation is not None else ""
        table = Table(title=f"feature {fe.feature}{fmax}", show_lines=False)
        table.add_column("act", justify="right")
        table.add_column("text")
        table.add_column("context")
        for ex in fe.examples:
            table.add_row(f"{ex.activation:.3g}", str(ex.text_id), Text(ex.snippet.replace("\n", "⏎")))
        if not fe.examples:
            table.add_row("", "", "[dim]never fired on this corpus[/]")
        console.print(table)
    return 0
