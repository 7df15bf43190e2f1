#!/usr/bin/env bash
# The prepared GPU check: install tscd into this machine's Python (its torch untouched), then run every GPU
# stage with its own time budget; results (JSON, markdown summary, log) go to OUT_DIR. Details and stages:
# bench/gpu_check.py (python bench/gpu_check.py --help).
#
#   bench/gpu_check.sh OUT_DIR               # on a GPU machine: budgeted at 450 s in all, build included
#   bench/gpu_check.sh OUT_DIR --dry-run     # the same stages on the CPU at tiny sizes (no install)
#   PYTHON=/opt/venv/bin/python bench/gpu_check.sh OUT_DIR --stages pytest,bench_ops
set -uo pipefail
if [ "$#" -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bench/gpu_check.sh OUT_DIR [--dry-run] [gpu_check.py options]" >&2
  exit 2
fi
OUT="$1"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT"
exec "$PY" "$ROOT/bench/gpu_check.py" --out "$OUT" "$@"
