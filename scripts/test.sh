#!/usr/bin/env bash
# Creates .venv (CPU torch 2.13.0 from the local wheel cache), installs the project with its test extras,
# and runs the test suite. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pytest "$@"
