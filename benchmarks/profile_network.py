"""Where a SlimUNet config's time goes on a GPU: torch.profiler over a few forwards, CUDA
time per kernel name, largest first. The network table gives each config's total against its
roofline floor; this says which kernels make up the gap.

    python benchmarks/profile_network.py [--config smallest ...] [--batch 8] [--size 512] [OUT.txt]
"""
import argparse
import sys

import torch

from _timing import kernel_table
from dds_fast import SlimUNet
from dds_fast.runner import default_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="profile-network.txt")
    parser.add_argument("--config", action="append", help="a label of dds_fast.runner.default_configs "
                        "(repeat for several; default smallest)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_network.py profiles GPU kernels: it needs CUDA")
    net = SlimUNet(in_channels=3, base_width=32, depth=4).cuda().half().to(memory_format=torch.channels_last).eval()
    configs = dict(default_configs(net))
    labels = args.config or ["smallest"]
    unknown = [label for label in labels if label not in configs]
    if unknown:
        sys.exit(f"--config must be among {sorted(configs)}, got {unknown}")
    x = torch.rand(args.batch, 3, args.size, args.size, device="cuda", dtype=torch.half).to(
        memory_format=torch.channels_last)
    reports = []
    for label in labels:
        net.set_config(configs[label])
        with torch.no_grad():
            table = kernel_table(lambda: net(x))
        reports.append(f"{torch.cuda.get_device_name()}, SlimUNet base 32 depth 4, config {label}, "
                       f"input {list(x.shape)} fp16 channels_last, 5 forwards\n{table}")
    with open(args.out, "w") as f:
        f.write("\n\n".join(reports))
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
