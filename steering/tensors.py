"""Validation of tensors that arrive from files or users: shape, dtype, finiteness.

Every check raises InvalidArgument naming the field and what is allowed, so a bad upload is refused
before it can reach a forward pass (a NaN in a steering table would poison every token it touches).
"""

from __future__ import annotations

import math

import torch

from steering.errors import invalid

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_float(t: torch.Tensor, field: str) -> None:
    """Refuse integer, bool or complex tensors."""
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise invalid(field, f"dtype {str(t.dtype).removeprefix('torch.')} not allowed; use one of {allowed}")


def require_finite(t: torch.Tensor, field: str) -> None:
    """Refuse NaN and +/-inf anywhere in the tensor."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        raise invalid(field, f"contains {int(bad.sum())} non-finite value(s) (first at flat index {first}); all values must be finite")


def require_shape(t: torch.Tensor, shape: tuple[int, ...], field: str) -> None:
    """Refuse a tensor whose shape differs from ``shape``."""
    if tuple(t.shape) != tuple(shape):
        raise invalid(field, f"shape {list(t.shape)} does not match the required {list(shape)}")


def checked(t: torch.Tensor, shape: tuple[int, ...], field: str) -> torch.Tensor:
    """Validate dtype, shape and finiteness; return the tensor as contiguous float32."""
    require_float(t, field)
    require_shape(t, shape, field)
    require_finite(t, field)
    return t.detach().to(torch.float32).contiguous()


def require_index(value: int, upper: int, field: str) -> int:
    """Refuse an index outside [0, upper)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < upper:
        raise invalid(field, f"{value!r} is out of range; allowed 0..{upper - 1}")
    return value


def unit_direction(v: torch.Tensor, field: str, what: str = "has zero norm; a direction must be non-zero",
                   ) -> torch.Tensor:
    """``v / |v|`` in ``v``'s dtype; refuses a (near-)zero vector with ``what``.

    Finite float32 values can still have a norm beyond float32's range (64 values of 3e38): the norm is
    then taken in float64, so the direction stays well defined instead of turning into zeros or NaN
    (a NaN direction in an ablation table would poison the batch it joins)."""
    norm = float(v.norm())
    if not math.isfinite(norm):
        v64 = v.double()
        norm = float(v64.norm())
        if not math.isfinite(norm):
            raise invalid(field, "has a non-finite norm; all values must be finite")
        return (v64 / norm).to(v.dtype)
    if norm < 1e-8:
        raise invalid(field, what)
    return v / norm
