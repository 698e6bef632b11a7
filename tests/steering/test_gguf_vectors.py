"""llama.cpp control vectors: round trips, files laid out as llama-cvector-generator and repeng write
them, the layer mapping (direction.N = output of decoder layer N = steerwatch layer N), refusals."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from steering.errors import InvalidArgument
from steering.gguf_vectors import export_gguf, import_gguf
from steering.vectors import make_vector

WIDTH = 8


def write_cvector(path, directions, *, arch="controlvector", hint="gemma3", layer_count=None, count_type="int32"):
    """A control vector written the way llama.cpp's cvector-generator export_gguf writes one."""
    w = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        w.add_string("controlvector.model_hint", hint)
    count = len(directions) if layer_count is None else layer_count
    (w.add_int32 if count_type == "int32" else w.add_uint32)("controlvector.layer_count", count)
    for name, values in directions.items():
        w.add_tensor(name, np.asarray(values))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _dirs(*layers, seed=0):
    g = np.random.default_rng(seed)
    return {f"direction.{n}": g.standard_normal(WIDTH).astype(np.float32) for n in layers}


def test_round_trip_keeps_layers_values_and_model(tmp_path):
    vec = make_vector({1: torch.randn(WIDTH), 5: torch.randn(WIDTH), 6: torch.randn(WIDTH)}, model="tiny", method="caa")
    export_gguf(vec, tmp_path / "v.gguf", model_hint="llama", n_layers=8)
    back = import_gguf(tmp_path / "v.gguf")
    assert back.layers == [1, 5, 6] and back.d_model == WIDTH
    assert (back.model, back.method) == ("llama", "gguf-import")
    for layer in vec.layers:
        assert torch.equal(back.per_layer[layer], vec.per_layer[layer])
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.5", "direction.6"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [WIDTH] for t in reader.tensors)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cvector_generator_layout_imports_to_the_layer_llama_cpp_applies_it_at(tmp_path):
    # cvector-generator on a 6-layer model: direction.1..direction.5, layer_count = n_layer - 1 (int32).
    dirs = _dirs(1, 2, 3, 4, 5)
    dirs["direction.3"] = np.zeros(WIDTH, dtype=np.float32)
    vec = import_gguf(write_cvector(tmp_path / "cg.gguf", dirs, layer_count=5))
    assert vec.layers == [1, 2, 4, 5]  # the all-zero direction adds nothing and is skipped
    for layer in vec.layers:  # direction.N is added to the output of decoder layer N: steerwatch layer N
        assert torch.equal(vec.per_layer[layer], torch.from_numpy(dirs[f"direction.{layer}"]))
    assert vec.model == "gemma3" and vec.meta["gguf.layer_count"] == "5" and vec.meta["gguf.skipped_zero_layers"] == "3"


def test_repeng_layout_with_a_layer_subset(tmp_path):
    # repeng: uint32 layer_count = len(directions), keys may exceed it.
    dirs = _dirs(10, 11, 12, seed=1)
    vec = import_gguf(write_cvector(tmp_path / "rp.gguf", dirs, hint="mistral", count_type="uint32"))
    assert vec.layers == [10, 11, 12] and vec.model == "mistral"
    torch.testing.assert_close(vec.per_layer[11], torch.from_numpy(dirs["direction.11"]))


def test_f16_directions_are_read_and_a_missing_hint_is_allowed(tmp_path):
    dirs = {"direction.2": np.linspace(-1, 1, WIDTH).astype(np.float16)}
    vec = import_gguf(write_cvector(tmp_path / "h.gguf", dirs, hint=None))
    assert vec.model == "" and vec.per_layer[2].dtype == torch.float32
    torch.testing.assert_close(vec.per_layer[2], torch.linspace(-1, 1, WIDTH), atol=1e-3, rtol=0)


@pytest.mark.parametrize(("directions", "kwargs", "pattern"), [
    (_dirs(1, 2), {"arch": "llama"}, r"^path:general.architecture: is 'llama' but a llama.cpp control vector has 'controlvector'"),
    ({"direction.1": np.ones(WIDTH, np.float32), "direction.2": np.array([1.0, np.nan] * 4, np.float32)}, {},
     r"^path:direction.2: contains 4 non-finite value"),
    ({"direction.1": np.ones(WIDTH, np.float32), "direction.2": np.ones(WIDTH + 1, np.float32)}, {},
     r"^path:direction.2: has 9 values but direction.1 has 8; all directions must have the same width"),
    ({"direction.0": np.ones(WIDTH, np.float32)}, {}, r"^path:direction.0: layer index 0 is not allowed"),
    ({"direction.1": np.ones(WIDTH, np.float32), "bias": np.ones(WIDTH, np.float32)}, {},
     r"^path:bias: unexpected tensor; a control vector holds only direction.<N> tensors"),
    ({"direction.1": np.ones((2, 4), np.float32)}, {}, r"^path:direction.1: shape \[4, 2\] is not 1-D"),
    ({"direction.1": np.ones(WIDTH, np.int32)}, {}, r"^path:direction.1: tensor type I32 not allowed; use F32"),
    ({"direction.1": np.zeros(WIDTH, np.float32)}, {}, r"^path: every direction in .* is all zeros"),
    ({}, {}, r"^path: .* has no direction.<N> tensors"),
])
def test_bad_files_are_refused_naming_the_field(tmp_path, directions, kwargs, pattern):
    with pytest.raises(InvalidArgument, match=pattern):
        import_gguf(write_cvector(tmp_path / "bad.gguf", directions, **kwargs))


def test_not_a_gguf_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not a gguf file")
    with pytest.raises(InvalidArgument, match=r"^vec: .*x.gguf' is not a readable GGUF file \(ValueError"):
        import_gguf(tmp_path / "x.gguf", field="vec")
    (tmp_path / "v.safetensors").write_bytes(b"")
    with pytest.raises(InvalidArgument, match=r"^path: .* is not a readable GGUF file"):
        import_gguf(tmp_path / "v.safetensors")
    with pytest.raises(InvalidArgument, match=r"^path: file .*nope.gguf' does not exist"):
        import_gguf(tmp_path / "nope.gguf")


def test_architecture_key_must_be_a_string(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "controlvector")
    w.add_int32("controlvector.model_hint", 3)
    w.add_tensor("direction.1", np.ones(WIDTH, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidArgument, match=r"^path:controlvector.model_hint: must be a string"):
        import_gguf(tmp_path / "a.gguf")


def test_export_refusals(tmp_path):
    out = tmp_path / "o.gguf"
    with pytest.raises(InvalidArgument, match=r"^vector.layer: layer 0 cannot be exported"):
        export_gguf(make_vector({0: torch.ones(WIDTH), 3: torch.ones(WIDTH)}), out, model_hint="llama")
    with pytest.raises(InvalidArgument, match=r"^n_layers: the vector has layer 9 but the model has 8 layers \(0..7\)"):
        export_gguf(make_vector({9: torch.ones(WIDTH)}), out, model_hint="llama", n_layers=8)
    with pytest.raises(InvalidArgument, match=r"^model_hint: required"):
        export_gguf(make_vector({2: torch.ones(WIDTH)}), out, model_hint=" ")
    with pytest.raises(InvalidArgument, match=r"^n_layers: must be an integer >= 2"):
        export_gguf(make_vector({1: torch.ones(WIDTH)}), out, model_hint="llama", n_layers=1)
    assert not out.exists()
