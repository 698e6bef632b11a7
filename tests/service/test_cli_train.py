"""``train probe``, ``train sae`` and ``sae top-examples`` end to end on the tiny checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

import monitors.train.sae as sae_mod
from monitors.probes import load_probe
from monitors.sae import load_sae
from service.cli_train import add_train_parsers, run_train
from steering.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("single_thread")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerwatch")
    add_train_parsers(p.add_subparsers(dest="command", required=True))
    return p


def run(argv: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> dict:
    code = run_train(parser().parse_args(argv), Console(width=120))
    assert code == 0
    if capsys is None:
        return {}
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-data")
    write_jsonl(d / "labelled.jsonl", [{"text": f"{'zzz qqq' if i % 2 else 'aaa bbb'} {i}", "label": bool(i % 2)}
                                       for i in range(24)])
    write_jsonl(d / "facts.jsonl", [{"id": i, "fact": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}.",
                                     "false": f"The number {i} is {'odd' if i % 2 == 0 else 'even'}.", "topic": "maths"}
                                    for i in range(12)])
    write_jsonl(d / "corpus.jsonl", [{"id": 100 + i, "text": f"The cat {i} sat on the mat and the dog barked {i % 7} times."}
                                     for i in range(40)])
    return d


def test_train_probe_on_labelled_texts_writes_a_calibrated_probe(tmp_path, tiny_dir, data, capsys):
    out = tmp_path / "p.safetensors"
    report = run(["train", "probe", "--model", str(tiny_dir), "--data", str(data / "labelled.jsonl"), "--layers", "0-1",
                  "-o", str(out), "--json"], capsys)
    assert [r["layer"] for r in report["layers"]] == [0, 1]
    best = next(r for r in report["layers"] if r["layer"] == report["best_layer"])
    assert best["heldout"]["auroc"] == 1.0 and best["heldout"]["n_pos"] == best["heldout"]["n_neg"] == 3
    probe = load_probe(out)
    assert probe.layer == report["best_layer"] and probe.threshold == pytest.approx(report["threshold"])
    assert probe.name == "p"


def test_train_probe_instructed_pairs_reports_the_true_false_generalisation(tmp_path, tiny_dir, data, capsys):
    report = run(["train", "probe", "--model", str(tiny_dir), "--instructed-pairs", str(data / "facts.jsonl"),
                  "--layer", "1", "-o", str(tmp_path / "d.safetensors"), "--json"], capsys)
    (layer,) = report["layers"]
    assert layer["layer"] == 1 and layer["n_train_pos"] == layer["n_train_neg"] == 9
    assert layer["plain true/false statements"]["n_pos"] == 3
    # the table view runs too
    run(["train", "probe", "--model", str(tiny_dir), "--instructed-pairs", str(data / "facts.jsonl"),
         "--layer", "1", "-o", str(tmp_path / "d.safetensors")])
    assert "true/false AUROC" in capsys.readouterr().out


def test_bad_jsonl_lines_are_rejected_with_line_numbers_or_skipped(tmp_path, tiny_dir, data, capsys):
    good = [json.loads(line) for line in (data / "labelled.jsonl").read_text().splitlines()]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*good[:2], "{not json", good[2], {"text": "x", "label": "yes"}, *good[3:]])
    argv = ["train", "probe", "--model", str(tiny_dir), "--data", str(bad), "--layer", "0",
            "-o", str(tmp_path / "p.safetensors"), "--json"]
    with pytest.raises(InvalidArgument) as exc:
        run(argv)
    assert exc.value.field == f"{bad}:3" and "invalid JSON" in str(exc.value)
    report = run([*argv, "--on-error", "skip"], capsys)
    assert [s["line"] for s in report["skipped"]] == [3, 5]
    assert "label" in report["skipped"][1]["reason"]


def test_a_missing_class_names_the_file_and_the_class(tmp_path, tiny_dir):
    only_pos = write_jsonl(tmp_path / "pos.jsonl", [{"text": f"t {i}", "label": True} for i in range(6)])
    with pytest.raises(InvalidArgument, match="no negative examples") as exc:
        run(["train", "probe", "--model", str(tiny_dir), "--data", str(only_pos), "--layer", "0",
             "-o", str(tmp_path / "p.safetensors")])
    assert exc.value.field == str(only_pos)
    with pytest.raises(InvalidArgument, match="out of range"):
        run(["train", "probe", "--model", str(tiny_dir), "--data", str(data_file(tmp_path)), "--layer", "5",
             "-o", str(tmp_path / "p.safetensors")])


def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "two.jsonl", [{"text": f"t {i}", "label": i % 2 == 0} for i in range(8)])


def test_train_sae_resumes_and_the_output_loads_then_top_examples(tmp_path, tiny_dir, data, capsys, monkeypatch):
    base = ["train", "sae", "--model", str(tiny_dir), "--layer", "1", "--corpus", str(data / "corpus.jsonl"),
            "--d-sae", "96", "--k", "6", "--tokens", "3072", "--batch-size", "256", "--lr", "3e-3", "--json"]
    straight = run([*base, "-o", str(tmp_path / "a")], capsys)
    assert straight["steps"] == 12 and straight["tokens"] == 3072 and straight["cached"] is True
    assert 0.0 < straight["fve"] <= 1.0 and straight["l0"] <= 6.0
    assert straight["epochs"] == pytest.approx(3072 / straight["corpus_tokens"])
    streamed = run([*base, "--no-cache", "-o", str(tmp_path / "s")], capsys)
    assert streamed["cached"] is False and streamed["steps"] == 12

    class Stop(Exception):
        pass

    ckpt = tmp_path / "ckpt"
    original = sae_mod._save_checkpoint
    calls = []

    def save_then_stop(*args, **kwargs):  # the run dies right after its first checkpoint
        original(*args, **kwargs)
        calls.append(args[6])
        raise Stop

    monkeypatch.setattr(sae_mod, "_save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        run([*base, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5", "-o", str(tmp_path / "b")])
    monkeypatch.undo()
    assert calls == [5]
    capsys.readouterr()
    resumed = run([*base, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5", "--resume", "-o", str(tmp_path / "b")],
                  capsys)
    assert resumed["resumed_from_step"] == 5 and resumed["steps"] == 12
    a, b = load_sae(tmp_path / "a"), load_sae(tmp_path / "b")
    for name, t in a.state_tensors().items():
        assert torch.equal(t, b.state_tensors()[name]), name
    assert a.hook_layer == 1 and a.architecture == "topk" and a.feature_max is not None

    top = run(["sae", "top-examples", str(tmp_path / "a"), "--model", str(tiny_dir), "--corpus",
               str(data / "corpus.jsonl"), "--all-top", "3", "--top", "2", "--window", "3", "--json"], capsys)
    assert len(top["features"]) == 3 and top["layer"] == 1
    first = top["features"][0]
    assert len(first["examples"]) == 2 and first["examples"][0]["activation"] >= first["examples"][1]["activation"]
    assert "«" in first["examples"][0]["snippet"] and first["examples"][0]["text_id"] >= 100
    # the recorded max covers every corpus token (cached training tokens and held-out), so nothing beats it
    assert all(ex["activation"] <= fe["max_activation"] + 1e-4 for fe in top["features"] for ex in fe["examples"])
    chosen = run(["sae", "top-examples", str(tmp_path / "a"), "--model", str(tiny_dir), "--corpus",
                  str(data / "corpus.jsonl"), "--features", f"{first['feature']},0", "--json"], capsys)
    assert [f["feature"] for f in chosen["features"]] == [first["feature"], 0]
    assert chosen["features"][0]["examples"][0]["activation"] == first["examples"][0]["activation"]
