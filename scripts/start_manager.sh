#!/usr/bin/env bash
# Starts one manager in the foreground; settings come from the environment (see README).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv
cd "$ROOT"
exec "$PY" -m services.manager.main "$@"
