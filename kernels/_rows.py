"""Deterministic sums of many rows of fp32 partials, spread over many programs.

Kernels that cannot use atomics (their results must not depend on scheduling) leave one row of
partial sums per program; a single program summing tens of thousands of such rows runs for
milliseconds. ``fold_rows`` sums consecutive blocks of rows in parallel, in a fixed order,
until few are left for the consumer.
"""
import functools

import torch
import triton
import triton.language as tl

from ._launch import CachedLaunch, cdiv, next_pow2

ROWS_PER_PROGRAM = 64


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, num_rows, rows_per_program, C,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[n, s, c] = the sum of part[n, t, c] over t in [s * rows_per_program, (s + 1) * rows_per_program)
    s = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, rows_per_program, BLOCK_T):
        block = t0 + tl.arange(0, BLOCK_T)
        t = s * rows_per_program + block
        mask = ((t < num_rows) & (block < rows_per_program))[:, None] & mask_c[None, :]
        acc += tl.load(part_ptr + (n * num_rows + t)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + (n * tl.num_programs(0) + s) * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)


def fold_rows(part: torch.Tensor, limit: int = 2 * ROWS_PER_PROGRAM,
              rows_per_program: int = ROWS_PER_PROGRAM) -> torch.Tensor:
    """``part`` fp32 ``[N, T, C]`` with its rows summed in consecutive blocks of
    ``rows_per_program`` (the last one partial), again and again, until at most ``limit`` rows
    are left: ``[N, T', C]`` with the same sum over rows (up to fp32 rounding; the same bits on
    every run)."""
    if part.dim() != 3 or part.dtype != torch.float32:
        raise ValueError(f"fold_rows: part must be fp32 [N, T, C], got {part.dtype} {tuple(part.shape)}")
    if limit < 1 or rows_per_program < 2:
        raise ValueError(f"fold_rows: need limit >= 1 and rows_per_program >= 2, got {limit} and {rows_per_program}")
    part = part.contiguous()
    for fold, shape in fold_plan(*part.shape, limit, rows_per_program):
        folded = torch.empty(shape, device=part.device, dtype=torch.float32)
        fold(part, folded)
        part = folded
    return part


@functools.lru_cache(maxsize=1024)
def fold_plan(n: int, rows: int, c: int, limit: int, rows_per_program: int) -> tuple[tuple[CachedLaunch, tuple], ...]:
    """``fold_rows``' launches for a contiguous ``[n, rows, c]``, each with the shape it writes
    (planned once per shape: the host work per call is what bounds small training steps)."""
    block_c = min(next_pow2(c), 256)
    block_t = min(next_pow2(rows_per_program), max(1, 8192 // block_c))
    plan = []
    while rows > limit:
        folded = cdiv(rows, rows_per_program)
        plan.append((CachedLaunch(_sum_rows_kernel, (folded, n, cdiv(c, block_c)), (rows, rows_per_program, c),
                                  dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4), num_tensors=2), (n, folded, c)))
        rows = folded
    return tuple(plan)
