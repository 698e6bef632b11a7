"""``vector import-gguf`` / ``vector export-gguf`` through the argparse parsers they add."""

from __future__ import annotations

import argparse
import io
import json

import gguf
import pytest
import torch
from rich.console import Console

from service.cli_vector_io import VECTOR_IO_COMMANDS, add_vector_io_parsers, run_vector_io
from steering.errors import InvalidArgument
from steering.vectors import load_vector, make_vector, save_vector


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerwatch")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vector")
    vsub = v.add_subparsers(dest="vector_command", required=True)
    vsub.add_parser("diff")
    add_vector_io_parsers(vsub)
    return p


def run(argv: list[str]) -> dict:
    out = io.StringIO()
    args = parser().parse_args(argv)
    assert args.vector_command in VECTOR_IO_COMMANDS
    assert run_vector_io(args, Console(file=out, width=80)) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_export_then_import_round_trips(tmp_path):
    vec = make_vector({2: torch.randn(16), 4: torch.randn(16)}, model="tiny-llama")
    save_vector(vec, tmp_path / "v.safetensors")
    got = run(["vector", "export-gguf", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "v.gguf"),
               "--model-hint", "llama", "--n-layers", "6"])
    assert got == {"output": str(tmp_path / "v.gguf"), "directions": ["direction.2", "direction.4"], "d_model": 16,
                   "model_hint": "llama"}
    assert [t.name for t in gguf.GGUFReader(str(tmp_path / "v.gguf")).tensors] == ["direction.2", "direction.4"]
    back = run(["vector", "import-gguf", str(tmp_path / "v.gguf"), "-o", str(tmp_path / "back.safetensors")])
    assert back["layers"] == [2, 4] and back["model_hint"] == "llama" and back["skipped_zero_layers"] == []
    loaded = load_vector(tmp_path / "back.safetensors")
    assert loaded.method == "gguf-import" and loaded.model == "llama"
    for layer in (2, 4):
        assert torch.equal(loaded.per_layer[layer], vec.per_layer[layer])


def test_required_flags_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["vector", "export-gguf", "in.safetensors", "-o", "out.gguf"])  # no --model-hint
    assert "--model-hint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["vector", "import-gguf", "in.gguf"])  # no -o
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    with pytest.raises(InvalidArgument, match=r"^IN: .*bad.gguf' is not a readable GGUF file"):
        run(["vector", "import-gguf", str(tmp_path / "bad.gguf"), "-o", str(tmp_path / "o.safetensors")])
    save_vector(make_vector({0: torch.ones(4)}), tmp_path / "l0.safetensors")
    with pytest.raises(InvalidArgument, match=r"^vector.layer: layer 0 cannot be exported"):
        run(["vector", "export-gguf", str(tmp_path / "l0.safetensors"), "-o", str(tmp_path / "o.gguf"), "--model-hint", "llama"])
    with pytest.raises(InvalidArgument, match=r"^IN: file .*missing.safetensors' does not exist"):
        run(["vector", "export-gguf", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o.gguf"),
             "--model-hint", "llama"])
