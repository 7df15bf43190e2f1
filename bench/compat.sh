#!/usr/bin/env bash
# Compatibility run: build tscd and run the CPU test suite against an older torch/triton pair
# (default torch 2.11 + triton 3.6, the oldest pair we support; the GPU machines run it).
#
#   bench/compat.sh                      # full CPU suite (not gpu, not slow)
#   bench/compat.sh tests/kernels -x     # arguments go to pytest (a subset)
#
# Environment:
#   COMPAT_TORCH   torch requirement  (default "torch==2.11.*")
#   COMPAT_TRITON  triton requirement (default "triton==3.6.*")
#   COMPAT_NUMPY   numpy requirement suffix (default "<2.4", see below)
#   COMPAT_DIR     work folder: the venv and a copy of the working tree (default /tmp/tscd-compat)
#   PYTHON         interpreter that creates the venv (default python3)
#
# The working tree (tracked and untracked, not ignored files) is copied into $COMPAT_DIR/src, so the
# checkout's own build (tscd/_C*.so, compiled for the main torch) is left alone; a rerun recompiles only
# the C++ sources that changed. The extension is built
# CPU-only there (TSCD_BUILD_CUDA=0: what we check is the C++ against the older torch headers; the CUDA
# sources are compile-checked by the normal build). Exit status: pytest's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPAT_TORCH="${COMPAT_TORCH:-torch==2.11.*}"
COMPAT_TRITON="${COMPAT_TRITON:-triton==3.6.*}"
COMPAT_DIR="${COMPAT_DIR:-/tmp/tscd-compat}"
PYTHON="${PYTHON:-python3}"
VENV="$COMPAT_DIR/venv"
SRC="$COMPAT_DIR/src"

log() { echo "[compat $(date -u +%H:%M:%S)] $*"; }

mkdir -p "$COMPAT_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python - "$COMPAT_TORCH" "$COMPAT_TRITON" "numpy${COMPAT_NUMPY:-<2.4}" pycocotools <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        if not req.specifier.contains(version(req.name).split("+")[0], prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
then
  log "installing $COMPAT_TORCH $COMPAT_TRITON and the test dependencies"
  # the machine may cap torch with a pip constraints file; an explicit older pin stays inside such a cap
  pip install -q --upgrade pip setuptools wheel packaging
  # numpy < 2.4: triton 3.6's interpreter (the CPU tests' Triton backend) converts 1-element arrays with int(),
  # which numpy 2.4 refuses ("only 0-dimensional arrays can be converted"); triton 3.8 is fine with 2.4
  pip install -q "$COMPAT_TORCH" "$COMPAT_TRITON" "numpy${COMPAT_NUMPY:-<2.4}" "timm>=1.0" pyyaml pillow tqdm \
    tensorboard matplotlib \
    ninja pybind11 pytest pycocotools
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

log "copying the working tree to $SRC"
mkdir -p "$SRC"
# keep the previous build (build/, tscd/_C*.so): ninja recompiles only the sources that changed
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build ! -name tscd -exec rm -rf {} +
[ -d "$SRC/tscd" ] && find "$SRC/tscd" -mindepth 1 -maxdepth 1 ! -name '_C*.so' -exec rm -rf {} +
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | grep -zv '^tscd/_C' |
  xargs -0 tar cf - 2>/dev/null) | (cd "$SRC" && tar xf -)

log "building the extension (CPU kernels; MAX_JOBS=${MAX_JOBS:-1})"
t0=$(date +%s)
(cd "$SRC" && TSCD_BUILD_CUDA=0 TSCD_BUILD_STRICT=1 MAX_JOBS="${MAX_JOBS:-1}" \
  python setup.py -q build_ext --inplace >"$COMPAT_DIR/build.log" 2>&1) ||
  { tail -40 "$COMPAT_DIR/build.log"; log "BUILD FAILED (log: $COMPAT_DIR/build.log)"; exit 2; }
log "built in $(( $(date +%s) - t0 )) s"

log "running pytest ${*:-tests -m 'not gpu and not slow'}"
cd "$SRC"
export PYTHONPATH="$SRC" TSCD_REQUIRE_BACKENDS="${TSCD_REQUIRE_BACKENDS:-cpp,triton,torch}"
python -c "import tscd.kernels._ext as e, tscd._C as c; assert e.has_cpp(), e.load_error(); print('loaded', c.__file__)"
if [ "$#" -gt 0 ]; then
  python -m pytest -q -p no:cacheprovider "$@"
else
  python -m pytest -q -p no:cacheprovider tests -m "not gpu and not slow"
fi
