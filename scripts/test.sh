#!/usr/bin/env bash
# Install onthefly with its test extras in ./.venv and run the whole test suite.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev
python -m pytest "$@"
