"""The gate head, whole-network configs and one stage-1 training step (benchmark suite,
items 3 to 5). On a GPU: fp16 at 512x512 (configs at batch 1 and 8), the gate at batch 1;
without a GPU, tiny fp32 shapes so CI exercises the code.

Not here yet: DDSNet dynamic mode with mixed widths in one batch and the one-graph forward,
which need the per-image-width path of DDSNet on the Triton kernels.
"""
import pytest
import torch
from _timing import CUDA, DEVICE, TIMER, describe

from dds_fast import DynamicGate, SlimConv2d, SlimUNet, macs_per_pixel
from dds_fast.runner import default_configs
from dds_fast.training.sandwich import sandwich_configs, sandwich_step

pytestmark = pytest.mark.benchmark(timer=TIMER, warmup=True, warmup_iterations=3)

DTYPE = torch.float16 if CUDA else torch.float32
SIZE = 512 if CUDA else 16
BASE = 32 if CUDA else 8


def unet(backend):
    torch.manual_seed(0)
    net = SlimUNet(in_channels=3, base_width=BASE, depth=4 if CUDA else 2)
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = backend
    return net.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gate_head(benchmark, backend):
    torch.manual_seed(0)
    gate = DynamicGate(48, 8, backend=backend).to(DEVICE, DTYPE).eval()
    x = torch.randn(1, 48, SIZE, SIZE, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    benchmark.group = "gate head, batch 1"
    describe(benchmark, backend=backend, dtype=str(DTYPE), shape=list(x.shape))
    with torch.no_grad():
        out = benchmark(gate, x)
    assert out.choice.shape == (1,)


@pytest.mark.parametrize("batch", [1, 8] if CUDA else [1])
@pytest.mark.parametrize("label", [label for label, _ in default_configs(SlimUNet(base_width=8, depth=2))])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_network_config(benchmark, backend, label, batch):
    net = unet(backend).to(dtype=DTYPE).eval()
    config = dict(default_configs(net))[label]
    net.set_config(config)
    x = torch.rand(batch, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    benchmark.group = f"SlimUNet config, batch {batch}"
    describe(benchmark, backend=backend, config=label, macs_per_pixel=macs_per_pixel(net), dtype=str(DTYPE),
             batch=batch, size=SIZE)
    with torch.no_grad():
        out = benchmark(net, x)
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stage1_training_step(benchmark, backend):
    net = unet(backend)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    clean = torch.rand(4, 3, 128 if CUDA else 8, 128 if CUDA else 8, device=DEVICE)
    noisy = clean + 0.1 * torch.randn_like(clean)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if CUDA else None
    generator = torch.Generator().manual_seed(0)
    benchmark.group = "stage-1 sandwich step (n = 4)"
    describe(benchmark, backend=backend, batch=4, size=clean.shape[-1])

    def step():
        optimizer.zero_grad(set_to_none=True)
        configs = sandwich_configs(net.space, 4, generator)
        kwargs = {"autocast": autocast} if autocast else {}
        losses = sandwich_step(net, noisy, clean, configs, **kwargs)
        optimizer.step()
        return losses

    losses = benchmark(step)
    assert set(losses) == {"largest", "random1", "random2", "smallest"}
