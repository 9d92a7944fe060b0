"""Refinement ablation: does training on the routing configs close their gap to the I-Nets?

    python benchmarks/ablate_refine.py CHECKPOINT [--steps 400] [--lr 2e-4] [--random]
        [--set KEY=JSON ...] [--out FILE.json] [--save REFINED.safetensors]

From a DDSNet (or stage-2) checkpoint, runs the ``refine`` stage for ``--steps`` with the
training options the checkpoint stores: the sandwich over its routing configs, or with
``--random`` over stage 1's random configs (the control: is it just more training?). Reports
each routing config's validation PSNR (8-bit, on the held-out photos' crops, the stage-2
measure) before and after. ``--set`` overrides other stored options (``distillation``...).
``--save`` writes the refined model (a DDSNet keeps its gate) for ``benchmarks/quality.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from ablate_stage1 import output_file, parse_overrides, report, stored_train_config

import dds_fast
from dds_fast.cli import _positive_int
from dds_fast.training.slimming import validation_psnr
from dds_fast.training.stages import Run, TrainConfig, super_network_of


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=_positive_int, default=400)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--random", action="store_true", help="sample stage 1's random configs instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="any other TrainConfig option, e.g. --set distillation='\"none\"'")
    parser.add_argument("--out", type=output_file, help="write the result as JSON here")
    parser.add_argument("--save", type=output_file, help="write the refined model here (safetensors)")
    args = parser.parse_args(argv)
    model = dds_fast.load(args.checkpoint)
    net = super_network_of(model)  # (behind the gate's attention scale where it runs one, as the trainer's stages)
    if not net.routing_space:
        raise SystemExit(f"{args.checkpoint} holds no routing space")
    stored = stored_train_config(parser, args.checkpoint)
    overrides = parse_overrides(args.set)
    config = TrainConfig.from_dict({**stored, **overrides, "refine_steps": args.steps, "refine_lr": args.lr,
                                    "device": "cpu", "progress": False, "checkpoint_every": args.steps})
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        run = Run(run_dir, config)
        net.eval()
        batches = run.validation_batches()
        before = [validation_psnr(net, batches, e.config) for e in net.routing_space]
        refined = run.refine(net, random_configs=args.random)
        after = [e.psnr for e in refined.routing_space]
    if args.save:
        # behind the attention scale, refine trained the gate's attention head with the body
        body, gate = ((refined.supernet, refined.gate) if isinstance(refined, dds_fast.AttentionSupernet)
                      else (refined, getattr(model, "gate", None)))
        saved = dds_fast.DDSNet(body, gate, refined.routing_space) if isinstance(model, dds_fast.DDSNet) else refined
        dds_fast.save(saved.eval(), args.save, train_config=dataclasses.asdict(config))
    report({"checkpoint": args.checkpoint, "configs": "random" if args.random else "routing", "steps": args.steps,
            "overrides": overrides,
            "lr": args.lr, "macs_per_pixel": [e.macs_per_pixel for e in model.routing_space],
            "validation_psnr_before": before, "validation_psnr_after": after,
            "seconds": time.perf_counter() - began}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
