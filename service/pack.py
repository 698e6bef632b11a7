"""Monitor packs: a directory of ready monitors for one model, with the measurements that justify them.

A pack holds ``pack.json`` (the manifest: model, assets, chosen layers, quality numbers), the asset
files, and ``REPORT.md`` (the same numbers for people). ``steerwatch pack build`` makes the default
pack for the embedded model; ``steerwatch serve`` loads the served model's pack when one is built.

Assets are registered under ``pack:<name>`` ids, shared by every tenant and read-only: a policy names
``pack:deception`` (probe), ``pack:sycophancy`` and ``pack:refusal`` (vectors) like its own ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from monitors.probes import load_probe
from steering.errors import invalid
from steering.vectors import load_vector

log = logging.getLogger(__name__)

PACK_PREFIX = "pack:"
MANIFEST = "pack.json"
REPORT = "REPORT.md"
PACK_FORMAT = 1


def is_pack_id(value: str) -> bool:
    return value.startswith(PACK_PREFIX)


def default_pack_dir(model_name: str) -> Path:
    from service.models import cache_root

    return cache_root() / "packs" / model_name


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise invalid("monitor_pack", f"{str(root)!r} holds no {MANIFEST}; build one with `steerwatch pack build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise invalid("monitor_pack", f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise invalid("monitor_pack", f"{path}: unknown pack format {manifest.get('format')!r}; rebuild it")
    return manifest


def load_pack(root: str | Path, registry: Any, *, model_name: str, d_model: int) -> dict[str, list[str]]:
    """Register a pack's assets; refuses a pack built for another model. Returns ids per kind."""
    from monitors.sae import load_sae
    from monitors.sae.formats import check_sae_fits

    root = Path(root)
    manifest = read_manifest(root)
    if manifest.get("model") != model_name:
        raise invalid("monitor_pack", f"{root} was built for model {manifest.get('model')!r}, not {model_name!r}")
    loaded: dict[str, list[str]] = {"probe": [], "vector": [], "sae": []}
    for asset in manifest["assets"]:
        key, kind, path = PACK_PREFIX + asset["name"], asset["kind"], root / asset["file"]
        if kind == "probe":
            registry.add_probe(key, load_probe(path, f"monitor_pack.{asset['name']}"), replace=True)
        elif kind == "vector":
            registry.add_vector(key, load_vector(path, f"monitor_pack.{asset['name']}"), replace=True)
        elif kind == "sae":
            sae = load_sae(path)
            check_sae_fits(sae, d_model=d_model, layer=None, model_name=model_name, field=f"monitor_pack.{asset['name']}")
            registry.add_sae(key, sae, replace=True)
        else:
            raise invalid("monitor_pack", f"{root / MANIFEST}: asset {asset['name']!r} has unknown kind {kind!r}")
        loaded[kind].append(key)
    return loaded


def resolve_pack(setting: str, model_name: str) -> Path | None:
    """The pack directory a ``monitor_pack`` setting names: "auto" = the model's built pack if any,
    "none" = no pack, else a directory (which must hold a pack)."""
    if setting == "none":
        return None
    if setting == "auto":
        root = default_pack_dir(model_name)
        if (root / MANIFEST).is_file():
            return root
        log.warning("no monitor pack built for %s (%s); run `steerwatch pack build` to get the default "
                    "monitors", model_name, root)
        return None
    return Path(setting)
