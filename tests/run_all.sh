#!/usr/bin/env bash
# The README's test command: the whole suite on TensorFlow (default), then the
# same backend-agnostic tests on JAX (TensorFlow-only tests skip there).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q "$@"
KERAS_BACKEND=jax python -m pytest -q "$@"
