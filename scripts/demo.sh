#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-apt
exec .venv/bin/moe-service demo "$@"
