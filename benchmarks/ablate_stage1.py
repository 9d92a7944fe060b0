"""Stage-1 ablation: how the sandwich size and the distillation targets train each width.

    python benchmarks/ablate_stage1.py --steps 600 [--sandwich 4] [--distillation synergy]
        [--distillation-loss mse] [--alone] [--out FILE.json]

Trains stage 1 (or, with ``--alone``, the largest config by itself) from scratch on the
bundled photos with AWGN sigma 25 at a constant learning rate, then reports the validation
PSNR (8-bit, on the held-out photos' crops) of the largest config, uniform configs at 2/3
and 1/3 of every width, and the smallest. Short runs on CPU are enough to see a sub-network
pulled off course. Extra options override the defaults as ``--set key=json_value``.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from dds_fast.checkpoint import read_metadata
from dds_fast.cli import _positive_int
from dds_fast.config import RoutingEntry
from dds_fast.metrics import batch_psnr
from dds_fast.training.data import check_writable_file
from dds_fast.training.stages import Run, TrainConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_positive_int, default=600)
    parser.add_argument("--sandwich", type=int, default=4)
    parser.add_argument("--distillation", default="synergy")
    parser.add_argument("--distillation-loss", default="mse")
    parser.add_argument("--alone", action="store_true", help="train the largest config alone (no sandwich)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="any other TrainConfig option, e.g. --set lr=5e-4")
    parser.add_argument("--out", type=output_file, help="write the result as JSON here")
    args = parser.parse_args(argv)
    options = dict(noise="awgn", noise_args={"sigma": 25.0}, batch_size=8, patch_size=64, epoch_patches=4096,
                   lr=1e-3, lr_schedule="constant", sandwich=args.sandwich, distillation=args.distillation,
                   distillation_loss=args.distillation_loss, steps=args.steps, device="cpu", progress=False,
                   checkpoint_every=args.steps)
    options.update(parse_overrides(args.set))
    config = TrainConfig.from_dict(options)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        run = Run(run_dir, config)
        if args.alone:  # the I-Net of the largest config: the same loop without the sandwich
            largest = run.new_network().space.largest()
            run.inets([RoutingEntry(largest, macs_per_pixel=0.0)])
            net = run.load("inet-0.safetensors")
        else:
            net = run.stage1()
        net.eval()
        batches = run.validation_batches()
        psnrs = {}
        with torch.no_grad():
            for label, widths in [("largest", net.space.largest()), ("uniform 2/3", net.space.uniform(2 / 3)),
                                  ("uniform 1/3", net.space.uniform(1 / 3)), ("smallest", net.space.smallest())]:
                net.set_config(widths)
                psnrs[label] = sum(batch_psnr(net(noisy), clean) for noisy, clean in batches) / len(batches)
    report({"alone": args.alone, "options": options, "validation_psnr": psnrs,
            "seconds": time.perf_counter() - began}, args.out)
    return 0


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=JSON`` options as a dict of TrainConfig values."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--set {item}: the value is not JSON ({error})") from None
    return overrides


def output_file(text: str) -> str:
    """argparse type of a file the script writes: checked as the arguments are read, not after
    the work that a bad path would throw away."""
    try:
        check_writable_file(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text}: not a file in a folder that exists ({error})") from None
    return text


def stored_train_config(parser: argparse.ArgumentParser, checkpoint: str) -> dict:
    """The training options that the training stages save in a checkpoint's metadata."""
    stored = read_metadata(checkpoint)["user"].get("train_config")
    if not isinstance(stored, dict):
        parser.error(f"{checkpoint} holds no train_config metadata: give a checkpoint saved by the training "
                     f"stages (dds-fast train), whose options this script reuses")
    return stored


def report(result: dict, out: str | None) -> None:
    """Print a CPU ablation's result with the machine and versions; write it as JSON to ``out``."""
    result = {"device": f"CPU: {platform.machine()}", "torch": torch.__version__, **result}
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
