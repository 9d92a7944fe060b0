"""Fused Triton kernels of the DDS-Net dynamic gate: the inference path of ``DynamicGate``.

Three steps, each usable on its own (a producing conv can emit the squeeze partials, and a
consuming conv can apply the scale while it loads its input tile):

- ``squeeze_partials(x)``: per-(image, spatial chunk) channel sums of ``x`` into an fp32
  buffer ``[N, T, C]``; deterministic, no atomics, no memset.
- ``gate_head(partials, hw, ...)``: one launch. Up to 128 programs per image fold its rows of
  partials; the last of them to finish (a ticket counter) sums the folded rows and runs both
  heads in fp32 registers: ``R = relu(W1 U + b1)``, ``scale = 1 + tanh(W2 R + b2)``,
  ``logits = W4 relu(BN(W3 R + b3)) + b4`` (the eval BatchNorm applied in the kernel from
  its running statistics), max-subtracted softmax and argmax. Writes scale ``[N, C]``, logits and
  probs ``[N, E]`` (fp32) and choice ``[N]`` (int32) to device memory, so the next layers
  can read the chosen config without a host sync.
- ``apply_scale(x, scale)``: ``x * scale[:, :, None, None]`` in the layout of ``x``.

``x`` may be fp32, fp16 or bf16, NCHW or channels_last, or any view whose two spatial axes
flatten to one stride (a channel prefix of a wider buffer does); other views are copied.
The kernels have no backward: training goes through the reference torch ops (see
``dds_fast.gate``). On a machine without a GPU they run under ``TRITON_INTERPRET=1``, which
must be set before this module is imported.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, MAX_BATCH, cdiv, launch, next_pow2, num_sms
from ._rows import ROWS_PER_PROGRAM

MAX_FOLDS = 128  # programs per image that fold the partials; the last one also runs the heads

__all__ = ["BatchNormStats", "GateHeadOutput", "squeeze_partials", "gate_head", "apply_scale", "route_flags"]


class GateHeadOutput(NamedTuple):
    scale: torch.Tensor   # [N, C] fp32, 1 + tanh(W2 R + b2) (ones when attention is off)
    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor   # [N, E] fp32, softmax of logits
    choice: torch.Tensor  # [N] int32, argmax of logits


@triton.jit
def _squeeze_kernel(x_ptr, part_ptr, C, HW, chunk, num_chunks, stride_n, stride_c, stride_p,
                    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = x_ptr + n.to(tl.int64) * stride_n
    start = pid_t.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, chunk, BLOCK_HW):
        p = start + p0 + tl.arange(0, BLOCK_HW)
        mask = (p < HW)[:, None] & mask_c[None, :]
        # (int64 channel offsets: an NCHW image's channel stride times C can pass 2**31)
        v = tl.load(base + p[:, None] * stride_p + offs_c[None, :].to(tl.int64) * stride_c, mask=mask, other=0.0)
        acc += v.to(tl.float32)
    tl.store(part_ptr + (n.to(tl.int64) * num_chunks + pid_t) * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)


@triton.jit
def _gate_kernel(part_ptr, folded_ptr, arrivals_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,
                 bn_mean_ptr, bn_var_ptr, bn_weight_ptr, bn_bias_ptr,
                 scale_ptr, logits_ptr, probs_ptr, choice_ptr,
                 num_rows, rows_per_program, inv_hw, bn_eps, C, CR, HID, E,
                 ATTENTION: tl.constexpr, BN_AFFINE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_CR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    # Program (s, n) sums its block of image n's rows of partials into folded[n, s]; the last
    # of image n's programs to arrive (a ticket counter) sums the folded rows, in order, and
    # runs the heads: one launch, and the same bits whichever program comes last.
    s = tl.program_id(0)
    n = tl.program_id(1)
    num_folds = tl.num_programs(0)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, rows_per_program, BLOCK_T):
        block = t0 + offs_t
        t = s * rows_per_program + block
        mask = ((t < num_rows) & (block < rows_per_program))[:, None] & mask_c[None, :]
        acc += tl.load(part_ptr + (n.to(tl.int64) * num_rows + t)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    tl.store(folded_ptr + (n * num_folds + s) * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)
    tl.debug_barrier()  # every thread's store comes before the ticket's release
    ticket = tl.atomic_add(arrivals_ptr + n, 1, sem="acq_rel", scope="gpu")
    if ticket == num_folds - 1:
        tl.atomic_xchg(arrivals_ptr + n, 0)  # ready for the next call (a CUDA graph replays it)
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for t0 in range(0, num_folds, BLOCK_T):
            t = t0 + offs_t
            mask = (t < num_folds)[:, None] & mask_c[None, :]
            # .cg: other programs wrote these rows; read them from L2, not this SM's L1
            acc += tl.load(folded_ptr + (n * num_folds + t)[:, None] * C + offs_c[None, :], mask=mask, other=0.0,
                           cache_modifier=".cg")
        u = tl.sum(acc, axis=0) * inv_hw                                         # [BLOCK_C]
        _heads(u, n, offs_c, mask_c, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,
               bn_mean_ptr, bn_var_ptr, bn_weight_ptr, bn_bias_ptr, scale_ptr, logits_ptr, probs_ptr, choice_ptr,
               bn_eps, C, CR, HID, E, ATTENTION, BN_AFFINE, BLOCK_C, BLOCK_CR, BLOCK_H, BLOCK_E)


@triton.jit
def _heads(u, n, offs_c, mask_c, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr,
           bn_mean_ptr, bn_var_ptr, bn_weight_ptr, bn_bias_ptr, scale_ptr, logits_ptr, probs_ptr, choice_ptr,
           bn_eps, C, CR, HID, E, ATTENTION: tl.constexpr, BN_AFFINE: tl.constexpr, BLOCK_C: tl.constexpr,
           BLOCK_CR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    # The FCs are far below tl.dot's 16-wide minimum: broadcast-multiply and tl.sum. Their
    # weight tiles alternate orientation so each result already has the layout the next
    # product broadcasts along, with no layout conversion in between.
    offs_r = tl.arange(0, BLOCK_CR)
    mask_r = offs_r < CR
    mask_rc = mask_r[:, None] & mask_c[None, :]
    w1 = tl.load(w1_ptr + offs_r[:, None] * C + offs_c[None, :], mask=mask_rc, other=0.0).to(tl.float32)
    r = tl.sum(w1 * u[None, :], axis=1) + tl.load(b1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    # NaN propagates (as torch.relu's does): a corrupt image must not get a confident route
    r = tl.maximum(r, 0.0, propagate_nan=tl.PropagateNan.ALL)                    # [BLOCK_CR]
    # padding lanes: their zero weights times an infinite squeeze are NaN, which the next
    # product's zero padding would carry into the real lanes
    r = tl.where(mask_r, r, 0.0)

    if ATTENTION:
        w2t = tl.load(w2_ptr + offs_c[None, :] * CR + offs_r[:, None], mask=mask_rc, other=0.0).to(tl.float32)
        z = tl.sum(w2t * r[:, None], axis=0) + tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        scale = 2.0 * tl.sigmoid(2.0 * z)                                        # == 1 + tanh(z)
    else:
        scale = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    tl.store(scale_ptr + n * C + offs_c, scale, mask=mask_c)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HID
    w3t = tl.load(w3_ptr + offs_h[None, :] * CR + offs_r[:, None], mask=mask_r[:, None] & mask_h[None, :],
                  other=0.0).to(tl.float32)
    hid = tl.sum(w3t * r[:, None], axis=0) + tl.load(b3_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    # the eval BatchNorm from its current statistics (read every call: nothing to go stale)
    mean = tl.load(bn_mean_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    var = tl.load(bn_var_ptr + offs_h, mask=mask_h, other=1.0).to(tl.float32)
    hid = (hid - mean) / tl.sqrt(var + bn_eps)
    if BN_AFFINE:
        hid = hid * tl.load(bn_weight_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32) \
            + tl.load(bn_bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    hid = tl.maximum(hid, 0.0, propagate_nan=tl.PropagateNan.ALL)                # [BLOCK_H]
    hid = tl.where(mask_h, hid, 0.0)

    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    w4 = tl.load(w4_ptr + offs_e[:, None] * HID + offs_h[None, :], mask=mask_e[:, None] & mask_h[None, :],
                 other=0.0).to(tl.float32)
    logits = tl.sum(w4 * hid[None, :], axis=1) + tl.load(b4_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    logits = tl.where(mask_e, logits, float("-inf"))                             # padding never wins
    ex = tl.exp(logits - tl.max(logits, axis=0))
    probs = ex / tl.sum(ex, axis=0)
    tl.store(logits_ptr + n * E + offs_e, logits, mask=mask_e)
    tl.store(probs_ptr + n * E + offs_e, probs, mask=mask_e)
    # torch.argmax takes the first NaN as the maximum; tl.argmax skips NaN (and could then pick
    # the padding), so NaN is found first and hidden from it
    is_nan = (logits != logits) & mask_e
    first_nan = tl.min(tl.where(is_nan, offs_e, BLOCK_E), axis=0)
    best = tl.argmax(tl.where(is_nan, float("-inf"), logits), axis=0)
    tl.store(choice_ptr + n, tl.where(first_nan < BLOCK_E, first_nan, best).to(tl.int32))


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, out_ptr, C, HW, sx_n, sx_c, sx_p, so_n, so_c, so_p,
                  BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    p = pid_p.to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (p < HW)[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + n.to(tl.int64) * sx_n + p[:, None] * sx_p + offs_c[None, :].to(tl.int64) * sx_c, mask=mask,
                other=0.0)
    s = tl.load(scale_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    y = x.to(tl.float32) * s[None, :]
    tl.store(out_ptr + n.to(tl.int64) * so_n + p[:, None] * so_p + offs_c[None, :].to(tl.int64) * so_c,
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _route_flags_kernel(choice_ptr, flags_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    # one program: whether every image chose the first image's route, then one flag per route
    first = tl.load(choice_ptr)
    differ = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        chosen = tl.load(choice_ptr + offs, mask=offs < N, other=0)
        differ += ((chosen != first) & (offs < N)).to(tl.int32)
    offs_e = tl.arange(0, BLOCK_E)
    uniform = (offs_e == first) & (offs_e < E) & (tl.sum(differ, axis=0) == 0)
    tl.store(flags_ptr + offs_e, uniform, mask=offs_e < E)
    tl.store(flags_ptr + E, tl.sum(uniform.to(tl.int32), axis=0) == 0)


def _check_runnable(t: torch.Tensor, what: str):
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{what}: tensors are on the CPU but the Triton kernels were compiled for a GPU; "
                           "set TRITON_INTERPRET=1 before importing dds_fast to run them on the CPU")


def _tile(c: int, hw: int) -> tuple[int, int]:
    """(BLOCK_HW, BLOCK_C) of the streaming kernels: about 4K elements per program on a GPU;
    under the interpreter, where each program costs tens of ms, whole images at once."""
    if INTERPRET:
        block_c = next_pow2(c)
        return min(next_pow2(hw), max(16, 65536 // block_c)), block_c
    block_c = min(next_pow2(c), 128)
    return min(max(16, 4096 // block_c), next_pow2(hw)), block_c


def _pixels(x: torch.Tensor, what: str) -> tuple[torch.Tensor, int]:
    """``x`` (copied when its spatial axes do not flatten) and the stride of its flattened pixel axis."""
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{what}: x is empty, shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: x is {x.dtype}; the kernels take float32, float16 and bfloat16 features")
    if x.is_neg():  # the kernels would read its memory, not its values
        raise ValueError(f"{what}: x is a lazily negated view (is_neg()); pass x.resolve_neg()")
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"{what}: a batch of {x.shape[0]} images; the kernels' grid takes at most {MAX_BATCH}")
    h, w = x.shape[2], x.shape[3]
    if w == 1:
        return x, x.stride(2)
    if h == 1 or x.stride(2) == w * x.stride(3):
        return x, x.stride(3)
    x = x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
    return x, x.stride(3)


def squeeze_partials(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Channel sums of ``x`` over consecutive chunks of its H*W pixels: fp32 ``[N, T, C]``.

    ``chunk`` (pixels per program) defaults to enough chunks to fill the GPU (one per image
    under the interpreter); it is rounded up to a multiple of the kernel's pixel block (a
    power of two, no larger than needed to cover ``chunk``).
    """
    x, stride_p = _pixels(x, "squeeze_partials")
    _check_runnable(x, "squeeze_partials")
    n, c, h, w = x.shape
    hw = h * w
    block_hw, block_c = _tile(c, hw)
    c_blocks = cdiv(c, block_c)
    if chunk is None:
        # one chunk per image under the interpreter; on a GPU about four programs per SM, each
        # over at least four pixel blocks, so the head never sums more partials than pixels
        chunks = 1 if INTERPRET else cdiv(4 * num_sms(x.device.index), n * c_blocks)
        chunk = max(cdiv(hw, chunks), 4 * block_hw)
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"squeeze_partials: chunk must be an int >= 1, got {chunk!r}")
    block_hw = min(block_hw, next_pow2(chunk))
    chunk = cdiv(min(chunk, hw), block_hw) * block_hw
    num_chunks = cdiv(hw, chunk)
    part = torch.empty((n, num_chunks, c), device=x.device, dtype=torch.float32)
    launch(_squeeze_kernel, (num_chunks, c_blocks, n), (x, part),
           (c, hw, chunk, num_chunks, x.stride(0), x.stride(1), stride_p), BLOCK_HW=block_hw, BLOCK_C=block_c,
           num_warps=4)
    return part


@functools.lru_cache(maxsize=None)
def _arrivals(device: torch.device) -> torch.Tensor:
    """The gate kernel's ticket counters, one per image: zero between calls (the last program
    of each image resets its own), so one buffer serves every call on a device, graph replays
    included. Calls on two streams at once would share them: a device's gates run on one stream
    at a time (the README's threads note)."""
    return torch.zeros(MAX_BATCH, device=device, dtype=torch.int32)


def _check_param(t: torch.Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"gate_head: {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"gate_head: {name} is on {t.device}, the input on {device}")
    return t.contiguous()


class BatchNormStats(NamedTuple):
    """An eval-mode ``BatchNorm1d``: ``(h - mean) / sqrt(var + eps) * weight + bias``."""
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None  # None (with bias) when the BatchNorm is not affine
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormStats":
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("gate_head: the BatchNorm has no running statistics (track_running_stats=False)")
        return cls(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))


def gate_head(partials: torch.Tensor, hw: int, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, bn: BatchNormStats, w4: torch.Tensor,
              b4: torch.Tensor, attention: bool = True) -> GateHeadOutput:
    """Both gate heads from squeeze partials ``[N, T, C]`` (fp32 channel sums over ``hw`` pixels).

    Weights are ``nn.Linear`` layouts: ``w1 [CR, C]``, ``w2 [C, CR]``, ``w3 [HID, CR]``,
    ``w4 [E, HID]``, each bias 1-D; ``bn`` the eval BatchNorm behind ``w3`` (``HID``
    features), applied in the kernel from its current statistics. Any float dtype; the math
    runs in fp32. With ``attention=False`` the scale is all ones and ``w2, b2`` are not read.
    """
    if partials.dim() != 3 or partials.dtype != torch.float32:
        raise ValueError(f"gate_head: partials must be fp32 [N, T, C], got {partials.dtype} {tuple(partials.shape)}")
    if isinstance(hw, bool) or not isinstance(hw, int) or hw < 1:  # (the kernel divides by it as given)
        raise ValueError(f"gate_head: hw must be an int >= 1 (the pixels the partials sum over), got {hw!r}")
    if partials.shape[1] < 1 or partials.shape[2] < 1:  # no program would write the outputs
        raise ValueError(f"gate_head: partials [N, T, C] need T >= 1 rows of sums and C >= 1 channels, got "
                         f"{tuple(partials.shape)}")
    if partials.shape[0] > MAX_BATCH:  # the arrival counters hold MAX_BATCH images
        raise ValueError(f"gate_head: a batch of {partials.shape[0]} images; the kernel takes at most {MAX_BATCH}")
    _check_runnable(partials, "gate_head")
    n, num_chunks, c = partials.shape
    cr, hid, e = w1.shape[0], w3.shape[0], w4.shape[0]
    dev = partials.device
    w1, w2 = _check_param(w1, "w1", (cr, c), dev), _check_param(w2, "w2", (c, cr), dev)
    w3, w4 = _check_param(w3, "w3", (hid, cr), dev), _check_param(w4, "w4", (e, hid), dev)
    b1, b2 = _check_param(b1, "b1", (cr,), dev), _check_param(b2, "b2", (c,), dev)
    b3, b4 = _check_param(b3, "b3", (hid,), dev), _check_param(b4, "b4", (e,), dev)
    affine = bn.weight is not None
    if affine != (bn.bias is not None):
        raise ValueError("gate_head: the BatchNorm needs both weight and bias, or neither")
    mean, var = _check_param(bn.mean, "bn.mean", (hid,), dev), _check_param(bn.var, "bn.var", (hid,), dev)
    bn_w = _check_param(bn.weight, "bn.weight", (hid,), dev) if affine else mean  # unread when not affine
    bn_b = _check_param(bn.bias, "bn.bias", (hid,), dev) if affine else mean
    partials = partials.contiguous()
    out = GateHeadOutput(torch.empty((n, c), device=dev, dtype=torch.float32),
                         torch.empty((n, e), device=dev, dtype=torch.float32),
                         torch.empty((n, e), device=dev, dtype=torch.float32),
                         torch.empty((n,), device=dev, dtype=torch.int32))
    block_c = next_pow2(c)
    # alone over a 512x512 stem's 2048 rows of sums, one program per image took 16 us on an
    # H200: the rows are folded by up to MAX_FOLDS programs per image first, in the same launch
    rows_per_program = max(ROWS_PER_PROGRAM, cdiv(num_chunks, MAX_FOLDS))
    num_folds = cdiv(num_chunks, rows_per_program)
    folded = torch.empty((n, num_folds, c), device=dev, dtype=torch.float32)
    block_t = min(next_pow2(rows_per_program), max(1, 8192 // block_c))
    arrivals = _arrivals(dev)
    try:
        launch(_gate_kernel, (num_folds, n), (partials, folded, arrivals, w1, b1, w2, b2, w3, b3, w4, b4, mean,
                                              var, bn_w, bn_b, *out),
               (num_chunks, rows_per_program, 1.0 / hw, float(bn.eps), c, cr, hid, e), ATTENTION=bool(attention),
               BN_AFFINE=affine, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_CR=next_pow2(cr), BLOCK_H=next_pow2(hid),
               BLOCK_E=next_pow2(e), num_warps=4)
    except BaseException:  # a launch stopped part-way (an interrupt) leaves tickets counted: the next would misread
        arrivals[:n].zero_()
        raise
    return out


def apply_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale[:, :, None, None]`` (math in fp32), in the dtype and memory format of ``x``."""
    x, sx_p = _pixels(x, "apply_scale")
    _check_runnable(x, "apply_scale")
    n, c, h, w = x.shape
    if tuple(scale.shape) != (n, c) or scale.dtype != torch.float32 or scale.device != x.device:
        raise ValueError(f"apply_scale: scale must be fp32 [{n}, {c}] on {x.device}, got {scale.dtype} "
                         f"{tuple(scale.shape)} on {scale.device}")
    scale = scale.contiguous()
    # a dense layout, whose pixels flatten: empty_like would copy the strides of a view whose
    # channels fall between its rows and columns (an unfold's), which do not
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)
    so_p = out.stride(2) if w == 1 else out.stride(3)
    block_hw, block_c = _tile(c, h * w)
    grid = (cdiv(h * w, block_hw), cdiv(c, block_c), n)
    launch(_scale_kernel, grid, (x, scale, out), (c, h * w, x.stride(0), x.stride(1), sx_p, out.stride(0),
                                                  out.stride(1), so_p), BLOCK_HW=block_hw, BLOCK_C=block_c,
           num_warps=4)
    return out


def route_flags(choice: torch.Tensor, num_routes: int) -> torch.Tensor:
    """bool ``[num_routes + 1]`` on the device of ``choice`` (one route index per image):
    ``flags[k]``, whether every image chose route ``k``; ``flags[num_routes]``, whether no
    route holds the whole batch (it mixes routes, or its first index is out of range). One
    launch, no host sync: the predicates of a CUDA graph's conditional nodes."""
    if not isinstance(choice, torch.Tensor) or choice.dim() != 1 or len(choice) == 0 or choice.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"route_flags: choice must be a non-empty 1-D int32 or int64 tensor, got {choice!r}")
    if isinstance(num_routes, bool) or not isinstance(num_routes, int) or num_routes < 1:
        raise ValueError(f"route_flags: num_routes must be an int >= 1, got {num_routes!r}")
    _check_runnable(choice, "route_flags")
    choice = choice.contiguous()
    flags = torch.empty((num_routes + 1,), device=choice.device, dtype=torch.bool)
    launch(_route_flags_kernel, (1,), (choice, flags), (len(choice), num_routes),
           BLOCK_N=min(next_pow2(len(choice)), 1024), BLOCK_E=next_pow2(num_routes), num_warps=1)
    return flags
