#!/usr/bin/env bash
# Install onthefly with its test extras in ./.venv and run the whole test suite.
set -euo pipefail

# The web dashboard's browser tests drive Debian's headless Chromium and its driver; install them
# once when missing (selenium must never download a browser or driver of its own).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: the dashboard tests need /usr/bin/chromium and /usr/bin/chromedriver" \
         "(Debian packages chromium, chromium-driver); install them and run again" >&2
    exit 1
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "scripts/test.sh: installing chromium and chromium-driver for the dashboard's browser tests" >&2
  if ! $SUDO apt-get update -q >/dev/null || \
     ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; then
    echo "scripts/test.sh: apt-get could not install chromium and chromium-driver" >&2
    exit 1
  fi
fi

. "$(dirname "$0")/_venv.sh" dev
# Two workers: half the suite waits on child processes, sockets and dashboards, so a 2-core
# machine runs two test processes in about 70% of the time of one.
python -m pytest -n "${ONTHEFLY_TEST_WORKERS:-2}" --durations=20 "$@"
