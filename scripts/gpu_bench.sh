#!/usr/bin/env bash
# Run the kvjax benchmark on a GPU machine in one call and write its table to a file.
#   scripts/gpu_bench.sh            # -> $OUT/benchmarks_gpu.md (or runs/ when OUT is unset)
# Needs a Python with jax[cuda] and kvjax installed (PY=..., default: .venv/bin/python, else
# python3), and gymnax (pip install -e ".[gymnax]") for the Asterix-MinAtar baseline of the
# standard-path table (vmap(env.step) with auto-reset, observation consumed; without gymnax the
# kv-cache-v0 rows are still measured). Batch sizes go up to 2^20 on an accelerator; override
# with BATCHES="1 4096 ...". Tested on the CPU: BATCHES="64" REPEATS=1 OUT=$(mktemp -d) scripts/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DEST="${OUT:-runs}"
mkdir -p "$DEST"
"$PY" -c "import jax; print('backend:', jax.default_backend(), jax.devices())"
"$PY" -c "import gymnax; print('gymnax installed: Asterix-MinAtar baseline')" 2>/dev/null \
  || echo "gymnax not installed: the standard-path table has no Asterix-MinAtar baseline"
# shellcheck disable=SC2086
"$PY" -m kvjax.cli bench --repeats "${REPEATS:-5}" \
  ${BATCHES:+--batch-sizes $BATCHES} \
  --write "$DEST/benchmarks_gpu.md" --json > "$DEST/benchmarks_gpu.json"
cat "$DEST/benchmarks_gpu.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
  >> "$DEST/benchmarks_gpu.md" || true
echo "wrote $DEST/benchmarks_gpu.md and $DEST/benchmarks_gpu.json"
