#!/bin/sh
# The one install recipe. `make install` (and so CI, through `make test`) runs it on the host;
# every image in docker/ runs it too, so what CI installs is what the images install.
#   docker/install.sh VENV [full|engine]
#   full:   the whole toolchain with test tools (torch 2.14.1, onnx, onnxruntime, ...)
#   engine: only what `toolchain engine build/check` needs on a TensorRT device (no torch)
set -eu
VENV="${1:-.venv}"
MODE="${2:-full}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv ${VENV_FLAGS:-} "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
case "$MODE" in
  full)   "$VENV/bin/python" -m pip install --quiet -e '.[test]' ;;
  engine) "$VENV/bin/python" -m pip install --quiet --no-deps -e . &&
          "$VENV/bin/python" -m pip install --quiet click numpy onnx 'cuda-python>=12' ;;
  *)      echo "usage: docker/install.sh VENV [full|engine]" >&2; exit 2 ;;
esac
