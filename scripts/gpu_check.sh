#!/usr/bin/env bash
# The GPU checks of scripts/gpu_check.py, without Ray, bounded to 5 minutes; writes gpu_check.json (or --out).
# On a machine with no CUDA device it says so and exits 0. Needs torch, transformers, grpcio, protobuf,
# safetensors and tokenizers; the checkout itself goes on PYTHONPATH (nothing is installed).
#   scripts/gpu_check.sh [--out FILE] [--device cpu]   (cpu: a dry run at small shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 300 "$PY" scripts/gpu_check.py "$@"
