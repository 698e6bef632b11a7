"""Does an SAE fit the model it is about to read? :func:`check_sae_fits` refuses an SAE made for
another width, layer or model; :func:`comparable_model_name` decides when two model names count as
the same model (base and instruction-tuned siblings do).
"""

from __future__ import annotations

from monitors.sae.base import SAE
from steering.errors import invalid

_VARIANT_SUFFIXES = ("-instruct", "-it", "-pt", "-base", "-hf", "-chat")


def comparable_model_name(name: str) -> str:
    """``"meta-llama/Llama-3.1-8B-Instruct"`` -> ``"llama-3.1-8b"``: the last path part, lower case,
    ``_`` as ``-``, one trailing variant suffix (-instruct, -it, -pt, -base, -hf, -chat) dropped, since
    SAEs trained on a base model are routinely used on its instruction-tuned sibling."""
    last = name.strip().rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    for suffix in _VARIANT_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            return last[: -len(suffix)]
    return last


def check_sae_fits(sae: SAE, *, d_model: int, layer: int | None, model_name: str | None, field: str) -> None:
    """Refuse an SAE that cannot read this model at ``layer``: InvalidArgument naming ``field`` when
    its d_in differs from ``d_model``; when its recorded hook layer differs from ``layer`` (both
    known); when both model names are known and differ after :func:`comparable_model_name`."""
    if sae.d_in != d_model:
        raise invalid(field, f"SAE has d_in {sae.d_in} but the model's d_model is {d_model}; it was made for another model")
    meta = sae.cfg.metadata
    trained = sae.hook_layer  # the decoder layer whose output it reads (resid_pre L -> L-1)
    if layer is not None and trained is not None and trained != layer:
        raise invalid(field, f"SAE was trained on the output of layer {trained} (hook {meta.hook_name!r}) but is "
                             f"used at layer {layer}; use it at layer {trained} or pick the SAE for layer {layer}")
    sae_model = meta.model_name
    if model_name and sae_model and comparable_model_name(model_name) != comparable_model_name(sae_model):
        raise invalid(field, f"SAE was trained on model {sae_model!r} but the model is {model_name!r}")
