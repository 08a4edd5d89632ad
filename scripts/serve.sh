#!/usr/bin/env bash
# Fresh machine → the service on its embedded default: creates .venv (CPU torch 2.13.0), installs the
# project and the default base model (scripts/venv.sh), then runs `peer-service serve` (SQLite + local store
# under ./data/service, Celery's filesystem transport, one API process and one worker per queue; no other
# service needed).
# Open http://127.0.0.1:8000/docs. Arguments go to `peer-service serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/peer-service serve "$@"
