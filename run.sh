#!/usr/bin/env bash
# One command per job, on a fresh machine:
#   ./run.sh lab          set up .venv from the lock and start JupyterLab on notebooks/ (its root: the repository)
#   ./run.sh test         set up .venv from the lock and run the unit tests and every notebook (offline, tiny checkpoint)
#   ./run.sh lock         regenerate the lock (requirements.txt): newest releases pyproject.toml allows, torch kept
#   ./run.sh test-latest  drift check: throwaway .venv-latest with the newest allowed releases, the unit tests
# Extra arguments go to jupyter lab / pytest. PYTHON=python3.11 ./run.sh ... picks the interpreter.
# TORCH=2.x.y ./run.sh lock|test-latest changes torch (default: the lock's version, so that a drift is
# transformers' and the others', not torch's). On Linux, PyPI's torch of any version is the CUDA build
# (GBs of nvidia-* packages); PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build.
set -euo pipefail
cd "$(dirname "$0")"

LOCK_TOOL="pip-tools==7.6.2"

locked_version() {  # the version of package $1 in the lock
  sed -n "s/^$1==//p" requirements.txt
}

venv() {  # create (once) and activate the virtual environment in folder $1
  [ -x "$1/bin/python" ] || "${PYTHON:-python3}" -m venv "$1"
  local version locked  # the lock is resolved for TESTED_VERSIONS["python"] (phi_helpers/versions.py)
  version="$("$1/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  locked="$(sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p' phi_helpers/versions.py)"
  if [ "$version" != "$locked" ]; then
    echo "warning: $1 uses Python $version; the lock is resolved for Python $locked (3.11 or newer is required), so" >&2
    echo "  some pinned versions may have no wheels here. If the install fails: rm -rf $1 and run again with PYTHON=python$locked ./run.sh ..." >&2
  fi
  # shellcheck disable=SC1091
  . "$1/bin/activate"
}

setup() {  # .venv with exactly the lock's versions, plus this package (editable); offline once installed
  venv .venv
  local stamp=.venv/installed-lock.sha256 wanted  # the lock and pyproject.toml this .venv was installed from
  wanted="$(python -c 'import hashlib; print(hashlib.sha256(open("requirements.txt", "rb").read() + open("pyproject.toml", "rb").read()).hexdigest())')"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
    return  # installed from this lock already: no package index needed (a workshop's day without network)
  fi
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r requirements.txt
  python -m pip install --quiet --no-deps -e .
  echo "$wanted" > "$stamp"
}

lock() {
  venv .venv-lock  # the lock tool lives in its own environment, not in .venv
  python -m pip install --quiet --upgrade pip "$LOCK_TOOL"
  CUSTOM_COMPILE_COMMAND="./run.sh lock" pip-compile --quiet --upgrade --upgrade-package "torch==${TORCH:-$(locked_version torch)}" \
    --extra notebooks --extra test --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
    --output-file requirements.txt pyproject.toml
  # A CPU wheel (e.g. from --find-links) pins torch==X+cpu; the lock names the plain version so that
  # every platform resolves it from PyPI.
  { echo "# The lock: exact versions of everything ./run.sh lab|test installs (pyproject.toml's dependencies"
    echo "# and extras notebooks, test). Regenerate it with ./run.sh lock, never by hand."
    sed -E -e 's/^torch==([^+ ]+)\+cpu/torch==\1/' \
      -e 's/^(triton==[^ ]+)$/\1 ; platform_system == "Linux" and platform_machine == "x86_64"/' requirements.txt; } > requirements.txt.new
  mv requirements.txt.new requirements.txt
  # triton is allowed: xgrammar needs it on Linux x86_64 only (its GPU mask kernel), and has no wheels for macOS or
  # Windows, so its pin gets xgrammar's marker (pip-compile resolves on this machine and drops markers); a CUDA
  # torch shows as nvidia-*.
  if grep -E '^nvidia-' requirements.txt; then
    echo "error: the lock pulled CUDA packages (above): resolve torch with its CPU wheel, e.g." >&2
    echo "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./run.sh lock" >&2
    exit 1
  fi
  echo "requirements.txt updated; now run ./run.sh test and update TESTED_VERSIONS and the README if they moved."
}

test_latest() {
  rm -rf .venv-latest
  venv .venv-latest
  python -m pip install --quiet --upgrade pip
  local torch="torch==${TORCH:-$(locked_version torch)}"  # held at the lock's unless TORCH says otherwise
  # the extras the lock holds: test (pytest, Ray, torchao) and notebooks (ipywidgets for the widget tests)
  python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[notebooks,test]" "$torch"
  echo "Drift check with the newest releases pyproject.toml allows ($torch):"
  python - <<'PY'
import importlib.metadata, re
canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lock = {canonical(n): v for n, v in re.findall(r"^(\S+)==(\S+)", open("requirements.txt").read(), re.M)}
installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
for name, version in sorted(installed.items()):
    if name not in ("phi-helpers", "pip"):
        locked = lock.get(name)
        note = "" if locked == version.split("+")[0] else "  (not in the lock)" if locked is None else f"  (lock: {locked})"
        print(f"  {name}=={version}{note}")
PY
  # every unit test (tests/); the notebooks take minutes more and run the same code
  python -m pytest -p no:cacheprovider tests "$@"
}

case "${1:-}" in
  lab)
    shift
    setup
    if [ "$(id -u)" -eq 0 ]; then set -- --allow-root "$@"; fi  # containers often run as root
    # The repository is the root, so that the notebooks' links to ../docs/ and ../benchmarks/ open;
    # the file browser starts in notebooks/.
    exec jupyter lab --notebook-dir=. --LabApp.default_url=/lab/tree/notebooks "$@"
    ;;
  test)
    shift
    setup
    exec python -m pytest "$@"
    ;;
  lock)
    lock
    ;;
  test-latest)
    shift
    test_latest "$@"
    ;;
  *)
    echo "usage: ./run.sh lab|test|lock|test-latest [extra arguments]" >&2
    exit 2
    ;;
esac
