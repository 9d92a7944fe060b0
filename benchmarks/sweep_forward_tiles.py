"""Tile sweep for the conv kernels: which tiles are fastest at each width, checked against an
fp64 reference before they are timed, beside cuDNN on the same narrow shape.

    python benchmarks/sweep_forward_tiles.py [OUT.json [CASE ...]]

3x3 layers, fp16, channels_last activations and weights, batch 8 (on a GPU; without one,
tiny fp32 cases under the interpreter check the script, not the speed). Forward, the
launcher's tiles against v9's (which ignored the fast layout's room for bigger tiles):
- stem: 3 to 48 channels at 512x512 with the gate's channel sums (DDSNet's full-width stem),
  on the launcher's tiles and on 32-lane steps;
- eight: 8 channels at 512x512 (a narrow config's full-resolution layers), with the taps in the
  reduction (v14) and with v13's per-tap loop;
- narrow: Cmax 64 at 512x512, widths 48 and 64;
- mid: 96 channels at 256x256 and 192 at 128x128 (the benchmark SlimUNet's middle levels);
- wide: Cmax 384 at 64x64, width 384 (its deepest level);
- per-image: the narrow layer with per-image widths (DDSNet's dynamic mode), every image at
  width 16 or every image at 64: one kernel serves both, so its tiles trade one for the other.
The narrow, mid and wide cases also take the forward through tensor descriptors (v16,
``TMA_FORWARD``; fp16 only, so not on the CPU, where the row says so).
Grad weight (``grad-weight`` rows), widths 16 and 64 at 512x512 and 96 at 256x256: a kernel
row's three taps per program against one tap per program.
The swapped-in choices are restored at the end; rows are written to the JSON as they come,
so a time limit keeps them. Earlier sweeps' candidates and results are in benchmarks/NOTES.md.
"""
import argparse
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before the kernels are imported

from _timing import median_ms  # noqa: E402
from dds_fast.kernels import conv2d as K  # noqa: E402

DTYPE, BATCH = (torch.float16, 8) if CUDA else (torch.float32, 1)
# fp16 operands, fp32 sums: 2e-4 here; v16's wrong sums were 8e-3 to 2e-2 (NOTES v24)
TOLERANCE = 1e-3
# (name, Cmax, size, widths)
GPU_CASES = [("stem", 48, 512, (48,)), ("eight", 8, 512, (8,)), ("narrow", 64, 512, (48, 64)), ("mid", 96, 256, (96,)),
             ("mid", 192, 128, (192,)), ("wide", 384, 64, (384,)), ("per-image", 64, 512, (16, 64))]
CASES = GPU_CASES if CUDA else [
    ("stem", 48, 8, (48,)), ("eight", 8, 8, (8,)), ("narrow", 32, 8, (16, 32)), ("wide", 64, 4, (48,)),
    ("per-image", 32, 8, (16,))]
# a GPU's case names are valid anywhere, so gpu_session.sh's command line runs on a CPU too
CASE_NAMES = list(dict.fromkeys(name for name, *_ in GPU_CASES)) + ["grad-weight"]
GRAD_WEIGHT_CASES = [(64, 512, 16), (64, 512, 64), (96, 256, 96)] if CUDA else [(32, 8, 16)]


LAUNCHER_TILES = K._tiles
TMA = "tensor descriptors"  # a candidate's tiles: the launcher's, with K.TMA_FORWARD on


def v9_tiles(dtype, npix, cols, red, fast=False, two_inputs=False):
    """The tiles before v10, which ignored the fast layout."""
    return LAUNCHER_TILES(dtype, npix, cols, red, False)


def v10_tiles(dtype, npix, cols, red, fast=False, two_inputs=False):
    """v10's: 64-wide reduction steps from 64 channels on (v11: multiples of 64 only), and 256
    rows for two inputs too."""
    bm, bn, bk, warps = LAUNCHER_TILES(dtype, npix, cols, red, fast)
    return bm, bn, (64 if bn == 128 and red >= 64 else bk), warps


def candidates(case: str, width: int) -> dict:
    """name -> (tiles, or a replacement of _tiles, or None for the launcher's; TAPS_IN_K_CHANNELS
    or None for today's). Earlier sweeps' candidates are in benchmarks/NOTES.md."""
    # (sm90.py counts fewer instructions per pixel for the v14 candidates: 17.5 against 22.6 with
    # 2 warps at 8 channels, 108.2 against 123.1 with 64-wide steps at 64)
    if case == "stem":  # the gate's full-width stem: 32-lane steps, 4 warps since v24
        return {"launcher": (None, None), "256 x 64 x 32": ((256, 64, 32, 8), None),
                "v23: 128 x 64 x 16, 8 warps": ((128, 64, 16, 8), None)}
    if case == "eight":  # v14: 8 channels' taps in the reduction, against v13's per-tap loop
        return {"launcher": (None, None), "per-tap loop (v13)": (None, ()),
                "v14: 2 warps": ((256, 16, 16, 2), None)}
    found = {"launcher": (None, None), "v9: small tiles in every layout": (v9_tiles, None),
             "v10: 64-wide steps over any reduction": (v10_tiles, None)}
    if case == "narrow" and width == 64:
        found["v14: 256 x 64 x 64"] = ((256, 64, 64, 8), None)
    if case != "per-image":  # (sm90.py: 71.8 against 123.1 at 64 channels, 97.7 at 48, 22.6 against 33.9 at 16)
        found["v16: tensor descriptors (TMA_FORWARD)"] = (TMA, None)
    return found


# name -> GRAD_WEIGHT_ROW_TAPS (None: today's)
GRAD_WEIGHT_CANDIDATES = {"launcher": None, "a tap per program": False}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="sweep-forward-tiles.json")
    # checked below, not by choices=, which refuses an empty list for a "*" positional
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"only these, of {', '.join(CASE_NAMES)} "
                                                                 f"(default: all)")
    args = parser.parse_args(argv)
    unknown = [case for case in args.cases if case not in CASE_NAMES]
    if unknown:
        parser.error(f"unknown cases {unknown}: choose from {', '.join(CASE_NAMES)}")
    absent = set(args.cases) - {name for name, *_ in CASES} - {"grad-weight"}
    if absent:
        print(f"no CPU case for {', '.join(sorted(absent))}: skipped", flush=True)
    run(args.out, set(args.cases) or None)


def run(out_path: str, only: Optional[set] = None) -> None:
    """Every case, or those named in ``only`` (``grad-weight`` for the grad weight rows)."""
    device = "cuda" if CUDA else "cpu"
    launcher_tiles, launcher_taps, launcher_row_taps = K._tiles, K.TAPS_IN_K_CHANNELS, K.GRAD_WEIGHT_ROW_TAPS
    launcher_taps_tiles = K._taps_tiles
    launcher_tma = K.TMA_FORWARD
    device_name = torch.cuda.get_device_name() if CUDA else "CPU (interpreter: checks the script, not the speed)"
    report = dict(device=device_name, torch=torch.__version__, dtype=str(DTYPE), batch=BATCH, rows=[])

    def record(**row):
        report["rows"].append(row)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
        shown = "wrong result" if row["median_ms"] is None else f"{row['median_ms']:8.4f} ms"
        print(f"{row['case']:11s} Cmax {row['cmax']:3d} width {row['width']:3d}  {row['candidate']:36s} {shown}  "
              f"rel err {row['rel_error']:.1e}", flush=True)

    def timed(run, error_of):
        """(relative error, median ms); a candidate that fails to build or run is a row, not an end."""
        try:
            error = error_of(run())
        except Exception as failure:  # noqa: BLE001 (e.g. out of shared memory for these tiles)
            print(f"failed: {str(failure)[:300]}", flush=True)
            return float("nan"), None
        return error, (median_ms(run) if error < TOLERANCE else None)

    def layer(cmax, width, size, per_image=False, cin=None):
        torch.manual_seed(0)
        weight = torch.randn(cmax, cin or cmax, 3, 3, device=device, dtype=DTYPE).to(
            memory_format=torch.channels_last) / (3 * width ** 0.5)
        # per-image widths read a max-width buffer up to each image's width
        x = torch.randn(BATCH, cin or (cmax if per_image else width), size, size, device=device, dtype=DTYPE).to(
            memory_format=torch.channels_last)
        return weight, x

    try:
        for case, cmax, size, widths in CASES:
            if only and case not in only:
                continue
            for width in widths:
                per_image, stem = case == "per-image", case == "stem"
                cin = 3 if stem else width  # a stem reads an RGB image
                weight, x = layer(cmax, width, size, per_image, 3 if stem else None)
                widths = torch.full((BATCH, 2), width, dtype=torch.int32, device=device) if per_image else None
                x_active = x[:, :cin]
                reference = F.conv2d(x_active.double(), weight[:width, :cin].double(), padding=1)
                narrow = weight[:width, :cin].contiguous(memory_format=torch.channels_last)
                dense = x_active.contiguous(memory_format=torch.channels_last)

                def error_of(y):
                    return ((y[:, :width].double() - reference).norm() / reference.norm()).item()

                with torch.no_grad():
                    error, ms = timed(lambda: F.conv2d(dense, narrow, padding=1), error_of)
                record(case=case, cmax=cmax, size=size, width=width, candidate="cuDNN static (b), no epilogue",
                       tiles=None, rel_error=error, median_ms=ms)
                for name, (tiles, taps) in candidates(case, width).items():
                    K.TMA_FORWARD = tiles == TMA  # else the launcher's choice, off
                    K._tiles = launcher_tiles if tiles in (None, TMA) else tiles if callable(tiles) else (
                        lambda *args, t=tiles, **kwargs: t)
                    # a stem's launch takes _taps_tiles, which sets its own warps over _tiles' (v24)
                    K._taps_tiles = launcher_taps_tiles if tiles is None or callable(tiles) or tiles == TMA else (
                        lambda *args, t=tiles, **kwargs: t)
                    K.TAPS_IN_K_CHANNELS = launcher_taps if taps is None else taps
                    K.clear_plans()  # launch plans hold the tiles they were built with

                    def run():
                        if per_image:
                            return K.slim_conv2d([x], weight, widths=widths, widths_multiple=8)
                        if stem:  # with the gate's channel sums, as DDSNet runs it
                            return K.slim_conv2d([x], weight, out_channels=width, channel_sums=True)[0]
                        return K.slim_conv2d([x], weight, out_channels=width)

                    with torch.no_grad():
                        error, ms = timed(run, error_of)
                    # the tiles the launcher picks: the active widths for a static launch
                    widths_seen = (cmax, cmax) if per_image else (width, width)
                    chosen = K._taps_tiles(DTYPE, size * size, [cin * 9], width) if stem else K._tiles(
                        DTYPE, size * size, *widths_seen, True)
                    if tiles == TMA:  # its own tiles (pixels as BH x BW), if the plan took it at all
                        launches = [p.launch for p in K._INFERENCE_PLANS.values() if p.launch is not None]
                        tma = [launch.tma for launch in launches if launch.tma is not None]
                        keys = ("BH", "BW", "BLOCK_N", "BLOCK_K", "num_warps")
                        chosen = [tma[0].launch.meta[key] for key in keys] if tma else None
                        name += "" if tma else " (not taken: the gather ran)"
                    record(case=case, cmax=cmax, size=size, width=width, candidate=name, tiles=chosen,
                           rel_error=error, median_ms=ms)
        K._tiles, K.TAPS_IN_K_CHANNELS, K.TMA_FORWARD = launcher_tiles, launcher_taps, launcher_tma
        K._taps_tiles = launcher_taps_tiles
        K.clear_plans()
        for cmax, size, width in GRAD_WEIGHT_CASES if not only or "grad-weight" in only else ():
            weight, x = layer(cmax, width, size)
            dy = torch.randn(BATCH, width, size, size, device=device, dtype=DTYPE).to(
                memory_format=torch.channels_last)
            reference = torch.nn.grad.conv2d_weight(x.double(), (width, width, 3, 3), dy.double(), padding=1)
            dense = x.contiguous(memory_format=torch.channels_last)
            narrow = weight[:width, :width].contiguous(memory_format=torch.channels_last)

            def error_of(dw):
                return ((dw[:width, :width].double() - reference).norm() / reference.norm()).item()

            def cudnn():
                return torch.ops.aten.convolution_backward(dy, dense, narrow, None, (1, 1), (1, 1), (1, 1), False,
                                                           (0, 0), 1, (False, True, False))[1]
            error, ms = timed(cudnn, error_of)
            record(case="grad-weight", cmax=cmax, size=size, width=width, candidate="cuDNN static (b)",
                   tiles=None, rel_error=error, median_ms=ms)
            for name, row_taps in GRAD_WEIGHT_CANDIDATES.items():
                K.GRAD_WEIGHT_ROW_TAPS = launcher_row_taps if row_taps is None else row_taps

                def run():
                    dw = torch.zeros_like(weight)
                    K._grad_weight_into(dw, dy, x, 0, 1, 1, width, zero_rest=True)
                    return dw
                error, ms = timed(run, error_of)
                record(case="grad-weight", cmax=cmax, size=size, width=width, candidate=name,
                       tiles=K._grad_weight_tiles(DTYPE, width, width), rel_error=error, median_ms=ms)
    finally:
        K._tiles, K.TAPS_IN_K_CHANNELS, K.GRAD_WEIGHT_ROW_TAPS = launcher_tiles, launcher_taps, launcher_row_taps
        K.TMA_FORWARD, K._taps_tiles = launcher_tma, launcher_taps_tiles
        K.clear_plans()


if __name__ == "__main__":
    main()
