"""Train a model within a time budget (one device call), resuming where the last call stopped.

The first call times a probe of stage-1 steps of ``--config`` and sizes the schedule to the budget:
stage-1 steps S, refine S steps (every route at every step: the middle routes, which stage 1
samples rarely, trailed their I-Nets until refine ran long; the CPU model took 12,000 refine
steps after 7,000 of stage 1), the I-Nets 2 S steps each (as many as the routes get from
stage 1 and refine: a comparison of equally trained networks) and the gate's steps as
configured. With ``graphs`` in the config, the probe times replayed steps (after their
warm-up), and the eager steps' costs are counted in seconds. That plan is written to ``RUN_DIR/config.json``
before any training, and a later call (a fresh machine, the run directory carried back)
resumes with it instead of timing again. The stages then run one after another (``dds-fast
train all``), as the plan's arithmetic assumes.

Usage: python3 training/gpu_train.py --config training/gpu.json --run-dir runs/gpu --budget 420
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dds_fast.checkpoint import atomic_write

# Random sandwich configs meet new conv shapes for many steps, each slow the first time (an
# H200 run of training/gpu.json: 82 ms per step over steps 20-40, 41 ms over the whole run;
# a 40-step probe planned for 91 ms and the run used 373 of its 520 s), so the probe is long
# and times its last third.
PROBE_STEPS = 150
# Costs in stage-1 steps, for sizing, from that run: a refine step is a stage-1 step (39 ms,
# the same sandwich); the four I-Nets 1.7 together (17-18 ms each, launch-bound at these
# sizes); a gate step 2.6 (108 ms: the largest and smallest configs on a batch twice as large)
INETS_STEP_COST = 1.7
GATE_STEP_COST = 2.6
# With ``graphs`` (not yet measured): a replayed I-Net step runs one sub-network at its own
# width against a stage-1 step's four at full width, but the host's 3-4 ms of data per step
# (crops, the noise model's 280 launches) no longer hides behind it, so the four I-Nets keep
# their cost in stage-1 steps; the gate's steps stay eager, at the seconds measured above.
GATE_STEP_SECONDS = 0.108
FIXED_SECONDS = 60  # stage 2's validation passes (about 20 s there), starts, the last checkpoints
REFINE_PER_STAGE1_STEP = 1.0


def train(stage: str, run_dir: Path, config: Path, *extra: str) -> None:
    """``dds-fast train STAGE`` in its own process (a stage's failure stops the run)."""
    command = [sys.executable, "-m", "dds_fast", "train", stage, "--run-dir", str(run_dir), "--config", str(config),
               *extra]
    print("$", " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}")


def seconds_per_step(config: Path) -> float:
    """The median time of the last third of ``PROBE_STEPS`` stage-1 steps."""
    with tempfile.TemporaryDirectory() as scratch:
        train("stage1", Path(scratch), config, "--steps", str(PROBE_STEPS), "--checkpoint-every", str(PROBE_STEPS))
        records = [json.loads(line) for line in (Path(scratch) / "stage1.log.jsonl").read_text().splitlines()]
    return statistics.median(r["time"] for r in records[-(PROBE_STEPS // 3):])


def plan(options: dict, step_seconds: float, budget: float) -> dict:
    """``options`` with steps, inet_steps and refine_steps sized to ``budget`` seconds."""
    graphs = options.get("graphs", False)
    gate_steps = options.get("gate_steps", 1000)
    gate_seconds = gate_steps * (GATE_STEP_SECONDS if graphs else GATE_STEP_COST * step_seconds)
    rounds = 1 + REFINE_PER_STAGE1_STEP  # stage 1's steps and refine's, each costing a stage-1 step at most
    steps = int((budget - FIXED_SECONDS - gate_seconds) / step_seconds / (rounds + rounds * INETS_STEP_COST))
    if steps < 1000:  # fewer would not make a model worth shipping
        raise SystemExit(f"a stage-1 step takes {step_seconds:.3f} s: {budget:.0f} s leave only {steps} steps")
    refine_steps = int(steps * REFINE_PER_STAGE1_STEP)
    return {**options, "steps": steps, "inet_steps": steps + refine_steps, "refine_steps": refine_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="training options (steps are sized here)")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds for the whole run, timing included")
    args = parser.parse_args()
    began = time.monotonic()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    planned = args.run_dir / "config.json"
    if not planned.exists():
        options = json.loads(args.config.read_text(encoding="utf-8-sig"))  # as TrainConfig.from_file reads it
        step_seconds = seconds_per_step(args.config)
        options = plan(options, step_seconds, args.budget - (time.monotonic() - began))
        # (a kill mid-write would leave half a plan, which every later call would reuse)
        atomic_write(planned, lambda tmp: tmp.write_text(json.dumps(options, indent=1) + "\n"))
        print(f"stage-1 step {step_seconds * 1000:.1f} ms: {options['steps']} steps, refine {options['refine_steps']}",
              flush=True)
    train("all", args.run_dir, planned)
    print(f"done in {time.monotonic() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
