"""Prefix-sliced 2-D convolution in Triton: ``act(conv(x, weight[:o, :i]) + bias[:o] + residual)``.

The shared weight ``[Cout_max, Cin_max, k, k]`` is read in place through its strides, so a
narrow layer never copies its slice. Activations are NCHW tensors in any memory format
(channels_last is the fast one); the output is channels_last.

- Forward: implicit GEMM (M = output pixels of one image, N = output channels, K = taps x
  input channels) with bias, residual and activation fused in the epilogue. Two inputs form
  the fused concat ``conv(cat([a, b], 1))`` of a U-Net decoder without building the cat.
- Backward: dZ = dY * act'(y) from the saved output, fused with the bias-gradient partial
  sums; grad input is a convolution of dZ with the flipped taps, split for stride 2 into the
  four sub-pixel phases (each a dense convolution with only its live taps); grad weight is a
  split reduction over output pixels into an fp32 workspace, then reduced into the prefix of
  a zero full-size gradient (deterministic, no atomics).
- Per-image widths (forward only): an int32 device tensor ``[N, 1 + len(inputs)]`` gives each
  image's (out width, in width per input); the kernels read the widths from memory, so one
  compiled kernel (and one CUDA graph) serves every width and nothing syncs with the host.
  A caller that knows every width is a multiple of 8 (DDSNet's tables) says so, and the
  channel masks keep their vector loads.

``slim_conv2d`` is registered as the ``torch.library`` op ``dds_fast::slim_conv2d`` (with
autograd, a fake implementation for ``torch.compile`` and a FLOP formula).
"""
import functools
import math
import numbers
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: no TMA_FORWARD
    TensorDescriptor = None
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from ._launch import (INTERPRET, MAX_BATCH, CachedDescriptorLaunch, CachedLaunch, cached_call, cdiv, next_pow2,
                      num_sms)
from ._rows import fold_plan, fold_rows

ACTIVATIONS = (None, "relu", "leaky_relu")
_ACT_NAMES = {"none": 0, "relu": 1, "leaky_relu": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _mma(acc, a, b, DOT_F32: tl.constexpr):
    # fp32 operands need exact products (tf32 fails fp32 accuracy); the interpreter also
    # routes bf16 through fp32 because its bf16 dot is silently wrong.
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        # ``a`` is always the activation operand: fp32 master weights (mixed precision) are
        # cast to its dtype in registers, so the weight is never copied
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


@triton.jit
def _fwd_segment(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start, c_n,
                 oh, ow, m_ok, co, co_ok, H, W,
                 KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Accumulate one input block over every (tap, channel block) step.

    One flat loop rather than a loop of channel blocks inside unrolled taps: at narrow widths
    each tap has a single channel block, so the inner loop had nothing for the compiler to
    pipeline and every tap waited for its own loads; flat, the next steps' loads are in
    flight while this step multiplies."""
    ck = tl.arange(0, BLOCK_K)
    blocks = tl.cdiv(c_n, BLOCK_K)
    tap = 0
    c0 = 0
    for _ in range(0, KSIZE * KSIZE * blocks):
        c = c0 + ck
        r = tap // KSIZE
        s = tap - r * KSIZE
        ih = oh * STRIDE - PAD + r
        iw = ow * STRIDE - PAD + s
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < c_n
        # Both operands masked: inactive channels of a max-width buffer may hold NaN.
        a = tl.load(x_img + (ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :],
                    mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w + (co * swo)[None, :] + r * swh + s * sww + ((start + c) * swi)[:, None],
                    mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, DOT_F32)
        # the next channel block, or the next tap's first: counted, not divided out of the step
        c0 += BLOCK_K
        next_tap = c0 >= c_n
        tap = tl.where(next_tap, tap + 1, tap)
        c0 = tl.where(next_tap, 0, c0)
    return acc


@triton.jit
def _fwd_taps_in_k(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start,
                   oh, ow, m_ok, co, co_ok, H, W,
                   KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_K: tl.constexpr, TAP_C: tl.constexpr):
    """``_fwd_segment`` for an input of a few channels (an image's 1 or 3, or a narrow layer's
    8): the taps join the channels in the reduction, so a 3-channel 3x3 conv runs one step of
    27 live lanes out of 32 instead of nine steps of 3 out of 16, and an 8-channel one five
    steps of 16 instead of nine half-empty ones. Each lane's tap and channel come from its
    index; TAP_C, the channel count, is a compile-time constant, so that is a shift or a
    multiply, and runs of TAP_C lanes are consecutive channels of one tap (vector loads)."""
    kk = tl.arange(0, BLOCK_K)
    total: tl.constexpr = KSIZE * KSIZE * TAP_C
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    for k0 in range(0, total, BLOCK_K):
        k = k0 + kk
        tap = k // TAP_C
        c = k - tap * TAP_C
        r = tap // KSIZE
        s = tap - r * KSIZE
        k_ok = k < total
        ih = ih0[:, None] + r[None, :]
        iw = iw0[:, None] + s[None, :]
        # unsigned: a negative row or column fails the one comparison
        ok = (m_ok[:, None] & k_ok[None, :] & (ih.to(tl.uint32, bitcast=True) < H)
              & (iw.to(tl.uint32, bitcast=True) < W))
        a = tl.load(x_img + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=ok, other=0.0)
        b = tl.load(w + (co * swo)[None, :] + (r * swh + s * sww + (start + c) * swi)[:, None],
                    mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, DOT_F32)
    return acc


@triton.jit
def _fwd_input(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start, c_n,
               oh, ow, m_ok, co, co_ok, H, W,
               KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_K: tl.constexpr, TAP_C: tl.constexpr, PER_IMAGE: tl.constexpr):
    """One input's share of the reduction. With TAP_C, its taps fold into the reduction: in a
    static launch always (the host passes C == TAP_C), with per-image widths for the images
    whose width is TAP_C (a branch per program, on its image's width); else the per-tap loop."""
    if TAP_C > 0:
        if PER_IMAGE:
            if c_n == TAP_C:
                acc = _fwd_taps_in_k(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start,
                                     oh, ow, m_ok, co, co_ok, H, W, KSIZE, STRIDE, PAD, DOT_F32, BLOCK_K, TAP_C)
            else:
                acc = _fwd_segment(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start, c_n,
                                   oh, ow, m_ok, co, co_ok, H, W, KSIZE, STRIDE, PAD, DOT_F32, BLOCK_K)
        else:
            acc = _fwd_taps_in_k(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start,
                                 oh, ow, m_ok, co, co_ok, H, W, KSIZE, STRIDE, PAD, DOT_F32, BLOCK_K, TAP_C)
    else:
        acc = _fwd_segment(acc, x_img, sxc, sxh, sxw, w, swo, swi, swh, sww, start, c_n,
                           oh, ow, m_ok, co, co_ok, H, W, KSIZE, STRIDE, PAD, DOT_F32, BLOCK_K)
    return acc


@triton.jit
def _epilogue(acc, b, sb, r_ptrs, out_ok, co, co_ok, slope,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """Bias, residual and activation on the fp32 accumulator of an output tile."""
    if HAS_BIAS:
        acc += tl.load(b + co * sb, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(r_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    if ACT == 1:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    elif ACT == 2:
        acc = tl.where(acc > 0, acc, acc * slope)
    return acc


@triton.jit
def _aligned(value, ALIGN: tl.constexpr):
    # value is a multiple of ALIGN (the host checks): written so, the compiler knows it and
    # loads and stores whole vectors along channels (asynchronous copies into shared memory)
    return value // ALIGN * ALIGN


@triton.jit
def _fwd_program(
    pid_m, co_tile, n,
    x0, x1, w, b, res, y, widths, sums,
    H, W, HO, WO, C0, C1, COUT, START0, START1,
    sx0n, sx0c, sx0h, sx0w, sx1n, sx1c, sx1h, sx1w,
    swo, swi, swh, sww, sb,
    srn, src, srh, srw, syn, syc, syh, syw, swdn, swdc,
    slope,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TWO_INPUTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, PER_IMAGE: tl.constexpr,
    CHANNEL_SUMS: tl.constexpr, DOT_F32: tl.constexpr, TAP_C0: tl.constexpr, TAP_C1: tl.constexpr,
    UPSCALE: tl.constexpr, PACKED_X0: tl.constexpr, PACKED_X1: tl.constexpr, PACKED_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    C_ALIGN: tl.constexpr, CO_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
    W_ALIGN: tl.constexpr,
):
    """Filter tile ``co_tile`` of pixel tile ``pid_m`` of image ``n``: its widths, the strides
    they give and the tile's convolution. A loop over filter tiles runs it whole on each pass: derived
    values kept across passes took up to 140 more registers on sm_90 (NOTES v27)."""
    # what the host found to be multiples of 8 (or 1), the input side apart from the output
    # side (a 3-channel output must not cost the input loads their vectors): input channel
    # counts and segment starts, output channels, the inputs' batch and pixel strides, the
    # output's and residual's, and the weight's strides other than Cin's
    cout_n = _aligned(COUT, CO_ALIGN)
    c0_n = _aligned(C0, C_ALIGN)
    c1_n = _aligned(C1, C_ALIGN)
    START0 = _aligned(START0, C_ALIGN)
    START1 = _aligned(START1, C_ALIGN)
    sx0n, sx0h, sx0w = _aligned(sx0n, X_ALIGN), _aligned(sx0h, X_ALIGN), _aligned(sx0w, X_ALIGN)
    sx1n, sx1h, sx1w = _aligned(sx1n, X_ALIGN), _aligned(sx1h, X_ALIGN), _aligned(sx1w, X_ALIGN)
    srn, srh, srw = _aligned(srn, Y_ALIGN), _aligned(srh, Y_ALIGN), _aligned(srw, Y_ALIGN)
    syn, syh, syw = _aligned(syn, Y_ALIGN), _aligned(syh, Y_ALIGN), _aligned(syw, Y_ALIGN)
    swo, swh, sww = _aligned(swo, W_ALIGN), _aligned(swh, W_ALIGN), _aligned(sww, W_ALIGN)
    if PER_IMAGE:
        # Clamped to the buffers so a bad width can never read or write out of bounds; the
        # alignment flags cover the caller's promise that the widths are multiples of 8 too.
        cout_n = _aligned(tl.minimum(tl.load(widths + n * swdn), COUT), CO_ALIGN)
        c0_n = _aligned(tl.minimum(tl.load(widths + n * swdn + swdc), C0), C_ALIGN)
        if TWO_INPUTS:
            c1_n = _aligned(tl.minimum(tl.load(widths + n * swdn + 2 * swdc), C1), C_ALIGN)
        # packed buffers: each image's pixels one after another at its own width's pitch (what a
        # packed output stores, and a packed input of the same widths reads), so a narrow image
        # moves as few bytes as in a buffer of its own width
        if PACKED_X0:
            sx0w = c0_n
            sx0h = W * c0_n
        if PACKED_X1:
            sx1w = c1_n
            sx1h = W * c1_n
        if PACKED_Y:
            syw = _aligned(cout_n // (UPSCALE * UPSCALE), CO_ALIGN)
            syh = (WO * UPSCALE) * syw
    if co_tile * BLOCK_N < cout_n:  # beyond this image's output width: left unwritten
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < HO * WO
        oh = offs_m // WO
        ow = offs_m % WO
        cols = tl.arange(0, BLOCK_N)
        # pixel shuffle: filter co goes to channel co // r^2 of sub-pixel phase co % r^2. Where r^2
        # divides the tile (r a power of two), the tile's columns take its filters phase by phase,
        # so that each run of PHASE_COLS columns stores consecutive channels of one phase: vector
        # stores, as without the shuffle; otherwise (r = 3, or r^2 above the tile) filter by filter
        PHASED: tl.constexpr = UPSCALE > 1 and BLOCK_N % (UPSCALE * UPSCALE) == 0
        if PHASED:
            PHASE_COLS: tl.constexpr = BLOCK_N // (UPSCALE * UPSCALE)
            co = co_tile * BLOCK_N + (cols % PHASE_COLS) * (UPSCALE * UPSCALE) + cols // PHASE_COLS
        else:
            co = co_tile * BLOCK_N + cols
        co_ok = co < cout_n

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _fwd_input(acc, x0 + n * sx0n, sx0c, sx0h, sx0w, w, swo, swi, swh, sww, START0, c0_n,
                         oh, ow, m_ok, co, co_ok, H, W, KSIZE, STRIDE, PAD, DOT_F32, BLOCK_K, TAP_C0, PER_IMAGE)
        if TWO_INPUTS:
            acc = _fwd_input(acc, x1 + n * sx1n, sx1c, sx1h, sx1w, w, swo, swi, swh, sww, START1, c1_n,
                             oh, ow, m_ok, co, co_ok, H, W, KSIZE, STRIDE, PAD, DOT_F32, BLOCK_K, TAP_C1, PER_IMAGE)

        out_ok = m_ok[:, None] & co_ok[None, :]
        acc = _epilogue(acc, b, sb, res + n * srn + (oh * srh + ow * srw)[:, None] + (co * src)[None, :], out_ok, co,
                        co_ok, slope, HAS_BIAS, HAS_RES, ACT)
        if UPSCALE > 1:
            # y is the shuffled [N, COUT / r^2, r * HO, r * WO]: phase p of pixel (oh, ow) is output
            # pixel (r * oh + p // r, r * ow + p % r)
            if PHASED:
                channel = co_tile * PHASE_COLS + cols % PHASE_COLS
                phase = cols // PHASE_COLS
            else:
                channel = co // (UPSCALE * UPSCALE)
                phase = co % (UPSCALE * UPSCALE)
            y_ptrs = y + n * syn + (oh * (UPSCALE * syh) + ow * (UPSCALE * syw))[:, None] + (
                channel * syc + (phase // UPSCALE) * syh + (phase % UPSCALE) * syw)[None, :]
            # the same filters as co_ok (whole channels: out widths are multiples of r^2), said in
            # channels, whose runs the compiler can see are all in or all out (CO_ALIGN counts them)
            out_ok = m_ok[:, None] & (channel < _aligned(cout_n // (UPSCALE * UPSCALE), CO_ALIGN))[None, :]
        else:
            y_ptrs = y + n * syn + (oh * syh + ow * syw)[:, None] + (co * syc)[None, :]
        out = acc.to(y.dtype.element_ty)
        tl.store(y_ptrs, out, mask=out_ok)
        if CHANNEL_SUMS:
            # the gate's squeeze, for free: this tile's channel sums of the stored output, one
            # row per pixel tile (summed in order by the gate head: deterministic, no atomics)
            part = tl.sum(tl.where(out_ok, out.to(tl.float32), 0.0), axis=0)
            tl.store(sums + (n * tl.num_programs(0) + pid_m) * COUT + co, part, mask=co_ok)


@triton.jit(do_not_specialize=["C0", "C1", "COUT"])
def _conv_fwd_kernel(
    x0, x1, w, b, res, y, widths, sums,
    H, W, HO, WO, C0, C1, COUT, START0, START1,
    sx0n, sx0c, sx0h, sx0w, sx1n, sx1c, sx1h, sx1w,
    swo, swi, swh, sww, sb,
    srn, src, srh, srw, syn, syc, syh, syw, swdn, swdc,
    slope,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TWO_INPUTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, PER_IMAGE: tl.constexpr,
    CHANNEL_SUMS: tl.constexpr, DOT_F32: tl.constexpr, TAP_C0: tl.constexpr, TAP_C1: tl.constexpr,
    UPSCALE: tl.constexpr, PACKED_X0: tl.constexpr, PACKED_X1: tl.constexpr, PACKED_Y: tl.constexpr,
    CO_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    C_ALIGN: tl.constexpr, CO_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
    W_ALIGN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)  # one image per program: its widths are per-program scalars
    if CO_LOOP:
        # Per-image widths on a grid of fewer filter tiles than the widest image's (the host
        # sizes it for the narrowest, with enough programs to fill the GPU): each program takes
        # every grid-width-th tile up to its own image's width, so a narrow image leaves no
        # programs that only exit (NOTES v27)
        tiles = tl.cdiv(_aligned(tl.minimum(tl.load(widths + n * swdn), COUT), CO_ALIGN), BLOCK_N)
        for co_tile in range(pid_co, tiles, tl.num_programs(1)):
            _fwd_program(
                pid_m, co_tile, n,
                x0, x1, w, b, res, y, widths, sums, H, W, HO, WO, C0, C1, COUT, START0, START1, sx0n, sx0c, sx0h, sx0w,
                sx1n, sx1c, sx1h, sx1w, swo, swi, swh, sww, sb, srn, src, srh, srw, syn, syc, syh, syw, swdn, swdc,
                slope, KSIZE, STRIDE, PAD, TWO_INPUTS, HAS_BIAS, HAS_RES, ACT, PER_IMAGE, CHANNEL_SUMS, DOT_F32, TAP_C0,
                TAP_C1, UPSCALE, PACKED_X0, PACKED_X1, PACKED_Y, BLOCK_M, BLOCK_N, BLOCK_K, C_ALIGN, CO_ALIGN,
                X_ALIGN, Y_ALIGN, W_ALIGN)
    else:  # one tile a program
        _fwd_program(
            pid_m, pid_co, n,
            x0, x1, w, b, res, y, widths, sums, H, W, HO, WO, C0, C1, COUT, START0, START1, sx0n, sx0c, sx0h, sx0w,
            sx1n, sx1c, sx1h, sx1w, swo, swi, swh, sww, sb, srn, src, srh, srw, syn, syc, syh, syw, swdn, swdc,
            slope, KSIZE, STRIDE, PAD, TWO_INPUTS, HAS_BIAS, HAS_RES, ACT, PER_IMAGE, CHANNEL_SUMS, DOT_F32, TAP_C0,
            TAP_C1, UPSCALE, PACKED_X0, PACKED_X1, PACKED_Y, BLOCK_M, BLOCK_N, BLOCK_K, C_ALIGN, CO_ALIGN,
            X_ALIGN, Y_ALIGN, W_ALIGN)


@triton.jit
def _tma_segment(acc, xd, wd, c_n, n, oh0, ow0, co0,
                 KSIZE: tl.constexpr, PAD: tl.constexpr, DOT_F32: tl.constexpr, BH: tl.constexpr,
                 BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_fwd_segment`` through tensor descriptors (TMA on sm_90): the input tile of a tap is
    the box of BH x BW pixels at the tap's offset, which the copy engine fetches with zeros
    beyond the image and beyond the descriptor's channels (the active ones): no address or
    mask arithmetic per element."""
    blocks = tl.cdiv(c_n, BLOCK_K)
    tap = 0
    c0 = 0
    for _ in range(0, KSIZE * KSIZE * blocks):
        r = tap // KSIZE
        s = tap - r * KSIZE
        a = xd.load([n, oh0 + r - PAD, ow0 + s - PAD, c0]).reshape(BH * BW, BLOCK_K)
        bt = wd.load([co0, r, s, c0]).reshape(BLOCK_N, BLOCK_K)
        acc = _mma(acc, a, tl.trans(bt), DOT_F32)
        c0 += BLOCK_K
        next_tap = c0 >= c_n
        tap = tl.where(next_tap, tap + 1, tap)
        c0 = tl.where(next_tap, 0, c0)
    return acc


@triton.jit(do_not_specialize=["C0", "C1", "COUT"])
def _conv_fwd_tma_kernel(
    x0d, x1d, w0d, w1d, b, res, y,
    HO, WO, C0, C1, COUT, sb, srn, src, srh, srw, syn, syc, syh, syw, slope,
    KSIZE: tl.constexpr, PAD: tl.constexpr, TWO_INPUTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, DOT_F32: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CO_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
):
    """``_conv_fwd_kernel`` for a static stride-1 launch in the fast layout, its inputs and
    weight blocks read through tensor descriptors (``x?d``: the NHWC view of an input's active
    channels; ``w?d``: the [o, k, k, channels] view of its weight block). Each program computes
    a BH x BW block of output pixels."""
    pid_m = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2)
    cout_n = _aligned(COUT, CO_ALIGN)
    srn, srh, srw = _aligned(srn, Y_ALIGN), _aligned(srh, Y_ALIGN), _aligned(srw, Y_ALIGN)
    syn, syh, syw = _aligned(syn, Y_ALIGN), _aligned(syh, Y_ALIGN), _aligned(syw, Y_ALIGN)
    tiles_w = tl.cdiv(WO, BW)
    oh0 = pid_m // tiles_w * BH
    ow0 = pid_m % tiles_w * BW
    acc = tl.zeros((BH * BW, BLOCK_N), dtype=tl.float32)
    acc = _tma_segment(acc, x0d, w0d, C0, n, oh0, ow0, pid_co * BLOCK_N, KSIZE, PAD, DOT_F32, BH, BW, BLOCK_N,
                       BLOCK_K)
    if TWO_INPUTS:
        acc = _tma_segment(acc, x1d, w1d, C1, n, oh0, ow0, pid_co * BLOCK_N, KSIZE, PAD, DOT_F32, BH, BW, BLOCK_N,
                           BLOCK_K)
    pix = tl.arange(0, BH * BW)
    oh = oh0 + pix // BW
    ow = ow0 + pix % BW
    co = pid_co * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < cout_n
    out_ok = ((oh < HO) & (ow < WO))[:, None] & co_ok[None, :]
    n64 = n.to(tl.int64)
    acc = _epilogue(acc, b, sb, res + n64 * srn + (oh * srh + ow * srw)[:, None] + (co * src)[None, :], out_ok, co,
                    co_ok, slope, HAS_BIAS, HAS_RES, ACT)
    tl.store(y + n64 * syn + (oh * syh + ow * syw)[:, None] + (co * syc)[None, :], acc.to(y.dtype.element_ty),
             mask=out_ok)


@triton.jit(do_not_specialize=["COUT"])
def _bwd_dz_kernel(
    dy, y, dz, bias_ws, HO, WO, COUT,
    sdyn, sdyc, sdyh, sdyw, syn, syc, syh, syw, szn, szc, szh, szw,
    slope,
    ACT: tl.constexpr, STORE_DZ: tl.constexpr, BIAS_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    COUT = _aligned(COUT, ALIGN)  # and the batch and pixel strides (see _conv_fwd_kernel)
    sdyn, sdyh, sdyw = _aligned(sdyn, ALIGN), _aligned(sdyh, ALIGN), _aligned(sdyw, ALIGN)
    syn, syh, syw = _aligned(syn, ALIGN), _aligned(syh, ALIGN), _aligned(syw, ALIGN)
    szn, szh, szw = _aligned(szn, ALIGN), _aligned(szh, ALIGN), _aligned(szw, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HO * WO
    oh = offs_m // WO
    ow = offs_m % WO
    co = pid_co * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    ok = m_ok[:, None] & co_ok[None, :]
    pix_dy = (oh * sdyh + ow * sdyw)[:, None]
    g = tl.load(dy + n * sdyn + pix_dy + (co * sdyc)[None, :], mask=ok, other=0.0).to(tl.float32)
    if ACT != 0:
        # The output's sign is the pre-activation's sign (slope >= 0 is enforced on the host).
        # Compared in fp32: the interpreter's bf16 comparison feeding tl.where is wrong.
        yv = tl.load(y + n * syn + (oh * syh + ow * syw)[:, None] + (co * syc)[None, :], mask=ok,
                     other=0.0).to(tl.float32)
        if ACT == 1:  # zero where y <= 0 only: a NaN output passes its gradient, as torch's ReLU does
            g = tl.where(yv <= 0, 0.0, g)
        else:
            g = tl.where(yv > 0, g, g * slope)
    if STORE_DZ:
        z_ptrs = dz + n * szn + (oh * szh + ow * szw)[:, None] + (co * szc)[None, :]
        tl.store(z_ptrs, g.to(dz.dtype.element_ty), mask=ok)
    if BIAS_SUMS:
        row = n * tl.num_programs(0) + pid_m
        tl.store(bias_ws + row * COUT + co, tl.sum(g, axis=0), mask=co_ok)


@triton.jit(do_not_specialize=["COUT", "CIN"])
def _bwd_input_kernel(
    dz, w, dx, H, W, HO, WO, HP, WP, COUT, CIN, START,
    szn, szc, szh, szw, swo, swi, swh, sww, sxn, sxc, sxh, sxw,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, IH0: tl.constexpr, IW0: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    C_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr,
):
    """Grad input for the input pixels (IH0 + STRIDE*jh, IW0 + STRIDE*jw) of one sub-pixel phase.

    Only taps with (IH0 + PAD - r) % STRIDE == 0 reach this phase, so the dead taps of a
    strided conv are dropped at compile time instead of masked at run time.
    """
    pid_m = tl.program_id(0)
    pid_ci = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    COUT, CIN, START = _aligned(COUT, C_ALIGN), _aligned(CIN, C_ALIGN), _aligned(START, C_ALIGN)
    szn, szh, szw = _aligned(szn, X_ALIGN), _aligned(szh, X_ALIGN), _aligned(szw, X_ALIGN)
    sxn, sxh, sxw = _aligned(sxn, X_ALIGN), _aligned(sxh, X_ALIGN), _aligned(sxw, X_ALIGN)
    swo, swh, sww = _aligned(swo, W_ALIGN), _aligned(swh, W_ALIGN), _aligned(sww, W_ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HP * WP
    jh = offs_m // WP
    jw = offs_m % WP
    ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < CIN
    ck = tl.arange(0, BLOCK_K)
    dz_img = dz + n * szn
    # The live taps of this phase: r = R0 + STRIDE * i for i < NR (likewise s), all taps at
    # stride 1. One flat loop over (live tap, channel block), as in the forward, so that the
    # next steps' loads are in flight while this one multiplies.
    R0 = (IH0 + PAD) % STRIDE
    S0 = (IW0 + PAD) % STRIDE
    NR = (KSIZE - R0 + STRIDE - 1) // STRIDE
    NS = (KSIZE - S0 + STRIDE - 1) // STRIDE
    blocks = tl.cdiv(COUT, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tap = 0
    co0 = 0
    for _ in range(0, NR * NS * blocks):
        co = co0 + ck
        r = R0 + STRIDE * (tap // NS)
        s = S0 + STRIDE * (tap % NS)
        oh = jh + (IH0 + PAD - r) // STRIDE
        ow = jw + (IW0 + PAD - s) // STRIDE
        pix_ok = m_ok & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        co_ok = co < COUT
        a = tl.load(dz_img + (oh * szh + ow * szw)[:, None] + (co * szc)[None, :],
                    mask=pix_ok[:, None] & co_ok[None, :], other=0.0)
        bt = tl.load(w + ((START + ci) * swi)[None, :] + r * swh + s * sww + (co * swo)[:, None],
                     mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = _mma(acc, a, bt, DOT_F32)
        co0 += BLOCK_K  # the next channel block, or the next live tap's first (as in the forward)
        next_tap = co0 >= COUT
        tap = tl.where(next_tap, tap + 1, tap)
        co0 = tl.where(next_tap, 0, co0)
    ih = IH0 + jh * STRIDE
    iw = IW0 + jw * STRIDE
    x_ptrs = dx + n * sxn + (ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :]
    tl.store(x_ptrs, acc.to(dx.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.jit
def _x_tile(x, pix, iw, row_ok, ci, ci_ok, sxw, sxc, W):
    """The input tile [pixels, BLOCK_CI] under one tap: pixel offsets ``pix`` (image and row)
    plus column ``iw``, zero where the tap falls outside the image."""
    ok = row_ok & (iw >= 0) & (iw < W)
    return tl.load(x + (pix + iw * sxw)[:, None] + (ci * sxc)[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)


@triton.jit
def _chunk_pixels(first, p0, NPIX, CHUNK, HO, WO, BLOCK_P: tl.constexpr):
    """Step p0 of the chunk of flattened output pixels from ``first``: mask, image, row, column."""
    p = first + p0 + tl.arange(0, BLOCK_P)
    p_ok = (p < NPIX) & (p0 + tl.arange(0, BLOCK_P) < CHUNK)
    img = p // (HO * WO)
    q = p % (HO * WO)
    return p_ok, img, q // WO, q % WO


@triton.jit(do_not_specialize=["COUT", "CIN", "NPIX", "CHUNK"])
def _bwd_weight_kernel(
    dz, x, ws, H, W, HO, WO, NPIX, CHUNK, COUT, CIN,
    szn, szc, szh, szw, sxn, sxc, sxh, sxw,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DOT_F32: tl.constexpr, ROW_TAPS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
    C_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
):
    """Partial grad weight over one chunk of output pixels (all images flattened), written to
    ws[split, tap, co, ci] in fp32: one tap per program, or with ROW_TAPS (KSIZE 3) the three
    taps of one kernel row, which then share each dz tile instead of loading it three times
    (with taps on the grid, the operands cross from L2 once per tap). Taps on the grid: more
    parallel programs and one compiled loop instead of KSIZE**2 unrolled ones."""
    COUT, CIN = _aligned(COUT, C_ALIGN), _aligned(CIN, C_ALIGN)
    szn, szh, szw = _aligned(szn, X_ALIGN), _aligned(szh, X_ALIGN), _aligned(szw, X_ALIGN)
    sxn, sxh, sxw = _aligned(sxn, X_ALIGN), _aligned(sxh, X_ALIGN), _aligned(sxw, X_ALIGN)
    pid_co = tl.program_id(0)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    split = tl.program_id(2)
    first = split.to(tl.int64) * CHUNK
    if ROW_TAPS:
        pid_ci = tl.program_id(1) // KSIZE
        r = tl.program_id(1) % KSIZE
        ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_ok = ci < CIN
        acc0 = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
        for p0 in range(0, CHUNK, BLOCK_P):
            p_ok, img, oh, ow = _chunk_pixels(first, p0, NPIX, CHUNK, HO, WO, BLOCK_P)
            a = tl.load(dz + (img * szn + oh * szh + ow * szw)[None, :] + (co * szc)[:, None],
                        mask=co_ok[:, None] & p_ok[None, :], other=0.0)
            ih = oh * STRIDE - PAD + r
            row_ok = p_ok & (ih >= 0) & (ih < H)
            pix = img * sxn + ih * sxh
            iw = ow * STRIDE - PAD
            acc0 = _mma(acc0, a, _x_tile(x, pix, iw, row_ok, ci, ci_ok, sxw, sxc, W), DOT_F32)
            acc1 = _mma(acc1, a, _x_tile(x, pix, iw + 1, row_ok, ci, ci_ok, sxw, sxc, W), DOT_F32)
            acc2 = _mma(acc2, a, _x_tile(x, pix, iw + 2, row_ok, ci, ci_ok, sxw, sxc, W), DOT_F32)
        ws_ptrs = ws + ((split * (KSIZE * KSIZE) + r * KSIZE) * COUT + co[:, None]) * CIN + ci[None, :]
        ok = co_ok[:, None] & ci_ok[None, :]
        tl.store(ws_ptrs, acc0, mask=ok)
        tl.store(ws_ptrs + COUT * CIN, acc1, mask=ok)
        tl.store(ws_ptrs + 2 * COUT * CIN, acc2, mask=ok)
    else:
        pid_ci = tl.program_id(1) // (KSIZE * KSIZE)
        tap = tl.program_id(1) % (KSIZE * KSIZE)
        r = tap // KSIZE
        s = tap % KSIZE
        ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_ok = ci < CIN
        acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
        for p0 in range(0, CHUNK, BLOCK_P):
            p_ok, img, oh, ow = _chunk_pixels(first, p0, NPIX, CHUNK, HO, WO, BLOCK_P)
            ih = oh * STRIDE - PAD + r
            iw = ow * STRIDE - PAD + s
            x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(dz + (img * szn + oh * szh + ow * szw)[None, :] + (co * szc)[:, None],
                        mask=co_ok[:, None] & p_ok[None, :], other=0.0)
            bt = tl.load(x + (img * sxn + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
                         mask=x_ok[:, None] & ci_ok[None, :], other=0.0)
            acc = _mma(acc, a, bt, DOT_F32)
        ws_ptrs = ws + ((split * (KSIZE * KSIZE) + tap) * COUT + co[:, None]) * CIN + ci[None, :]
        tl.store(ws_ptrs, acc, mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _reduce_kernel(ws, out, R, COUT, CIN, START, COUT_MAX, CIN_MAX, so, si, sh, sw,
                   KSIZE: tl.constexpr, ZERO_REST: tl.constexpr, BLOCK: tl.constexpr):
    """out[co, START + ci, r, s] = sum over rows of ws[row, tap, co, ci] (fixed order: deterministic),
    over the whole [COUT_MAX, CIN_MAX, KSIZE, KSIZE] output; with ZERO_REST, zero outside the
    active block (a fill launch less), else left as it is."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = f % KSIZE
    r = (f // KSIZE) % KSIZE
    ci = (f // (KSIZE * KSIZE)) % CIN_MAX - START
    co = f // (KSIZE * KSIZE * CIN_MAX)
    inside = co < COUT_MAX
    active = inside & (co < COUT) & (ci >= 0) & (ci < CIN)
    e = ((r * KSIZE + s) * COUT + co) * CIN + ci
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(R):
        acc += tl.load(ws + row * (KSIZE * KSIZE * COUT * CIN) + e, mask=active, other=0.0)
    dst = co * so + (START + ci) * si + r * sh + s * sw
    tl.store(out + dst, acc.to(out.dtype.element_ty), mask=inside if ZERO_REST else active)


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _alignment(*values: int) -> int:
    """8 when every value is a multiple of 8, else 1: how far the kernels may assume alignment."""
    return 8 if all(v % 8 == 0 for v in values) else 1


def _batch_and_pixel_strides(*strides_of: Sequence[int]) -> list[int]:
    """The batch and pixel strides of NCHW tensors with these strides."""
    return [s for strides in strides_of for s in (strides[0], strides[2], strides[3])]


def _pixel_strides_of_weight(strides: Sequence[int]) -> tuple[int, int, int]:
    """The weight's strides other than its input channels' (the ones the kernels step over)."""
    return strides[0], strides[2], strides[3]


def _empty_channels_last(shape, like: torch.Tensor) -> torch.Tensor:
    """Every output and gradient buffer comes from here (tests poison it to prove full writes)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _pixel_unshuffle(t: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.pixel_unshuffle`` into channels_last, in one copy: output channel c * r^2 + i * r + j
    of pixel (h, w) is channel c of input pixel (r * h + i, r * w + j)."""
    n, c, h, w = t.shape
    r = factor
    blocks = t.permute(0, 2, 3, 1).reshape(n, h // r, r, w // r, r, c)
    # contiguous, then a view: a reshape that can view (a 1x1 output) would keep an NCHW layout
    out = blocks.permute(0, 1, 3, 5, 2, 4).contiguous()
    return out.view(n, h // r, w // r, c * r * r).permute(0, 3, 1, 2)


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _tiles(dtype: torch.dtype, npix: int, cols: int, red: int, fast: bool = False,
           two_inputs: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of an implicit GEMM over npix pixels, cols output
    columns and red reduction channels.

    Per-image forwards pass the weight's maximum widths, so one compiled kernel serves every
    width; static launches pass their active widths. The interpreter pays per program, so it
    gets big tiles. The gathered operands' pointer and mask tensors take many registers:
    ``fast`` says every channel stride is 1 and every alignment flag 8 (channels_last
    activations and weights), where the compiler keeps them small and bigger tiles fit;
    elsewhere the small tiles are the ones that do not spill on sm_90 under Triton 3.6 and
    3.9 (tests/test_compile_sm90.py).
    """
    if INTERPRET:
        return _pow2(npix, 16, 1024), _pow2(cols, 16, 64), _pow2(red, 16, 64), 4
    if dtype == torch.float32:
        # ieee fp32 dots unroll into FMAs: small tiles keep code size and registers sane
        return 32, _pow2(cols, 16, 32), 16, 4
    # From the tile sweeps (benchmarks/NOTES.md, v7, v8 and v10): BLOCK_K 32 halves the loop
    # steps and their per-step index and mask work once there are 32 channels (and wastes half
    # of each step below that); narrow tiles take 256 rows; beyond 64 columns, 128 x 128 x 64
    # tiles were 18-35% faster than 128 x 64 x 32 ones, and 256 x 64 x 32 12-14% at 48-64.
    # In v10 two exceptions lost time (48 + 48 to 48 channels at 512x512: 1.25 -> 1.38 ms; 96
    # to 192: +15-19%), so a reduction that is no multiple of 64 steps by 32 (96 channels in
    # 64-wide steps waste a quarter), and two inputs keep 128 rows (each input's loop is a
    # separate pipeline; 256 rows double the registers both hold).
    bn = _pow2(cols, 16, 128 if fast else 64)
    bk = 32 if red >= 32 else 16
    if bn == 16:
        return 256, bn, bk, (4 if bk == 16 else 8)
    if bn == 128:
        return 128, bn, (64 if red % 64 == 0 else bk), 8
    return (256 if bn == 32 or (fast and not two_inputs) else 128), bn, bk, 8


def _taps_step(lanes: Sequence[int], out_channels: int, two_inputs: bool = False) -> int:
    """The reduction step (16 or 32 lanes) of inputs whose taps join the reduction, ``lanes``
    (taps x channels) each: the one that pads the fewest lanes, the wider on a tie (fewer
    steps): 3 channels x 9 taps take one step of 32, 8 x 9 five of 16 (90% live, against 75%
    in three of 32). 32-wide steps spilled on sm_90 beyond 32 output columns in v9; with the
    channel count compiled in they no longer do up to 64 (beyond, not built), except a
    concat's, which still spill beyond 32."""
    if out_channels > (32 if two_inputs else 64):
        return 16
    return min((32, 16), key=lambda step: sum(cdiv(n, step) * step - n for n in lanes))


def _taps_tiles(dtype: torch.dtype, npix: int, lanes: Sequence[int], out_channels: int,
                two_inputs: bool = False) -> tuple[int, int, int, int]:
    """``_tiles`` of a static launch whose inputs' taps join the reduction (``_taps_step``).
    32-lane steps over 33 to 64 output columns (one input) take 4 warps: an RGB stem to 48
    channels with the gate's channel sums ran in 0.128 ms so on an H200 (8x512x512), against
    0.217 ms on 16-lane steps with 8 warps and 0.156 ms on 256-row tiles (NOTES v24)."""
    step = _taps_step(lanes, out_channels, two_inputs)
    bm, bn, bk, warps = _tiles(dtype, npix, out_channels, step, two_inputs=two_inputs)
    return bm, bn, bk, (4 if out_channels > 32 and bk == 32 else warps)


def _fast_layout(channel_strides: Sequence[int], *alignments: int) -> bool:
    """Whether a launch may take ``_tiles``' big tiles: unit channel strides, all alignments 8
    (and 16-byte aligned tensors, ``_aligned_pointers``)."""
    return all(s == 1 for s in channel_strides) and all(a == 8 for a in alignments)


def _aligned_pointers(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether every tensor's address is a multiple of 16 bytes, as the JIT specialises it."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _negated(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a tensor's negation bit is set: a lazily negated view, whose memory (what the
    kernels read) holds its values' negation. Never asked while torch.compile traces: Dynamo
    cannot trace the question, and a compiled graph drops the bit anyway (torch 2.13 computes
    even ``x * 2`` from the memory of such an input)."""
    return any(t is not None and t.is_neg() for t in tensors)


def _pointers_key(*tensors: Optional[torch.Tensor]) -> int:
    """``inference_key``'s view of the memory: 0 every address 16-byte aligned, 1 not, 2 a
    tensor whose negation bit is set (a lazily negated view, which the full call refuses, so
    no plan is ever kept under 2)."""
    key = 0
    for t in tensors:
        if t is not None:
            if t.is_neg():
                return 2
            if t.data_ptr() % 16:
                key = 1
    return key


GRAD_WEIGHT_WARPS = 8  # 4 spill on sm_90 beyond 16 x 16 tiles
GRAD_WEIGHT_ROW_TAPS = True  # 3x3 grad weight: a kernel row's three taps per program
# Inputs of these channel counts fold the taps into the reduction: an image's few, where the
# per-tap loop leaves most lanes idle, and 8, where it leaves half (16 and up fill its steps).
TAPS_IN_K_CHANNELS = (1, 2, 3, 4, 8)
FOLD_LIMIT = 128  # rows of partial sums that a reduction's single pass may take; more are folded first
# Static stride-1 forwards in the fast layout read their inputs and weight through tensor
# descriptors (_conv_fwd_tma_kernel): on sm_90 fewer instructions per pixel (benchmarks/NOTES.md,
# v16). Off: on an H200 (v24) faster at 64 and 96 channels, slower at 48 and on small images,
# and the tiles fixed since (128 filters) untimed. Launch plans keep the choice they were made
# with: clear_plans() after changing it.
TMA_FORWARD = False
# Per-image forwards launch filter tiles for their tiles' out width (with enough programs to fill
# the GPU), not for the widest image: the narrower images' tiles beyond their width were
# programs that only exit, 65% of a routed forward's (benchmarks/NOTES.md, v27). False: the
# widest image's tiles, as before v27 (for comparisons; clear_plans() after changing it).
PER_IMAGE_NARROW_GRID = True


_NOT_PACKED = (False, False, False)  # (input 0, input 1, output): see slim_conv2d's packed_inputs


class _TmaLaunch(NamedTuple):
    """A launch of ``_conv_fwd_tma_kernel``: its descriptors are made per call, for these
    inputs' first channels in the weight and this many output channels."""
    launch: CachedDescriptorLaunch
    starts: tuple[int, int]
    out_channels: int


class _ForwardPlan(NamedTuple):
    """Everything a forward launch derives from its arguments' shapes, strides and options."""
    out_shape: tuple[int, int, int, int]
    launch: CachedLaunch  # grid, run-time scalars and compile-time arguments of _conv_fwd_kernel
    tma: Optional[_TmaLaunch] = None  # the same forward through tensor descriptors (TMA_FORWARD)


def _meta(t: Optional[torch.Tensor]):
    """What the argument checks and the launch plan read of a tensor (a hashable key)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _fast_tiles_store(upscale_factor: int) -> bool:
    """Whether the fast layout's bigger tiles suit this output: a pixel shuffle whose r^2 may
    not divide the tile (r = 3, r >= 8) stores filter by filter, whose scattered addresses
    spill registers on sm_90 in those tiles (not in the others)."""
    return upscale_factor ** 2 in (1, 4, 16)


@functools.lru_cache(maxsize=1024)
def _forward_plan(m0, m1, mw, mb, mr, mwd, widths_multiple, start0, start1, out_channels, stride, padding,
                  activation, negative_slope, upscale_factor, channel_sums=False, aligned_pointers=False,
                  tile_widths=None, packed=_NOT_PACKED) -> _ForwardPlan:
    """The launch of ``_conv_fwd_kernel`` for arguments with these ``_meta`` keys
    (``aligned_pointers``: whether every tensor's address is a multiple of 16 bytes;
    ``tile_widths``: see ``slim_conv2d``; ``packed``: whether input 0, input 1 and the output
    are packed per-image buffers): computed once per signature, since the host work per call is
    what bounds small launches."""
    (n, c0, h, w), x0_strides, dtype, device = m0
    c1 = 0 if m1 is None else m1[0][1]
    x1_strides = x0_strides if m1 is None else m1[1]
    w_shape, w_strides = mw[0], mw[1]
    k = w_shape[-1]
    ho, wo = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    r = upscale_factor
    out_shape = (n, out_channels // (r * r), ho * r, wo * r)
    y_strides = torch.empty(out_shape, device="meta", memory_format=torch.channels_last).stride()
    r_strides = y_strides if mr is None else mr[1]
    wd_strides = (0, 0) if mwd is None else mwd[1]
    # Per-image widths share one kernel for every width; a static launch sizes its tiles to
    # the active widths (at width 16 of 64, a 64-wide tile wastes 3/4 of each MMA). An input
    # of a few channels (a net's first conv, or a narrow layer's 8) joins its taps to the
    # reduction (_fwd_taps_in_k), with its channel count compiled in.
    if mwd is None:
        tap_c0 = c0 if k > 1 and c0 in TAPS_IN_K_CHANNELS else 0
        tap_c1 = c1 if k > 1 and m1 is not None and c1 in TAPS_IN_K_CHANNELS else 0
    out_multiple, in_multiple = ([], []) if mwd is None else ([widths_multiple[0]], [widths_multiple[1]])
    aligns = dict(
        C_ALIGN=_alignment(c0, c1, start0, start1, *in_multiple),
        # with an upscale, of the shuffled channels (r^2 filters each; a multiple of widths that is
        # not one of r^2 promises nothing about them)
        CO_ALIGN=_alignment(*[v // (r * r) if v % (r * r) == 0 else 1 for v in [out_channels, *out_multiple]]),
        X_ALIGN=_alignment(*_batch_and_pixel_strides(x0_strides, x1_strides)),
        Y_ALIGN=_alignment(*_batch_and_pixel_strides(r_strides, y_strides)),
        W_ALIGN=_alignment(*_pixel_strides_of_weight(w_strides)),
    )
    fast = aligned_pointers and _fast_layout((x0_strides[1], x1_strides[1], r_strides[1], y_strides[1], w_strides[1]),
                                             *aligns.values()) and _fast_tiles_store(r)
    if mwd is not None:
        # each input of a concat runs its own reduction loop: the wider one's channels, as a
        # static launch takes them, not the weight's sum of both
        cols, red = (w_shape[0], max(c0, c1)) if tile_widths is None else tile_widths
        bm, bn, bk, warps = _tiles(dtype, ho * wo, cols, red, fast, m1 is not None)
        # With per-image widths, the images whose input width is the one the tiles are sized
        # for fold their taps too when it is such a count (a branch per program on its image's
        # width); in the fast layout only (DDSNet's buffers), as elsewhere both loops spill.
        tap_c0 = red if fast and tile_widths and k > 1 and red in TAPS_IN_K_CHANNELS else 0
        tap_c1 = tap_c0 if m1 is not None else 0
    elif tap_c0 or tap_c1:
        bm, bn, bk, warps = _taps_tiles(dtype, ho * wo, [c * k * k for c in (tap_c0, tap_c1) if c], out_channels,
                                        m1 is not None)
    else:
        bm, bn, bk, warps = _tiles(dtype, ho * wo, out_channels, max(c0, c1), fast, m1 is not None)
    scalars = (h, w, ho, wo, c0, c1, out_channels, start0, start1, *x0_strides, *x1_strides, *w_strides,
               w_strides[0] if mb is None else mb[1][0], *r_strides, *y_strides, *wd_strides, float(negative_slope))
    meta = dict(
        KSIZE=k, STRIDE=stride, PAD=padding, TWO_INPUTS=m1 is not None, HAS_BIAS=mb is not None,
        HAS_RES=mr is not None, ACT=_ACT_NAMES[activation], PER_IMAGE=mwd is not None,
        CHANNEL_SUMS=channel_sums, DOT_F32=_dot_f32(dtype), TAP_C0=tap_c0, TAP_C1=tap_c1, UPSCALE=r,
        PACKED_X0=packed[0], PACKED_X1=packed[1], PACKED_Y=packed[2], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, **aligns,
    )
    co_tiles = cdiv(out_channels, bn)
    if mwd is not None and PER_IMAGE_NARROW_GRID and fast:
        # the tiles' own out width (the narrowest route's, under tile_widths), or more where the
        # pixel tiles alone would not fill the GPU: the kernel's programs take the rest in turn
        # (in the fast layout only, DDSNet's buffers: elsewhere the loop spilled on sm_90)
        fill = 1 if INTERPRET else 4 * num_sms(device.index)
        co_tiles = min(co_tiles, max(cdiv(cols, bn), cdiv(fill, max(1, cdiv(ho * wo, bm) * n))))
    meta["CO_LOOP"] = co_tiles < cdiv(out_channels, bn)
    grid = (cdiv(ho * wo, bm), co_tiles, n)
    tma = None
    # descriptors need the inputs' and weight's fast layout; the output and residual may be any
    tma_layout = aligned_pointers and _fast_layout((x0_strides[1], x1_strides[1], w_strides[1]), aligns["C_ALIGN"],
                                                   aligns["X_ALIGN"], aligns["W_ALIGN"])
    # (a descriptor's every dimension must be positive: empty batches and images take the gather)
    if TMA_FORWARD and TensorDescriptor is not None and tma_layout and stride == 1 and mwd is None \
            and not channel_sums and r == 1 and not (tap_c0 or tap_c1) and dtype in (torch.float16, torch.bfloat16) \
            and min(n, h, w, ho, wo) > 0:
        # the gather's tiles, its rows as a block of pixels (as wide as the image, up to 64), and
        # 64-wide reduction steps where they divide it: a step's cost no longer grows with its
        # width (no gathered addresses), so fewer, wider steps. Not beside 128 filters: those
        # steps summed wrongly on an H200 under Triton 3.6 (relative error 1e-2 at 64 to 384
        # channels; 32-wide steps right), NOTES v24
        bw = min(bm, 64, next_pow2(wo))
        bh = bm // bw
        wide_steps = max(c0, c1) >= 64 and c0 % 64 == 0 and c1 % 64 == 0
        bk = 64 if wide_steps and bn <= 64 else min(bk, 32)
        tma = _TmaLaunch(CachedDescriptorLaunch(
            _conv_fwd_tma_kernel, (cdiv(ho, bh) * cdiv(wo, bw), cdiv(out_channels, bn), n),
            (ho, wo, c0, c1, out_channels, w_strides[0] if mb is None else mb[1][0], *r_strides, *y_strides,
             float(negative_slope)),
            dict(KSIZE=k, PAD=padding, TWO_INPUTS=m1 is not None, HAS_BIAS=mb is not None, HAS_RES=mr is not None,
                 ACT=_ACT_NAMES[activation], DOT_F32=_dot_f32(dtype), BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk,
                 CO_ALIGN=aligns["CO_ALIGN"], Y_ALIGN=aligns["Y_ALIGN"], num_warps=warps), num_tensors=7),
            (start0, start1), out_channels)
    return _ForwardPlan(out_shape, CachedLaunch(_conv_fwd_kernel, grid, scalars, meta, num_tensors=8), tma)


def _tma_descriptors(x, weight, start: int, out_channels: int, meta: dict):
    """Tensor descriptors of an input (its NHWC view) and of its weight block ([o, k, k, C])."""
    xv = x.permute(0, 2, 3, 1)
    wv = weight.permute(0, 2, 3, 1)[:out_channels, :, :, start:start + x.shape[1]]
    return (TensorDescriptor(xv, list(xv.shape), list(xv.stride()), [1, meta["BH"], meta["BW"], meta["BLOCK_K"]]),
            TensorDescriptor(wv, list(wv.shape), list(wv.stride()), [meta["BLOCK_N"], 1, 1, meta["BLOCK_K"]]))


def _launch_forward(plan: _ForwardPlan, x0, x1, weight, bias, residual, widths):
    """The output; with ``plan.launch.meta['CHANNEL_SUMS']``, also its fp32 channel sums per pixel tile."""
    y = _empty_channels_last(plan.out_shape, x0)
    if plan.tma is not None:
        launch_tma, starts, out_channels = plan.tma
        x0d, w0d = _tma_descriptors(x0, weight, starts[0], out_channels, launch_tma.meta)
        x1d, w1d = (x0d, w0d) if x1 is None else _tma_descriptors(x1, weight, starts[1], out_channels,
                                                                 launch_tma.meta)
        launch_tma(x0d, x1d, w0d, w1d, weight if bias is None else bias, y if residual is None else residual, y)
        return y
    forward = plan.launch
    sums = None
    if forward.meta["CHANNEL_SUMS"]:
        sums = torch.empty((plan.out_shape[0], forward.grid[0], plan.out_shape[1]), dtype=torch.float32,
                           device=x0.device)
    # unused pointers get any valid tensor: the kernel does not read them
    forward(x0, x0 if x1 is None else x1, weight, weight if bias is None else bias, y if residual is None else residual,
           y, y if widths is None else widths, y if sums is None else sums)
    return y if sums is None else (y, sums)


def _forward_impl(x0, x1, weight, bias, residual, widths, widths_multiple, start0, start1, out_channels, stride,
                  padding, activation, negative_slope, upscale_factor):
    plan = _forward_plan(_meta(x0), _meta(x1), _meta(weight), _meta(bias), _meta(residual), _meta(widths),
                         widths_multiple, start0, start1, out_channels, stride, padding, activation, negative_slope,
                         upscale_factor,
                         # the keywords slim_conv2d passes, in its order: one cache entry for both
                         channel_sums=False, aligned_pointers=_aligned_pointers(x0, x1, weight, bias, residual),
                         tile_widths=None, packed=_NOT_PACKED)
    return _launch_forward(plan, x0, x1, weight, bias, residual, widths)


def _grad_input(dz, weight, x, start, stride, padding, cout):
    dx = _empty_channels_last(x.shape, x)
    for launch_phase in _grad_input_plan(_meta(dz), _meta(weight), _meta(dx), start, stride, padding, cout,
                                         _aligned_pointers(dz, weight)):
        launch_phase(dz, weight, dx)
    return dx


# The backward's launch plans are computed once per signature (the tensors' _meta keys, the
# options and the pointers' alignment), as the forward's are: planning every call took about
# half of a small layer's backward host time. clear_plans() forgets them.
@functools.lru_cache(maxsize=1024)
def _grad_input_plan(dz_meta, w_meta, dx_meta, start, stride, padding, cout, aligned) -> tuple[CachedLaunch, ...]:
    """The launches of ``_bwd_input_kernel``, one per sub-pixel phase."""
    (n, cin, h, w), dx_strides, dtype, _ = dx_meta
    (_, _, ho, wo), dz_strides = dz_meta[0], dz_meta[1]
    w_shape, w_strides = w_meta[0], w_meta[1]
    k = w_shape[-1]
    c_align = _alignment(cout, cin, start)
    x_align = _alignment(*_batch_and_pixel_strides(dz_strides, dx_strides))
    w_align = _alignment(*_pixel_strides_of_weight(w_strides))
    fast = aligned and _fast_layout((dz_strides[1], dx_strides[1], w_strides[1]), c_align, x_align, w_align)
    bm, bn, bk, warps = _tiles(dtype, h * w, cin, cout, fast)
    # One launch per sub-pixel phase; the phases tile the input exactly, so every pixel is written.
    launches = []
    for ih0 in range(min(stride, h)):
        for iw0 in range(min(stride, w)):
            hp, wp = cdiv(h - ih0, stride), cdiv(w - iw0, stride)
            launches.append(CachedLaunch(
                _bwd_input_kernel, (cdiv(hp * wp, bm), cdiv(cin, bn), n),
                (h, w, ho, wo, hp, wp, cout, cin, start, *dz_strides, *w_strides, *dx_strides),
                dict(KSIZE=k, STRIDE=stride, PAD=padding, IH0=ih0, IW0=iw0, DOT_F32=_dot_f32(dtype), BLOCK_M=bm,
                     BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, C_ALIGN=c_align, X_ALIGN=x_align, W_ALIGN=w_align),
                num_tensors=3))
    return tuple(launches)


def _reduce_into(ws, out, rows, cout, cin, start, k, zero_rest):
    """``out`` (a weight-shaped gradient, or a bias gradient viewed as [Cout, 1, 1, 1]) from the
    ``rows`` partial sums ``ws [rows, k*k, cout, cin]``; with ``zero_rest``, zero elsewhere."""
    if rows:
        # The bias gradient leaves one row per (image, pixel tile): 32768 rows at 8x512x512, which
        # _reduce_kernel's programs, one per 1024 entries, took 10 ms to sum on an H200. Folded
        # over many programs first, a few rows are left.
        ws = fold_rows(ws.view(1, rows, k * k * cout * cin), limit=FOLD_LIMIT)[0]
    else:  # an empty batch: no rows to sum, but the kernel takes a live fp32 pointer
        ws = torch.empty(1, 1, dtype=torch.float32, device=out.device)[:0]
    _reduce_launch(ws.shape[0], cout, cin, start, k, zero_rest, out.shape, out.stride())(ws, out)


@functools.lru_cache(maxsize=1024)
def _reduce_launch(rows, cout, cin, start, k, zero_rest, out_shape, out_strides) -> CachedLaunch:
    block = 1024
    return CachedLaunch(_reduce_kernel, (cdiv(math.prod(out_shape), block),),
                        (rows, cout, cin, start, out_shape[0], out_shape[1], *out_strides),
                        dict(KSIZE=k, ZERO_REST=zero_rest, BLOCK=block), num_tensors=2)


def _grad_weight_tiles(dtype: torch.dtype, cout: int, cin: int) -> tuple[int, int, int, int]:
    """(BLOCK_CO, BLOCK_CI, BLOCK_P, num_warps) of the grad weight kernel: tiles of the active
    widths (at width 16 of 64, 64-wide tiles did 16x the MMA work); fp32 takes short pixel
    steps (see _tiles), narrow tiles long ones, for work per step."""
    bco, bci = _pow2(cout, 16, 64), _pow2(cin, 16, 64)
    if INTERPRET:
        return bco, bci, 64, 4
    if dtype == torch.float32:
        return bco, bci, 16, GRAD_WEIGHT_WARPS
    # 16 x 16 tiles: 4 warps were 17% faster than 8 on the H200 (NOTES v10)
    return bco, bci, (128 if bco * bci <= 32 * 32 else 64), (4 if bco * bci <= 16 * 16 else GRAD_WEIGHT_WARPS)


def _grad_weight_into(dw, dz, x, start, stride, padding, cout, zero_rest):
    """The active block of ``dw`` from one input ``x`` (channels from ``start``); with
    ``zero_rest``, every other entry zero."""
    k = dw.shape[-1]
    plan = _grad_weight_plan(_meta(dz), _meta(x), k, cout, stride, padding, _aligned_pointers(dz, x),
                             GRAD_WEIGHT_ROW_TAPS, GRAD_WEIGHT_WARPS)
    if plan is None:  # an empty batch: no partial sums, a zero gradient
        _reduce_into(None, dw, 0, cout, x.shape[1], start, k, zero_rest)
        return
    workspace, launch_weight = plan
    ws = torch.empty(workspace, dtype=torch.float32, device=dz.device)
    launch_weight(dz, x, ws)
    _reduce_into(ws, dw, workspace[0], cout, x.shape[1], start, k, zero_rest)


@functools.lru_cache(maxsize=1024)
def _grad_weight_plan(dz_meta, x_meta, k, cout, stride, padding, aligned, row_taps_allowed, warps_beyond_16):
    """(the fp32 workspace's shape, the launch of ``_bwd_weight_kernel``), or None for an empty
    batch. ``row_taps_allowed`` and ``warps_beyond_16``: GRAD_WEIGHT_ROW_TAPS and
    GRAD_WEIGHT_WARPS as they were (part of the key, so a sweep that sets them gets new plans)."""
    (n, cin, h, w), x_strides, dtype, device = x_meta
    (_, _, ho, wo), dz_strides = dz_meta[0], dz_meta[1]
    npix = n * ho * wo
    if npix == 0:
        return None
    bco, bci, bp, warps = _grad_weight_tiles(dtype, cout, cin)
    c_align = _alignment(cout, cin)
    x_align = _alignment(*_batch_and_pixel_strides(dz_strides, x_strides))
    # a row's taps per program take more registers: the fast layout's only (they spill elsewhere)
    row_taps = k == 3 and row_taps_allowed and aligned and _fast_layout((dz_strides[1], x_strides[1]), c_align,
                                                                        x_align)
    # small chunks under the interpreter, so that tiny test shapes still exercise the split
    target = 18 if INTERPRET else 4 * num_sms(device.index)
    tiles = cdiv(cout, bco) * cdiv(cin, bci) * (k if row_taps else k * k)
    # Split the pixel reduction so that about `target` programs run, in whole BLOCK_P steps.
    splits = max(1, min(cdiv(target, tiles), cdiv(npix, bp)))
    chunk = cdiv(cdiv(npix, splits), bp) * bp
    splits = cdiv(npix, chunk)
    return (splits, k * k, cout, cin), CachedLaunch(
        _bwd_weight_kernel, (cdiv(cout, bco), cdiv(cin, bci) * (k if row_taps else k * k), splits),
        (h, w, ho, wo, npix, chunk, cout, cin, *dz_strides, *x_strides),
        dict(KSIZE=k, STRIDE=stride, PAD=padding, DOT_F32=_dot_f32(dtype), ROW_TAPS=row_taps, BLOCK_CO=bco,
             BLOCK_CI=bci, BLOCK_P=bp, num_warps=warps, C_ALIGN=c_align, X_ALIGN=x_align), num_tensors=3)


@functools.lru_cache(maxsize=1024)
def _dz_plan(gy_meta, y_meta, dz_strides, cout_max, act, negative_slope, store_dz, bias_sums):
    """(rows of the bias gradient's partial sums, the launch of ``_bwd_dz_kernel``)."""
    (n, o, ho, wo), gy_strides = gy_meta[0], gy_meta[1]
    bm = _pow2(ho * wo, 16, 1024) if INTERPRET else 64
    bn = _pow2(cout_max, 16, 64)
    grid = (cdiv(ho * wo, bm), cdiv(o, bn), n)
    return n * grid[0], CachedLaunch(
        _bwd_dz_kernel, grid, (ho, wo, o, *gy_strides, *y_meta[1], *dz_strides, negative_slope),
        dict(ACT=act, STORE_DZ=store_dz, BIAS_SUMS=bias_sums, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
             ALIGN=_alignment(o, *_batch_and_pixel_strides(gy_strides, y_meta[1], dz_strides))), num_tensors=4)


def _backward_impl(grad_y, y, x0, x1, weight, start0, start1, stride, padding, activation, negative_slope,
                   has_bias, needs):
    """Returns (dx0, dx1, dweight, dbias, dresidual); a gradient not asked for is an empty tensor.
    dresidual is empty when there is no activation: it is then grad_y itself."""
    need_x0, need_x1, need_w, need_b, need_res = needs
    act = _ACT_NAMES[activation]
    n, o, ho, wo = grad_y.shape
    if _span(grad_y.shape, grad_y.stride()) >= 2 ** 31:
        # autograd's gradient of a slice of a wider buffer (a cat): the kernels' int32 offsets within
        # an image would wrap; the output's own layout is checked to fit them
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)

    def empty():  # a fresh one each time: custom-op outputs may not alias each other
        return grad_y.new_empty(0)

    bias_sums = has_bias and need_b
    store_dz = act != 0 and (need_x0 or need_x1 or need_w or need_res)
    dz = grad_y
    db = empty()
    if store_dz or bias_sums:
        if store_dz:
            dz = _empty_channels_last(grad_y.shape, grad_y)
        y_ = grad_y if y is None else y
        bias_rows, launch_dz = _dz_plan(_meta(grad_y), _meta(y_), dz.stride(), weight.shape[0], act,
                                        float(negative_slope), store_dz, bias_sums)
        # Unused pointers get a live tensor: an empty one may have no valid device address.
        bias_ws = torch.empty((bias_rows, o), dtype=torch.float32, device=grad_y.device) if bias_sums else grad_y
        launch_dz(grad_y, y_, dz, bias_ws)
        if bias_sums:
            db = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
            _reduce_into(bias_ws, db.view(-1, 1, 1, 1), bias_rows, o, 1, 0, 1, zero_rest=True)
    dx0 = _grad_input(dz, weight, x0, start0, stride, padding, o) if need_x0 else empty()
    dx1 = _grad_input(dz, weight, x1, start1, stride, padding, o) if need_x1 else empty()
    dw = empty()
    if need_w:
        dw = torch.empty_like(weight)  # full size: the first reduction zeroes what no input's block covers
        _grad_weight_into(dw, dz, x0, start0, stride, padding, o, zero_rest=True)
        if x1 is not None:
            _grad_weight_into(dw, dz, x1, start1, stride, padding, o, zero_rest=False)
    dres = dz if (need_res and store_dz) else empty()
    return dx0, dx1, dw, db, dres


# ----------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------
# widths_multiple is (out, in); int[2] lets a direct call pass one int for both, as before pairs
@torch.library.custom_op("dds_fast::slim_conv2d", mutates_args=(), schema=(
    "(Tensor x0, Tensor? x1, Tensor weight, Tensor? bias, Tensor? residual, Tensor? widths, int[2] widths_multiple, "
    "int start0, int start1, int out_channels, int stride, int padding, str activation, float negative_slope, "
    "int upscale_factor=1) -> Tensor"))
def _slim_conv2d_op(x0: torch.Tensor, x1: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                    widths: Optional[torch.Tensor], widths_multiple: List[int], start0: int, start1: int,
                    out_channels: int, stride: int, padding: int, activation: str,
                    negative_slope: float, upscale_factor: int = 1) -> torch.Tensor:
    # a direct call of the op, or a traced graph run on other shapes, has not been through slim_conv2d's checks
    two = x1 is not None
    widths_multiple = tuple(widths_multiple)  # (out, in), hashable for the plan's cache
    _checked_signature([x0, x1] if two else [x0], weight, bias, residual, widths, (start0, start1) if two else (start0,),
                       out_channels, stride, padding, None if activation == "none" else activation, negative_slope,
                       widths_multiple, upscale_factor)
    return _forward_impl(x0, x1, weight, bias, residual, widths, widths_multiple, start0, start1, out_channels,
                         stride, padding, activation, negative_slope, upscale_factor)


@_slim_conv2d_op.register_fake
def _(x0, x1, weight, bias, residual, widths, widths_multiple, start0, start1, out_channels, stride, padding,
      activation, negative_slope, upscale_factor=1):
    n, _, h, w = x0.shape
    k, r = weight.shape[-1], upscale_factor
    return _empty_channels_last((n, out_channels // (r * r), _out_size(h, k, stride, padding) * r,
                                 _out_size(w, k, stride, padding) * r), x0)


@torch.library.custom_op("dds_fast::slim_conv2d_backward", mutates_args=())
def _slim_conv2d_backward_op(grad_y: torch.Tensor, y: Optional[torch.Tensor], x0: torch.Tensor,
                             x1: Optional[torch.Tensor], weight: torch.Tensor, start0: int, start1: int,
                             stride: int, padding: int, activation: str, negative_slope: float, has_bias: bool,
                             needs: List[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_y, y, x0, x1, weight, start0, start1, stride, padding, activation,
                          negative_slope, has_bias, needs)


@_slim_conv2d_backward_op.register_fake
def _(grad_y, y, x0, x1, weight, start0, start1, stride, padding, activation, negative_slope, has_bias, needs):
    need_x0, need_x1, need_w, need_b, need_res = needs
    return (_empty_channels_last(x0.shape, x0) if need_x0 else grad_y.new_empty(0),
            _empty_channels_last(x1.shape, x1) if need_x1 else grad_y.new_empty(0),
            torch.empty_like(weight) if need_w else grad_y.new_empty(0),
            weight.new_empty(weight.shape[0]) if (has_bias and need_b) else grad_y.new_empty(0),
            _empty_channels_last(grad_y.shape, grad_y) if (need_res and activation != "none")
            else grad_y.new_empty(0))


def _setup_context(ctx, inputs, output):
    (x0, x1, weight, bias, residual, widths, _, start0, start1, out_channels, stride, padding, activation,
     negative_slope, *upscale) = inputs  # the op's call may leave upscale_factor at its default
    ctx.save_for_backward(x0, x1, weight, output if activation != "none" else None)
    ctx.args = (start0, start1, stride, padding, activation, negative_slope)
    ctx.upscale_factor = upscale[0] if upscale else 1
    ctx.has_bias = bias is not None
    ctx.per_image = widths is not None


def _backward(ctx, grad_y, backward_impl=None):
    if ctx.per_image:
        raise NotImplementedError("slim_conv2d: per-image widths are forward only")
    x0, x1, weight, y = ctx.saved_tensors
    start0, start1, stride, padding, activation, negative_slope = ctx.args
    if ctx.upscale_factor > 1:  # the backward takes the filters' own layout: undo the store's shuffle
        grad_y = _pixel_unshuffle(grad_y, ctx.upscale_factor)
        y = None if y is None else _pixel_unshuffle(y, ctx.upscale_factor)
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2], need[3], need[4]]
    dx0, dx1, dw, db, dres = (backward_impl or torch.ops.dds_fast.slim_conv2d_backward)(
        grad_y, y, x0, x1, weight, start0, start1, stride, padding, activation, negative_slope, ctx.has_bias,
        needs)
    if need[4] and activation == "none":
        dres = grad_y
    return (dx0 if need[0] else None, dx1 if need[1] else None, dw if need[2] else None,
            db if (need[3] and ctx.has_bias) else None, dres if need[4] else None,
            None, None, None, None, None, None, None, None, None) + (None,) * (len(need) - 14)


_slim_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerSlimConv2d(torch.autograd.Function):
    """The registered op's forward and autograd without its dispatch, for eager training calls:
    the op's dispatch in both directions cost 0.13-0.15 ms of host time per training step on
    the CPU machine, half of a stubbed step's (benchmarks/NOTES.md, v9). Same arguments as the op."""

    @staticmethod
    def forward(ctx, *inputs):
        y = _forward_impl(*inputs)
        _setup_context(ctx, inputs, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: its gradients would be silently constant
            raise RuntimeError("slim_conv2d: no double backward through the Triton kernels (create_graph=True); "
                               "use backend='torch' for higher-order gradients")
        functorch = torch._C._functorch
        if functorch.is_functorch_wrapped_tensor(grad_y) or functorch.is_legacy_batchedtensor(grad_y):
            # (autograd's own vmap batches it) its storage is no buffer a kernel reads
            raise RuntimeError("slim_conv2d: the Triton kernels' backward takes no batched gradient "
                               "(is_grads_batched=True, jacobian(vectorize=True)); use backend='torch' for those")
        # a dispatch mode entered around the backward alone (FlopCounterMode) sees the op
        return _backward(ctx, grad_y, None if torch._C._len_torch_dispatch_stack() else _backward_impl)


def _macs(x0_shape, x1_shape, w_shape, out_shape) -> int:
    n, o, ho, wo = out_shape
    cin = x0_shape[1] + (x1_shape[1] if x1_shape is not None else 0)
    return n * ho * wo * o * cin * w_shape[2] * w_shape[3]


@register_flop_formula(torch.ops.dds_fast.slim_conv2d)
def _slim_conv2d_flops(x0_shape, x1_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # The active slice only: o filters over the inputs' channels (per-image widths count the maximum).
    return 2 * _macs(x0_shape, x1_shape, w_shape, out_shape)


@register_flop_formula(torch.ops.dds_fast.slim_conv2d_backward)
def _slim_conv2d_backward_flops(grad_y_shape, y_shape, x0_shape, x1_shape, w_shape, start0, start1, stride,
                                padding, activation, negative_slope, has_bias, needs, out_shape=None,
                                **kwargs) -> int:
    # Each input's gradient costs the multiply-adds of its share of the forward; the weight's
    # gradient, the whole forward's.
    grad_inputs = (_macs(x0_shape, None, w_shape, grad_y_shape) if needs[0] else 0) + (
        _macs(x1_shape, None, w_shape, grad_y_shape) if needs[1] else 0)
    grad_weight = _macs(x0_shape, x1_shape, w_shape, grad_y_shape) if needs[2] else 0
    return 2 * (grad_inputs + grad_weight)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def _as_int(value, name: str, pairs: bool = True) -> int:
    """An int, or (``pairs``) a pair of equal ints (nn.Conv2d stores stride and padding as pairs).
    Never a float, bool or tensor: int() would truncate 2.7 to 2, and a tensor in a plan's key
    could change in place."""
    kind = "an int or a pair of equal ints" if pairs else "an int"
    if pairs and isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"slim_conv2d: {name} must be {kind}, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"slim_conv2d: {name} must be {kind}, got {value!r}")
    return value


def unsupported_reason(inputs, weight: torch.Tensor, stride=1, padding=None, dilation=1, groups=1,
                       padding_mode: str = "zeros", activation: Optional[str] = None,
                       negative_slope: float = 0.01, input_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the Triton kernels cannot run this convolution (None when they can).

    ``inputs`` is a tensor or a list of tensors; the other arguments are those of the layer.
    ``input_dtype``: the dtype the inputs will be cast to before the call (autocast's), if any.
    """
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else inputs
    if not torch.compiler.is_compiling() and _negated(*tensors, weight):
        return "a lazily negated view (is_neg()), whose memory holds the values' negation"
    args = (tuple([_spec(t, input_dtype) for t in tensors]), _spec(weight), stride, padding, dilation, groups,
            padding_mode, activation, negative_slope)
    try:
        return cached_call(_reason, *args)
    except TypeError:  # an unhashable option (a list): not worth caching
        return _reason.__wrapped__(*args)


def _span(shape, strides) -> int:
    """The largest element offset within one image of a 4-D tensor of ``shape`` and ``strides``."""
    return sum((size - 1) * abs(step) for size, step in zip(shape[1:], strides[1:]))


def autocast_dtype(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast to ``dtype`` gives ``t`` in a conv: it casts floating-point tensors
    other than float64 and leaves the rest (float64, integers) as they are."""
    return dtype if dtype is not None and t.is_floating_point() and t.dtype != torch.float64 else t.dtype


def _spec(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> tuple:
    return t.shape, autocast_dtype(t, dtype), t.device.type, t.stride()


@functools.lru_cache(maxsize=1024)
def _reason(specs, weight_spec, stride, padding, dilation, groups, padding_mode, activation,
            negative_slope) -> Optional[str]:
    """``unsupported_reason`` from the tensors' (shape, dtype, device type): a layer asks on
    every call, so the answer is cached."""
    if not 1 <= len(specs) <= 2:
        return f"{len(specs)} inputs (the kernels fuse a concat of at most 2)"
    w_shape, w_dtype, _, _ = weight_spec
    if len(w_shape) != 4:
        return f"weight must be 4-D, got {len(w_shape)}-D"
    kh, kw = w_shape[2], w_shape[3]
    if kh != kw:
        return f"kernel {kh}x{kw} is not square"
    if kh % 2 == 0:
        return f"kernel size {kh} is even (only odd sizes with padding k//2 are supported)"
    if dilation not in (1, (1, 1), [1, 1]):
        return f"dilation {dilation!r} is not 1"
    pad = kh // 2 if padding is None else padding
    if isinstance(pad, str):  # an odd kernel at stride 1: 'same' is k//2 on each side
        pad = {"same": kh // 2, "valid": 0}.get(pad, pad)
    if isinstance(pad, str) or (isinstance(pad, (tuple, list)) and tuple(pad) != (kh // 2, kh // 2)) \
            or (isinstance(pad, int) and pad != kh // 2):
        return f"padding {padding!r} is not kernel_size//2 = {kh // 2}"
    if groups != 1:
        return f"groups={groups} is not 1"
    if padding_mode != "zeros":
        return f"padding_mode {padding_mode!r} is not 'zeros'"
    if stride not in (1, 2, (1, 1), (2, 2), [1, 1], [2, 2]):
        return f"stride {stride!r} is not 1 or 2"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not one of {list(ACTIVATIONS)}"
    if activation == "leaky_relu" and negative_slope < 0:
        return f"leaky_relu negative_slope {negative_slope} < 0 (backward reads the sign of the output)"
    for _, dtype, device_type, _ in specs + (weight_spec,):
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not float32, float16 or bfloat16"
        if not _dtypes_match(dtype, w_dtype):
            return f"input dtype {dtype} with weight dtype {w_dtype} (the weight's, or fp32 master weights)"
        if device_type != "cuda" and not (INTERPRET and device_type == "cpu"):
            return (f"tensor on {device_type} (the kernels need CUDA, or CPU tensors with TRITON_INTERPRET=1 set "
                    f"before importing dds_fast)")
    if len(specs) == 2 and specs[0][1] != specs[1][1]:  # torch.cat would promote; the fused concat cannot
        return f"concatenated inputs of dtypes {specs[0][1]} and {specs[1][1]}"
    if len(specs[0][0]) == 4 and specs[0][0][0] > MAX_BATCH:
        return f"a batch of {specs[0][0][0]} images (the kernels' grid takes at most {MAX_BATCH})"
    for shape, _, _, strides in specs:
        if len(shape) == 4 and max(shape[1], w_shape[0]) * shape[2] * shape[3] >= 2 ** 31:
            return (f"an image of {shape[1]} channels, {shape[2]}x{shape[3]}, with {w_shape[0]} output "
                    f"channels has 2**31 elements or more (the kernels index within an image in int32)")
        if len(shape) == 4 and _span(shape, strides) >= 2 ** 31:
            return "an input view spans 2**31 elements or more within an image (the kernels index in int32)"
    return None


def _dtypes_match(activation: torch.dtype, weight: torch.dtype) -> bool:
    """Activations in the weight's dtype, or fp16/bf16 activations over fp32 master weights."""
    return activation == weight or weight == torch.float32


def _check_args(inputs, weight, bias, segment_starts, out_channels, stride, padding, activation, residual,
                widths, widths_multiple, upscale_factor):
    if not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= 2 \
            or not all(isinstance(t, torch.Tensor) for t in inputs):
        got = len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__
        raise ValueError(f"slim_conv2d: inputs must be a list of 1 or 2 tensors, got {got}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual), ("widths", widths)):
        if not isinstance(t, torch.Tensor) and (t is not None or name == "weight"):
            raise ValueError(f"slim_conv2d: {name} must be a tensor{'' if name == 'weight' else ' or None'}, "
                             f"got {type(t).__name__}")
    for name, t in (*((f"input {i}", t) for i, t in enumerate(inputs)), ("weight", weight), ("bias", bias),
                    ("residual", residual), ("widths", widths)):
        if t is not None and t.layout != torch.strided:
            raise ValueError(f"slim_conv2d: {name} is a {t.layout} tensor; the kernels read dense (strided) tensors")
        if t is not None and not torch.compiler.is_compiling() and _negated(t):
            raise ValueError(f"slim_conv2d: {name} is a lazily negated view (is_neg()); pass t.resolve_neg()")
    # here, not in slim_conv2d alone: a direct call of the op with 0 would align the kernel to 8
    if len(widths_multiple) != 2:
        raise ValueError(f"slim_conv2d: widths_multiple must be an int or a pair (out, in), got {list(widths_multiple)}")
    if min(widths_multiple) < 1:
        shown = widths_multiple[0] if len(set(widths_multiple)) == 1 else tuple(widths_multiple)
        raise ValueError(f"slim_conv2d: widths_multiple={shown} must be >= 1")
    if len(segment_starts) != len(inputs):
        raise ValueError(f"slim_conv2d: {len(inputs)} input(s) but {len(segment_starts)} segment_starts "
                         f"{list(segment_starts)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"slim_conv2d: weight must be [Cout, Cin, k, k] with odd k, got {tuple(weight.shape)}")
    cout_max, cin_max, k = weight.shape[0], weight.shape[1], weight.shape[2]
    first = inputs[0]
    if first.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"slim_conv2d: the inputs are on {first.device}, but the kernels were compiled for a GPU; "
                         "set TRITON_INTERPRET=1 before importing dds_fast to run them on the CPU")
    for i, (t, start) in enumerate(zip(inputs, segment_starts)):
        if t.dim() != 4 or t.shape[1] == 0:
            raise ValueError(f"slim_conv2d: input {i} must be 4-D [N, C, H, W] with C >= 1, got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"slim_conv2d: input {i} is {t.dtype}; the kernels take float32, float16 or bfloat16 "
                             f"(unsupported_reason() says when to use the PyTorch reference instead)")
        if (t.shape[0], t.shape[2], t.shape[3]) != (first.shape[0], first.shape[2], first.shape[3]):
            raise ValueError(f"slim_conv2d: inputs disagree in batch or size: {[tuple(u.shape) for u in inputs]}")
        if t.dtype != first.dtype or not _dtypes_match(t.dtype, weight.dtype) or t.device != weight.device:
            raise ValueError(f"slim_conv2d: input {i} is {t.dtype} on {t.device}, the weight {weight.dtype} "
                             f"on {weight.device} (inputs share one dtype: the weight's, or fp16/bf16 over "
                             f"fp32 weights)")
        if start < 0 or start + t.shape[1] > cin_max:
            raise ValueError(f"slim_conv2d: input {i} has {t.shape[1]} channels from weight channel {start}, "
                             f"beyond the weight's {cin_max} input channels")
    n = first.shape[0]
    if n > MAX_BATCH:
        raise ValueError(f"slim_conv2d: a batch of {n} images; the kernels' grid takes at most {MAX_BATCH} "
                         f"(split the batch)")
    for name, t in [(f"input {i}", t) for i, t in enumerate(inputs)] + [("residual", residual)]:
        # offsets within an image are int32: a view into a much wider buffer can reach past them
        # (the output's own span is checked below, with its shape)
        if isinstance(t, torch.Tensor) and t.dim() == 4 and _span(t.shape, t.stride()) >= 2 ** 31:
            raise ValueError(f"slim_conv2d: {name} (shape {tuple(t.shape)}, strides {t.stride()}) spans 2**31 "
                             f"elements or more within an image, past the kernels' int32 offsets; pass a "
                             f"contiguous copy")
        # its gradient is stored dense: an expanded (stride 0) view does not bound that
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] * t.shape[2] * t.shape[3] >= 2 ** 31:
            raise ValueError(f"slim_conv2d: {name} of shape {tuple(t.shape)} has 2**31 elements or more in an "
                             f"image, past the kernels' int32 offsets (split the image)")
    if len(inputs) == 2 and segment_starts[0] + inputs[0].shape[1] > segment_starts[1]:
        raise ValueError(f"slim_conv2d: segment_starts {list(segment_starts)} must ascend without overlap: input 0 "
                         f"takes weight channels {segment_starts[0]} to {segment_starts[0] + inputs[0].shape[1] - 1}")
    if not 1 <= out_channels <= cout_max:
        raise ValueError(f"slim_conv2d: out_channels={out_channels} not in [1, {cout_max}]")
    if stride in (1, 2) and padding == k // 2 and out_channels * _out_size(first.shape[2], k, stride, padding) \
            * _out_size(first.shape[3], k, stride, padding) >= 2 ** 31:
        raise ValueError(f"slim_conv2d: an output image of {out_channels} channels from {tuple(first.shape[2:])} "
                         f"pixels spans 2**31 elements or more, past the kernels' int32 offsets (split the image)")
    if stride not in (1, 2):
        raise ValueError(f"slim_conv2d: stride={stride} not supported (1 or 2)")
    if padding != k // 2:
        raise ValueError(f"slim_conv2d: padding={padding} must be kernel_size//2 = {k // 2}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"slim_conv2d: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if bias is not None and (tuple(bias.shape) != (cout_max,) or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"slim_conv2d: bias is {bias.dtype} {tuple(bias.shape)} on {bias.device}, expected "
                         f"{weight.dtype} ({cout_max},) on {weight.device}")
    n, _, h, w = first.shape
    out_shape = (n, out_channels, _out_size(h, k, stride, padding), _out_size(w, k, stride, padding))
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != first.dtype
                                 or residual.device != weight.device):
        raise ValueError(f"slim_conv2d: residual is {residual.dtype} {tuple(residual.shape)} on {residual.device}, "
                         f"the output is {first.dtype} {out_shape} on {weight.device}")
    if widths is not None:
        cols = 1 + len(inputs)
        if widths.dtype != torch.int32 or tuple(widths.shape) != (n, cols) or widths.device != first.device:
            raise ValueError(f"slim_conv2d: widths must be an int32 [{n}, {cols}] tensor on {first.device}, got "
                             f"{widths.dtype} {tuple(widths.shape)} on {widths.device}")
    if upscale_factor < 1:
        raise ValueError(f"slim_conv2d: upscale_factor={upscale_factor} must be >= 1")
    if upscale_factor > 1:
        # whole shuffled channels: the out widths only (widths_multiple also covers the in widths,
        # which need not be multiples of r^2; each image's out width is checked with the values)
        groups = upscale_factor ** 2
        if out_channels % groups:
            raise ValueError(f"slim_conv2d: with upscale_factor={upscale_factor}, out_channels ({out_channels}) and "
                             f"each image's out width must be multiples of {groups}")
        if residual is not None:
            raise ValueError("slim_conv2d: a residual with upscale_factor > 1 is not supported")
    # last: every check above reads shapes only, and runs on meta tensors too
    if first.device.type not in ("cuda", "cpu"):  # (the interpreter reads CPU memory, and CUDA's through copies)
        raise ValueError(f"slim_conv2d: the inputs are on {first.device}; the kernels take CUDA tensors, or CPU "
                         f"tensors under TRITON_INTERPRET=1")


def _check_width_values(widths, inputs, out_channels, widths_multiple, upscale_factor):
    """The values of per-image widths on the CPU (on a GPU, reading them would sync; the kernel
    clamps them to the buffers instead)."""
    limits = torch.tensor([out_channels] + [t.shape[1] for t in inputs], dtype=torch.int32)
    bad = ((widths < 0) | (widths > limits)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise ValueError(f"slim_conv2d: widths[{i}, {j}] = {int(widths[i, j])} not in [0, {int(limits[j])}]")
    multiples = torch.tensor([widths_multiple[0]] + [widths_multiple[1]] * len(inputs), dtype=torch.int32)
    bad = (widths % multiples).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        promised = (f"widths_multiple={widths_multiple[0]}" if widths_multiple[0] == widths_multiple[1] else
                    f"{int(multiples[j])} (widths_multiple={widths_multiple})")
        raise ValueError(f"slim_conv2d: widths[{i}, {j}] = {int(widths[i, j])} is not a multiple of {promised}")
    bad = (widths[:, 0] % upscale_factor ** 2).nonzero() if upscale_factor > 1 else []  # whole shuffled channels
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"slim_conv2d: widths[{i}, 0] = {int(widths[i, 0])} is not a multiple of "
                         f"{upscale_factor ** 2} (upscale_factor={upscale_factor})")


_CHECKED_SIGNATURES: dict = {}  # signatures whose arguments passed _check_args


def _widths_multiples(value) -> tuple[int, int]:
    """``slim_conv2d``'s ``widths_multiple`` as the pair (out, in): an int promises it of both."""
    pair = value if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"slim_conv2d: widths_multiple must be an int or a pair (out, in) of ints, got {value!r}")
    return tuple(pair)


def _remember(seen: dict, key, value=None, limit: int = 1024):
    if key is not None:
        if len(seen) >= limit:
            seen.clear()
        seen[key] = value


class _KnownCall(NamedTuple):
    """What a repeated eager call of ``slim_conv2d`` needs: the launch plan (inference; None
    until an inference call made it) and the normalised options that ``_EagerSlimConv2d``
    takes (training)."""
    launch: Optional[_ForwardPlan]
    options: tuple


_INFERENCE_PLANS: dict = {}  # inference_key -> the _KnownCall of a checked eager call


def clear_plans() -> None:
    """Forget every cached launch plan (for code that changes what the plans are made of)."""
    for plan in (_forward_plan, _dz_plan, _grad_input_plan, _grad_weight_plan, _reduce_launch, fold_plan):
        plan.cache_clear()
    _INFERENCE_PLANS.clear()


def inference_key(inputs, weight, bias, residual, widths, *options, packed_inputs=(), packed_output=False):
    """``slim_conv2d``'s arguments but the channel sums (``options``: its keyword arguments from
    ``segment_starts`` to ``tile_widths``, as the call passes them) as one hashable key: on a
    repeated call it finds the plan without normalising, checking or planning again, which is
    most of a small layer's host time. Per-image widths count by their shape, strides, dtype
    and device (their values are each call's). None when an argument is not a tensor (the full
    path then reports it); unhashable when an option is."""
    if type(inputs) not in (list, tuple):
        return None
    try:
        return (*[_meta(t) for t in inputs], _meta(weight), _meta(bias), _meta(residual), _meta(widths), *options,
                tuple(packed_inputs), packed_output, _pointers_key(*inputs, weight, bias, residual))
    except (AttributeError, TypeError, RuntimeError):  # (TypeError: packed_inputs not a sequence;
        return None                                    # RuntimeError: a sparse tensor has no strides)


def repeat_call(key, inputs, weight, bias, residual=None, widths=None):
    """The output of ``slim_conv2d`` on these tensors when an earlier eager call whose
    arguments gave ``inference_key`` ``key`` ran (and so was checked and planned): its launch
    again, or its normalised options through autograd. None when none ran, or this one cannot
    take that path (a dispatch mode, torch.compile, an inference call after only training
    ones, per-image widths with gradients): the full call then runs (and reports what it must)."""
    try:
        known = _INFERENCE_PLANS.get(key)
    except TypeError:  # an unhashable option (a list of segment starts): never remembered
        return None
    if known is None:
        return None
    path = _eager_path(*inputs, weight, bias, residual)
    x1 = inputs[1] if len(inputs) == 2 else None
    if path == "inference" and known.launch is not None:
        if widths is not None and widths.device.type == "cpu":  # each call's values, as the full call checks them
            multiple, out_channels, upscale_factor = known.options[0], known.options[3], known.options[8]
            _check_width_values(widths, inputs, out_channels, multiple, upscale_factor)
        return _launch_forward(known.launch, inputs[0], x1, weight, bias, residual, widths)
    if path == "training" and widths is None:  # the arguments were checked and normalised once already
        return _EagerSlimConv2d.apply(inputs[0], x1, weight, bias, residual, None, *known.options)
    return None


def exact_ints(value) -> bool:
    """An int, or a tuple of ints (not bools, floats or tensors, which may hash as an int does
    and must still be refused by the full call)."""
    return type(value) is int or (type(value) is tuple and all(type(v) is int for v in value))


def _signature(inputs, weight, bias, residual, widths, *options):
    """A hashable key of everything ``_check_args`` reads (the values of CPU widths excepted),
    its first six entries the ``_meta`` keys of the plan; None when an argument is not even
    a tensor, for the checks to report."""
    if not isinstance(inputs, (list, tuple)):  # (a batch tensor indexes too: its first image is no input)
        return None
    try:
        x1 = inputs[1] if len(inputs) == 2 else None
        return (_meta(inputs[0]), _meta(x1), _meta(weight), _meta(bias), _meta(residual), _meta(widths),
                len(inputs), *options, _negated(*inputs, weight, bias, residual))
    except (AttributeError, TypeError, IndexError):
        return None


def _checked_signature(inputs, weight, bias, residual, widths, segment_starts, out_channels, stride, padding,
                       activation, negative_slope, widths_multiple, upscale_factor):
    """``_signature`` of arguments that ``_check_args`` passes (run once per signature; the
    values of CPU widths on every call)."""
    # while tracing, hashing the symbolic sizes into the key would pin them (a recompile per
    # shape): check every time instead, which guards on inequalities only
    tracing = torch.compiler.is_compiling()
    signature = None if tracing else _signature(inputs, weight, bias, residual, widths, segment_starts, out_channels,
                                                stride, padding, activation, negative_slope, widths_multiple,
                                                upscale_factor)
    if signature is None or signature not in _CHECKED_SIGNATURES:
        _check_args(inputs, weight, bias, segment_starts, out_channels, stride, padding, activation, residual, widths,
                    widths_multiple, upscale_factor)
        if activation == "leaky_relu" and not 0 <= negative_slope < math.inf:  # NaN fails too
            raise ValueError(f"slim_conv2d: leaky_relu negative_slope={negative_slope} must be finite and >= 0")
        _remember(_CHECKED_SIGNATURES, signature)
    # traced or fake widths have no values to read (the op checks them when it runs)
    if widths is not None and widths.device.type == "cpu" and not tracing and not is_fake(widths):
        _check_width_values(widths, inputs, out_channels, widths_multiple, upscale_factor)
    return signature


def slim_conv2d(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                segment_starts: Sequence[int] = (0,), out_channels: Optional[int] = None, stride=1,
                padding=None, activation: Optional[str] = None, negative_slope: float = 0.01,
                residual: Optional[torch.Tensor] = None, widths: Optional[torch.Tensor] = None,
                widths_multiple: int | tuple[int, int] = 1, channel_sums: bool = False,
                tile_widths: Optional[tuple[int, int]] = None, upscale_factor: int = 1,
                packed_inputs: Sequence[bool] = (), packed_output: bool = False):
    """``act(conv(cat(inputs, 1), weight[:o, active input channels]) + bias[:o] + residual)``.

    - ``inputs``: 1 or 2 tensors ``[N, C_k, H, W]``; input k's channels are the weight's input
      channels ``[segment_starts[k], segment_starts[k] + C_k)``.
    - ``weight`` ``[Cout_max, Cin_max, k, k]`` (odd k, any strides) and ``bias`` ``[Cout_max]``
      are the full parameters, read in place.
    - ``out_channels``: active output width o (None: Cout_max). ``padding`` must be k//2.
    - ``activation``: None, 'relu' or 'leaky_relu' (``negative_slope``); ``residual``
      ``[N, o, Ho, Wo]`` is added before it.
    - ``widths``: optional int32 tensor ``[N, 1 + len(inputs)]`` on the inputs' device with each
      image's (out width, in width per input). The inputs are then max-width buffers read only
      up to each image's widths, and output channels at or beyond an image's out width are left
      UNWRITTEN (uninitialised memory). Forward only.
    - ``widths_multiple``: the caller's promise that every entry of ``widths`` is a multiple of
      it, or a pair ``(out, in)``: the out widths' multiple and the in widths' (a layer of 3
      outputs, or an upsampling conv's out widths of r^2 filters per channel, then keeps its
      inputs' promise). Checked on CPU only, where that costs no device sync. A multiple of 8
      (of 8 r^2 for an upsampling conv's out widths) lets the kernel keep vector loads on that
      side; on a GPU a broken promise rounds widths down to that multiple.
    - ``channel_sums``: also return the output's channel sums, ``(y, sums)`` with ``sums`` fp32
      ``[N, T, o]`` over T consecutive blocks of output pixels (the squeeze partials that
      ``kernels.gate.gate_head`` reads), computed in the epilogue. ``sums`` is None when the
      call goes through the registered op (gradients, torch.compile, a dispatch mode); not
      with per-image widths.
    - ``tile_widths``: with per-image widths, the (out, in per input) widths to size the tiles
      for instead of the weight's maximum ones (the narrowest of the widths the images will
      take, say): images as narrow run on tiles that fit them, wider ones on more, smaller
      tiles. The result is the same up to rounding (the reduction is summed in other blocks).

    - ``upscale_factor`` r: the output pixel-shuffled as ``F.pixel_shuffle(out, r)`` does, in
      the store (an upsampling conv with no copy after it): ``[N, o / r^2, r Ho, r Wo]``; ``o``
      and each image's out width multiples of r^2 (the latter checked on CPU only; on a GPU
      a broken one leaves part of a channel unwritten); no residual or channel sums.
    - ``packed_output`` (per-image widths only): store each image's pixels one after another
      at the pitch of its own out width (``[H, W, its width]`` from the start of its slot of
      the max-width buffer) instead of at the buffer's channel stride, so a narrow image writes
      and later reads as few bytes as in a buffer of its width. The returned tensor's strides
      then do NOT describe its contents: only ``slim_conv2d`` reading it as a packed input
      (``packed_inputs``: one flag per input) with the same per-image widths may use it. An
      image at the buffer's full width is stored as in a dense buffer. Eager inference only
      (not under torch.compile or a dispatch mode); packed inputs must be channels_last
      contiguous; a residual is always read as a dense tensor.

    Inputs (and residual) share one dtype: the weight's, or fp16/bf16 over fp32 weights (mixed
    precision: the weight tiles are cast in registers, and weight and bias gradients stay fp32).
    Returns ``[N, o, Ho, Wo]`` in channels_last, in the inputs' dtype (fp32 accumulation).
    Differentiable w.r.t. inputs, weight and bias (full-size gradients, zero outside the
    active slice) and residual.
    """
    key = None
    if type(packed_inputs) is not tuple:  # (the key would use up a generator before its flags are read)
        try:
            packed_inputs = tuple(packed_inputs)
        except TypeError:
            raise ValueError(f"slim_conv2d: packed_inputs must be a sequence of flags, one per input, "
                             f"got {packed_inputs!r}") from None
    # eager calls only (a trace, and a dispatch mode's fake tensors, have no pointers), with plain
    # int options (1.0 and True hash as 1 does, and must still be rejected)
    if not channel_sums and type(stride) is int and exact_ints(segment_starts) \
            and (padding is None or type(padding) is int) and exact_ints(widths_multiple) \
            and type(upscale_factor) is int and (out_channels is None or type(out_channels) is int) \
            and (tile_widths is None or exact_ints(tile_widths)) and not torch.compiler.is_compiling() \
            and not torch._C._len_torch_dispatch_stack():
        key = inference_key(inputs, weight, bias, residual, widths, segment_starts, out_channels, stride, padding,
                            activation, negative_slope, widths_multiple, upscale_factor, tile_widths,
                            packed_inputs=packed_inputs, packed_output=packed_output)
        y = repeat_call(key, inputs, weight, bias, residual, widths)
        if y is not None:
            return y
        try:
            hash(key)
        except TypeError:  # an unhashable option (a list of segment starts): not remembered
            key = None
    four_d = isinstance(weight, torch.Tensor) and weight.dim() == 4  # else the checks below report the weight
    k = weight.shape[-1] if four_d else 0
    if out_channels is None:
        out_channels = weight.shape[0] if four_d else 1
    out_channels = _as_int(out_channels, "out_channels", pairs=False)
    stride = _as_int(stride, "stride")
    padding = k // 2 if padding is None else _as_int(padding, "padding")
    segment_starts = tuple(_as_int(s, f"segment_starts[{i}]", pairs=False) for i, s in enumerate(segment_starts))
    widths_multiple = _widths_multiples(widths_multiple)
    upscale_factor = _as_int(upscale_factor, "upscale_factor", pairs=False)
    # a tensor in a plan's key could change in place (float first: an ABC check costs host time)
    if type(negative_slope) is not float and not isinstance(negative_slope, numbers.Real):
        raise ValueError(f"slim_conv2d: negative_slope must be a number, got {type(negative_slope).__name__}")
    signature = _checked_signature(inputs, weight, bias, residual, widths, segment_starts, out_channels, stride,
                                   padding, activation, negative_slope, widths_multiple, upscale_factor)
    if tile_widths is not None:
        if widths is None:
            raise ValueError("slim_conv2d: tile_widths applies to per-image widths only")
        if not isinstance(tile_widths, (tuple, list)) or len(tile_widths) != 2 or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile_widths):
            raise ValueError(f"slim_conv2d: tile_widths must be two positive widths (out, in), got {tile_widths!r}")
        tile_widths = tuple(tile_widths)
    if channel_sums and upscale_factor > 1:
        raise ValueError("slim_conv2d: channel_sums with upscale_factor > 1 is not supported")
    if channel_sums and widths is not None:
        raise ValueError("slim_conv2d: channel_sums with per-image widths is not supported (the sums of "
                         "channels beyond an image's width would be undefined)")
    if widths is not None and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*inputs, weight, bias, residual)):
        raise ValueError("slim_conv2d: per-image widths are forward only; run under torch.no_grad()")
    x1 = inputs[1] if len(inputs) == 2 else None
    start1 = segment_starts[1] if len(inputs) == 2 else 0
    options = (widths_multiple, segment_starts[0], start1, out_channels, stride, padding,
               "none" if activation is None else activation, float(negative_slope), upscale_factor)
    path = _eager_path(*inputs, weight, bias, residual)
    packed = _packed_flags(inputs, widths, packed_inputs, packed_output, path)
    if path == "inference":
        # not the widths': read one scalar at a time, their address says nothing about the
        # vector loads that the fast layout's tiles need (DDSNet's are its table's column views)
        plan = _forward_plan(*signature[:6], *options, channel_sums=bool(channel_sums),
                             aligned_pointers=_aligned_pointers(*inputs, weight, bias, residual),
                             tile_widths=tile_widths, packed=packed)
        _remember(_INFERENCE_PLANS, key, _KnownCall(plan, options))
        return _launch_forward(plan, inputs[0], x1, weight, bias, residual, widths)
    if path == "training" and key not in _INFERENCE_PLANS:  # (an inference call's entry serves both)
        _remember(_INFERENCE_PLANS, key, _KnownCall(None, options))
    call = _EagerSlimConv2d.apply if path == "training" else torch.ops.dds_fast.slim_conv2d
    y = call(inputs[0], x1, weight, bias, residual, widths, *options)
    return (y, None) if channel_sums else y


def packs_per_image_buffers() -> bool:
    """Whether ``slim_conv2d`` calls made now may pack per-image buffers: on the eager path (not
    under torch.compile or a dispatch mode such as FlopCounterMode)."""
    return _eager_path() == "inference"


def _packed_flags(inputs, widths, packed_inputs, packed_output, path) -> tuple[bool, bool, bool]:
    """(input 0, input 1, output) packed, checked: see ``slim_conv2d``'s ``packed_output``."""
    flags = tuple(bool(p) for p in packed_inputs)
    if not any(flags) and not packed_output:
        return _NOT_PACKED
    if widths is None:
        raise ValueError("slim_conv2d: packed inputs or outputs need per-image widths")
    if len(flags) not in (0, len(inputs)):
        raise ValueError(f"slim_conv2d: packed_inputs needs one flag per input ({len(inputs)}), got {len(flags)}")
    if path != "inference":
        raise ValueError("slim_conv2d: packed per-image buffers run on the eager inference path only, not under "
                         "torch.compile or a dispatch mode")
    for i, (x, p) in enumerate(zip(inputs, flags)):
        if p and not x.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"slim_conv2d: packed input {i} must be a channels_last contiguous buffer (as a packed "
                             f"output is), got strides {tuple(x.stride())}")
    flags = flags or (False,) * len(inputs)
    return flags[0], len(flags) == 2 and flags[1], bool(packed_output)


def _eager_path(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """'inference' or 'training' when nothing needs the registered op (no tracing, no dispatch
    mode such as FlopCounterMode or fake tensors), else None. Its dispatch costs more host time
    than the launches of a small layer, so the same implementation then runs directly."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return None
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "training" if grads else "inference"
