#!/usr/bin/env bash
# Install what the test suite needs and run it. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# A CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"

# The playground's browser tests drive Debian's Chromium through Playwright (never
# `playwright install`). Install it when missing and we may; otherwise those tests fail and
# say how to install it (never a silent skip).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing Debian's chromium for the playground's browser tests" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
            echo "test.sh: could not install chromium; the browser tests will fail" >&2
        fi
    else
        echo "test.sh: /usr/bin/chromium is missing and cannot be installed here (not root or no apt-get);" \
             "the browser tests will fail" >&2
    fi
fi

# Ray: no token auth for the throwaway local clusters the tests start.
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
# -X faulthandler: a crash anywhere, even in a native library at interpreter exit after pytest
# has reported, prints every thread's Python stack instead of a bare "Segmentation fault".
# One process, one test after another: `-n 2 --dist loadgroup` (the two groups tests/conftest.py
# gives, side by side) took 17-18 min instead of 20-25 here, but on 2 cores the contention failed
# a different timing-bound test in most runs (a Ray start-up timeout, a stop that took too many
# steps), so it stays a developer's option, not the CI's.
# --durations: the slowest tests in every log, to keep the suite within its 20 minutes on slower machines.
python -X faulthandler -m pytest -ra --durations=30 "$@"
