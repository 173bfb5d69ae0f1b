#!/usr/bin/env bash
# The whole pool on this machine: redis (unless REDIS_URL is set), manager, worker, router,
# and a demo model. Ctrl-C stops everything. First run installs what it needs.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv
[ -n "${REDIS_URL:-}" ] || ensure_redis
cd "$ROOT"
exec "$PY" -m scripts.start_all "$@"
