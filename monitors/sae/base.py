"""The SAE base class: normalisation, encoders (full and feature subset), decoder.

Shapes: T tokens, d_in model width, d_sae features, n selected features. All weights are float32
whatever the file dtype. The encoder is kept transposed ([d_sae, d_in], contiguous) so selecting a
feature subset gathers contiguous rows. Inputs must be on the SAE's device; any float dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from monitors.sae.config import SAEConfigBase
from monitors.sae.normalization import Normalizer, NormState
from steering.errors import invalid
from steering.tensors import require_float


class SAE:
    """A loaded sparse autoencoder. Subclasses implement :meth:`_activate` for one architecture.

    ``subset_exact`` is True when a feature's activation depends only on its own encoder column, so
    :meth:`encode_features` touches only ``W_enc[:, idx]`` (cost 2*d_in*n per token). When False
    (TopK) :meth:`encode_features` runs the full encode and gathers: still exact, full cost.
    """

    subset_exact: ClassVar[bool] = True
    #: per-feature [d_sae] tensors this architecture keeps besides W_enc, W_dec, b_dec
    feature_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: SAEConfigBase, weights: Mapping[str, torch.Tensor]) -> None:
        """``weights`` are checked float32 SAELens tensors (W_enc [d_in, d_sae] etc.)."""
        self.cfg = cfg
        self.feature_max: torch.Tensor | None = None
        self._w_enc_t = weights["W_enc"].t().contiguous()
        self._w_dec = weights["W_dec"].contiguous()
        self._b_dec = weights["b_dec"].contiguous()
        self._params = {name: weights[name].contiguous() for name in self.feature_params}
        factor = cfg.norm_scaling_factor if cfg.normalize_activations == "expected_average_only_in" else None
        self._norm = Normalizer(cfg.normalize_activations, cfg.d_in, factor or 1.0)

    # ---- description -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_layer(self) -> int | None:
        return self.cfg.hook_layer

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def device(self) -> torch.device:
        return self._w_dec.device

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, "
            f"hook_layer={self.hook_layer}, normalize={self.cfg.normalize_activations!r}, device={self.device})"
        )

    # ---- normalisation -----------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormState]:
        """x [T, d_in] any float dtype -> (x_norm [T, d_in] float32, state for decode/denormalize)."""
        return self._norm.normalize(self._input(x, "x", self.d_in))

    def denormalize_delta(self, delta: torch.Tensor, state: NormState) -> torch.Tensor:
        """A change delta [T, d_in] made in normalised space -> the change in input space [T, d_in]."""
        return self._norm.delta_to_input(self._input(delta, "delta", self.d_in), state)

    # ---- encode ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] -> feature activations [T, d_sae] float32 (normalises internally)."""
        x_norm, _ = self.normalize(x)
        return self.encode_normalized(x_norm)

    def encode_normalized(self, x_norm: torch.Tensor) -> torch.Tensor:
        """x_norm [T, d_in] (output of :meth:`normalize`) -> [T, d_sae]."""
        h = F.linear(self._centre(x_norm), self._w_enc_t)
        return self._activate(h, None)

    def encode_features(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, d_in], idx [n] int64 -> activations of features ``idx`` [T, n]; exact.

        ``idx`` must be in range (see :func:`validate_features`); it is not re-checked here.
        """
        x_norm, _ = self.normalize(x)
        return self.encode_features_normalized(x_norm, idx)

    def encode_features_normalized(self, x_norm: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Like :meth:`encode_features` for an already normalised x_norm [T, d_in]."""
        idx = self._index(idx)
        if not self.subset_exact:
            return self.encode_normalized(x_norm).index_select(1, idx)
        h = F.linear(self._centre(x_norm), self._w_enc_t.index_select(0, idx))
        return self._activate(h, idx)

    def _centre(self, x_norm: torch.Tensor) -> torch.Tensor:
        x_norm = self._input(x_norm, "x_norm", self.d_in)
        return x_norm - self._b_dec if self.cfg.apply_b_dec_to_input else x_norm

    def _activate(self, h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """h = x~ @ W_enc[:, idx] [T, n] (no bias) -> activations [T, n]; idx None = all features."""
        raise NotImplementedError

    def _param(self, name: str, idx: torch.Tensor | None) -> torch.Tensor:
        """Per-feature tensor ``name`` [d_sae], restricted to ``idx`` when given."""
        value = self._params[name]
        return value if idx is None else value.index_select(0, idx)

    # ---- decode ------------------------------------------------------------------------------
    def decode(self, f: torch.Tensor, state: NormState | None = None) -> torch.Tensor:
        """f [T, d_sae] -> reconstruction [T, d_in] in input space: ``f @ W_dec + b_dec``, then the
        normalisation undone. ``state`` (from :meth:`normalize` of the same tokens) is required for
        constant_norm_rescale and layer_norm."""
        f = self._input(f, "f", self.d_sae)
        return self._norm.undo(torch.addmm(self._b_dec, f, self._w_dec), state)

    def decoder_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """W_dec[idx] -> [n, d_in] (normalised space; map sums of rows back with denormalize_delta)."""
        return self._w_dec.index_select(0, self._index(idx))

    # ---- movement and export -----------------------------------------------------------------
    def to(self, device: torch.device | str) -> SAE:
        """Move every tensor to ``device`` in place; returns self."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        self._params = {name: value.to(device) for name, value in self._params.items()}
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """SAELens-named float32 tensors (W_enc [d_in, d_sae], ...) describing this SAE as loaded."""
        out = {"W_enc": self._w_enc_t.t().contiguous(), "W_dec": self._w_dec, "b_dec": self._b_dec}
        return {**out, **self._params}

    def to_cfg_dict(self) -> dict[str, Any]:
        """cfg.json content matching :meth:`state_tensors`."""
        return self.cfg.to_cfg_dict()

    # ---- input checks ------------------------------------------------------------------------
    def _input(self, t: torch.Tensor, field: str, width: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise invalid(field, f"must be a torch.Tensor, got {type(t).__name__}")
        require_float(t, field)
        if t.ndim != 2 or t.shape[1] != width:
            raise invalid(field, f"shape {list(t.shape)} not allowed; expected [T, {width}]")
        if t.device != self.device:
            raise invalid(field, f"is on {t.device} but the SAE is on {self.device}; move one of them")
        return t.to(torch.float32)

    def _index(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise invalid("idx", "must be a 1-D int64 tensor of feature indices (see validate_features)")
        if idx.device != self.device:
            raise invalid("idx", f"is on {idx.device} but the SAE is on {self.device}")
        return idx.long()
