#!/usr/bin/env bash
# Installs what the tests need, then runs them on the CPU (Triton kernels under its interpreter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" dev
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$MOL_PY" -m pytest -q -p no:cacheprovider "$@"
