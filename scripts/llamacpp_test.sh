#!/usr/bin/env bash
# Runs the opt-in real llama.cpp test (tests/real_llamacpp): llama-cpp-python's server on CPU.
#
# llama-cpp-python is kept out of the project's .venv; it gets a venv of its own,
# .venv-llamacpp (SVLLM_LLAMACPP_VENV overrides), built from source (cmake, CPU only; several
# minutes on 2 cores the first time). The test's worker runs on that venv's python, so the
# services' requirements go in too, with `gguf` for writing the test model. A stamp makes
# later runs skip the installation. Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ensure_venv
ensure_redis

LLAMACPP_VENV="${SVLLM_LLAMACPP_VENV:-$ROOT/.venv-llamacpp}"
LLAMACPP_PY="$LLAMACPP_VENV/bin/python"
LLAMACPP_SPEC="llama-cpp-python[server]==0.3.36"
GGUF_SPEC="gguf==0.19.0"
# The stamp names what was installed (and the services' requirements), so a change reinstalls.
STAMP="$LLAMACPP_VENV/.svllm-installed"
WANT="$LLAMACPP_SPEC $GGUF_SPEC requirements.txt:$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"

ensure_llamacpp_venv() {
  if [ -x "$LLAMACPP_PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    return 0
  fi
  echo "==> setting up $LLAMACPP_VENV with $LLAMACPP_SPEC (first run; later runs skip this)"
  ensure_cmd cmake cmake
  ensure_cmd g++ build-essential
  if [ ! -x "$LLAMACPP_PY" ]; then
    python3 -m venv "$LLAMACPP_VENV"
  fi
  "$LLAMACPP_PY" -m pip install -q --upgrade pip
  # A portable CPU build (no -march=native, no GPU backends), without llama.cpp's own tests and
  # examples; niced, as the build takes both cores for minutes.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    nice -n 19 "$LLAMACPP_PY" -m pip install -q "$LLAMACPP_SPEC" "$GGUF_SPEC" \
    -r "$ROOT/requirements.txt"
  echo "$WANT" > "$STAMP"
}

ensure_llamacpp_venv
cd "$ROOT"
export SVLLM_LLAMACPP_PYTHON="$LLAMACPP_PY"
exec "$PY" -m pytest -m real_llamacpp tests/real_llamacpp -v "$@"
