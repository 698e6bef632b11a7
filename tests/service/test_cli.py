"""The CLI end to end on a tiny checkpoint directory: generate --json, vector diff, inspect, errors."""

from __future__ import annotations

import json

import pytest
import torch

from monitors.probes import make_probe, save_probe
from monitors.sae import load_sae, save_sae
from service.cli import main
from steering.vectors import load_vector, make_vector, save_vector
from tests.monitors.test_sae_fixtures import make_cfg, make_tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    save_vector(make_vector({1: torch.randn(64, generator=g) * 30}), d / "v.safetensors")
    save_probe(make_probe(torch.randn(64, generator=g), 0.0, layer=1, name="p"), d / "p.safetensors")
    cfg = make_cfg("standard", d_in=64, d_sae=32)
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    save_sae(make_tensors("plain", d_in=64, d_sae=32), cfg, d / "sae")
    return d


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_reports_tokens_readings_and_steering(capsys, tiny_dir, files):
    base = ["generate", "Hello", "--model", str(tiny_dir), "--max-tokens", "6", "--json",
            "--probe", f"{files / 'p.safetensors'}", "--watch", f"{files / 'v.safetensors'}@1",
            "--sae-monitor", f"{files / 'sae'}:3,5"]
    plain = run_json(capsys, base)
    assert len(plain["tokens"]) == plain["usage"]["completion_tokens"] >= 1
    assert set(plain["tokens"][0]["readings"]) == {"p", "v", "sae#3", "sae#5"}
    assert 0.0 <= plain["tokens"][0]["readings"]["p"] <= 1.0
    assert plain["steering"] == []
    steered = run_json(capsys, base + ["--steer", f"{files / 'v.safetensors'}:10@1", "--ablate", f"{files / 'v.safetensors'}@0"])
    assert [s["kind"] for s in steered["steering"]] == ["add", "ablate"]
    assert steered["tokens"][0]["readings"]["v"] != plain["tokens"][0]["readings"]["v"]


def test_clamp_flag_and_bad_values_give_clear_errors(capsys, tiny_dir, files):
    ok = run_json(capsys, ["generate", "Hi", "--model", str(tiny_dir), "--max-tokens", "3", "--json",
                           "--clamp", f"{files / 'sae'}:4=2.5"])
    assert ok["steering"][0] == {"kind": "clamp", "sae": ok["steering"][0]["sae"], "feature": 4, "target": 2.5,
                                 "layers": [1], "phase": "both"}
    cases = [
        (["--clamp", f"{files / 'sae'}:99=1"], "edits[0].feature"),
        (["--steer", f"{files / 'v.safetensors'}:100@1"], "edits[0].coef"),
        (["--steer", f"{files / 'v.safetensors'}:1@7"], "edits[0].layers"),
        (["--probe", f"{files / 'missing.safetensors'}"], "--probe"),
        (["--sae-monitor", f"{files}:1"], "cfg.json"),
    ]
    for extra, field in cases:
        assert main(["generate", "Hi", "--model", str(tiny_dir), "--max-tokens", "2", "--json", *extra]) == 2
        err = capsys.readouterr().err
        assert field in err, (extra, err)


def test_vector_diff_writes_a_vector_file(capsys, tiny_dir, tmp_path):
    out = tmp_path / "d.safetensors"
    report = run_json(capsys, ["vector", "diff", "--model", str(tiny_dir), "--layers", "0-1", "-o", str(out),
                               "--positive", "I love it", "--negative", "I hate it"])
    vec = load_vector(out)
    assert vec.layers == [0, 1] == report["layers"] and vec.method == "caa"
    assert vec.norm() > 0


def test_inspect_lists_sae_features_and_logit_lens(capsys, tiny_dir, files):
    report = run_json(capsys, ["inspect", "Hello world", "--model", str(tiny_dir), "--sae", str(files / "sae"), "--json"])
    sae = load_sae(files / "sae")
    assert report["sae"]["layer"] == sae.hook_layer == 1
    assert len(report["sae"]["per_token"]) == len(report["tokens"])
    assert len(report["logit_lens"]) == 2 and len(report["logit_lens"][0]) == 3
    assert main(["inspect", "Hi", "--model", str(tiny_dir), "--position", "40"]) == 2
    assert "--position" in capsys.readouterr().err
