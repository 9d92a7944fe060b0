"""One conv layer at widths 0.25-1 (issue: benchmark suite, items 1 and 2).

Variants, all channels_last: the Triton SlimConv2d with fused bias + LeakyReLU, (a) the
sliced-copy PyTorch path, (b) the stock conv on a contiguous static weight of the narrow
shape plus bias and activation, (c) torch.compile of (b). On a GPU: fp16, bf16 and fp32,
256x256 and 512x512, batch 1 and 16, Cmax 64. Without a GPU one tiny fp32 case runs (the
Triton variant under the interpreter) so CI exercises the code, not the speed.

Run on a GPU: pytest benchmarks/bench_layers.py -n 0 --benchmark-enable --benchmark-json=OUT.json
"""
import pytest
import torch
from _timing import CUDA, DEVICE, TIMER, describe

from dds_fast.bench import layer_variants
from dds_fast.runner import WIDTHS

pytestmark = pytest.mark.benchmark(timer=TIMER, warmup=True, warmup_iterations=5)

CMAX = 64
if CUDA:
    DTYPES = [torch.float16, torch.bfloat16, torch.float32]
    SHAPES = [(1, 256), (16, 256), (1, 512), (16, 512)]
    VARIANTS = ["triton fused", "(a) sliced copy", "(b) static", "(c) compiled static"]
    RATIOS = WIDTHS
else:
    DTYPES, SHAPES, RATIOS = [torch.float32], [(1, 8)], [0.25, 1.0]
    VARIANTS = ["triton fused", "(a) sliced copy", "(b) static"]


def layer(variant, ratio, dtype):
    backends = ["triton", "torch"]
    width, variants = layer_variants(CMAX if CUDA else 16, ratio, DEVICE, dtype, backends,
                                     compile_static=variant.startswith("(c)"))
    return width, variants[variant]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch,size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(benchmark, dtype, batch, size, ratio, variant):
    if variant.startswith("(c)") and dtype != torch.float16:
        pytest.skip("the torch.compile baseline runs in fp16 only: each compile costs tens of seconds")
    width, conv = layer(variant, ratio, dtype)
    x = torch.rand(batch, width, size, size, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    benchmark.group = f"forward {dtype} {batch}x{size}x{size} ratio {ratio}"
    describe(benchmark, variant=variant, width=width, dtype=str(dtype), batch=batch, size=size,
             macs=width * width * 9 * size * size * batch)
    with torch.no_grad():
        out = benchmark(conv, x)
    assert out.shape == (batch, width, size, size)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("(c)")])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("batch,size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(benchmark, dtype, batch, size, ratio, variant):
    width, conv = layer(variant, ratio, dtype)
    x = torch.rand(batch, width, size, size, device=DEVICE, dtype=dtype).to(
        memory_format=torch.channels_last).requires_grad_()
    probe = torch.randn(batch, width, size, size, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    benchmark.group = f"forward+backward {dtype} {batch}x{size}x{size} ratio {ratio}"
    describe(benchmark, variant=variant, width=width, dtype=str(dtype), batch=batch, size=size,
             macs=3 * width * width * 9 * size * size * batch)

    def step():
        conv.zero_grad(set_to_none=True)
        x.grad = None
        conv(x).backward(probe)

    benchmark(step)
    assert x.grad is not None and conv.weight.grad is not None
