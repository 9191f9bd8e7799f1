#!/usr/bin/env bash
# Install what the test suite needs and run it. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# A CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"

# Ray: no token auth for the throwaway local clusters the tests start.
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
python -m pytest -ra "$@"
