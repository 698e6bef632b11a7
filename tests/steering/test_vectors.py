"""Vector and probe files: round trips with metadata, and clear refusals of bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from monitors.probes import load_probe, make_probe, save_probe
from steering.errors import InvalidArgument
from steering.vectors import load_vector, make_vector, read_metadata, save_vector


def test_vector_round_trip_keeps_layers_and_metadata(tmp_path):
    vec = make_vector({3: torch.randn(8), 5: torch.randn(8)}, model="tiny", method="caa", source="pairs.jsonl")
    save_vector(vec, tmp_path / "v.safetensors")
    back = load_vector(tmp_path / "v.safetensors")
    assert back.layers == [3, 5] and back.model == "tiny" and back.method == "caa" and back.source == "pairs.jsonl"
    assert torch.equal(back.at(5), vec.at(5))
    meta = read_metadata(tmp_path / "v.safetensors")
    assert meta["layers"] == "3,5" and meta["d_model"] == "8" and float(meta["norm"]) == pytest.approx(vec.norm(), rel=1e-5)


def test_single_layer_vector_serves_any_layer_but_multi_layer_does_not():
    one = make_vector({2: torch.ones(4)})
    assert torch.equal(one.at(7), torch.ones(4))
    two = make_vector({2: torch.ones(4), 3: torch.ones(4)})
    with pytest.raises(InvalidArgument, match=r"^vector\.layer: layer 7 not in this vector's layers \[2, 3\]"):
        two.at(7)


@pytest.mark.parametrize("tensors, message", [
    ({"layer.0": torch.tensor([1.0, float("inf")])}, "non-finite"),
    ({"layer.0": torch.ones(4, dtype=torch.int32)}, "dtype int32 not allowed"),
    ({"layer.0": torch.ones(4), "layer.1": torch.ones(5)}, r"shape \[5\] does not match the required \[4\]"),
    ({"layer.0": torch.ones(2, 2)}, "not a 1-D"),
    ({"weights": torch.ones(4)}, "only layer.<L> tensors"),
])
def test_bad_vector_files_are_refused_with_the_reason(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgument, match=message):
        load_vector(path)


def test_missing_and_corrupt_vector_files(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_vector(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgument, match="not a readable safetensors file"):
        load_vector(tmp_path / "junk.safetensors")


def test_probe_standardisation_is_folded_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, mean, std = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    probe = make_probe(w, 0.2, mean=mean, std=std, layer=4, name="deception", threshold=0.7)
    x = torch.randn(5, 6, generator=g)
    torch.testing.assert_close(probe.read(x), torch.sigmoid(((x - mean) / std) @ w + 0.2))
    save_probe(probe, tmp_path / "p.safetensors", model="tiny")
    back = load_probe(tmp_path / "p.safetensors")
    assert (back.layer, back.name, back.threshold) == (4, "deception", 0.7)
    torch.testing.assert_close(back.read(x), probe.read(x))


def test_probe_file_errors_name_the_field(tmp_path):
    save_file({"weight": torch.ones(4), "std": torch.zeros(4)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(InvalidArgument, match=r"^probe\.std: every entry must be > 0"):
        load_probe(tmp_path / "p.safetensors")
    save_file({"bias": torch.ones(1)}, str(tmp_path / "q.safetensors"))
    with pytest.raises(InvalidArgument, match="no 'weight' tensor"):
        load_probe(tmp_path / "q.safetensors")
