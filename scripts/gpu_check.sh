#!/usr/bin/env bash
# The GPU checks of scripts/gpu_check.py, without Ray, within GPU_CHECK_S seconds (default 280: about 20 s
# below a 300 s caller). Results: $OUT/gpu_check.json when OUT is set, else gpu_check.json (or --out),
# rewritten after every check. On a machine with no CUDA device it says so and exits 0. Needs torch,
# transformers, grpcio, protobuf, safetensors and tokenizers; the checkout goes on PYTHONPATH (nothing is
# installed).
#   OUT=dir scripts/gpu_check.sh [--out FILE] [--device cpu]   (cpu: a dry run at small shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_S=${GPU_CHECK_S:-280}
# SIGTERM at the limit (the script records where it stopped), SIGKILL 5 s later if that hangs
exec timeout --kill-after=5 "$GPU_CHECK_S" "$PY" scripts/gpu_check.py "$@"
