#!/usr/bin/env bash
# The README's test command: the whole suite on TensorFlow (default), then the
# same backend-agnostic tests on JAX (TensorFlow-only tests skip there). Both
# suites always run; the command fails at the end if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
python -m pytest -q "$@" || status=1
KERAS_BACKEND=jax python -m pytest -q "$@" || status=1
if [ "$status" -ne 0 ]; then
  echo "run_all: at least one suite failed (see above)" >&2
fi
exit "$status"
