"""Parse the CLI's compact intervention flags into registry entries and an InterventionSpec.

  --steer FILE:COEF[@LAYERS]     add a vector (LAYERS: 3 | 3,5 | 2-6 | all; default the file's layers)
  --ablate FILE[@LAYERS]         remove a direction (default all layers)
  --clamp SAE_DIR:FEATURE=VALUE  clamp an SAE feature (VALUE absolute, or e.g. 10x its recorded max)
  --probe FILE[@LAYER]           monitor a linear probe
  --watch FILE[@LAYER]           monitor the projection on a direction (dot)
  --sae-monitor SAE_DIR:F1,F2    monitor SAE features
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monitors.probes import load_probe
from steering.errors import invalid
from steering.registry import Registry
from steering.spec import AblateEdit, AddEdit, ClampEdit, InterventionSpec, ReadSpec
from steering.vectors import load_vector


def parse_layers(text: str, n_layers: int, field: str) -> list[int] | str:
    """'all', '3', '3,5', '2-6' -> list (range checked later by the compiler)."""
    if text == "all":
        return "all"
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise invalid(field, f"{text!r} is not a layer list (e.g. 3, 3,5, 2-6 or all; layers 0..{n_layers - 1})") from exc
    return out


def _split_at(text: str) -> tuple[str, str | None]:
    path, sep, layers = text.rpartition("@")
    return (path, layers) if sep and not Path(text).exists() else (text, None)


class SpecBuilder:
    """Registers files under stable ids and collects edits and reads."""

    def __init__(self, registry: Registry, n_layers: int) -> None:
        self.reg, self.n_layers = registry, n_layers
        self.edits: list[Any] = []
        self.reads: list[ReadSpec] = []
        self._ids: dict[str, str] = {}

    def spec(self) -> InterventionSpec:
        return InterventionSpec(edits=self.edits, reads=self.reads)

    def _id(self, kind: str, path: str, loader) -> str:  # noqa: ANN001
        key = f"{kind}:{Path(path).resolve()}"
        if key not in self._ids:
            ident = f"{kind}-{len(self._ids)}-{Path(path).stem}"[:100].replace(" ", "_")
            getattr(self.reg, f"add_{kind}")(ident, loader(path))
            self._ids[key] = ident
        return self._ids[key]

    def steer(self, text: str) -> None:
        body, layers = _split_at(text)
        path, sep, coef = body.rpartition(":")
        if not sep:
            raise invalid("--steer", f"{text!r} must look like FILE:COEF[@LAYERS]")
        try:
            c = float(coef)
        except ValueError as exc:
            raise invalid("--steer", f"coefficient {coef!r} is not a number") from exc
        vid = self._id("vector", path, lambda p: load_vector(p, "--steer"))
        lay = None if layers is None else parse_layers(layers, self.n_layers, "--steer")
        if lay == "all":
            lay = list(range(self.n_layers))
        self.edits.append(AddEdit(vector=vid, coef=c, layers=lay))

    def ablate(self, text: str) -> None:
        path, layers = _split_at(text)
        vid = self._id("vector", path, lambda p: load_vector(p, "--ablate"))
        lay = "all" if layers is None else parse_layers(layers, self.n_layers, "--ablate")
        self.edits.append(AblateEdit(vector=vid, layers=lay))

    def clamp(self, text: str) -> None:
        from monitors.sae import load_sae

        path, sep, rest = text.rpartition(":")
        feat, eq, value = rest.partition("=")
        if not sep or not eq:
            raise invalid("--clamp", f"{text!r} must look like SAE_DIR:FEATURE=VALUE (VALUE like 8.0 or 10x)")
        sid = self._id("sae", path, load_sae)
        mode = "max_multiple" if value.endswith("x") else "absolute"
        try:
            self.edits.append(ClampEdit(sae=sid, feature=int(feat), value=float(value.rstrip("x")), mode=mode))
        except ValueError as exc:
            raise invalid("--clamp", f"{text!r}: FEATURE must be an integer and VALUE a number") from exc

    def probe(self, text: str) -> None:
        path, layer = _split_at(text)
        pid = self._id("probe", path, lambda p: load_probe(p, "--probe"))
        self.reads.append(ReadSpec(name=_name(path, self.reads), kind="probe", source=pid,
                                   layer=None if layer is None else _int(layer, "--probe")))

    def watch(self, text: str) -> None:
        path, layer = _split_at(text)
        vid = self._id("vector", path, lambda p: load_vector(p, "--watch"))
        self.reads.append(ReadSpec(name=_name(path, self.reads), kind="direction", source=vid,
                                   layer=None if layer is None else _int(layer, "--watch")))

    def sae_monitor(self, text: str) -> None:
        from monitors.sae import load_sae

        path, sep, feats = text.rpartition(":")
        if not sep:
            raise invalid("--sae-monitor", f"{text!r} must look like SAE_DIR:F1,F2,...")
        sid = self._id("sae", path, load_sae)
        for f in feats.split(","):
            idx = _int(f, "--sae-monitor")
            self.reads.append(ReadSpec(name=f"{Path(path).name}#{idx}", kind="sae_feature", source=sid, feature=idx))


def _int(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise invalid(field, f"{text!r} is not an integer") from exc


def _name(path: str, taken: list[ReadSpec]) -> str:
    base = Path(path).stem[:48] or "monitor"
    names = {r.name for r in taken}
    name, i = base, 2
    while name in names:
        name, i = f"{base}-{i}", i + 1
    return name
