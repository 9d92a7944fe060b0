"""Tile sweep for the forward kernel: which (BLOCK_M, BLOCK_N, BLOCK_K, warps) is fastest at
each width, checked against cuDNN's result before it is timed.

    python benchmarks/sweep_forward_tiles.py [OUT.json]

One 3x3 layer, Cmax 64, fp16, channels_last, batch 8, 512x512 (on a GPU; without one, a tiny
fp32 case under the interpreter checks the script, not the speed). The launcher's tile choice
(``kernels.conv2d._tiles``) is swapped for each candidate in turn; "launcher" is today's.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

from dds_fast.kernels import conv2d as K

CUDA = torch.cuda.is_available()
CMAX = 64
DTYPE, BATCH, SIZE = (torch.float16, 8, 512) if CUDA else (torch.float32, 1, 8)


def candidates(width: int) -> dict:
    bucket = K._pow2(width, 16, 64)  # the active width's power of two, not the weight's
    return {"launcher": None,
            "BLOCK_N = width bucket": (128, bucket, 16, 8),
            "BLOCK_N bucket, BLOCK_K 32": (128, bucket, 32, 8),
            "BLOCK_M 64, 4 warps": (64, bucket, 16, 4),
            "BLOCK_M 256": (256, bucket, 16, 8),
            "BLOCK_K 32": (128, 64, 32, 8)}


def median_ms(fn) -> float:
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[1] * 1e3


def main(out_path: str) -> None:
    device = "cuda" if CUDA else "cpu"
    launcher_tiles = K._tiles
    rows = []
    try:
        for width in (16, 32, 64):
            torch.manual_seed(0)
            weight = torch.randn(CMAX, CMAX, 3, 3, device=device, dtype=DTYPE).to(memory_format=torch.channels_last)
            x = torch.randn(BATCH, width, SIZE, SIZE, device=device, dtype=DTYPE).to(memory_format=torch.channels_last)
            reference = F.conv2d(x.float(), weight[:width, :width].float(), padding=1)
            for name, tiles in candidates(width).items():
                K._tiles = launcher_tiles if tiles is None else (lambda *args, t=tiles: t)
                K._forward_plan.cache_clear()  # launch plans hold the tiles they were built with
                with torch.no_grad():
                    def run():
                        return K.slim_conv2d([x], weight, out_channels=width)

                    y = run()
                    error = ((y.float() - reference).norm() / reference.norm()).item()
                    ms = median_ms(run) if error < 1e-2 else None
                rows.append(dict(width=width, candidate=name, tiles=tiles or launcher_tiles(DTYPE, SIZE * SIZE, CMAX,
                                                                                            CMAX),
                                 rel_error=error, median_ms=ms))
                shown = "wrong result" if ms is None else f"{ms:8.4f} ms"
                print(f"width {width:2d}  {name:28s} {shown}  rel err {error:.1e}", flush=True)
    finally:
        K._tiles = launcher_tiles
        K._forward_plan.cache_clear()
    device_name = torch.cuda.get_device_name() if CUDA else "CPU (interpreter: checks the script, not the speed)"
    with open(out_path, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, dtype=str(DTYPE), batch=BATCH, size=SIZE,
                       cmax=CMAX, rows=rows), f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sweep-forward-tiles.json")
