"""``steerwatch extract caa|refusal``: steering vectors from the project's (or the user's) datasets.

Each command loads the model, collects activations with a progress bar, prints a quality table and
writes a vector file (docs/extraction.md explains the recipes and the numbers).
"""

from __future__ import annotations

import argparse
from typing import Any

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
    read_items,
)

EXTRACT_COMMANDS = ("extract",)


def add_extract_parsers(sub: Any) -> None:
    e = sub.add_parser("extract", help="steering vectors from contrastive data: CAA, refusal direction")
    esub = e.add_subparsers(dest="extract_command", required=True)

    c = esub.add_parser("caa", help="CAA vector from A/B pairs (Rimsky et al.), with a held-out layer sweep")
    add_model_args(c)
    add_data_args(c)
    c.add_argument("--data", default=None, help="JSONL of A/B questions (Rimsky format) or pairs; default: the "
                   "packaged sycophancy_ab dataset")
    c.add_argument("--format", choices=["ab", "pairs"], default="ab",
                   help="ab: question + answer_matching_behavior/answer_not_matching_behavior; "
                   "pairs: prompt + positive/negative")
    c.add_argument("--layer", type=int, default=None)
    c.add_argument("--layers", default="all", help="layers to sweep, e.g. 4-12 (default all)")
    c.add_argument("--holdout", type=float, default=0.25, help="fraction of pairs held out to score layers")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-o", "--output", required=True)

    r = esub.add_parser("refusal", help="refusal direction (Arditi et al.): difference of means, chosen by "
                        "ablation and KL")
    add_model_args(r)
    add_data_args(r)
    r.add_argument("--data", default=None, help="JSONL of instructions labelled harmful/harmless; default: the "
                   "packaged instructions dataset")
    r.add_argument("--template", default=None, help="prompt template with {instruction} (default: a plain "
                   "'Instruction: ...\\nResponse:' format for base models)")
    r.add_argument("--layer", type=int, default=None)
    r.add_argument("--layers", default="all", help="candidate layers (those >= 0.8 depth are dropped)")
    r.add_argument("--positions", type=int, default=3, help="candidate positions: the last N template tokens")
    r.add_argument("--train", type=int, default=128, help="instructions per class for the means")
    r.add_argument("--val", type=int, default=32, help="held-out instructions per class to score candidates")
    r.add_argument("--max-kl", type=float, default=0.1, help="largest KL on harmless prompts under ablation")
    r.add_argument("--refusal-prefix", action="append", default=None, help="refusal phrase (repeatable)")
    r.add_argument("-o", "--output", required=True)


def run_extract(args: argparse.Namespace, console: Console) -> int:
    return _caa(args, console) if args.extract_command == "caa" else _refusal(args, console)


# ---- caa ------------------------------------------------------------------------------------------
def _pairs(args: argparse.Namespace, console: Console) -> tuple[list[str], list[str], str, list]:
    from monitors.datasets import ABQuestion, ContrastivePair, packaged
    from steering.caa import ab_texts
    from steering.errors import invalid

    path = args.data or str(packaged("sycophancy_ab"))
    if args.format == "ab":
        items, skipped = read_items(path, ABQuestion, args.on_error, console, args.json)
        texts = [ab_texts(q.question, q.answer_matching_behavior, q.answer_not_matching_behavior) for q in items]
    else:
        pairs, skipped = read_items(path, ContrastivePair, args.on_error, console, args.json)
        texts = [(p.prompt + p.positive, p.prompt + p.negative) for p in pairs]
    if len(texts) < 2:
        raise invalid("--data", f"{path} has {len(texts)} usable pairs; need at least 2")
    return [t[0] for t in texts], [t[1] for t in texts], path, skipped


def _caa(args: argparse.Namespace, console: Console) -> int:
    from monitors.train.activations import collect_activations
    from steering.caa import caa_vector, last_token_starts
    from steering.vectors import save_vector

    positive, negative, path, skipped = _pairs(args, console)
    lm = load_lm(args)
    which = checked_layers(args, lm.n_layers)
    encode = encoder(lm)
    texts = positive + negative
    with progress_bar(console, args.json) as bar:
        task = bar.add_task("activations at the answer letter", total=len(texts))
        acts = collect_activations(lm.model, lm.layers, encode, texts, which, pad_id=pad_id(lm),
                                   starts=last_token_starts(encode, texts), batch_size=args.text_batch,
                                   progress=lambda done, total: bar.update(task, completed=done))
    n = len(positive)
    pos = {layer: a[:n] for layer, a in acts.acts.items()}  # one kept row per text, in text order
    neg = {layer: a[n:] for layer, a in acts.acts.items()}
    result = caa_vector(pos, neg, holdout=args.holdout, seed=args.seed, model=lm.name, source=path)
    save_vector(result.vector, args.output)
    sweep = [{"layer": s.layer, "pair_accuracy": s.pair_accuracy, "effect_size": s.effect_size, "norm": s.norm}
             for s in result.sweep]
    if args.json:
        emit_json({"output": args.output, "pairs": n, "heldout": result.n_heldout, "best_layer": result.best.layer,
                   "sweep": sweep, "skipped": skipped})
        return 0
    table = Table(title=f"CAA separation on {result.n_heldout} held-out pairs of {n} ({path})")
    for col in ("layer", "pair accuracy", "effect size", "|v|"):
        table.add_column(col, justify="right")
    for s in result.sweep:
        mark = " *" if s.layer == result.best.layer else ""
        table.add_row(f"{s.layer}{mark}", f"{s.pair_accuracy:.2f}", f"{s.effect_size:.2f}", f"{s.norm:.1f}")
    console.print(table)
    console.print(f"best layer {result.best.layer} (*); vector for layers {which} written to {args.output}")
    return 0


# ---- refusal --------------------------------------------------------------------------------------
def _instructions(args: argparse.Namespace, console: Console) -> tuple[list[str], list[str], str, list]:
    from monitors.datasets import Instruction, packaged
    from steering.errors import invalid

    path = args.data or str(packaged("instructions"))
    items, skipped = read_items(path, Instruction, args.on_error, console, args.json)
    harmful = [i.instruction for i in items if i.label == "harmful"]
    harmless = [i.instruction for i in items if i.label == "harmless"]
    for name, group in (("harmful", harmful), ("harmless", harmless)):
        if len(group) < 2:
            raise invalid("--data", f"{path} has {len(group)} {name} instructions; need at least 2 (one to "
                          "build the direction, one to score it)")
    return harmful, harmless, path, skipped


def _split(items: list[str], n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    n_val = max(1, min(n_val, len(items) // 2))
    return items[n_val:n_val + n_train], items[:n_val]


def _refusal(args: argparse.Namespace, console: Console) -> int:
    from steering.refusal import (
        BASE_TEMPLATE,
        REFUSAL_PREFIXES,
        Runner,
        find_refusal_direction,
        refusal_token_ids,
    )
    from steering.vectors import save_vector

    harmful, harmless, path, skipped = _instructions(args, console)
    template = args.template or BASE_TEMPLATE
    if "{instruction}" not in template:
        from steering.errors import invalid

        raise invalid("--template", "must contain {instruction}")
    lm = load_lm(args)
    which = checked_layers(args, lm.n_layers)
    encode = encoder(lm)
    fmt = [template.format(instruction=x) for x in harmful], [template.format(instruction=x) for x in harmless]
    h_train, h_val = _split(fmt[0], args.train, args.val)
    s_train, s_val = _split(fmt[1], args.train, args.val)
    refusal_ids = refusal_token_ids(lambda t: lm.tokenizer.encode(t, add_special_tokens=False),
                                    args.refusal_prefix or REFUSAL_PREFIXES)
    runner = Runner(lm.model, lm.layers, encode, pad_id(lm), batch_size=args.text_batch)
    with progress_bar(console, args.json) as bar:
        task = bar.add_task("scoring (layer, position) candidates", total=None)
        result = find_refusal_direction(runner, h_train, s_train, h_val, s_val, refusal_ids, layers=which,
                                        n_positions=args.positions, max_kl=args.max_kl, model=lm.name, source=path,
                                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    save_vector(result.vector, args.output)
    return _refusal_report(args, console, result, path, skipped)


def _refusal_report(args: argparse.Namespace, console: Console, result: Any, path: str, skipped: list) -> int:
    c = result.chosen
    chosen = {"layer": c.layer, "position": c.position, "ablated_refusal": c.ablated_refusal, "kl": c.kl,
              "induced_refusal": c.induced_refusal, "norm": c.norm, "selection": result.selection}
    if args.json:
        emit_json({"output": args.output, "chosen": chosen, "baseline_harmful": result.baseline_harmful,
                   "baseline_harmless": result.baseline_harmless, "skipped": skipped,
                   "candidates": [vars(x) for x in result.candidates]})
        return 0
    table = Table(title=f"refusal-direction candidates ({path}); refusal score = log-odds of a refusal start")
    for col in ("layer", "pos", "ablated harmful", "KL harmless", "added harmless", "|r|"):
        table.add_column(col, justify="right")
    for x in sorted(result.candidates, key=lambda x: x.ablated_refusal)[:12]:
        mark = " *" if x is c else ""
        table.add_row(f"{x.layer}{mark}", str(x.position), f"{x.ablated_refusal:.2f}", f"{x.kl:.3f}",
                      f"{x.induced_refusal:.2f}", f"{x.norm:.1f}")
    console.print(table)
    console.print(f"baseline refusal score: harmful {result.baseline_harmful:.2f}, harmless "
                  f"{result.baseline_harmless:.2f}; chosen layer {c.layer}, position {c.position} (*) by "
                  f"{result.selection}")
    if result.selection != "kl+induce":
        console.print(f"[yellow]no candidate passed Arditi's filters (KL < {args.max_kl} on harmless prompts and "
                      "adding r raises refusal): this model may have no refusal behaviour to find[/]")
    console.print(f"direction written to {args.output} (the same r at every layer, for ablation)")
    return 0
