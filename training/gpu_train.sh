#!/usr/bin/env bash
# Train the GPU model (training/gpu.json: all three stages, then the I-Nets) within one
# device call, resuming where the last call stopped. Usage on the device machine, from the
# repository root: bash training/gpu_train.sh [SECONDS, default 540]
# The run directory comes back as $OUT/gpu-run.tgz; unpack it to runs/gpu here and carry
# runs/gpu with the next call to continue on a fresh machine.
set -uo pipefail
LIMIT=${1:-540}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p runs/gpu "$OUT"
source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > runs/gpu/device.txt
timeout --signal=TERM "$LIMIT" python3 -m dds_fast train all --run-dir runs/gpu --config training/gpu.json
echo "dds-fast train exited with $? (124: stopped at the time limit; the next call resumes)"
for log in runs/gpu/*.log.jsonl; do echo "$log: $(wc -l < "$log") steps; last: $(tail -n 1 "$log")"; done
tar czf "$OUT/gpu-run.tgz" -C runs gpu
