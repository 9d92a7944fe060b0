"""Which tiles of the tensor-descriptor forward (v16, ``TMA_FORWARD``) give right results on a
GPU: the kernel launched directly over (BLOCK_N, BLOCK_K, BH x BW) variants at the channel
counts of the benchmark SlimUNet, checked against fp64, beside the gather launcher, the
descriptors' launcher and cuDNN. fp16, channels_last, batch 8, 3x3. A variant's time includes
poisoning its output and the JIT's launch (descriptors encoded per call): compare variants
with each other, not with the launchers' rows.

    python benchmarks/probe_tma.py OUT.json
"""
import json
import sys

import torch
import torch.nn.functional as F
from triton import cdiv

from _timing import median_ms
from dds_fast.kernels import conv2d as K

TOLERANCE = 1e-3  # fp16 operands, fp32 sums: 2e-4 when right
CASES = [(64, 64, 512), (96, 96, 256), (128, 128, 128), (192, 192, 128), (96, 192, 256), (384, 384, 64)]
VARIANTS = [(128, 64, 2, 64), (128, 32, 2, 64), (64, 64, 2, 64), (64, 64, 4, 64), (64, 32, 4, 64), (128, 64, 1, 64)]


def main(out_path: str) -> None:
    if not torch.cuda.is_available():
        sys.exit("probe_tma.py needs a CUDA GPU: its tensor descriptors are Hopper's copy engine")
    rows = []
    for cin, cout, size in CASES:
        torch.manual_seed(0)
        x = torch.randn(8, cin, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        weight = (torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.float16) / (3 * cin ** 0.5)).to(
            memory_format=torch.channels_last)
        reference = F.conv2d(x.double(), weight.double(), padding=1)

        def error_of(y):
            return ((y.double() - reference).norm() / reference.norm()).item()

        def record(name, run):
            try:
                error = error_of(run())
                ms = median_ms(run) if error < TOLERANCE else None
            except Exception as failure:  # noqa: BLE001 (a variant that does not build is a row)
                error, ms = float("nan"), None
                name += f" failed: {str(failure)[:200]}"
            rows.append(dict(cin=cin, cout=cout, size=size, variant=name, rel_error=error, median_ms=ms))
            shown = "wrong" if ms is None else f"{ms:.4f} ms"
            print(f"{cin:3d} -> {cout:3d} at {size:3d}  {name:34s} {shown:10s} rel err {error:.1e}", flush=True)
            with open(out_path, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=2)

        with torch.no_grad():
            record("cuDNN", lambda: F.conv2d(x, weight, padding=1))
            K.TMA_FORWARD = False
            K.clear_plans()
            record("gather launcher", lambda: K.slim_conv2d([x], weight))
            K.TMA_FORWARD = True
            K.clear_plans()
            record("TMA launcher", lambda: K.slim_conv2d([x], weight))
            K.TMA_FORWARD = False
            K.clear_plans()
            for bn, bk, bh, bw in VARIANTS:
                if cin % bk:
                    continue

                def run(bn=bn, bk=bk, bh=bh, bw=bw):
                    y = torch.full((8, cout, size, size), float("nan"), device="cuda", dtype=torch.float16).to(
                        memory_format=torch.channels_last)
                    meta = dict(BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk)
                    xd, wd = K._tma_descriptors(x, weight, 0, cout, meta)
                    grid = (cdiv(size, bh) * cdiv(size, bw), cdiv(cout, bn), 8)
                    K._conv_fwd_tma_kernel[grid](
                        xd, xd, wd, wd, weight, y, y, size, size, cin, 0, cout, weight.stride(0), *y.stride(),
                        *y.stride(), 0.01, KSIZE=3, PAD=1, TWO_INPUTS=False, HAS_BIAS=False, HAS_RES=False, ACT=0,
                        DOT_F32=False, BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk, CO_ALIGN=8, Y_ALIGN=8, num_warps=8)
                    return y
                record(f"TMA {bn} x {bk}, {bh} x {bw} pixels", run)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "probe-tma.json")
