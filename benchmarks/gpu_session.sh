#!/usr/bin/env bash
# Everything a GPU lease should run, in one call of at most ~9.5 minutes: install, the test
# suite on CUDA (GPU-only tests included), `dds-fast bench` (layers and network, JSON, markdown,
# plot) and the pytest-benchmark suite. Every step has its own time limit, so a slow or hung
# step costs its slot, not the lease; results are packed into $OUT/results.tgz at the end.
# Usage on the device machine, from the repository root (wheels in .whl/ are installed
# first: only the 16-bit PNG tests need pypng, which the image lacks): bash
# benchmarks/gpu_session.sh [full|quick]. quick (at most 6 minutes)
# runs the tests that touch a kernel, the host time per call, the per-kernel breakdown, a forward tile sweep, the
# layer table, the network at batch 8, a profile of its smallest config and the one-graph
# dynamic mode.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-$PWD/gpu-out}
R=$OUT/results
mkdir -p "$R"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*"; }

step install
source benchmarks/gpu_setup.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$R/device.txt" 2>&1
cat "$R/device.txt"

if [ "$MODE" = quick ]; then
  step "kernel tests on CUDA (8 workers)"
  timeout -s INT 95 python3 -m pytest -q -n 8 --timeout 80 -p no:cacheprovider -rfEs tests/test_kernels_conv2d.py \
    tests/test_slim_conv_triton.py tests/test_gate.py tests/test_ddsnet.py tests/test_runner.py tests/test_bench.py > "$R/tests.txt" 2>&1
  tail -25 "$R/tests.txt"
  step "host time per call: our wrappers (kernels stubbed) and with Triton's launches"
  timeout -s INT 30 python3 benchmarks/host_cost.py "$R/host_cost.json" > "$R/host_cost.txt" 2>&1
  cat "$R/host_cost.txt"
  step "per-kernel breakdown against cuDNN"
  timeout -s INT 40 python3 benchmarks/conv_breakdown.py "$R/conv_breakdown.json" > "$R/conv_breakdown.txt" 2>&1
  cat "$R/conv_breakdown.txt"
  step "forward tile sweep, batch 8, 512x512"
  timeout -s INT 45 python3 benchmarks/sweep_forward_tiles.py "$R/sweep_forward_tiles.json" > "$R/sweep.txt" 2>&1
  cat "$R/sweep.txt"
  step "dds-fast bench: layers fp16 (512/256, batch 8/1), network at 8x3x512x512 with CUDA graphs"
  timeout -s INT 90 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 \
    --size 256 --batch 8 --batch 1 --out "$R/bench" > "$R/bench.txt" 2>&1
  tail -70 "$R/bench.txt"
  step "kernels of the smallest network config, batch 8"
  timeout -s INT 30 python3 benchmarks/profile_network.py "$R/profile_network.txt" > /dev/null 2>&1
  head -20 "$R/profile_network.txt"
  step "DDSNet dynamic mode: one graph against a graph per config"
  timeout -s INT 30 python3 -m pytest -q benchmarks/bench_network.py -k "graph" --benchmark-enable \
    --benchmark-max-time=0.1 --benchmark-columns=median,rounds -p no:cacheprovider > "$R/graphs.txt" 2>&1
  grep -E "one graph|per config|passed|failed" "$R/graphs.txt" | tail -5
  step pack
  tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$R"
  exit 0
fi

step "tests on CUDA (8 workers)"
timeout -s INT 170 python3 -m pytest -q -n 8 --timeout 150 -p no:cacheprovider tests -rfEs \
  > "$R/tests.txt" 2>&1
tail -25 "$R/tests.txt"

step "dds-fast bench: layers fp16 (512/256, batch 16/1), network at 1x3x512x512 with CUDA graphs"
timeout -s INT 140 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 --size 256 \
  --batch 1 --batch 16 --out "$R/bench" > "$R/bench.txt" 2>&1
tail -70 "$R/bench.txt"

BENCH="--benchmark-enable --benchmark-max-time=0.1 --benchmark-min-rounds=20 --benchmark-columns=median,iqr,rounds --benchmark-group-by=group -p no:cacheprovider"
step "pytest-benchmark: gate, network configs at batch 1 and 8, dynamic mode, graphs, training step"
timeout -s INT 120 python3 -m pytest -q benchmarks/bench_network.py $BENCH \
  --benchmark-json="$R/bench_network.json" > "$R/bench_network.txt" 2>&1
grep -E "passed|failed|error" "$R/bench_network.txt" | tail -3

step "pytest-benchmark: layer forward+backward fp16"
timeout -s INT 40 python3 -m pytest -q benchmarks/bench_layers.py -k "forward_backward and float16" $BENCH \
  --benchmark-json="$R/bench_layers_fwdbwd.json" > "$R/bench_layers_fwdbwd.txt" 2>&1
grep -E "passed|failed|error" "$R/bench_layers_fwdbwd.txt" | tail -3

step "dds-fast bench bf16 layers (512, batch 16)"
timeout -s INT 25 python3 -m dds_fast bench --full --no-compile --dtype bfloat16 --size 512 --batch 16 \
  --out "$R/bench_bf16" > "$R/bench_bf16.txt" 2>&1

step "pytest-benchmark: torch.compile baseline (c), fp16 forward"
timeout -s INT 40 python3 -m pytest -q benchmarks/bench_layers.py -k "compiled" $BENCH \
  --benchmark-json="$R/bench_layers_compiled.json" > "$R/bench_layers_compiled.txt" 2>&1
grep -E "passed|failed|error" "$R/bench_layers_compiled.txt" | tail -3

step pack
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$R"
step done
