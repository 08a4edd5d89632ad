#!/usr/bin/env bash
# Fresh machine → the service on its embedded default: creates .venv (CPU torch 2.13.0), installs the
# project, then runs `peer-service serve` (SQLite + local store under ./data/service, Celery's filesystem
# transport, one API process and one worker per queue; no other service needed).
# Open http://127.0.0.1:8000/docs. Arguments go to `peer-service serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/peer-service serve "$@"
