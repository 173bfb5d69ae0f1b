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
exec "$PY" -m pytest "$@"
