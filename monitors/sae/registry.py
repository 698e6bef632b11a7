"""Architecture registry: name -> (config model, builder). Registering a name twice raises."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from monitors.sae.config import SAEConfigBase
from steering.errors import AlreadyExists, invalid

if TYPE_CHECKING:
    from monitors.sae.base import SAE

Builder = Callable[[SAEConfigBase, Mapping[str, torch.Tensor], str], "SAE"]


@dataclass(frozen=True)
class Architecture:
    """One SAELens architecture: its cfg model and ``build(cfg, tensors, source) -> SAE``."""

    name: str
    config_cls: type[SAEConfigBase]
    build: Builder


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add ``arch``; raises AlreadyExists when its name is taken."""
    if arch.name in _REGISTRY:
        raise AlreadyExists(f"architecture: {arch.name!r} is registered already", field="architecture")
    _REGISTRY[arch.name] = arch
    return arch


def architectures() -> tuple[str, ...]:
    """Registered architecture names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_architecture(name: object, field: str = "architecture") -> Architecture:
    """Look ``name`` up; InvalidArgument listing the allowed names when unknown."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise invalid(field, f"unknown architecture {name!r}; allowed: {', '.join(architectures())}")
    return _REGISTRY[name]
