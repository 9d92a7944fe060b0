"""Tile sweep for the forward kernel: which (BLOCK_M, BLOCK_N, BLOCK_K, warps) is fastest at
each width, checked against an fp64 reference before it is timed, beside cuDNN on the same
narrow shape.

    python benchmarks/sweep_forward_tiles.py [OUT.json]

3x3 layers, fp16, channels_last, batch 8 (on a GPU; without one, tiny fp32 cases under the
interpreter check the script, not the speed):
- narrow: Cmax 64 at 512x512, widths 16, 32 and 64 (the first level of a slimmable U-Net);
- wide: Cmax 384 at 64x64, widths 288 and 384 (the deepest level of the benchmark's
  SlimUNet at a 512x512 input);
- per-image: the narrow layer with per-image widths (DDSNet's dynamic mode), every image at
  width 16 or every image at 64: one kernel serves both, so its tiles trade one for the other.
The launcher's tile choice (``kernels.conv2d._tiles``) is swapped for each candidate in turn;
"launcher" is today's. Rows are written to the JSON as they come, so a time limit keeps them.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before the kernels are imported

from _timing import median_ms  # noqa: E402
from dds_fast.kernels import conv2d as K  # noqa: E402

DTYPE, BATCH = (torch.float16, 8) if CUDA else (torch.float32, 1)
# (name, Cmax, size, widths)
CASES = [("narrow", 64, 512, (16, 32, 64)), ("wide", 384, 64, (288, 384)), ("per-image", 64, 512, (16, 64))] \
    if CUDA else [("narrow", 32, 8, (16, 32)), ("wide", 64, 4, (48,)), ("per-image", 32, 8, (16,))]


def candidates(case: str, width: int) -> dict:
    bucket = K._pow2(width, 16, 64)  # the active width's power of two, not the weight's
    if case == "narrow":
        return {"launcher": None,
                "v6: BLOCK_N from Cmax, BLOCK_K 16": (128, 64, 16, 8),
                "BLOCK_M 256, BLOCK_K 32": (256, bucket, 32, 8),
                "BLOCK_M 128, BLOCK_K 32": (128, bucket, 32, 8),
                "BLOCK_M 128, BLOCK_K 64": (128, bucket, 64, 8),
                "BLOCK_M 256, BLOCK_K 16": (256, bucket, 16, 8),
                "BLOCK_M 256, BLOCK_K 16, 4 warps": (256, bucket, 16, 4)}
    if case == "wide":
        return {"launcher": None,
                "BLOCK_K 64": (128, 64, 64, 8),
                "BLOCK_N 128, BLOCK_K 64": (128, 128, 64, 8),
                "BLOCK_N 128, BLOCK_K 32": (128, 128, 32, 8),
                "BLOCK_M 64, BLOCK_K 64, 4 warps": (64, 64, 64, 4),
                "BLOCK_M 256, BLOCK_K 32": (256, 64, 32, 8)}
    return {"launcher": None,
            "BLOCK_N 32": (128, 32, 32, 8),
            "BLOCK_N 16, BLOCK_M 256": (256, 16, 32, 8),
            "BLOCK_N 64, BLOCK_K 16": (128, 64, 16, 8)}


def main(out_path: str) -> None:
    device = "cuda" if CUDA else "cpu"
    launcher_tiles = K._tiles
    device_name = torch.cuda.get_device_name() if CUDA else "CPU (interpreter: checks the script, not the speed)"
    report = dict(device=device_name, torch=torch.__version__, dtype=str(DTYPE), batch=BATCH, rows=[])

    def record(**row):
        report["rows"].append(row)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
        shown = "wrong result" if row["median_ms"] is None else f"{row['median_ms']:8.4f} ms"
        print(f"{row['case']:9s} width {row['width']:3d}  {row['candidate']:46s} {shown}  "
              f"rel err {row['rel_error']:.1e}", flush=True)

    try:
        for case, cmax, size, widths in CASES:
            for width in widths:
                torch.manual_seed(0)
                weight = torch.randn(cmax, cmax, 3, 3, device=device, dtype=DTYPE).to(
                    memory_format=torch.channels_last) / (3 * width ** 0.5)
                per_image = case == "per-image"
                # per-image widths read a max-width buffer up to each image's width
                x = torch.randn(BATCH, cmax if per_image else width, size, size, device=device, dtype=DTYPE).to(
                    memory_format=torch.channels_last)
                widths = torch.full((BATCH, 2), width, dtype=torch.int32, device=device) if per_image else None
                x_active = x[:, :width]
                reference = F.conv2d(x_active.double(), weight[:width, :width].double(), padding=1)
                narrow = weight[:width, :width].contiguous(memory_format=torch.channels_last)
                dense = x_active.contiguous(memory_format=torch.channels_last)

                def error_of(y):
                    return ((y[:, :width].double() - reference).norm() / reference.norm()).item()

                with torch.no_grad():
                    y = F.conv2d(dense, narrow, padding=1)
                    record(case=case, cmax=cmax, size=size, width=width, candidate="cuDNN static (b), no epilogue",
                           tiles=None, rel_error=error_of(y),
                           median_ms=median_ms(lambda: F.conv2d(dense, narrow, padding=1)))
                for name, tiles in candidates(case, width).items():
                    K._tiles = launcher_tiles if tiles is None else (lambda *args, t=tiles: t)
                    K._forward_plan.cache_clear()  # launch plans hold the tiles they were built with
                    with torch.no_grad():
                        def run():
                            if per_image:
                                return K.slim_conv2d([x], weight, widths=widths, widths_multiple=8)
                            return K.slim_conv2d([x], weight, out_channels=width)

                        error = error_of(run())
                        ms = median_ms(run) if error < 1e-2 else None
                    # the tiles the launcher picks: the active widths for a static launch
                    widths_seen = (cmax, cmax) if per_image else (width, width)
                    chosen = tiles or launcher_tiles(DTYPE, size * size, *widths_seen)
                    record(case=case, cmax=cmax, size=size, width=width, candidate=name, tiles=chosen,
                           rel_error=error, median_ms=ms)
    finally:
        K._tiles = launcher_tiles
        K._forward_plan.cache_clear()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sweep-forward-tiles.json")
