#!/usr/bin/env bash
# Everything a GPU lease should run, in one call: install, the full test suite on CUDA
# (GPU-only tests included), the pytest-benchmark suite and the `dds-fast bench` report.
# Usage on the device machine, from the repository root: bash benchmarks/gpu_session.sh
# Results go under $OUT (at most 8 files): commit what matters under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install --quiet --no-deps --no-build-isolation -e . || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

python -m pytest -q -x tests 2>&1 | tail -40 > "$OUT/tests.txt"
tail -3 "$OUT/tests.txt"

python -m pytest -q benchmarks/bench_layers.py benchmarks/bench_network.py --benchmark-enable \
  --benchmark-max-time=0.25 --benchmark-min-rounds=20 --benchmark-json="$OUT/benchmarks.json" \
  --benchmark-columns=median,iqr,rounds --benchmark-group-by=group 2>&1 | tail -200 > "$OUT/benchmarks.txt"
tail -3 "$OUT/benchmarks.txt"

dds-fast bench --full --dtype float16 --out "$OUT/bench" 2>&1 | tail -60
