#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the service, the tests and the benchmark need.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [--no-apt]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: the project's `torch>=2.4` is then satisfied and no CUDA build is pulled.
# On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index) to choose another.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test,bench]"
# Prometheus (server and promtool) for the observability tests, openssl for the TLS test, HAProxy for the
# gRPC front (`moe-service serve --front`, its overload test); Debian/Ubuntu only, needs root.
if [ "${1:-}" != "--no-apt" ] && { ! command -v prometheus >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 \
        || ! command -v haproxy >/dev/null 2>&1; }; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus openssl haproxy >/dev/null
        # the Debian packages start a system Prometheus on :9090 and a system HAProxy; the tests run their own
        (systemctl stop prometheus || service prometheus stop || pkill -x prometheus) >/dev/null 2>&1 || true
        (systemctl stop haproxy || service haproxy stop || pkill -x haproxy) >/dev/null 2>&1 || true
    else
        echo "note: 'prometheus' or 'haproxy' is not installed; their integration tests will skip" >&2
    fi
fi
