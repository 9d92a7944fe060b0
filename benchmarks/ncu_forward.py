"""The forward kernel and cuDNN under Nsight Compute: what limits each (run under ``ncu``).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python benchmarks/ncu_forward.py

One 3x3 layer, Cmax 64, fp16, channels_last, batch 8, 512x512, widths 16 and 64: for each, the
Triton forward (fused LeakyReLU) and cuDNN's static conv of the narrow shape, each launched
once inside the profiled range after a warm-up outside it (compilation, cuDNN's plan choice).
"""
import torch
import torch.nn.functional as F

from dds_fast.kernels import conv2d as K

CMAX, SIZE, BATCH, DTYPE = 64, 512, 8, torch.float16


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ncu_forward.py profiles GPU kernels: it needs CUDA")
    runs = []
    for width in (16, 64):
        torch.manual_seed(0)
        weight = torch.randn(CMAX, CMAX, 3, 3, device="cuda", dtype=DTYPE).to(memory_format=torch.channels_last)
        x = torch.randn(BATCH, width, SIZE, SIZE, device="cuda", dtype=DTYPE).to(memory_format=torch.channels_last)
        narrow = weight[:width, :width].contiguous(memory_format=torch.channels_last)
        runs.append(lambda x=x, weight=weight, width=width: K.slim_conv2d([x], weight, out_channels=width,
                                                                         activation="leaky_relu"))
        runs.append(lambda x=x, narrow=narrow: F.conv2d(x, narrow, padding=1))
    with torch.no_grad():
        for run in runs:
            run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for run in runs:
            run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order: triton w16, cuDNN w16, triton w64, cuDNN w64")


if __name__ == "__main__":
    main()
