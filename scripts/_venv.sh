# Sourced by scripts/demo.sh and scripts/test.sh: create ./.venv once and install onthefly into it.
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ONTHEFLY_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e "$ROOT[$1]"
cd "$ROOT"
