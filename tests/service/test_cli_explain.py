"""``steerwatch explain`` on the tiny checkpoint: JSON and coloured output, each monitor kind, errors."""

from __future__ import annotations

import argparse
import io
import json
import re

import pytest
import torch
from rich.console import Console

from monitors.attribution import attribute, reader_score_fn, sae_feature_score_fn
from monitors.probes import make_direction, make_probe, save_probe
from monitors.sae import load_sae, save_sae
from service.cli_explain import add_explain_parser, run_explain
from service.models import encode_prompt
from steering.errors import InvalidArgument
from steering.vectors import make_vector, save_vector
from tests.monitors.test_sae_fixtures import make_cfg, make_tensors

PROMPT = "Hello world, explain me"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    g = torch.Generator().manual_seed(0)
    save_probe(make_probe(torch.randn(64, generator=g), 0.5, layer=1, name="p"), d / "p.safetensors")
    save_probe(make_probe(torch.randn(64, generator=g)), d / "nolayer.safetensors")
    save_vector(make_vector({1: torch.randn(64, generator=g)}), d / "v.safetensors")
    save_vector(make_vector({0: torch.randn(64, generator=g), 1: torch.randn(64, generator=g)}), d / "v2.safetensors")
    cfg = make_cfg("standard", d_in=64, d_sae=32)
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    save_sae(make_tensors("plain", d_in=64, d_sae=32), cfg, d / "sae")
    return d


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="steerwatch")
    add_explain_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["explain", *argv])


def run_json(capsys, argv: list[str]) -> dict:
    assert run_explain(parse([*argv, "--json"])) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_probe_json_matches_the_library(capsys, tiny, tiny_dir, files):
    from monitors.probes import load_probe

    out = run_json(capsys, [PROMPT, "--model", str(tiny_dir), "--probe", str(files / "p.safetensors")])
    ids = encode_prompt(tiny.tokenizer, PROMPT)
    a = attribute(tiny.model, tiny.layers, ids, reader_score_fn(load_probe(files / "p.safetensors")), 1)
    assert {"method", "target", "score", "tokens"} <= set(out)
    assert out["method"] == "grad_x_input" and out["layer"] == 1 and out["monitor"] == "p"
    assert out["target"] == a.target and 0.0 <= out["score"] <= 1.0
    assert out["score"] == pytest.approx(a.score, rel=1e-5)
    assert [t["pos"] for t in out["tokens"]] == list(range(len(ids)))
    assert "".join(t["text"] for t in out["tokens"][1:]) == PROMPT
    assert [t["attribution"] for t in out["tokens"]] == pytest.approx(a.per_token, rel=1e-4, abs=1e-9)
    assert out["top"] == [pos for pos, _ in a.top(8)]


def test_watch_occlusion_uses_the_pad_token_and_the_given_layer(capsys, tiny, tiny_dir, files):
    from steering.vectors import load_vector

    out = run_json(capsys, [PROMPT, "--model", str(tiny_dir), "--watch", f"{files / 'v2.safetensors'}@0",
                            "--method", "occlusion", "--target", "-1"])
    ids = encode_prompt(tiny.tokenizer, PROMPT)
    reader = make_direction(load_vector(files / "v2.safetensors").per_layer[0])
    a = attribute(tiny.model, tiny.layers, ids, reader_score_fn(reader), 0, method="occlusion", target=-1,
                  baseline_id=tiny.tokenizer.pad_token_id)
    assert out["layer"] == 0 and out["target"] == len(ids) - 1 and out["method"] == "occlusion"
    assert [t["attribution"] for t in out["tokens"]] == pytest.approx(a.per_token, rel=1e-4, abs=1e-7)
    base = [PROMPT, "--model", str(tiny_dir), "--watch", f"{files / 'v2.safetensors'}@0", "--method", "occlusion",
            "--target", "-1", "--baseline"]
    letter = run_json(capsys, [*base, "65"])
    assert letter["score"] == pytest.approx(out["score"]) and letter["tokens"] != out["tokens"]
    # the tiny LLaMA's pad row is all zeros (padding_idx), so 'zero' and 'pad' must agree exactly
    assert not tiny.model.get_input_embeddings().weight[tiny.tokenizer.pad_token_id].any()
    assert run_json(capsys, [*base, "zero"])["tokens"] == out["tokens"]


def test_sae_feature_and_probe_logit(capsys, tiny, tiny_dir, files):
    out = run_json(capsys, [PROMPT, "--model", str(tiny_dir), "--sae-monitor", f"{files / 'sae'}:3", "--top", "3"])
    ids = encode_prompt(tiny.tokenizer, PROMPT)
    a = attribute(tiny.model, tiny.layers, ids, sae_feature_score_fn(load_sae(files / "sae"), 3), 1)
    assert out["monitor"] == "sae#3" and out["layer"] == 1 and len(out["top"]) <= 3
    assert out["score"] == pytest.approx(a.score, rel=1e-5)
    at0 = run_json(capsys, [PROMPT, "--model", str(tiny_dir), "--sae-monitor", f"{files / 'sae'}:3@0", "--target", "-1"])
    assert at0["layer"] == 0 and at0["target"] == len(ids) - 1
    prob = run_json(capsys, [PROMPT, "--model", str(tiny_dir), "--probe", f"{files / 'p.safetensors'}", "--target", "5"])
    logit = run_json(capsys, [PROMPT, "--model", str(tiny_dir), "--probe", f"{files / 'p.safetensors'}", "--target", "5",
                              "--logit"])
    assert prob["score"] == pytest.approx(float(torch.sigmoid(torch.tensor(logit["score"]))), rel=1e-5)


def test_coloured_view_shows_the_prompt_score_and_top_table(tiny_dir, files):
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=True, color_system="truecolor", highlight=False)
    args = parse([PROMPT, "--model", str(tiny_dir), "--probe", str(files / "p.safetensors"), "--target", "8", "--top", "4"])
    assert run_explain(args, console) == 0
    text = buf.getvalue()
    assert "\x1b[48;2;" in text  # the heat: truecolor backgrounds
    plain = _strip_ansi(text)
    assert "p (layer 1) probability" in plain and "at position 8 ('o')" in plain
    assert "top 4 tokens" in plain and "rank" in plain and "attribution" in plain
    rows = re.findall(r"^│\s+(\d+) │\s+(\d+) │", plain, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and all(int(pos) <= 8 for _, pos in rows)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize(("extra", "flag", "detail"), [
    (["--probe", "P", "--target", "99"], "--target", "99 is out of range; allowed 0..23"),
    (["--probe", "NOLAYER"], "--probe", "records no layer; add @LAYER with LAYER in 0..1"),
    (["--probe", "P@2"], "--probe", "2 is out of range; allowed 0..1"),
    (["--watch", "V2"], "--watch", "the vector has layers [0, 1]; pick one"),
    (["--watch", "V", "--logit"], "--logit", "applies to --probe only"),
    (["--sae-monitor", "SAE:32"], "--sae-monitor", "32 is out of range; allowed 0..31"),
    (["--sae-monitor", "SAE"], "--sae-monitor", "must look like SAE_DIR:FEATURE"),
    (["--probe", "P", "--top", "0"], "--top", "0 is out of range; allowed 1..50"),
    (["--probe", "P", "--method", "occlusion", "--baseline", "300"], "--baseline", "300 is out of range; allowed 0..258"),
])
def test_errors_name_the_flag(tiny_dir, files, extra, flag, detail):
    paths = {"P": files / "p.safetensors", "NOLAYER": files / "nolayer.safetensors", "V": files / "v.safetensors",
             "V2": files / "v2.safetensors", "SAE": files / "sae"}
    argv = [PROMPT, "--model", str(tiny_dir), "--json"]
    for item in extra:
        head, sep, tail = item.partition("@") if "@" in item else item.partition(":")
        argv.append(f"{paths[head]}{sep}{tail}" if head in paths else item)
    with pytest.raises(InvalidArgument) as err:
        run_explain(parse(argv))
    assert str(err.value).startswith(f"{flag}: ") and detail in str(err.value), str(err.value)


def test_exactly_one_monitor_is_required(files, capsys):
    with pytest.raises(SystemExit):
        parse([PROMPT])
    with pytest.raises(SystemExit):
        parse([PROMPT, "--probe", str(files / "p.safetensors"), "--watch", str(files / "v.safetensors")])
    capsys.readouterr()
