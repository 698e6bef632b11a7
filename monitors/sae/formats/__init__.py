"""SAE layouts other than SAELens, converted into SAELens tensors and a SAELens cfg dict.

:func:`monitors.sae.loader.load_sae` calls :func:`detect_layout` and, for a non-SAELens layout, the
converter here; the result goes through the same ``parse_config``/``build_sae`` as a SAELens
directory, so everything downstream sees one SAE type. Each converter reproduces the releasing
library's own inference computation (sources named per converter); all errors name the file and key.

Layouts (first match wins):

* **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` (read by the loader itself).
* **EleutherAI sparsify**: ``cfg.json`` + ``sae.safetensors`` (one hookpoint directory such as
  ``layers.6/``; a parent holding several is refused with the list of its hookpoints).
* **Llama Scope** (OpenMOSS lm_saes): ``hyperparams.json`` + ``checkpoints/final.safetensors``
  (or ``sae_weights.safetensors`` / ``checkpoints/pruned.safetensors``, lm_saes' own search order).
* **Gemma Scope 2**: ``params.safetensors`` (+ ``config.json``, optional).
* **Goodfire**: one ``*.pt`` / ``*.pth`` torch state dict, given as the file or its directory.

Also :func:`check_sae_fits`: refuse an SAE made for another width, layer or model.

Modules: this one detects the layout and dispatches; one module per converter (:mod:`.sparsify`,
:mod:`.llama_scope`, :mod:`.gemma_scope`, :mod:`.goodfire`), the checked readers they share and the
layout names in :mod:`.common`, the fit check in :mod:`.fit`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from monitors.sae.formats.common import (
    GEMMA_SCOPE_2,
    GOODFIRE,
    LAYOUTS,
    LLAMA_SCOPE,
    LOOKED_FOR,
    SAELENS,
    SPARSIFY,
    Converted,
)
from monitors.sae.formats.fit import check_sae_fits, comparable_model_name
from monitors.sae.formats.gemma_scope import GEMMA_CFG, GEMMA_WEIGHTS, convert_gemma_scope_2
from monitors.sae.formats.goodfire import TORCH_SUFFIXES, convert_goodfire
from monitors.sae.formats.llama_scope import LLAMA_SCOPE_CFG, LLAMA_SCOPE_WEIGHTS, convert_llama_scope
from monitors.sae.formats.sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS, convert_sparsify
from steering.errors import invalid

__all__ = [
    "GEMMA_CFG",
    "GEMMA_SCOPE_2",
    "GEMMA_WEIGHTS",
    "GOODFIRE",
    "LAYOUTS",
    "LLAMA_SCOPE",
    "LLAMA_SCOPE_CFG",
    "LLAMA_SCOPE_WEIGHTS",
    "LOOKED_FOR",
    "SAELENS",
    "SPARSIFY",
    "SPARSIFY_CFG",
    "SPARSIFY_WEIGHTS",
    "TORCH_SUFFIXES",
    "Converted",
    "check_sae_fits",
    "comparable_model_name",
    "convert",
    "convert_gemma_scope_2",
    "convert_goodfire",
    "convert_llama_scope",
    "convert_sparsify",
    "detect_layout",
]

_CONVERTERS: dict[str, Callable[[Path], Converted]] = {
    SPARSIFY: convert_sparsify,
    LLAMA_SCOPE: convert_llama_scope,
    GEMMA_SCOPE_2: convert_gemma_scope_2,
    GOODFIRE: convert_goodfire,
}


def detect_layout(path: Path) -> tuple[str, Path]:
    """(layout name, directory or file to read). Raises InvalidArgument naming what was looked for."""
    if path.is_file():
        if path.suffix in TORCH_SUFFIXES:
            return GOODFIRE, path
        if path.name in ("sae_weights.safetensors", SPARSIFY_WEIGHTS, GEMMA_WEIGHTS, "cfg.json", LLAMA_SCOPE_CFG, GEMMA_CFG):
            return detect_layout(path.parent)
        if path.name == "final.safetensors" and path.parent.name == "checkpoints":
            return detect_layout(path.parent.parent)
        raise invalid("path", f"{str(path)!r} is a file but not a known SAE weights file; looked for: {LOOKED_FOR}")
    if not path.is_dir():
        raise invalid("path", f"{str(path)!r} is not a directory (nor a file); expected an SAE in one of: {LOOKED_FOR}")
    has = {name: (path / name).is_file() for name in ("cfg.json", "sae_weights.safetensors", SPARSIFY_WEIGHTS,
                                                       LLAMA_SCOPE_CFG, GEMMA_WEIGHTS)}
    if has["cfg.json"] and has["sae_weights.safetensors"]:
        return SAELENS, path
    if has["cfg.json"] and has[SPARSIFY_WEIGHTS]:
        return SPARSIFY, path
    if has[LLAMA_SCOPE_CFG] and not has["cfg.json"]:
        return LLAMA_SCOPE, path
    if has[GEMMA_WEIGHTS]:
        return GEMMA_SCOPE_2, path
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in TORCH_SUFFIXES)
    if len(pickles) == 1 and not has["cfg.json"]:
        return GOODFIRE, path / pickles[0]
    if len(pickles) > 1 and not has["cfg.json"]:
        raise invalid("path", f"{str(path)!r} holds {len(pickles)} torch files ({', '.join(pickles)}); "
                              "a Goodfire SAE directory must hold exactly one; give the file itself")
    hookpoints = sorted(p.name for p in path.iterdir()
                        if p.is_dir() and (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file())
    if hookpoints and not has["cfg.json"]:
        shown = ", ".join(hookpoints[:12]) + (", ..." if len(hookpoints) > 12 else "")
        raise invalid("path", f"{str(path)!r} holds one sparsify SAE per hookpoint ({len(hookpoints)}); "
                              f"give one of its subdirectories: {shown}")
    # Fall through to SAELens: its loader names the missing cfg.json / sae_weights.safetensors.
    return SAELENS, path


def convert(layout: str, where: Path) -> Converted:
    """Run the converter of a non-SAELens ``layout`` on ``where`` (from :func:`detect_layout`)."""
    return _CONVERTERS[layout](where)
