"""Build every Triton kernel for sm_90 (the H100) with the real compiler, no GPU needed.

The interpreter that runs the kernels in CI skips Triton's compiler, so type and layout
errors that only the compiler sees would otherwise wait for a GPU session to show up.
"""
import os
import subprocess
import sys

import pytest

_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dds_fast.kernels import conv2d as K
assert not K.INTERPRET

def build(fn, ptrs, constexprs):
    sig = {a: "constexpr" if a in constexprs else ptrs.get(a, "i32") for a in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

p, f = "*bf16", "*fp32"
build(K._conv_fwd_kernel, dict(x0=p, x1=p, w=p, b=p, res=p, y=p, widths="*i32", slope="fp32"),
      dict(KSIZE=3, STRIDE=2, PAD=1, TWO_INPUTS=True, HAS_BIAS=True, HAS_RES=True, ACT=2, PER_IMAGE=True,
           DOT_F32=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32))
build(K._conv_fwd_kernel, dict(x0=f, x1=f, w=f, b=f, res=f, y=f, widths="*i32", slope="fp32"),
      dict(KSIZE=3, STRIDE=1, PAD=1, TWO_INPUTS=False, HAS_BIAS=False, HAS_RES=False, ACT=1, PER_IMAGE=False,
           DOT_F32=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16))
# mixed precision: bf16 activations over fp32 master weights
build(K._conv_fwd_kernel, dict(x0=p, x1=p, w=f, b=f, res=p, y=p, widths="*i32", slope="fp32"),
      dict(KSIZE=3, STRIDE=1, PAD=1, TWO_INPUTS=False, HAS_BIAS=True, HAS_RES=False, ACT=2, PER_IMAGE=False,
           DOT_F32=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32))
build(K._bwd_input_kernel, dict(dz=p, w=f, dx=p),
      dict(KSIZE=3, STRIDE=1, PAD=1, IH0=0, IW0=0, DOT_F32=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32))
build(K._reduce_kernel, dict(ws=f, out=f), dict(KSIZE=3, BLOCK=1024))
build(K._bwd_dz_kernel, dict(dy=p, y=p, dz=p, bias_ws=f, slope="fp32"),
      dict(ACT=2, STORE_DZ=True, BIAS_SUMS=True, BLOCK_M=64, BLOCK_N=64))
build(K._bwd_input_kernel, dict(dz=p, w=p, dx=p),
      dict(KSIZE=3, STRIDE=2, PAD=1, IH0=1, IW0=0, DOT_F32=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32))
build(K._bwd_weight_kernel, dict(dz=p, x=p, ws=f),
      dict(KSIZE=3, STRIDE=2, PAD=1, DOT_F32=False, BLOCK_CO=64, BLOCK_CI=64, BLOCK_P=64))
build(K._reduce_kernel, dict(ws=f, out=p), dict(KSIZE=3, BLOCK=1024))
from dds_fast.kernels import gate as G
assert not G._interpreted()
build(G._squeeze_kernel, dict(x_ptr=p, part_ptr=f), dict(BLOCK_HW=64, BLOCK_C=32))
build(G._head_kernel, dict(part_ptr=f, inv_hw="fp32", w1_ptr=f, b1_ptr=f, w2_ptr=f, b2_ptr=f, w3_ptr=f,
                           b3_ptr=f, w4_ptr=f, b4_ptr=f, scale_ptr=f, logits_ptr=f, probs_ptr=f,
                           choice_ptr="*i32"),
      dict(ATTENTION=True, BLOCK_T=32, BLOCK_C=64, BLOCK_CR=16, BLOCK_H=16, BLOCK_E=16))
build(G._scale_kernel, dict(x_ptr=p, scale_ptr=f, out_ptr=p), dict(BLOCK_HW=64, BLOCK_C=32))
"""


def test_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
