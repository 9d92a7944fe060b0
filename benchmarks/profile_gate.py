"""Where the fused gate head's time goes on a GPU: torch.profiler over a few calls of a
DynamicGate (48 channels, 5 choices, attention off, as stage 3 leaves it) on the channel sums
that a 512x512 stem's epilogue leaves, at batch 1 and 8, beside the eager gate.

    python benchmarks/profile_gate.py [OUT.txt]
"""
import sys

import torch

from _timing import add_report, kernel_table
from dds_fast import DynamicGate
from dds_fast.kernels import conv2d


def main(out: str) -> None:
    if not torch.cuda.is_available():
        sys.exit("profile_gate.py profiles GPU kernels: it needs CUDA")
    gate = DynamicGate(48, 5).cuda().half().eval()
    gate.attention = False
    reports = []
    for batch in (1, 8):
        x = torch.randn(batch, 48, 512, 512, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
        weight = torch.randn(48, 3, 3, 3, device="cuda", dtype=torch.half)
        image = torch.randn(batch, 3, 512, 512, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
        _, sums = conv2d.slim_conv2d([image], weight, channel_sums=True)  # the stem's rows of sums
        with torch.no_grad():
            for backend in ("triton", "torch"):
                gate.backend = backend
                table = kernel_table(lambda: gate(x, channel_sums=sums if backend == "triton" else None))
                add_report(out, reports, f"{torch.cuda.get_device_name()}, gate on {backend}, batch {batch}, "
                                         f"sums {list(sums.shape)}, 5 calls\n{table}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "profile-gate.txt")
