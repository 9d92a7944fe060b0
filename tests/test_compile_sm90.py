"""Build every Triton kernel for sm_90 (the H100) with the real compiler, no GPU needed, and
check that none spills registers to local memory.

The interpreter that runs the kernels in CI skips Triton's compiler, so type and layout
errors that only the compiler sees would otherwise wait for a GPU session to show up. The
kernels are built with the tiles and warps the launchers use; spills (stack bytes per
thread, read from the cubin with the cuobjdump that ships with Triton) mean local-memory
traffic inside the reduction loops.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"  # sm90.py: the build and its readings

_COMPILE_FOR_SM90 = """
import json, sys
import torch
sys.path.insert(0, BENCHMARKS)
from sm90 import LAYOUTS, UNIT_STRIDES, compile_kernel, forward_row, has_cuobjdump, resources, vector_accesses
from dds_fast.kernels import conv2d as K
from dds_fast.kernels import gate as G
from dds_fast.kernels import _rows as R
assert not K.INTERPRET and not G.INTERPRET
stacks = {}

def build(name, fn, ptrs, constexprs, warps, fast_tiles=None, layouts=LAYOUTS):
    # generic strides and no alignment; channels_last with every alignment flag at 8, where
    # the launchers take the tiles of their fast layout (fast_tiles: constexprs, warps)
    for layout in layouts if UNIT_STRIDES & set(fn.arg_names) else ("strided",):
        blocks, num_warps = fast_tiles if layout == "channels_last" and fast_tiles else ({}, warps)
        kernel = compile_kernel(fn, ptrs, {**constexprs, **blocks}, num_warps, layout)
        if has_cuobjdump():
            stacks[f"{name} ({layout})"] = resources(kernel)["stack"]

def vector_loads(fn, ptrs, constexprs, warps, stores=False):
    # in the channels_last build with 16-byte aligned pointers, as the JIT specialises them at
    # run time (constexprs set the alignment flags)
    return vector_accesses(compile_kernel(fn, ptrs, constexprs, warps), stores)

def tiles(dtype, cols=64, red=64, fast=False, two_inputs=False):
    bm, bn, bk, warps = K._tiles(dtype, 512 * 512, cols, red, fast, two_inputs)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps

p, f = "*bf16", "*fp32"

def forward_ptrs(act, wt):
    return dict(x0=act, x1=act, w=wt, b=wt, res=act, y=act, widths="*i32", sums=f, slope="fp32")

def forward_constexprs(**given):
    return dict(dict(KSIZE=3, STRIDE=1, PAD=1, TWO_INPUTS=False, HAS_BIAS=True, HAS_RES=False, ACT=2, PER_IMAGE=False,
                     CHANNEL_SUMS=False, DOT_F32=False, TAP_C0=0, TAP_C1=0, PACKED_X0=False, PACKED_X1=False,
                     PACKED_Y=False, UPSCALE=1, CO_LOOP=False), **given)

for (name, act, wt, extra), (cols, red) in [(case, widths) for case in [
    ("forward bf16, two inputs, residual, per-image widths, packed buffers", p, p,
     dict(TWO_INPUTS=True, HAS_RES=True, PER_IMAGE=True, STRIDE=2, PACKED_X0=True, PACKED_X1=True, PACKED_Y=True)),
    ("forward bf16 over fp32 weights, two inputs, residual, per-image widths", p, f,
     dict(TWO_INPUTS=True, HAS_RES=True, PER_IMAGE=True)),
    ("forward fp32", f, f, dict(DOT_F32=True)),
    ("forward bf16 with channel sums (a gate's stem)", p, p, dict(CHANNEL_SUMS=True)),
    ("forward bf16, pixel shuffle in the store (an upsampling conv), per-image widths, packed output", p, p,
     dict(UPSCALE=2, PER_IMAGE=True, PACKED_Y=True)),
] for widths in ((16, 16), (16, 64), (32, 64), (64, 16), (64, 64), (128, 16), (128, 32), (128, 128))] + [
    # every tile class a static launch picks
    (("forward bf16, taps in the reduction (3 input channels), channel sums", p, p,
      dict(TAP_C0=3, CHANNEL_SUMS=True)), widths) for widths in ((16, 16), (16, 32), (32, 32), (64, 16))] + [
    (("forward bf16, taps in the reduction (two inputs of 8 channels), residual", p, p,
      dict(TAP_C0=8, TAP_C1=8, TWO_INPUTS=True, HAS_RES=True)), widths)
    for widths in ((16, 16), (32, 16), (64, 16))] + [
    # per-image widths on tiles for 8 input channels: a branch per image between both loops
    # (the fast layout only, where the launcher takes it)
    (("forward bf16, two inputs, per-image widths, packed buffers, taps in the reduction at 8 channels", p, p,
      dict(TAP_C0=8, TAP_C1=8, TWO_INPUTS=True, PER_IMAGE=True, PACKED_X0=True, PACKED_X1=True, PACKED_Y=True)),
     widths) for widths in ((16, 8), (32, 8), (64, 8), (128, 8))] + [
    # an upscale factor whose square divides no tile: the shuffle's store filter by filter
    (("forward bf16, pixel shuffle by 3 in the store", p, p, dict(UPSCALE=3)), widths) for widths in ((9, 16), (36, 16))] + [
    # per-image widths on a grid narrower than the widest image's filter tiles: a loop over them
    # (the fast layout only, where the launcher narrows the grid; NOTES v27)
    (("forward bf16, two inputs, residual, per-image widths, packed buffers, a loop over filter tiles", p, p,
      dict(TWO_INPUTS=True, HAS_RES=True, PER_IMAGE=True, PACKED_X0=True, PACKED_X1=True, PACKED_Y=True,
           CO_LOOP=True)), widths) for widths in ((16, 16), (16, 64), (32, 64), (64, 64))] + [
    (("forward bf16, two inputs, per-image widths, packed buffers, taps in the reduction at 8 channels, a loop over "
      "filter tiles", p, p, dict(TAP_C0=8, TAP_C1=8, TWO_INPUTS=True, PER_IMAGE=True, PACKED_X0=True, PACKED_X1=True,
                                 PACKED_Y=True, CO_LOOP=True)), widths) for widths in ((16, 8), (32, 8), (64, 8))] + [
    (("forward bf16, pixel shuffle in the store, per-image widths, packed buffers, a loop over filter tiles", p, p,
      dict(UPSCALE=2, PER_IMAGE=True, PACKED_X0=True, PACKED_Y=True, CO_LOOP=True)), widths)
    for widths in ((16, 16), (32, 32), (64, 64))]:
    dtype = torch.float32 if act == f else torch.bfloat16
    blocks, warps = tiles(dtype, cols, red)
    name = f"{name}, {cols} output and {red} input columns"
    build(name, K._conv_fwd_kernel, forward_ptrs(act, wt), forward_constexprs(**blocks, **extra), warps,
          None if extra.get("TAP_C0") and not extra.get("PER_IMAGE") or not K._fast_tiles_store(extra.get("UPSCALE", 1))
          else tiles(dtype, cols, red, True, extra.get("TWO_INPUTS", False)),
          ("channels_last",) if extra.get("TAP_C0") and extra.get("PER_IMAGE") or extra.get("CO_LOOP")
          else ("strided", "channels_last"))
# an RGB stem to 33-64 channels with the gate's channel sums, as _taps_tiles tiles it (and a
# concat of two such inputs)
for cols, two in ((48, False), (64, False), (64, True)):
    bm, bn, bk, warps = K._taps_tiles(torch.bfloat16, 512 * 512, [27] * (1 + two), cols, two)
    build(f"forward bf16, taps in the reduction ({'two inputs of ' if two else ''}3 input channels), channel sums, "
          f"{cols} output columns, {bm} x {bn} x {bk}, {warps} warps", K._conv_fwd_kernel, forward_ptrs(p, p),
          forward_constexprs(TAP_C0=3, TAP_C1=3 if two else 0, TWO_INPUTS=two, CHANNEL_SUMS=True, BLOCK_M=bm,
                             BLOCK_N=bn, BLOCK_K=bk), warps)
# a net's last conv per image (3 outputs): its inputs aligned, its outputs not (v25), on the
# tiles of a launch outside the fast layout
for red in (16, 48):
    blocks, warps = tiles(torch.bfloat16, 3, red)
    build(f"forward bf16, per-image widths, packed input, 3 outputs of {red} input columns", K._conv_fwd_kernel,
          forward_ptrs(p, p), forward_constexprs(PER_IMAGE=True, PACKED_X0=True, ACT=0, CO_ALIGN=1, Y_ALIGN=1,
                                                 **blocks), warps, layouts=("channels_last",))
# v27's loop over filter tiles against the same build without it: registers (occupancy)
loop_registers = {}
if has_cuobjdump():
    for cols, red, two, residual in ((16, 8, False, True), (16, 16, True, True), (32, 32, True, True),
                                     (64, 64, False, True), (64, 64, False, False)):
        blocks, warps = tiles(torch.bfloat16, cols, red, True, two)
        tap = red if red in K.TAPS_IN_K_CHANNELS else 0
        extra = dict(TWO_INPUTS=two, HAS_RES=residual, PER_IMAGE=True, PACKED_X0=True, PACKED_X1=two, PACKED_Y=True,
                     TAP_C0=tap, TAP_C1=tap if two else 0, **blocks)
        builds = [compile_kernel(K._conv_fwd_kernel, forward_ptrs(p, p), forward_constexprs(**extra, CO_LOOP=loop),
                                 warps) for loop in (False, True)]
        loop_registers[f"{cols} output and {red} input columns{', two inputs' if two else ''}"
                       f"{', residual' if residual else ''}"] = [
            dict(registers=resources(k)["reg"], shared=k.metadata.shared, warps=warps) for k in builds]
blocks, warps = tiles(torch.float16)
h = "*fp16"
vectors = {}
for align in (1, 8):
    flags = dict(C_ALIGN=align, X_ALIGN=align, W_ALIGN=align)
    for per_image in (False, True):
        # per-image launches read and write packed buffers (DDSNet's): pitches from the widths
        packed = dict(PACKED_X0=per_image, PACKED_X1=per_image, PACKED_Y=per_image)
        vectors[f"forward{' per-image' if per_image else ''} fp16, alignment {align}"] = vector_loads(
            K._conv_fwd_kernel, forward_ptrs(h, h),
            forward_constexprs(TWO_INPUTS=True, HAS_RES=True, PER_IMAGE=per_image, **packed, CO_ALIGN=align,
                               Y_ALIGN=align, **flags, **blocks), warps)
    # a 3-channel output (a net's last layer): the inputs keep their vector loads, per image
    # too (out and in widths promise their own multiples)
    for per_image in (False, True):
        vectors[f"forward{' per-image' if per_image else ''} fp16, input alignment {align}, output alignment 1"] = \
            vector_loads(K._conv_fwd_kernel, forward_ptrs(h, h),
                         forward_constexprs(HAS_RES=not per_image, ACT=0, PER_IMAGE=per_image, PACKED_X0=per_image,
                                            CO_ALIGN=1, Y_ALIGN=1, **flags, **blocks), warps)
    # a narrow layer's 8 channels with the taps in the reduction: each tap's channels are one vector
    vectors[f"taps in the reduction fp16, alignment {align}"] = vector_loads(
        K._conv_fwd_kernel, forward_ptrs(h, h),
        forward_constexprs(TAP_C0=8, CO_ALIGN=align, Y_ALIGN=align, **flags, BLOCK_M=256, BLOCK_N=16, BLOCK_K=16), 4)
    # an upsampling conv's shuffled store: vectors along each sub-pixel phase's channels
    vectors[f"upsampling forward's stores fp16, alignment {align}"] = vector_loads(
        K._conv_fwd_kernel, forward_ptrs(h, h),
        forward_constexprs(KSIZE=1, PAD=0, ACT=0, PER_IMAGE=True, PACKED_X0=True, PACKED_Y=True, UPSCALE=2,
                           CO_ALIGN=align, Y_ALIGN=align, **flags, **blocks), warps, stores=True)
    vectors[f"grad input fp16, alignment {align}"] = vector_loads(
        K._bwd_input_kernel, dict(dz=h, w=h, dx=h),
        dict(KSIZE=3, STRIDE=1, PAD=1, IH0=0, IW0=0, DOT_F32=False, **flags, **blocks), warps)
    del flags["W_ALIGN"]
    vectors[f"grad weight fp16, alignment {align}"] = vector_loads(
        K._bwd_weight_kernel, dict(dz=h, x=h, ws=f),
        dict(KSIZE=3, STRIDE=1, PAD=1, DOT_F32=False, ROW_TAPS=True, BLOCK_CO=64, BLOCK_CI=64, BLOCK_P=64,
             **flags),
        K.GRAD_WEIGHT_WARPS)
for name, wt, stride in [("grad input bf16 over fp32 weights", f, 1), ("grad input bf16, stride 2", p, 2)]:
    for cin, cout in ((16, 64), (64, 64), (128, 32), (128, 96), (128, 128)):
        blocks, warps = tiles(torch.bfloat16, cin, cout)
        build(f"{name}, {cin} input and {cout} output columns", K._bwd_input_kernel, dict(dz=p, w=wt, dx=p),
              dict(KSIZE=3, STRIDE=stride, PAD=1, IH0=1, IW0=0, DOT_F32=False, **blocks), warps,
              tiles(torch.bfloat16, cin, cout, fast=True))
blocks, warps = tiles(torch.float32)
build("grad input fp32", K._bwd_input_kernel, dict(dz=f, w=f, dx=f),
      dict(KSIZE=3, STRIDE=1, PAD=1, IH0=0, IW0=0, DOT_F32=True, **blocks), warps)
for cout, cin in ((64, 64), (16, 16), (16, 32), (32, 32)):  # wide, and narrow tiles' longer steps
    bco, bci, bp, warps = K._grad_weight_tiles(torch.bfloat16, cout, cin)
    build(f"grad weight bf16, {bco} x {bci} x {bp}, {warps} warps", K._bwd_weight_kernel, dict(dz=p, x=p, ws=f),
          dict(KSIZE=3, STRIDE=2, PAD=1, DOT_F32=False, ROW_TAPS=False, BLOCK_CO=bco, BLOCK_CI=bci, BLOCK_P=bp),
          warps, (dict(ROW_TAPS=True), warps))  # a kernel row's taps per program in the fast layout
W = K.GRAD_WEIGHT_WARPS
build("grad weight fp32", K._bwd_weight_kernel, dict(dz=f, x=f, ws=f),
      dict(KSIZE=3, STRIDE=1, PAD=1, DOT_F32=True, ROW_TAPS=False, BLOCK_CO=64, BLOCK_CI=64, BLOCK_P=16), W,
      (dict(ROW_TAPS=True), W))
build("activation and bias gradient", K._bwd_dz_kernel, dict(dy=p, y=p, dz=p, bias_ws=f, slope="fp32"),
      dict(ACT=2, STORE_DZ=True, BIAS_SUMS=True, BLOCK_M=64, BLOCK_N=64), 4)
for zero_rest in (True, False):
    build(f"reduce into bf16{', zeroing the rest' if zero_rest else ''}", K._reduce_kernel, dict(ws=f, out=p),
          dict(KSIZE=3, ZERO_REST=zero_rest, BLOCK=1024), 4)
build("gate squeeze", G._squeeze_kernel, dict(x_ptr=p, part_ptr=f), dict(BLOCK_HW=64, BLOCK_C=32), 4)
build("row folding (bias gradient)", R._sum_rows_kernel, dict(part_ptr=f, out_ptr=f),
      dict(BLOCK_T=32, BLOCK_C=256), 4)
build("gate head", G._gate_kernel, dict(part_ptr=f, folded_ptr=f, arrivals_ptr="*i32", inv_hw="fp32", w1_ptr=f, b1_ptr=f, w2_ptr=f, b2_ptr=f,
                                        w3_ptr=f, b3_ptr=f, w4_ptr=f, b4_ptr=f, bn_mean_ptr=f, bn_var_ptr=f,
                                        bn_weight_ptr=f, bn_bias_ptr=f, bn_eps="fp32", scale_ptr=f,
                                        logits_ptr=f, probs_ptr=f, choice_ptr="*i32"),
      dict(ATTENTION=True, BN_AFFINE=True, BLOCK_T=32, BLOCK_C=64, BLOCK_CR=16, BLOCK_H=16, BLOCK_E=16), 4)
build("gate scale", G._scale_kernel, dict(x_ptr=p, scale_ptr=f, out_ptr=p), dict(BLOCK_HW=64, BLOCK_C=32), 4)
build("route flags", G._route_flags_kernel, dict(choice_ptr="*i32", flags_ptr="*i1"), dict(BLOCK_N=8, BLOCK_E=4), 1)
# the instructions an 8-channel layer issues per pixel, its taps in the reduction and not
per_pixel = {}
if has_cuobjdump():
    for taps in ((8,), ()):
        K.TAPS_IN_K_CHANNELS = taps
        K.clear_plans()
        row = forward_row(K, "8 to 8", (8,), 8, 1)
        per_pixel[f"taps {row['taps_in_reduction'][0]}"] = row["warp_instructions_per_pixel"]
    # the forward through tensor descriptors (TMA_FORWARD), as the launcher would tile it
    K.TMA_FORWARD = True
    K.clear_plans()
    for name, ins, out in [("16 to 16", (16,), 16), ("64 to 64", (64,), 64), ("96 + 96 to 96", (96, 96), 96),
                           ("192 to 192", (192,), 192), ("48 to 3", (48,), 3)]:
        row = forward_row(K, name, ins, out, 1)
        assert row["kernel"] == "_conv_fwd_tma_kernel", row
        stacks[f"forward through tensor descriptors, {name}"] = row["stack"]
        per_pixel[f"tma {name}"] = row["warp_instructions_per_pixel"]
    K.TMA_FORWARD = False
    K.clear_plans()
    per_pixel["gather 64 to 64"] = forward_row(K, "64 to 64", (64,), 64, 1)["warp_instructions_per_pixel"]
print(json.dumps({"stacks": stacks, "vectors": vectors, "per_pixel": per_pixel, "loop_registers": loop_registers}))
"""


def test_kernels_compile_for_h100_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip("sm90.py counts the reduction loops in the code of Triton 3.6 and later; Triton 3.4 lays them "
                    "out otherwise")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", f"BENCHMARKS = {str(BENCHMARKS)!r}" + _COMPILE_FOR_SM90], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    stacks, vectors = found["stacks"], found["vectors"]
    # without the alignment hints every global load is scalar; with them, vectors
    for kernel in ("forward", "forward per-image", "taps in the reduction", "upsampling forward's stores", "grad input",
                   "grad weight"):
        assert vectors[f"{kernel} fp16, alignment 1"] == 0 < vectors[f"{kernel} fp16, alignment 8"], vectors
    for kernel in ("forward", "forward per-image"):
        assert vectors[f"{kernel} fp16, input alignment 1, output alignment 1"] == 0 < vectors[
            f"{kernel} fp16, input alignment 8, output alignment 1"], vectors
    if not stacks:
        pytest.skip("kernels compile for sm_90; this Triton has no cuobjdump to read their register use")
    # v14's premise (benchmarks/NOTES.md): 8 channels' taps in the reduction issue far fewer
    # instructions per output pixel than the per-tap loop's half-empty steps
    assert found["per_pixel"]["taps 8"] < 0.75 * found["per_pixel"]["taps 0"], found["per_pixel"]
    # and v16's: tensor descriptors take the gathered addresses out of the wide layers' steps
    assert found["per_pixel"]["tma 64 to 64"] < 0.75 * found["per_pixel"]["gather 64 to 64"], found["per_pixel"]
    spilled = {name: size for name, size in stacks.items() if size}
    assert not spilled, f"kernels spill registers on sm_90 (stack bytes per thread): {spilled}"
    # the loop over filter tiles re-derives each pass's widths and strides: kept across passes
    # they took up to 2.4x the registers, half the resident blocks (NOTES v27); now it may
    # cost one block per multiprocessor (5 -> 4 at 16 columns over two inputs), whose price
    # against the programs it saves only a GPU can tell
    fewer = {name: [blocks_per_sm(**build) for build in builds] for name, builds in found["loop_registers"].items()
             if blocks_per_sm(**builds[1]) < blocks_per_sm(**builds[0]) - 1}
    assert found["loop_registers"] and not fewer, f"blocks per multiprocessor (without, with the loop): {fewer}"


def blocks_per_sm(registers: int, shared: int, warps: int) -> int:
    """An H100's resident blocks of a kernel by its registers (65,536 a multiprocessor, given
    out 8 a thread at a time) and its shared memory (228 KiB, 1 KiB of it reserved per block)."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, 228 * 1024 // (shared + 1024), 32)
