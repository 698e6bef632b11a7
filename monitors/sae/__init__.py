"""Sparse autoencoders in the SAELens on-disk format: load, encode (all or a subset of features),
decode. Pure torch + pydantic + safetensors.

Architectures: standard, jumprelu, gated, topk, batchtopk (served as JumpReLU or TopK).
Normalisation: none, expected_average_only_in, constant_norm_rescale, layer_norm.
"""

from monitors.sae.base import SAE
from monitors.sae.batchtopk import BatchTopKConfig
from monitors.sae.config import SAEConfigBase, SAEMetadata, layer_from_hook_name
from monitors.sae.features import validate_features
from monitors.sae.gated import GatedConfig, GatedSAE
from monitors.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from monitors.sae.loader import build_sae, load_sae, parse_config, save_sae
from monitors.sae.normalization import NormState
from monitors.sae.registry import Architecture, architectures, get_architecture, register_architecture
from monitors.sae.standard import StandardConfig, StandardSAE
from monitors.sae.topk import TopKConfig, TopKSAE

__all__ = [
    "SAE",
    "Architecture",
    "BatchTopKConfig",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "NormState",
    "SAEConfigBase",
    "SAEMetadata",
    "StandardConfig",
    "StandardSAE",
    "TopKConfig",
    "TopKSAE",
    "architectures",
    "build_sae",
    "get_architecture",
    "layer_from_hook_name",
    "load_sae",
    "parse_config",
    "register_architecture",
    "save_sae",
    "validate_features",
]
