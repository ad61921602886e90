#!/usr/bin/env bash
# One command per job, on a fresh machine:
#   ./run.sh lab    set up .venv and start JupyterLab on notebooks/
#   ./run.sh test   set up .venv and run the unit tests and every notebook (offline, tiny checkpoint)
# Extra arguments go to jupyter lab / pytest. PYTHON=python3.11 ./run.sh ... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  python -m pip install --quiet --upgrade pip
  # The tested torch; on Linux with an NVIDIA GPU, PyPI's wheel is the CUDA build.
  python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -r requirements.txt
  python -m pip install --quiet --no-deps -e .
}

case "${1:-}" in
  lab)
    shift
    setup
    exec jupyter lab --notebook-dir=notebooks "$@"
    ;;
  test)
    shift
    setup
    exec python -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh lab|test [extra arguments]" >&2
    exit 2
    ;;
esac
