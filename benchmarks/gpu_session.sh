#!/usr/bin/env bash
# Everything a GPU lease should run, in one call of at most ~9.5 minutes: install, the test
# suite on CUDA (GPU-only tests included), `dds-fast bench` (layers and network, JSON, markdown,
# plot) and the pytest-benchmark suite. Every step has its own time limit, so a slow or hung
# step costs its slot, not the lease; results are packed into $OUT/results.tgz as each step
# begins and at the end (a call stopped at its limit keeps the steps before; beside it in $OUT
# only the trained model's archives, in the modes that train).
# Usage on the device machine, from the repository root (wheels in .whl/ are installed
# first: only the 16-bit PNG tests need pypng, which the image lacks): bash
# benchmarks/gpu_session.sh [full|quick|train|verify|model|tests]. model (one whole call): the
# graph-captured training steps' tests, then the GPU model's training for the rest of the
# call. verify (289 s on an H100 before its v14
# to v16 steps, which add at most 195) reruns a quick run's tests with more time, sweeps the
# v14-v16 candidates, times two configs' layers with and without tensor descriptors, profiles
# the routed dynamic forward (packed and max-width buffers; at batch 1 as graph replays, through
# conditional nodes too), times the layers and network again
# (the run-to-run spread) and the shipped model's routes; with HOST_COST=1 (90 s more) also the
# host time per call and a host-side profile of a launched training step. quick (its step limits add up to 9.5
# minutes, 11.0 with HOST_COST=1; it took 5.4 with HOST_COST=1 on an H100, where the tests alone need 96 s) runs
# the tests that touch a kernel, the host time per call only with HOST_COST=1 (90 s more), the
# layer table, the network at batch 8, a forward tile sweep, a profile of a layer's training
# step, each layer of three network configs alone, the per-kernel breakdown and the gate
# head's kernels. train (one whole call, 590 s): the gate
# head's profile, the layer and network tables at 512x512 (batch 1 and 8) and each layer of
# three network configs, on a quiet GPU; the graph-captured training step's test
# (tests/test_graphed.py); then the GPU model's training (training/gpu_train.sh, its steps
# replayed as CUDA graphs) for the rest of the call but the last 110 s, which run the kernel
# tests. tests (one whole call): the whole suite on CUDA, each result printed as it comes (on
# an H200 the tests that touch a kernel took 119 s on 8 workers, the other 870 more than 190 s;
# the sm_90 build test alone takes minutes on a cold cache, so no test is stopped before 540 s).
# next (one call under a 15-minute lease, 575 s unless BUDGET says less): what no GPU has
# run since v24, most needed first: the whole suite on CUDA with each result printed (v24's
# two test fixes, the six unnamed failures outside the kernel files, the graphed training
# steps), then v24's stem tiles and v26's host time (the layer table's batch-1 eager rows) in
# dds-fast bench, v25's per-image tiles in the shipped model's dynamic forward, and the routed
# forward kernel by kernel (v27's per-image grid against the widest image's).
# (Nsight Compute: benchmarks/ncu_forward.py says how.)
set -uo pipefail
MODE=${1:-full}
case $MODE in  # a mistyped mode would run the full session
  full|quick|train|verify|model|tests|next) ;;
  *) echo "gpu_session.sh: unknown mode '$MODE': use full, quick, train, verify, model, tests or next" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/gpu-out}
# The results gather outside $OUT, which brings back 8 files at most: $OUT holds one archive of
# them, packed again at each step's start, so a call stopped at its limit keeps every step before
WORK=${DDS_SESSION_WORK:-/tmp/dds-session}
R=$WORK/results
rm -rf "$R"
mkdir -p "$R" "$OUT"
export PYTHONUNBUFFERED=1
pack() {
  tar czf "$OUT/results.tgz.part" -C "$WORK" results && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}
step() {
  [ -n "$(ls -A "$R")" ] && pack
  echo "== $(date +%T) $*"
}
finish() {
  pack
  echo "== $(date +%T) packed $OUT/results.tgz"
  exit 0
}
# A test step stopped at its limit can leave pytest-xdist workers running on the GPU, sharing
# it with every timing after: the H100 run of v12 timed its host costs right after such a
# step (NOTES v17). Each test step ends with this: whatever still runs tests is killed, and said.
# Only this session's (-s 0): its steps' pytest runs and their workers, never another user's.
# Never this script or the shells that started it: a command line that names "-m pytest"
# (bash -c '... gpu_session.sh next; python3 -m pytest ...') would match too.
quiet_gpu() {
  local pids="" pid ancestors=" " p=$$ stat
  while [ "${p:-0}" -gt 1 ]; do
    ancestors+="$p "
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || break
    # the parent's pid: the field after the state, past the command name (which may hold spaces)
    read -r _ p _ <<< "${stat##*) }"
  done
  for pid in $(pgrep -s 0 -f -- '-m pytest|exec\(eval\(sys\.stdin'); do
    case "$ancestors" in *" $pid "*) ;; *) pids+="$pid " ;; esac
  done
  if [ -n "${pids// /}" ]; then
    echo "test processes still running after the step, killed: $pids"
    kill -9 $pids 2>/dev/null
    sleep 2
  fi
}
# verify's steps: a time limit cut to what is left of the call's BUDGET seconds (575 unless
# set: a second call on a warm machine may have less), or the step skipped
BUDGET=${BUDGET:-575}
capped() {
  local limit=$1 left=$((BUDGET - SECONDS)); shift
  if [ "$left" -le 15 ]; then echo "skipped, no time left: $*"; return 0; fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout -k 10 -s INT "$limit" "$@"
}

step install
source benchmarks/gpu_setup.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # DDSNet.route_branches needs these (NOTES v19): torch's own (2.13), or the driver's through cuda-python
  python3 -c "from dds_fast.graph_if import conditional_nodes_source as c; print('CUDA-graph conditional nodes from:', c())"
} > "$R/device.txt" 2>&1
cat "$R/device.txt"

# The graphed training steps' GPU tests; unless the torch backend's passed, the training that
# follows runs with graphs off (GPU_CONFIG: training/gpu.json with "graphs": false).
graphed_or_eager() {
  step "graph-captured training steps against eager ones (the training below replays them)"
  # -v: each result is printed as it comes, so a step stopped at its limit keeps those before
  timeout -k 10 -s INT 90 python3 -m pytest -v -n 0 -p no:cacheprovider tests/test_graphed.py -k gpu \
    > "$R/tests_graphed.txt" 2>&1
  quiet_gpu
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$R/tests_graphed.txt" | tail -6
  if ! grep -q "test_gpu_graphed_sandwich_trains_as_the_eager_one\[torch\] PASSED" "$R/tests_graphed.txt"; then
    python3 -c "import json; c = json.load(open('training/gpu.json')); c['graphs'] = False; \
json.dump(c, open('$R/gpu-eager.json', 'w'))"
    export GPU_CONFIG="$R/gpu-eager.json"
    echo "graphed steps not confirmed on this GPU: training with graphs off ($GPU_CONFIG)"
  fi
}

if [ "$MODE" = tests ]; then
  step "the whole test suite on CUDA (12 workers)"
  # -v: each result as it comes, so a run stopped at its limit keeps the names of its failures
  timeout -k 10 -s INT $((BUDGET - 5 - SECONDS)) python3 -m pytest -v -n 12 --timeout 540 -p no:cacheprovider -rfEs tests \
    > "$R/tests.txt" 2>&1
  quiet_gpu
  grep -E "FAILED|ERROR" "$R/tests.txt" | sort -u | head -40
  tail -3 "$R/tests.txt"
  finish
fi

if [ "$MODE" = next ]; then
  step "the whole test suite on CUDA (14 workers), each result as it comes"
  # (the sm_90 build test compiles on the CPU for minutes on a cold cache: CI's second stage runs it)
  capped 330 python3 -m pytest -v -n 14 --timeout 300 -p no:cacheprovider -rfEs tests \
    --ignore tests/test_compile_sm90.py > "$R/tests.txt" 2>&1
  quiet_gpu
  grep -E "FAILED|ERROR" "$R/tests.txt" | sort -u | head -40
  tail -3 "$R/tests.txt"
  step "dds-fast bench: layers fp16 512, batch 8/1, network with CUDA graphs (v24: the stem's tiles; v26: batch-1 eager layers)"
  capped 110 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 \
    --batch 8 --batch 1 --out "$R/bench" > "$R/bench.txt" 2>&1
  grep -E "^\| network|^\| gate" "$R/bench.txt" | cut -c1-200
  # (after the general bench, whose layer table it repeats first, its kernels compiled by then)
  step "the shipped model's routes and dynamic forward at 512x512 (v25: per-image tiles as the static ones)"
  capped 50 python3 -m dds_fast bench --checkpoint dds_fast/weights/dds.safetensors --no-compile \
    --cuda-graph --dtype float16 --size 512 --batch 1 --batch 8 --out "$R/bench_shipped" > "$R/bench_shipped.txt" 2>&1
  tail -12 "$R/bench_shipped.txt" | cut -c1-200
  step "the routed dynamic forward kernel by kernel, against each route's config alone (v27: the per-image grid)"
  capped 90 python3 benchmarks/profile_network.py --routed smallest --routed largest \
    --grid narrow --grid widest "$R/profile_network_routed.txt" > "$R/profile_network_routed.log" 2>&1
  grep "CUDA time per forward" "$R/profile_network_routed.txt" | cut -c1-220
  finish
fi

if [ "$MODE" = model ]; then
  graphed_or_eager
  step "the GPU model's training for the rest of the call"
  DDS_SETUP_DONE=1 bash training/gpu_train.sh $((BUDGET - 5 - SECONDS)) > "$R/train.txt" 2>&1
  tail -20 "$R/train.txt"
  finish
fi

if [ "$MODE" = train ]; then
  step "the fused gate head's kernels under the profiler"
  timeout -k 15 -s INT 40 python3 benchmarks/profile_gate.py "$R/profile_gate.txt" > "$R/profile_gate.log" 2>&1
  grep -E "gate on|Self CUDA time total|_kernel" "$R/profile_gate.txt" | cut -c1-60,100-175
  step "dds-fast bench: layers fp16 (512, batch 8/1), network and gate at 3x512x512 with CUDA graphs"
  timeout -k 15 -s INT 120 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 \
    --batch 8 --batch 1 --out "$R/bench" > "$R/bench.txt" 2>&1
  tail -45 "$R/bench.txt"
  step "each conv layer of three network configs alone, against cuDNN and its floor"
  timeout -k 15 -s INT 60 python3 benchmarks/network_layers.py --config smallest --config "uniform 0.75" --config largest \
    "$R/network_layers.json" > "$R/network_layers.txt" 2>&1
  grep "sum of layers" "$R/network_layers.txt"
  graphed_or_eager
  # the training times a probe of itself to size its schedule: nothing else may run beside it
  step "training, leaving 110 s for the kernel tests"
  DDS_SETUP_DONE=1 bash training/gpu_train.sh $((BUDGET - 110 - SECONDS)) > "$R/train.txt" 2>&1
  tail -20 "$R/train.txt"
  step "kernel tests on CUDA (8 workers)"
  timeout -k 10 -s INT $((BUDGET - SECONDS)) python3 -m pytest -q -n 8 --timeout 80 -p no:cacheprovider -rfEs \
    tests/test_kernels_conv2d.py tests/test_slim_conv_triton.py tests/test_gate.py tests/test_ddsnet.py > "$R/tests.txt" 2>&1
  quiet_gpu
  tail -25 "$R/tests.txt"
  finish
fi

if [ "$MODE" = verify ]; then
  step "the fast layout's tile test alone, then the tests that touch a kernel (8 workers)"
  capped 45 python3 -m pytest -q -n 0 -p no:cacheprovider -rA tests/test_kernels_conv2d.py \
    -k fast_layout_tiles > "$R/tests_fast_layout.txt" 2>&1
  quiet_gpu
  grep -E "PASSED|FAILED|passed|failed" "$R/tests_fast_layout.txt" | tail -4
  capped 150 python3 -m pytest -q -n 8 --timeout 120 -p no:cacheprovider -rfEs tests/test_kernels_conv2d.py \
    tests/test_slim_conv_triton.py tests/test_gate.py tests/test_ddsnet.py tests/test_graph_if.py tests/test_runner.py \
    tests/test_bench.py tests/test_profile_network.py > "$R/tests.txt" 2>&1
  quiet_gpu
  tail -8 "$R/tests.txt"
  if [ "${HOST_COST:-0}" = 1 ]; then
    step "host time per call, and where a launched training step's host time goes"
    capped 90 python3 benchmarks/host_cost.py "$R/host_cost.json" > "$R/host_cost.txt" 2>&1
    cat "$R/host_cost.txt"
    grep -E "Name|Self CPU time total|Launch|Synchronize|evaluate_function" "$R/host_cost-step-profile.txt" | cut -c1-150
    sed -n '/^Wall time per step/,$p' "$R/host_cost-step-profile.txt"
  fi
  step "v14 and v16 against v13 in one run: 8-channel taps, tensor descriptors, tile candidates; layers of two configs"
  capped 60 python3 benchmarks/sweep_forward_tiles.py "$R/sweep_v16.json" stem eight narrow mid \
    > "$R/sweep_v16.txt" 2>&1
  grep -E "^(stem|eight|narrow|mid)" "$R/sweep_v16.txt"
  capped 40 python3 benchmarks/network_layers.py --config smallest --config largest \
    "$R/network_layers.json" > "$R/network_layers.txt" 2>&1
  grep "sum of layers" "$R/network_layers.txt"
  capped 40 python3 benchmarks/network_layers.py --tma --config smallest --config largest \
    "$R/network_layers_tma.json" > "$R/network_layers_tma.txt" 2>&1
  grep "sum of layers" "$R/network_layers_tma.txt"
  step "the routed dynamic forward kernel by kernel, against each route's config alone (v27: the per-image grid)"
  capped 90 python3 benchmarks/profile_network.py --routed smallest --routed largest \
    --grid narrow --grid widest "$R/profile_network_routed.txt" > "$R/profile_network_routed.log" 2>&1
  grep "CUDA time per forward" "$R/profile_network_routed.txt" | cut -c1-220
  # v24: routing through conditional graph nodes took 1.83x the smallest route alone at batch 1
  capped 60 python3 benchmarks/profile_network.py --graphs --batch 1 --routed smallest --tiles narrowest \
    --tiles branches "$R/profile_network_graphs.txt" > "$R/profile_network_graphs.log" 2>&1
  grep "CUDA time per forward" "$R/profile_network_graphs.txt" | cut -c1-220
  step "dds-fast bench again (the run-to-run spread): layers fp16 512, batch 8/1, network with CUDA graphs"
  capped 110 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 \
    --batch 8 --batch 1 --out "$R/bench" > "$R/bench.txt" 2>&1
  grep -E "^\| network|^\| gate" "$R/bench.txt" | cut -c1-200
  step "the shipped model's routes and gate at 512x512"
  capped 50 python3 -m dds_fast bench --checkpoint dds_fast/weights/dds.safetensors --no-compile \
    --cuda-graph --dtype float16 --size 512 --batch 1 --batch 8 --out "$R/bench_shipped" > "$R/bench_shipped.txt" 2>&1
  tail -12 "$R/bench_shipped.txt" | cut -c1-200
  finish
fi

if [ "$MODE" = quick ]; then
  step "kernel tests on CUDA (8 workers)"
  timeout -k 15 -s INT 140 python3 -m pytest -q -n 8 --timeout 120 -p no:cacheprovider -rfEs tests/test_kernels_conv2d.py \
    tests/test_slim_conv_triton.py tests/test_gate.py tests/test_ddsnet.py tests/test_runner.py tests/test_bench.py > "$R/tests.txt" 2>&1
  quiet_gpu
  tail -25 "$R/tests.txt"
  if [ "${HOST_COST:-0}" = 1 ]; then
    step "host time per call: our wrappers (kernels stubbed), cached launches, Triton's JIT launch"
    timeout -k 15 -s INT 90 python3 benchmarks/host_cost.py "$R/host_cost.json" > "$R/host_cost.txt" 2>&1
    cat "$R/host_cost.txt"
  fi
  step "dds-fast bench: layers fp16 (512/256, batch 8/1), network at 8x3x512x512 with CUDA graphs"
  timeout -k 15 -s INT 150 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 \
    --size 256 --batch 8 --batch 1 --out "$R/bench" > "$R/bench.txt" 2>&1
  tail -32 "$R/bench.txt"
  step "one training step of the benchmark's layer under the profiler: Triton and cuDNN"
  timeout -k 15 -s INT 40 python3 benchmarks/profile_layer_step.py "$R/profile_layer_step.txt" \
    > "$R/profile_layer_step.log" 2>&1
  grep -E "forward\+backward|Self CUDA time total|_kernel|void|sm[0-9]+_" "$R/profile_layer_step.txt" | cut -c1-60,141-215 | head -30
  step "each conv layer of three network configs alone, against cuDNN and its floor"
  python3 -c "import torch, torch.nn.functional as F; x = torch.randn(1, 16, 8, 8, device='cuda').to(
memory_format=torch.channels_last); y = F.pixel_shuffle(x, 2); print('pixel_shuffle of a channels_last CUDA tensor:',
y.stride(), 'channels_last' if y.is_contiguous(memory_format=torch.channels_last) else 'not channels_last')" \
    | tee "$R/pixel_shuffle.txt"
  timeout -k 15 -s INT 60 python3 benchmarks/network_layers.py --config smallest --config "uniform 0.75" --config largest \
    "$R/network_layers.json" > "$R/network_layers.txt" 2>&1
  grep "sum of layers" "$R/network_layers.txt"
  step "per-kernel breakdown against cuDNN"
  timeout -k 15 -s INT 40 python3 benchmarks/conv_breakdown.py "$R/conv_breakdown.json" > "$R/conv_breakdown.txt" 2>&1
  cat "$R/conv_breakdown.txt"
  step "forward tile sweep: narrow (Cmax 64, 512x512), wide (Cmax 384, 64x64) and per-image layers, batch 8"
  timeout -k 15 -s INT 100 python3 benchmarks/sweep_forward_tiles.py "$R/sweep_forward_tiles.json" > "$R/sweep.txt" 2>&1
  cat "$R/sweep.txt"
  step "the fused gate head's kernels under the profiler"
  timeout -k 15 -s INT 40 python3 benchmarks/profile_gate.py "$R/profile_gate.txt" > "$R/profile_gate.log" 2>&1
  grep -E "gate on|Self CUDA time total|_kernel" "$R/profile_gate.txt" | cut -c1-60,100-175
  finish
fi

step "tests on CUDA (8 workers)"
timeout -k 15 -s INT 170 python3 -m pytest -q -n 8 --timeout 150 -p no:cacheprovider tests -rfEs \
  > "$R/tests.txt" 2>&1
quiet_gpu
tail -25 "$R/tests.txt"

step "dds-fast bench: layers fp16 (512/256, batch 16/1), network at 1x3x512x512 with CUDA graphs"
timeout -k 15 -s INT 140 python3 -m dds_fast bench --full --no-compile --cuda-graph --dtype float16 --size 512 --size 256 \
  --batch 1 --batch 16 --out "$R/bench" > "$R/bench.txt" 2>&1
tail -70 "$R/bench.txt"

# -n 0: one process (pytest.ini asks xdist for every core, under which pytest-benchmark times nothing)
BENCH="-n 0 --benchmark-enable --benchmark-max-time=0.1 --benchmark-min-rounds=20 --benchmark-columns=median,iqr,rounds --benchmark-group-by=group -p no:cacheprovider"
step "pytest-benchmark: gate, network configs at batch 1 and 8, dynamic mode, graphs, training step"
timeout -k 15 -s INT 120 python3 -m pytest -q benchmarks/bench_network.py $BENCH \
  --benchmark-json="$R/bench_network.json" > "$R/bench_network.txt" 2>&1
quiet_gpu
grep -E "passed|failed|error" "$R/bench_network.txt" | tail -3

step "pytest-benchmark: layer forward+backward fp16"
timeout -k 15 -s INT 40 python3 -m pytest -q benchmarks/bench_layers.py -k "forward_backward and float16 and not bfloat16" $BENCH \
  --benchmark-json="$R/bench_layers_fwdbwd.json" > "$R/bench_layers_fwdbwd.txt" 2>&1
quiet_gpu
grep -E "passed|failed|error" "$R/bench_layers_fwdbwd.txt" | tail -3

step "dds-fast bench bf16 layers (512, batch 16)"
timeout -k 15 -s INT 25 python3 -m dds_fast bench --full --no-compile --dtype bfloat16 --size 512 --batch 16 \
  --out "$R/bench_bf16" > "$R/bench_bf16.txt" 2>&1

step "pytest-benchmark: torch.compile baseline (c), fp16 forward"
timeout -k 15 -s INT 40 python3 -m pytest -q benchmarks/bench_layers.py -k "compiled" $BENCH \
  --benchmark-json="$R/bench_layers_compiled.json" > "$R/bench_layers_compiled.txt" 2>&1
quiet_gpu
grep -E "passed|failed|error" "$R/bench_layers_compiled.txt" | tail -3

finish
