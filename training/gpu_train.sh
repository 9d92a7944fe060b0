#!/usr/bin/env bash
# Train the GPU model (training/gpu.json: all three stages, then the I-Nets) within one
# device call, the schedule sized to the time left (training/gpu_train.py). Usage on the
# device machine, from the repository root: bash training/gpu_train.sh [SECONDS, default 540]
# (GPU_CONFIG=FILE: another config than training/gpu.json)
# The results come back as $OUT/gpu-run.tgz (the stages' weights, logs, the sized config) and
# $OUT/gpu-inets.tgz (the I-Nets; a returned file holds at most 16 MB). The resumable state
# (weights with the optimizer's moments: about 7 MB a stage at base width 24) stays there.
set -uo pipefail
LIMIT=${1:-540}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p runs/gpu "$OUT"
[ -n "${DDS_SETUP_DONE:-}" ] || source benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > runs/gpu/device.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> runs/gpu/device.txt
# the budget leaves the packing a margin; the hard limit stops a run that overruns its plan
timeout --signal=TERM "$LIMIT" python3 training/gpu_train.py --config "${GPU_CONFIG:-training/gpu.json}" --run-dir runs/gpu \
  --budget $((LIMIT - 25))
echo "training exited with $? (124: stopped at the time limit; a next call on this machine while it is warm resumes \
from runs/gpu, whose state files stay here: a fresh machine starts over)"
for log in runs/gpu/*.log.jsonl; do echo "$log: $(wc -l < "$log") steps; last: $(tail -n 1 "$log")"; done
tar czf "$OUT/gpu-run.tgz" -C runs --exclude '*.state.safetensors' --exclude 'inet-*' --exclude stage1.safetensors gpu
tar czf "$OUT/gpu-inets.tgz" -C runs --exclude '*.state.safetensors' $(cd runs && ls gpu/inet-* 2>/dev/null)
ls -l "$OUT"
