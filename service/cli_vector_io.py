"""``steerwatch vector import-gguf`` / ``vector export-gguf``: llama.cpp control vectors (GGUF) to and
from steerwatch vector files. The layer mapping is steering/gguf_vectors.py's: layer L <-> direction.L.

Wiring (service/cli.py): call :func:`add_vector_io_parsers` with the ``vector`` subparsers and route
``args.vector_command in VECTOR_IO_COMMANDS`` to :func:`run_vector_io`. Errors are raised as
SteerwatchError (``main`` prints them and exits 2), like ``vector diff``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from steering.errors import invalid

VECTOR_IO_COMMANDS = ("import-gguf", "export-gguf")


def add_vector_io_parsers(vsub: Any) -> None:
    """Add ``import-gguf`` and ``export-gguf`` to the ``vector`` subcommand's subparsers."""
    i = vsub.add_parser("import-gguf", help="convert a llama.cpp control vector (GGUF) to a steerwatch vector file")
    i.add_argument("input", metavar="IN", help="control vector .gguf (llama-cvector-generator, repeng export_gguf)")
    i.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")

    e = vsub.add_parser("export-gguf", help="write a steerwatch vector file as a llama.cpp control vector (GGUF)")
    e.add_argument("input", metavar="IN.safetensors", help="steerwatch vector file (no layer 0: llama.cpp has no slot)")
    e.add_argument("-o", "--output", required=True, metavar="OUT.gguf")
    e.add_argument("--model-hint", required=True, metavar="NAME",
                   help="controlvector.model_hint: the model's architecture as llama.cpp names it (llama, gemma3, ...)")
    e.add_argument("--n-layers", type=int, default=None, metavar="N",
                   help="the model's decoder layers; layers >= N are refused (default: the vector's highest layer + 1)")


def run_vector_io(args: argparse.Namespace, console: Console) -> int:
    """Run ``vector import-gguf`` or ``vector export-gguf``; prints one JSON summary line."""
    from steering.gguf_vectors import export_gguf, import_gguf
    from steering.vectors import load_vector, save_vector

    if args.vector_command == "import-gguf":
        vec = import_gguf(args.input, field="IN")
        save_vector(vec, args.output)
        summary: dict[str, Any] = {
            "output": args.output, "layers": vec.layers, "d_model": vec.d_model, "model_hint": vec.model,
            "skipped_zero_layers": [int(x) for x in vec.meta.get("gguf.skipped_zero_layers", "").split(",") if x],
        }
    elif args.vector_command == "export-gguf":
        vec = load_vector(args.input, field_name="IN")
        export_gguf(vec, args.output, model_hint=args.model_hint, n_layers=args.n_layers)
        summary = {"output": args.output, "directions": [f"direction.{layer}" for layer in vec.layers],
                   "d_model": vec.d_model, "model_hint": args.model_hint}
    else:
        raise invalid("vector_command", f"{args.vector_command!r} is not one of {', '.join(VECTOR_IO_COMMANDS)}")
    console.print(json.dumps(summary), markup=False, highlight=False, soft_wrap=True)
    return 0
