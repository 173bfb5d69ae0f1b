#!/usr/bin/env bash
# Runs the test suite (installs what it needs on first use). Extra args go to pytest,
# e.g. scripts/test.sh -m real_vllm   or   scripts/test.sh tests/unit
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv
ensure_redis
ensure_cmd nginx nginx  # the fault-injection suite puts nginx in front of the routers
ensure_cmd chromium chromium  # the console's browser tests (tests/browser) drive it
cd "$ROOT"
"$PY" -m ruff check .
"$PY" -m mypy shared services scripts tests
# In parallel: most of the suite waits on processes it started. --dist loadgroup keeps the
# tests of one xdist_group (a shared module-scoped pool, the serial chaos tests) on one
# worker. SVLLM_TEST_WORKERS=0 (or a later -n 0) runs it in this process.
exec "$PY" -m pytest -n "${SVLLM_TEST_WORKERS:-3}" --dist loadgroup "$@"
