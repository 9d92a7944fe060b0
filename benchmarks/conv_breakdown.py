"""Where a conv layer's time goes, kernel by kernel, against cuDNN doing the same piece.

For one 3x3 layer (Cmax 64, fp16, channels_last) at a few widths: the Triton forward with
its fused epilogue against cuDNN's convolution alone, then the backward's parts (the
activation gradient, grad input, grad weight with its reduction) against cuDNN's grad input
and grad weight, each with its roofline floor from the fewest bytes and the FLOPs. A GPU
script (``triton.testing.do_bench``, median): ``python benchmarks/conv_breakdown.py OUT.json``.
"""
import json
import sys

import torch
import torch.nn.functional as F

from _timing import median_ms
from dds_fast.kernels import conv2d as K
from dds_fast.runner import LatencyRunner, describe_device

CMAX, SIZE, DTYPE = 64, 512, torch.float16


def main(out_path: str) -> None:
    device = torch.device("cuda")
    peaks = LatencyRunner(torch.nn.Identity(), (1, 1, 1, 1), DTYPE, device, 10, 50).measure_peaks()
    rows = []
    for batch in (1, 16):
        for width in (16, 32, 64):
            torch.manual_seed(0)
            weight = torch.randn(CMAX, CMAX, 3, 3, device=device, dtype=DTYPE).to(memory_format=torch.channels_last)
            bias = torch.randn(CMAX, device=device, dtype=DTYPE)
            x = torch.randn(batch, width, SIZE, SIZE, device=device, dtype=DTYPE).to(memory_format=torch.channels_last)
            dz = torch.randn_like(x)
            narrow = weight[:width, :width].contiguous(memory_format=torch.channels_last)
            act = x.numel() * x.element_size()  # one activation-sized tensor, in bytes
            flops = 2 * 9 * width * width * SIZE * SIZE * batch
            dw = torch.zeros_like(weight)
            pieces = {
                "forward (fused bias, LeakyReLU)": (
                    lambda: K.slim_conv2d([x], weight, bias, out_channels=width, activation="leaky_relu",
                                          negative_slope=0.2),
                    lambda: F.conv2d(x, narrow, None, padding=1), 2 * act, flops),
                "grad input": (
                    lambda: K._grad_input(dz, weight, x, 0, 1, 1, width),
                    lambda: torch.ops.aten.convolution_backward(dz, x, narrow, None, [1, 1], [1, 1], [1, 1], False,
                                                                [0, 0], 1, [True, False, False]),
                    2 * act, flops),
                "grad weight (split + reduce)": (
                    lambda: K._grad_weight_into(dw, dz, x, 0, 1, 1, width, zero_rest=True),
                    lambda: torch.ops.aten.convolution_backward(dz, x, narrow, None, [1, 1], [1, 1], [1, 1], False,
                                                                [0, 0], 1, [False, True, False]),
                    2 * act, flops),
            }
            for name, (ours, cudnn, nbytes, nflops) in pieces.items():
                floor, _ = peaks.floor_ms(nbytes, nflops)
                t_ours, t_cudnn = median_ms(ours), median_ms(cudnn)
                rows.append(dict(batch=batch, width=width, piece=name, triton_ms=t_ours, cudnn_ms=t_cudnn,
                                 floor_ms=floor, triton_vs_cudnn=t_cudnn / t_ours))
                print(f"batch {batch:2d} width {width:2d} {name:32s} triton {t_ours:8.4f} ms  cuDNN {t_cudnn:8.4f} ms"
                      f"  floor {floor:7.4f} ms  cuDNN/triton {t_cudnn / t_ours:5.2f}", flush=True)
    name, env = describe_device(device)
    with open(out_path, "w") as f:
        json.dump(dict(device=name, environment=env, dtype=str(DTYPE), size=SIZE, cmax=CMAX,
                       peaks=dict(bytes_per_s=peaks.bytes_per_s, flops_per_s=peaks.flops_per_s),
                       rows=rows), f, indent=2)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("conv_breakdown.py times GPU kernels: it needs CUDA")
    main(sys.argv[1] if len(sys.argv) > 1 else "conv-breakdown.json")
