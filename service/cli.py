"""The ``steerwatch`` command line: prepare, generate, inspect, vector diff, bench; serve, keys, chat, demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console

from service.cli_explain import add_explain_parser, run_explain
from service.cli_extract import EXTRACT_COMMANDS, add_extract_parsers, run_extract
from service.cli_pack import PACK_COMMANDS, add_pack_parsers, run_pack
from service.cli_service import SERVICE_COMMANDS, add_service_parsers
from service.cli_train import TRAIN_COMMANDS, add_train_parsers, run_train
from service.cli_vector_io import VECTOR_IO_COMMANDS, add_vector_io_parsers, run_vector_io
from steering.errors import SteerwatchError

if TYPE_CHECKING:
    pass

SUBCOMMANDS = ("prepare", "generate", "inspect", "explain", "vector", "bench", "extract", "train", "sae", "pack",
               "serve", "keys", "chat", "health", "demo")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (Gemma 3 270M, embedded) or a local HF checkpoint dir")
    p.add_argument("--quantize", choices=["4bit", "8bit"], default=None, help="load through bitsandbytes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerwatch", description="Residual-stream monitors and steering for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("prepare", help="prepare the embedded default model (one-time, ~1 min)")

    g = sub.add_parser("generate", help="generate with monitors and steering, token by token")
    g.add_argument("prompt")
    _model_args(g)
    g.add_argument("--steer", action="append", default=[], metavar="FILE:COEF[@LAYERS]")
    g.add_argument("--ablate", action="append", default=[], metavar="FILE[@LAYERS]")
    g.add_argument("--clamp", action="append", default=[], metavar="SAE_DIR:FEATURE=VALUE")
    g.add_argument("--probe", action="append", default=[], metavar="FILE[@LAYER]")
    g.add_argument("--watch", action="append", default=[], metavar="FILE[@LAYER]", help="direction projection monitor")
    g.add_argument("--sae-monitor", action="append", default=[], metavar="SAE_DIR:F1,F2")
    g.add_argument("--color-by", default=None, help="monitor that colours the text (default: the first one)")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--max-coef", type=float, default=16.0, help="limit on |COEF| of --steer")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the heat view")

    i = sub.add_parser("inspect", help="top SAE features per token and a logit-lens view")
    i.add_argument("prompt")
    _model_args(i)
    i.add_argument("--sae", default=None, help="SAELens-format SAE directory")
    i.add_argument("--sae-layer", type=int, default=None)
    i.add_argument("--top", type=int, default=3, help="features / candidates shown per row")
    i.add_argument("--position", type=int, default=-1, help="token position for the logit lens (default last)")
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("vector", help="make steering vectors")
    vsub = v.add_subparsers(dest="vector_command", required=True)
    d = vsub.add_parser("diff", help="difference of means between positive and negative texts (CAA)")
    _model_args(d)
    d.add_argument("--positive", action="append", required=True, help="text, or @FILE with one text per line")
    d.add_argument("--negative", action="append", required=True, help="text, or @FILE with one text per line")
    d.add_argument("--layers", required=True, help="e.g. 6 or 4-8 or all")
    d.add_argument("--position", default="last", choices=["last", "mean"])
    d.add_argument("-o", "--output", required=True)
    add_vector_io_parsers(vsub)

    b = sub.add_parser("bench", help="tokens/s of the plain model vs steerwatch configurations")
    _model_args(b)
    b.add_argument("--max-tokens", type=int, default=32)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: the transformers engine vs its plain loop; vllm: steerwatch on vLLM vs plain vLLM")
    b.add_argument("--batches", default="16,64,256",
                   help="vllm only: batch sizes of the distinct-configuration rows (comma-separated)")
    add_explain_parser(sub)
    add_extract_parsers(sub)
    add_pack_parsers(sub)
    add_train_parsers(sub)
    add_service_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        return _dispatch(args)
    except SteerwatchError as exc:
        err.print(f"[bold red]error[/]: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from service.models import prepare_default_model

        print(prepare_default_model())
        return 0
    if args.command == "bench":
        from service.bench import run_bench

        return run_bench(args)
    if args.command == "inspect":
        from service.inspect import run_inspect

        return run_inspect(args)
    if args.command == "vector":
        if args.vector_command in VECTOR_IO_COMMANDS:
            return run_vector_io(args, Console(highlight=False))
        return _vector_diff(args)
    if args.command == "explain":
        return run_explain(args, Console(highlight=False))
    if args.command in PACK_COMMANDS:
        return run_pack(args, Console(highlight=False))
    if args.command in EXTRACT_COMMANDS:
        return run_extract(args, Console(highlight=False))
    if args.command in TRAIN_COMMANDS:
        return run_train(args, Console(highlight=False))
    if args.command in SERVICE_COMMANDS:
        return SERVICE_COMMANDS[args.command](args)
    return _generate(args)


def _load(args: argparse.Namespace) -> Any:
    from service.models import load_model

    return load_model(args.model, quantize=args.quantize, dtype=args.dtype, device=args.device,
                      progress=not getattr(args, "json", False))


def _texts(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            with open(item[1:], encoding="utf-8") as fh:
                out.extend(line.rstrip("\n") for line in fh if line.strip())
        else:
            out.append(item)
    return out


def _vector_diff(args: argparse.Namespace) -> int:
    from service.cli_args import parse_layers
    from service.models import encode_prompt
    from steering.extract import mean_difference
    from steering.tensors import require_index
    from steering.vectors import save_vector

    lm = _load(args)
    layers = parse_layers(args.layers, lm.n_layers, "--layers")
    which: list[int] = list(range(lm.n_layers)) if isinstance(layers, str) else layers
    for layer in which:
        require_index(layer, lm.n_layers, "--layers")
    vec = mean_difference(lm.model, lm.layers, lambda t: encode_prompt(lm.tokenizer, t), _texts(args.positive),
                          _texts(args.negative), which, position=args.position, model_name=lm.name,
                          source="steerwatch vector diff")
    save_vector(vec, args.output)
    print(json.dumps({"output": args.output, "layers": vec.layers,
                      "norms": {str(k): round(float(v.norm()), 4) for k, v in vec.per_layer.items()}}))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from service.cli_args import SpecBuilder
    from service.engines.hf import EngineLimits, HFEngine
    from service.engines.types import FinalEvent, GenerationRequest, PromptEvent, Sampling, TokenEvent
    from service.render import HeatView, peaks_table

    lm = _load(args)
    engine = HFEngine(lm, limits=EngineLimits(max_abs_coef=args.max_coef))
    sb = SpecBuilder(engine.registry, lm.n_layers)
    for flag, fn in (("steer", sb.steer), ("ablate", sb.ablate), ("clamp", sb.clamp), ("probe", sb.probe),
                     ("watch", sb.watch), ("sae_monitor", sb.sae_monitor)):
        for text in getattr(args, flag):
            fn(text)
    req = GenerationRequest(prompt=args.prompt, interventions=sb.spec(), sampling=Sampling(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, stop=args.stop))
    names = [r.name for r in req.interventions.reads]
    color_by = args.color_by or (names[0] if names else None)
    bounded = any(r.name == color_by and r.kind == "probe" for r in req.interventions.reads)
    console = Console(highlight=False)
    view = HeatView(console, color_by, bounded)
    tokens: list[dict[str, Any]] = []
    prompt: dict[str, Any] = {}
    final: FinalEvent | None = None
    with engine:
        if not args.json:
            console.print(f"[dim]{args.prompt}[/]", end="")
        for ev in engine.stream(req):
            if isinstance(ev, PromptEvent):
                prompt = {"tokens": ev.tokens, "readings": ev.readings}
            elif isinstance(ev, TokenEvent):
                tokens.append({"index": ev.index, "token": ev.token, "token_id": ev.token_id, "readings": ev.readings})
                if not args.json:
                    view.token(ev.text, ev.readings)
            elif isinstance(ev, FinalEvent):
                final = ev
                if not args.json:
                    view.token(ev.tail, {})
    assert final is not None
    if args.json:
        print(json.dumps(_json_result(lm, args.prompt, final, tokens, prompt)))
    else:
        console.print()
        if names:
            console.print(peaks_table(tokens, names))
        console.print(f"[dim]{final.completion_tokens} tokens, finish={final.finish_reason}, "
                      f"{final.total_s:.2f}s, steering={json.dumps(final.applied)}[/]")
    return 0 if final.finish_reason != "error" else 1


def _json_result(lm: Any, prompt_text: str, final: Any, tokens: list, prompt: dict) -> dict[str, Any]:
    return {
        "model": lm.name, "prompt": prompt_text, "text": final.text, "finish_reason": final.finish_reason,
        "tokens": tokens, "prompt_readings": prompt, "steering": final.applied,
        "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens},
        "timings": {"queue_s": final.queue_s, "ttft_s": final.ttft_s, "total_s": final.total_s},
    }


if __name__ == "__main__":
    sys.exit(main())
