#!/usr/bin/env bash
# Creates .venv (once) and installs mol with what the given extras need. Sourced by train.sh and test.sh.
# MOL_PYTHON=/path/to/python uses an existing interpreter (e.g. one with your CUDA build of torch) instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-dev}"
if [ -n "${MOL_PYTHON:-}" ]; then
    PY="$MOL_PYTHON"
else
    [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
    PY="$ROOT/.venv/bin/python"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Any torch >= 2.6 the user already has is kept; on a machine without one, 2.13.0 is installed first so
# the dependency resolver does not pull the newest (multi-GB CUDA) build on its own.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e "$ROOT[$EXTRAS]"
export MOL_PY="$PY"
