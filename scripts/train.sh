#!/usr/bin/env bash
# Installs what training needs, then runs the default Hydra job (overrides pass through: method=lora ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" default-model
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false
exec "$MOL_PY" -m mol.train "$@"
