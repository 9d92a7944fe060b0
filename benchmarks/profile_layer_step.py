"""Where one training step of a conv layer goes on a GPU: torch.profiler over a few forward +
backward steps of the benchmark's layer (``dds-fast bench``'s "forward+backward" rows), CUDA
time per kernel, largest first, for the Triton layer and cuDNN's static conv of the same shape.

    python benchmarks/profile_layer_step.py [--width 16] [--batch 8] [--size 512] [OUT.txt]
"""
import argparse
import sys

import torch

from _timing import add_report, kernel_table
from dds_fast.bench import backward_step, layer_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="profile-layer-step.txt")
    parser.add_argument("--width", type=int, default=16, help="active width of the 64-channel layer")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_layer_step.py profiles GPU kernels: it needs CUDA")
    width, variants = layer_variants(64, args.width / 64, torch.device("cuda"), torch.float16, ["triton"],
                                     compile_static=False)
    x = torch.rand(args.batch, width, args.size, args.size, device="cuda", dtype=torch.float16).to(
        memory_format=torch.channels_last)
    reports = []
    for name in ("triton fused", "(b) static"):
        table = kernel_table(backward_step(variants[name], x))
        add_report(args.out, reports, f"{torch.cuda.get_device_name()}, {name}, 3x3 conv width {width} of 64, "
                                      f"input {list(x.shape)} fp16 channels_last, 5 forward+backward steps\n{table}")


if __name__ == "__main__":
    main()
