#!/usr/bin/env bash
# Install onthefly in ./.venv and run the quickstart demo (streams to a dashboard if one listens).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" explorer
python examples/quickstart.py "$@"
