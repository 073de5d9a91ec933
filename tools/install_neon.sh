#!/usr/bin/env bash
# Installs Neon and its dependencies (pyproject.toml's, megatron-core==0.16.1 among them) into a
# Python that already has torch -- NVIDIA's NGC PyTorch image, or any CUDA torch install --
# without replacing that torch: a constraints file pins torch to the version already there, so
# pip keeps it (or stops with a conflict instead of pulling another multi-GB torch).
#
#   tools/install_neon.sh [SRC_DIR] [extra pip arguments]
#
# The Dockerfile runs exactly this; the test suite runs it too, with --dry-run, against its own
# torch (tests/launch/test_docker.py), so the image's install step is exercised by CI.
# Environment: PYTHON (default python3).
set -euo pipefail

SRC=${1:-.}
shift || true
PYTHON=${PYTHON:-python3}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if ! "$PYTHON" -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"; then
    echo "install_neon.sh: $PYTHON has no torch; install the torch build for your GPU first" \
        "(or, on a CPU-only machine, use: pip install -r requirements.txt)" >&2
    exit 1
fi
echo "install_neon.sh: keeping $(cat "$constraints")" >&2
"$PYTHON" -m pip install --no-cache-dir --constraint "$constraints" "$@" "$SRC"
