#!/usr/bin/env bash
# Regenerates the lock files from requirements.txt / requirements-dev.txt after you change them:
#   scripts/lock.sh            (then commit requirements.lock and requirements-dev.lock)
#   scripts/lock.sh --upgrade  (move every pin to the newest allowed release)
# pip-compile runs in its own venv (.venv-lock) so the project's environment is not touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${SVLLM_LOCK_VENV:-$ROOT/.venv-lock}"
if [ ! -x "$TOOLS/bin/pip-compile" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q pip-tools
fi
cd "$ROOT"
opts=(-q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links)
"$TOOLS/bin/pip-compile" "${opts[@]}" "$@" -o requirements.lock requirements.txt
# tests/unit/test_lock.py fails when the two locks disagree on a shared package or miss a
# requirement, so a lock that was not regenerated cannot land.
"$TOOLS/bin/pip-compile" "${opts[@]}" "$@" -o requirements-dev.lock requirements-dev.txt
echo "updated requirements.lock and requirements-dev.lock; commit them"
