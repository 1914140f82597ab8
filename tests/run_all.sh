#!/usr/bin/env bash
# The README's test command: the whole suite on TensorFlow (default), then the
# same backend-agnostic tests on JAX (TensorFlow-only tests skip there). Both
# suites always run; the command fails at the end if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Test files are spread over one process per core (pytest-xdist), each file
# kept in one process so that its module fixtures are made once; each suite
# ends with its 25 slowest tests (the suites have a time budget: BUILD_NOTES).
workers="${PYTEST_WORKERS:-$(python -c 'import os; print(max(1, min(4, os.cpu_count() or 1)))')}"
status=0
# The JAX suite's processes share one compilation cache (tests/conftest.py).
cache="$(mktemp -d "${TMPDIR:-/tmp}/keras-fsp-test-jax-cache.XXXXXX")"
trap 'rm -rf "$cache"' EXIT
python -m pytest -q -n "$workers" --dist loadfile --durations=25 "$@" || status=1
KERAS_BACKEND=jax KERAS_FSP_TEST_JAX_CACHE="$cache" python -m pytest -q -n "$workers" --dist loadfile --durations=25 "$@" || status=1
if [ "$status" -ne 0 ]; then
  echo "run_all: at least one suite failed (see above)" >&2
fi
exit "$status"
