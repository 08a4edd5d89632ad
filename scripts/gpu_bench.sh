#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine without network (BENCHMARKS.md section 7).
#
# Carry build/gpu-wheels (peer-pytorch 0.2.2 and the packages it needs that such a machine lacks; made
# here with the `pip download` line in benchmarks/gpu.py's docstring). They are installed into /tmp/site
# with no index and no dependency resolution; without them part 3 records "peer-pytorch not available".
# Results: $OUT/gpu.json and $OUT/gpu.log when OUT is set (the device tool's folder), else runs/.
# Extra arguments go to the script (e.g. --budget-s 300, --small, --parts copy expert_mix).
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-runs}"
mkdir -p "$dest"
PYTHON="${PYTHON:-python3}"
site="${PEER_WHEEL_SITE:-/tmp/site}"
if compgen -G "build/gpu-wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        build/gpu-wheels/*.whl || {
        echo "pip install failed: unpacking the wheels (pure Python) into $site instead"
        for wheel in build/gpu-wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$site"; done
    }
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null | tee "$dest/nvidia-smi.txt"
"$PYTHON" benchmarks/gpu.py --out "$dest/gpu.json" "$@" 2>&1 | tee "$dest/gpu.log"
