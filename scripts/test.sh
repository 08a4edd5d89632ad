#!/usr/bin/env bash
# Creates .venv (CPU torch 2.13.0 from the local wheel cache) with the project, its test extras and the default
# base model (scripts/venv.sh), installs Debian's Chromium for the console's browser tests when it is missing,
# and runs the test suite.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium and chromium-driver for the console's browser tests"
    if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      echo "could not install chromium: the browser tests will skip"
    fi
  else
    echo "no /usr/bin/chromium and no way to install it here (needs root and apt-get): the browser tests will skip"
  fi
fi
bash scripts/venv.sh test
.venv/bin/python -m pytest "$@"
