"""The kernels built for sm_90 (the H100) with Triton's own compiler, no GPU needed: register
use, spills and vector accesses (``tests/test_compile_sm90.py`` checks them) and the
instructions each output pixel costs, a static cost model for the forward convs.

    python benchmarks/sm90.py [OUT.json]

prints, for the layers of the benchmark SlimUNet's smallest config and a few wider ones at
8x512x512 (fp16, channels_last), the kernel and tiles the launcher picks (then again with
``TMA_FORWARD`` where it applies), registers, spill bytes, the main loops' lengths and the
warp instructions per output pixel: (the code outside the loops +
each loop's body x its trips) x warps / BLOCK_M. At a few instructions per pixel a layer is
bound by issue, not bytes: on an H100, 132 SMs x 4 warp instructions a cycle at about 1.75
GHz issue 2.1M pixels x 36.5 (8 to 8 channels before v14) in 83 us. The code is the installed Triton's (3.9 here; the
GPU machines run 3.6, whose code may differ). Needs TRITON_INTERPRET unset: the interpreter
picks other tiles.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Channel strides of 1 (channels_last activations and weights, the fast path): the JIT
# specialises them into constants, which changes the code and its register use.
UNIT_STRIDES = {"sx0c", "sx1c", "syc", "src", "swi", "szc", "sxc", "sdyc"}
LAYOUTS = ("strided", "channels_last")


def compile_kernel(fn, ptrs: dict, constexprs: dict, warps: int, layout: str = "channels_last"):
    """``fn`` built for sm_90 as the JIT would specialise it: ``strided``, generic strides and
    no alignment; ``channels_last``, unit channel strides, every alignment flag 8 and 16-byte
    aligned pointers. ``ptrs`` types the pointer and float arguments (others are i32);
    ``constexprs`` may override the layout's alignment flags and unit strides."""
    ones = {a: 1 for a in fn.arg_names if layout == "channels_last" and a in UNIT_STRIDES}
    aligns = {a: 8 if layout == "channels_last" else 1 for a in fn.arg_names if a.endswith("ALIGN")}
    values = {**ones, **aligns, **constexprs}
    sig = {a: "constexpr" if a in values else ptrs.get(a, "i32") for a in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in values.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if layout == "channels_last" and sig[a].startswith("*")}
    return triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


def _cuobjdump(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def has_cuobjdump() -> bool:
    return os.path.exists(os.path.join(BIN, "cuobjdump"))


def resources(kernel) -> dict:
    """Registers and stack (spill) bytes per thread."""
    usage = _cuobjdump(kernel, "--dump-resource-usage")
    return {key.lower(): int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK")}


def vector_accesses(kernel, stores: bool = False) -> int:
    """Vector loads and asynchronous copies (or vector stores) in the PTX."""
    pattern = r"st\.global\.v[248]" if stores else r"cp\.async\.c[ag]\.shared\.global|ld\.global\.v[248]"
    return len(re.findall(pattern, kernel.asm["ptx"]))


def instructions(kernel) -> tuple[int, list[int]]:
    """(SASS instructions, the body length of each loop that multiplies, in code order: a
    backward branch over a matrix instruction; the waits on asynchronous copies also branch
    back, over no multiply)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump(kernel, "-sass"))]
    loops = []
    for offset, body in code:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", body)
        if target and int(target.group(1), 16) < offset:
            inside = [b for o, b in code if int(target.group(1), 16) <= o <= offset]
            if any(re.search(r"\bH?GMMA|\bHMMA", b) for b in inside) and not any("STG" in b for b in inside):
                loops.append(len(inside))
    return len(code), loops


def forward_cases() -> list[tuple[str, tuple, tuple, int]]:
    """(name, input channels, output channels and stride) of the layers the table shows."""
    return [("3 to 8 (the smallest config's stem)", (3,), 8, 1), ("8 to 8", (8,), 8, 1),
            ("8 to 16, stride 2", (8,), 16, 2), ("8 + 8 to 8 (a decoder's concat)", (8, 8), 8, 1),
            ("8 to 3 (the last layer, with the residual)", (8,), 3, 1), ("16 to 16", (16,), 16, 1),
            ("48 to 48", (48,), 48, 1), ("64 to 64", (64,), 64, 1),
            ("48 to 3 (the largest config's last layer)", (48,), 3, 1)]


def forward_row(K, name: str, ins: tuple, out: int, stride: int, batch: int = 8, size: int = 512) -> dict:
    """The launcher's forward for this layer, built and counted."""
    import torch

    def meta(c: int, h: int, w: int):
        shape = (batch, c, h, w)
        return shape, torch.empty(shape, device="meta").to(memory_format=torch.channels_last).stride(), \
            torch.float16, torch.device("cuda")

    cin = sum(ins)
    weight = torch.empty(out, cin, 3, 3, device="meta").to(memory_format=torch.channels_last)
    residual = meta(out, size, size) if out == 3 else None
    plan = K._forward_plan(meta(ins[0], size, size), meta(ins[1], size, size) if len(ins) == 2 else None,
                           (weight.shape, weight.stride(), torch.float16, torch.device("cuda")),
                           ((out,), (1,), torch.float16, torch.device("cuda")), residual, None, (1, 1), 0, ins[0], out,
                           stride, 1, "leaky_relu" if out != 3 else "none", 0.2, 1, aligned_pointers=True)
    if plan.tma is not None:  # K.TMA_FORWARD: the descriptors' kernel
        meta = plan.tma.launch.meta
        x_box, w_box = f"[1,{meta['BH']},{meta['BW']},{meta['BLOCK_K']}]", f"[{meta['BLOCK_N']},1,1,{meta['BLOCK_K']}]"
        kernel_fn, block_m, taps = K._conv_fwd_tma_kernel, meta["BH"] * meta["BW"], (0, 0)
        ptrs = dict(x0d=f"tensordesc<fp16{x_box}>", x1d=f"tensordesc<fp16{x_box}>", w0d=f"tensordesc<fp16{w_box}>",
                    w1d=f"tensordesc<fp16{w_box}>", b="*fp16", res="*fp16", y="*fp16", slope="fp32")
    else:
        meta = plan.launch.meta
        kernel_fn, block_m, taps = K._conv_fwd_kernel, meta["BLOCK_M"], (meta["TAP_C0"], meta["TAP_C1"])
        ptrs = dict(x0="*fp16", x1="*fp16", w="*fp16", b="*fp16", res="*fp16", y="*fp16", widths="*i32",
                    sums="*fp32", slope="fp32")
    block_k, warps = meta["BLOCK_K"], meta["num_warps"]
    kernel = compile_kernel(kernel_fn, ptrs, {key: value for key, value in meta.items() if key != "num_warps"}, warps)
    total, loops = instructions(kernel)
    trips = [-(-9 * c // block_k) if tap else 9 * -(-c // block_k) for c, tap in zip(ins, taps)]
    # every instruction once, and each input's loop (in order) its further trips; an input of
    # one step has no loop (in the total once, as it runs), and a loop unrolled is in it as often
    counted = [t for t, tap in zip(trips, taps) if not (tap and t == 1)]
    if len(counted) != len(loops):
        raise RuntimeError(f"sm90.py: {len(loops)} multiplying loops in {name}'s code for inputs of {counted} trips")
    per_pixel = (total + sum(b * (t - 1) for b, t in zip(loops, counted))) * warps / block_m
    return dict(layer=name, kernel=kernel_fn.__name__, tiles=[block_m, meta["BLOCK_N"], block_k, warps],
                taps_in_reduction=list(taps), **resources(kernel),
                instructions=total, loops=loops, trips=counted, warp_instructions_per_pixel=round(per_pixel, 1))


def _device() -> str:
    """The machine that built and counted (no kernel runs on it)."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, no GPU)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="sm90-forward.json")
    run(parser.parse_args(argv).out)


def run(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("sm90.py builds for a GPU: unset TRITON_INTERPRET")
    import dds_fast.kernels.conv2d as K

    rows = []
    for tma in (False, True):  # the launcher's kernels, then with TMA_FORWARD where it applies
        K.TMA_FORWARD = tma
        K.clear_plans()
        for case in forward_cases():
            row = forward_row(K, *case)
            if tma and row["kernel"] != "_conv_fwd_tma_kernel":
                continue
            rows.append(row)
            print(f"{row['layer']:45s} {row['kernel']:21s} tiles {row['tiles']} taps {row['taps_in_reduction']} "
                  f"regs {row['reg']:3d} spill {row['stack']} loops {row['loops']} x {row['trips']}: "
                  f"{row['warp_instructions_per_pixel']} warp instructions per pixel", flush=True)
    with open(out_path, "w") as f:
        json.dump(dict(target="sm_90", triton=triton.__version__, batch=8, size=512, dtype="float16",
                       device=_device(), what="SASS built for sm_90 and counted on this device: no timing",
                       rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
