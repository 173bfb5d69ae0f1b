# Sourced by the other scripts: make sure the virtual environment and redis-server exist.
# Idempotent and quick once done: the venv is reinstalled only when a lock file changes.
# Installs come from the lock files (exact versions, hashes checked): two installs a month apart
# run the same code, the fast lane's uvicorn internals included. scripts/lock.sh updates them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SVLLM_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
  local stamp="$VENV/.requirements.sha"
  local want
  want="$(cat "$ROOT/requirements.lock" "$ROOT/requirements-dev.lock" | sha256sum | cut -d' ' -f1)"
  if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    ensure_project
    return 0
  fi
  echo "==> setting up $VENV (first run; later runs skip this)"
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV" || {
      echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    }
  fi
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q --require-hashes -r "$ROOT/requirements-dev.lock"
  echo "$want" > "$stamp"
  ensure_project
}

# The project itself, editable and without dependencies (the lock installed them): puts the
# `svllm` console script in $VENV/bin. Built with the locked setuptools (no build isolation,
# so nothing unpinned is fetched). Reinstalled when the venv's project is another checkout.
ensure_project() {
  if [ ! -x "$VENV/bin/svllm" ] || ! "$PY" -I -c 'import sys, services; sys.exit(services.__file__ != sys.argv[1])' "$ROOT/services/__init__.py" 2>/dev/null; then
    PYTHONWARNINGS=ignore "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  fi
}

# ensure_cmd COMMAND PACKAGE: install PACKAGE with apt-get when COMMAND is missing.
ensure_cmd() {
  if command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1; then
    echo "==> installing $2 with apt-get"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
  else
    echo "$1 is missing: install $2 with your package manager and retry" >&2
    exit 1
  fi
}

ensure_redis() {
  ensure_cmd redis-server redis-server
}
