"""``steerwatch train probe|sae`` (logic: monitors/train/); also registers ``steerwatch sae``, whose
commands live in service/cli_sae.py.

Each command loads the model, shows a progress bar while it collects activations or trains, prints a
quality table and writes its output. ``--json`` prints one JSON object instead (no bar, no table).
Recipes, report numbers and costs: docs/training.md. Heavy imports (torch, transformers) happen
inside the handlers so that building the parser stays cheap. Helpers shared with the other commands:
service/cli_common.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

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
    read_items,
)
from service.cli_sae import add_sae_parsers, run_sae
from steering.errors import invalid

if TYPE_CHECKING:
    from monitors.train.probe import Evaluation, Sweep

TRAIN_COMMANDS = ("train", "sae")


def add_train_parsers(sub: Any) -> None:
    """Add ``train`` (probe, sae) and ``sae`` (top-examples) to an argparse subparsers object."""
    t = sub.add_parser("train", help="train monitors: logistic probes and sparse autoencoders")
    tsub = t.add_subparsers(dest="train_command", required=True)

    p = tsub.add_parser("probe", help="logistic-regression probe on token activations (Apollo recipe)")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL of {\"text\": ..., \"label\": true|false}; true = the class to flag")
    src.add_argument("--instructed-pairs", nargs="?", const="", metavar="FACTS.jsonl",
                     help="honest/dishonest instructed pairs from facts (default: the packaged instructed_facts)")
    lay = p.add_mutually_exclusive_group(required=True)
    lay.add_argument("--layer", type=int, help="one layer")
    lay.add_argument("--layers", help="a sweep, e.g. 4-10 or 4,6,8 or all; the best held-out AUROC is saved")
    p.add_argument("--c", type=float, default=0.1, help="inverse L2 strength (sklearn's C)")
    p.add_argument("--fit-intercept", action="store_true", help="fit a bias (Apollo: none)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of the threshold")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of texts (facts) held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="probe name (default: the output file's stem)")
    p.add_argument("-o", "--output", required=True, help="probe file (.safetensors)")
    add_data_args(p)

    s = tsub.add_parser("sae", help="sparse autoencoder (TopK or ReLU) on one layer's residual stream")
    add_model_args(s)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--corpus", default=None, help="JSONL of {\"text\": ...} (default: the packaged neutral_corpus)")
    s.add_argument("--arch", choices=["topk", "relu"], default="topk")
    s.add_argument("--d-sae", type=int, default=None, help="features (default 8 x d_model)")
    s.add_argument("--k", type=int, default=32, help="active features per token (topk)")
    s.add_argument("--l1", type=float, default=5.0, help="sparsity weight lambda (relu)")
    s.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (the corpus repeats as needed)")
    s.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    s.add_argument("--lr", type=float, default=4e-4)
    s.add_argument("--warmup-steps", type=int, default=0)
    s.add_argument("--dead-tokens", type=int, default=None,
                   help="a feature is dead after this many tokens without firing (default min(1M, tokens/10))")
    s.add_argument("--heldout", type=float, default=0.05, help="fraction of corpus texts held out for the report")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here")
    s.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    s.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    s.add_argument("--no-cache", action="store_true",
                   help="run the model again for every epoch instead of collecting the corpus' activations "
                        "once and training on shuffled epochs of them in memory (default when they fit "
                        "--cache-gb)")
    s.add_argument("--cache-gb", type=float, default=4.0, help="memory limit for cached activations")
    s.add_argument("-o", "--output", required=True, help="SAELens-format output directory")
    add_data_args(s)

    add_sae_parsers(sub)


def run_train(args: argparse.Namespace, console: Console) -> int:
    """Run a command added by :func:`add_train_parsers`; SteerwatchError propagates to the caller."""
    if args.command == "train" and args.train_command == "probe":
        return _train_probe(args, console)
    if args.command == "train" and args.train_command == "sae":
        return _train_sae(args, console)
    if args.command == "sae":
        return run_sae(args, console)
    raise invalid("command", f"{args.command!r} is not a training command")


# ---- train probe --------------------------------------------------------------------------------
def _train_probe(args: argparse.Namespace, console: Console) -> int:
    from monitors.datasets import Fact, LabelledText, packaged
    from monitors.probes import save_probe
    from monitors.train.probe import Collector, train_instructed_probe, train_text_probe

    if args.data is not None:
        path = Path(args.data)
        items, skipped = read_items(path, LabelledText, args.on_error, console, args.json)
        for value, what in ((False, "negative examples (label false)"), (True, "positive examples (label true)")):
            if not any(it.label == value for it in items):
                raise invalid(str(path), f"has no {what}; a probe needs both classes")
        recipe = "labelled texts"
    else:
        path = Path(args.instructed_pairs) if args.instructed_pairs else packaged("instructed_facts")
        items, skipped = read_items(path, Fact, args.on_error, console, args.json)
        recipe = "instructed pairs"
    lm = load_lm(args)
    which = checked_layers(args, lm.n_layers)
    collector = Collector(lm.model, lm.layers, encoder(lm), pad_id(lm), args.text_batch, args.max_length)
    opts = dict(c=args.c, fpr=args.fpr, holdout=args.holdout, seed=args.seed, fit_intercept=args.fit_intercept,
                name=args.name or Path(args.output).stem)
    with progress_bar(console, args.json) as bar:
        task = bar.add_task("collecting activations", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if args.data is not None:
            sweep = train_text_probe(collector, [it.text for it in items], [it.label for it in items], which,
                                     progress=tick, **opts)
        else:
            sweep = train_instructed_probe(collector, [(it.fact, it.false) for it in items], which,
                                           progress=tick, **opts)
    save_probe(sweep.best.reader, args.output, model=lm.name)
    payload = _probe_payload(sweep, args, lm.name, recipe, str(path), skipped)
    if args.json:
        emit_json(payload)
    else:
        console.print(_probe_table(sweep, args.fpr, recipe))
        console.print(f"saved layer {sweep.best.layer} probe to [bold]{args.output}[/] (threshold "
                      f"{sweep.best.heldout.threshold:.4g} on the per-token sigmoid mean; calibrated on "
                      f"{sweep.best.calibration})")
    return 0


def _eval_json(e: Evaluation) -> dict[str, Any]:
    return {"auroc": e.auroc, "threshold": e.threshold, "recall": e.recall, "fpr": e.fpr, "accuracy": e.accuracy,
            "n_pos": e.n_pos, "n_neg": e.n_neg}


def _probe_payload(sweep: Sweep, args: argparse.Namespace, model: str, recipe: str, data: str,
                   skipped: list) -> dict[str, Any]:
    layers = [{"layer": r.layer, "heldout": _eval_json(r.heldout), "calibration": r.calibration,
               "n_train_pos": r.n_train_pos, "n_train_neg": r.n_train_neg, "n_train_tokens": r.n_train_tokens,
               "lbfgs_iterations": r.fit.iterations, **{k: _eval_json(v) for k, v in r.extra.items()}}
              for r in sweep.results]
    return {"output": args.output, "model": model, "recipe": recipe, "data": data, "best_layer": sweep.best.layer,
            "threshold": sweep.best.heldout.threshold, "score": "mean over tokens of sigmoid(w.x + b)",
            "target_fpr": args.fpr, "c": args.c, "layers": layers, "skipped": skipped}


def _probe_table(sweep: Sweep, fpr: float, recipe: str) -> Table:
    from monitors.train.probe import GENERALISATION

    extra = any(r.extra for r in sweep.results)
    table = Table(title=f"probe ({recipe}); held-out texts, threshold at {fpr:.1%} FPR")
    for col in ("layer", "AUROC", "recall", "FPR", "accuracy", "threshold", "train +/-", "held-out +/-"):
        table.add_column(col, justify="right")
    if extra:
        table.add_column("true/false AUROC", justify="right")
        table.add_column("true/false recall", justify="right")
    for r in sweep.results:
        h = r.heldout
        row = [f"{r.layer}{' *' if r is sweep.best else ''}", f"{h.auroc:.3f}", f"{h.recall:.1%}", f"{h.fpr:.1%}",
               f"{h.accuracy:.1%}", f"{h.threshold:.4g}", f"{r.n_train_pos}/{r.n_train_neg}", f"{h.n_pos}/{h.n_neg}"]
        if extra:
            g = r.extra.get(GENERALISATION)
            row += [f"{g.auroc:.3f}", f"{g.recall:.1%}"] if g else ["", ""]
        table.add_row(*row)
    return table


# ---- train sae ----------------------------------------------------------------------------------
def _train_sae(args: argparse.Namespace, console: Console) -> int:
    import torch

    from monitors.train.activations import collect_activations, shuffled_epochs, token_stream
    from monitors.train.sae import SAETrainConfig, StepInfo, train_sae

    if args.resume and not args.checkpoint_dir:
        raise invalid("--resume", "needs --checkpoint-dir (where the checkpoint was written)")
    if not 0 < args.heldout < 1:
        raise invalid("--heldout", f"{args.heldout} is out of range; allowed 0 < heldout < 1")
    items, skipped, corpus = read_corpus(args, console)
    if len(items) < 2:
        raise invalid(corpus, f"has {len(items)} text(s); SAE training needs at least 2 (training and held-out)")
    lm = load_lm(args)
    checked_layers(args, lm.n_layers)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_held = min(len(items) - 1, max(1, round(args.heldout * len(items))))
    held_texts = [items[i].text for i in perm[:n_held]]
    train_texts = [items[i].text for i in perm[n_held:]]
    encode, pad = encoder(lm), pad_id(lm)
    dead = args.dead_tokens or min(1_000_000, max(args.batch_size, args.tokens // 10))
    cfg = SAETrainConfig(d_in=lm.d_model, d_sae=args.d_sae or 8 * lm.d_model, arch=args.arch, k=args.k,
                         l1=args.l1, lr=args.lr, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                         total_tokens=args.tokens, dead_tokens=dead, seed=args.seed)
    n_tokens = sum(max(0, min(len(encode(t)), args.max_length) - 1) for t in train_texts)
    cache = not args.no_cache and n_tokens * lm.d_model * 4 <= args.cache_gb * 2**30
    if not cache and not args.no_cache and not args.json:
        console.print(f"[yellow]{n_tokens} training tokens do not fit --cache-gb {args.cache_gb:g}; "
                      "running the model for every epoch[/]")
    with progress_bar(console, args.json) as bar:
        task = bar.add_task("held-out activations", total=len(held_texts))
        held = collect_activations(lm.model, lm.layers, encode, held_texts, [args.layer], pad_id=pad,
                                   batch_size=args.text_batch, max_length=args.max_length,
                                   progress=lambda done, total: bar.update(task, completed=done))
        if cache:
            task = bar.add_task("training activations", total=len(train_texts))
            cached = collect_activations(lm.model, lm.layers, encode, train_texts, [args.layer], pad_id=pad,
                                       batch_size=args.text_batch, max_length=args.max_length,
                                       progress=lambda done, total: bar.update(task, completed=done))
            stream = shuffled_epochs(cached.acts[args.layer], seed=args.seed)
        else:
            stream = token_stream(lm.model, lm.layers, encode, train_texts, args.layer, pad_id=pad,
                                  batch_size=args.text_batch, max_length=args.max_length, seed=args.seed)
        train_task = bar.add_task("training", total=cfg.total_steps)

        def tick(info: StepInfo) -> None:
            bar.update(train_task, completed=info.step,
                       description=f"training (mse {info.mse:.3g}, L0 {info.l0:.1f}, dead {info.dead})")

        result = train_sae(stream, cfg, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                           resume=args.resume, heldout=held.acts[args.layer], progress=tick)
        if cache:
            result.observe_max(cached.acts[args.layer])  # feature_max over every training token
    result.save(args.output, model_name=lm.name, layer=args.layer)
    m = result.metrics
    assert m is not None
    payload = {"output": args.output, "model": lm.name, "layer": args.layer, "corpus": corpus, "arch": args.arch,
               "d_sae": cfg.d_sae, "k": cfg.k if cfg.arch == "topk" else None, "l1": cfg.l1 if cfg.arch == "relu" else None,
               "steps": result.steps, "tokens": result.tokens, "resumed_from_step": result.resumed_from,
               "corpus_tokens": n_tokens, "epochs": result.tokens / max(1, n_tokens), "cached": cache,
               "heldout_tokens": m.n_tokens, "mse": m.mse, "fve": m.fve, "l0": m.l0,
               "dead_fraction": m.dead_fraction, "heldout_silent_fraction": m.heldout_silent_fraction,
               "skipped": skipped}
    if args.json:
        emit_json(payload)
        return 0
    table = Table(title=f"SAE layer {args.layer}, {cfg.arch}, d_sae {cfg.d_sae}; held-out {m.n_tokens} tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("steps / tokens", f"{result.steps} / {result.tokens}"),
            ("epochs over the corpus", f"{result.tokens / max(1, n_tokens):.1f} ({'cached' if cache else 'streamed'})"), ("MSE (per element)", f"{m.mse:.4g}"),
            ("variance explained", f"{m.fve:.1%}"), ("mean L0", f"{m.l0:.1f}"),
            (f"dead (no firing in {cfg.dead_tokens} tokens)", f"{m.dead_fraction:.1%}"),
            ("silent on held-out", f"{m.heldout_silent_fraction:.1%}")]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if result.tokens < cfg.total_tokens and result.steps < cfg.total_steps:
        console.print(f"[yellow]the stream ended after {result.tokens} of {cfg.total_tokens} tokens[/]")
    console.print(f"saved SAELens directory [bold]{args.output}[/]")
    return 0
