"""Where a SlimUNet config's time goes on a GPU: torch.profiler over a few forwards, CUDA
time per kernel name, largest first. The network table gives each config's total against its
roofline floor; this says which kernels make up the gap.

    python benchmarks/profile_network.py [--config smallest ...] [--batch 8] [--size 512] [OUT.txt]
"""
import sys

import torch

from _timing import chosen_configs, kernel_table, network_arguments, write_reports
from dds_fast import SlimUNet


def main() -> None:
    args = network_arguments(__doc__, "profile-network.txt", ["smallest"])
    if not torch.cuda.is_available():
        sys.exit("profile_network.py profiles GPU kernels: it needs CUDA")
    net = SlimUNet(in_channels=3, base_width=32, depth=4).cuda().half().to(memory_format=torch.channels_last).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device="cuda", dtype=torch.half).to(
        memory_format=torch.channels_last)
    reports = []
    for label, config in chosen_configs(args.config, net).items():
        net.set_config(config)
        with torch.no_grad():
            table = kernel_table(lambda: net(x))
        reports.append(f"{torch.cuda.get_device_name()}, SlimUNet base 32 depth 4, config {label}, "
                       f"input {list(x.shape)} fp16 channels_last, 5 forwards\n{table}")
    write_reports(args.out, reports)

if __name__ == "__main__":
    main()
