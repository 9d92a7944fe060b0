"""The gate head, whole-network configs, DDSNet dynamic mode and one stage-1 training step
(benchmark suite, items 3 to 5). On a GPU: fp16 at 512x512 (configs at batch 1 and 8, the
dynamic mode at batch 16), the gate at batch 1; without a GPU, tiny fp32 shapes (the training
step on one 8x8 image: under the interpreter each kernel program costs tens of ms) so CI
exercises the code.
"""
import pytest
import torch
from _timing import CUDA, DEVICE, TIMER, describe

from dds_fast import DDSNet, DynamicGate, RoutingEntry, SlimConv2d, SlimUNet, export_static, macs_per_pixel
from dds_fast.graph_if import conditional_graph_nodes
from dds_fast.runner import capture_cuda_graph, default_configs
from dds_fast.training.loop import as_floats
from dds_fast.training.sandwich import MaskedSandwich, ends_fixed, sandwich_configs, sandwich_step

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
    return net.to(DEVICE, memory_format=torch.channels_last)


def gate_macs(gate):
    """Multiply-adds per image of the gate's linear layers (its squeeze and scale are elementwise)."""
    layers = [gate.fc1, gate.fc3, gate.fc4] + ([gate.fc2] if gate.attention else [])
    return sum(layer.in_features * layer.out_features for layer in layers)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gate_head(benchmark, backend):
    torch.manual_seed(0)
    gate = DynamicGate(48, 8, backend=backend).to(DEVICE, DTYPE).eval()
    x = torch.randn(1, 48, SIZE, SIZE, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    benchmark.group = "gate head, batch 1"
    describe(benchmark, backend=backend, dtype=str(DTYPE), shape=list(x.shape), macs_per_image=gate_macs(gate),
             widths=dict(channels=gate.channels, reduced=gate.reduced, hidden=gate.hidden, choices=gate.num_choices),
             attention=gate.attention)
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
    describe(benchmark, backend=backend, config=label, widths=config.to_dict(), macs_per_pixel=macs_per_pixel(net),
             dtype=str(DTYPE), batch=batch, size=SIZE)
    with torch.no_grad():
        out = benchmark(net, x)
    assert out.shape == x.shape


DYNAMIC_BATCH = 16 if CUDA else 4


def dynamic_model(backend):
    """A DDSNet whose routing space is the five default configs (smallest to largest), with a
    fixed mix of them over a batch: image i runs config i mod 5."""
    net = unet(backend).to(dtype=DTYPE)
    routes = [RoutingEntry(config, macs_per_pixel(net, config)) for _, config in default_configs(net)]
    gate = DynamicGate(net.stem_channels, len(routes), backend=backend)
    gate.attention = False
    model = DDSNet(net, gate, routes).to(DEVICE, DTYPE, memory_format=torch.channels_last).eval()
    x = torch.rand(DYNAMIC_BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    choice = torch.arange(DYNAMIC_BATCH, device=DEVICE) % len(routes)
    return model, x, choice


def describe_mix(benchmark, model, choice, **info):
    """extra_info of a mixed batch: each image's route, the routes' widths and the mean MACs/pixel
    of the dynamic forward (the routed configs behind the full-width stem)."""
    describe(benchmark, dtype=str(DTYPE), batch=DYNAMIC_BATCH, size=SIZE, choice=choice.tolist(),
             widths=[entry.config.to_dict() for entry in model.routing_space],
             macs_per_pixel=sum(model.dynamic_macs_per_pixel[i] for i in choice.tolist()) / DYNAMIC_BATCH, **info)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ddsnet_dynamic_mixed_batch(benchmark, backend):
    """Triton: every image at its own widths, one launch per layer. Reference: the batch
    grouped by config, one sub-network run per group (a host sync to group)."""
    model, x, choice = dynamic_model(backend)
    model.per_image = backend == "triton"
    benchmark.group = f"DDSNet dynamic, five configs mixed in a batch of {DYNAMIC_BATCH}"
    describe_mix(benchmark, model, choice, backend=backend)
    with torch.no_grad():
        out = benchmark(model, x, choice=choice)
    assert out.shape == x.shape


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["one graph", "one graph, a conditional node per route", "a graph per config"])
def test_ddsnet_dynamic_cuda_graphs(benchmark, mode):
    """One CUDA graph for the whole dynamic forward (per-image widths on the Triton kernels;
    with a conditional node per route too, which a mixed batch skips: their cost), against
    what static sub-networks need: the gate's graph, a host sync to read its choices,
    then one graph per config (cuDNN on contiguous narrow weights) that gathers its part of
    the batch, runs it and scatters the result back. In that baseline's favour: each config's
    rows are found once, at capture (a nonzero has a data-dependent size, so no graph can hold
    it), where a real batch would find them after the sync. Against it: each static
    sub-network runs its own narrow stem again, which the MACs recorded (the dynamic
    forward's) leave out."""
    model, x, choice = dynamic_model("triton")
    with torch.no_grad():
        if mode.startswith("one graph"):
            if mode != "one graph" and not conditional_graph_nodes():
                pytest.skip("this torch captures no conditional graph nodes")
            model.per_image = True
            model.route_branches = mode != "one graph"
            run = capture_cuda_graph(lambda: model(x, choice=choice), DEVICE)
        else:
            out = torch.empty_like(x)
            gate = capture_cuda_graph(lambda: model.gate_forward(x), DEVICE)
            graphs = []
            for index, entry in enumerate(model.routing_space):
                static = export_static(model.supernet, entry.config).to(DEVICE, DTYPE,
                                                                        memory_format=torch.channels_last).eval()
                rows = (choice == index).nonzero().squeeze(1)
                graphs.append(capture_cuda_graph(lambda s=static, r=rows: out.index_copy_(
                    0, r, s(x.index_select(0, r).contiguous(memory_format=torch.channels_last))), DEVICE))

            def run():
                gate()
                for index in torch.unique(choice).tolist():  # the host needs the choices
                    graphs[index]()
    benchmark.group = f"DDSNet dynamic in CUDA graphs, batch {DYNAMIC_BATCH}"
    describe_mix(benchmark, model, choice, mode=mode, backend="triton" if mode.startswith("one graph") else "cudnn")
    benchmark(run)


@pytest.mark.parametrize("mode", ["eager", "graphed"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stage1_training_step(benchmark, backend, mode):
    """``graphed``: the trainer's ``graphs`` option, the step's forwards and backwards replayed
    as one CUDA graph of masked widths (training/graphed.py; eager off CUDA)."""
    net = unet(backend)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    clean = torch.rand(4 if CUDA else 1, 3, 128 if CUDA else 8, 128 if CUDA else 8, device=DEVICE)
    noisy = clean + 0.1 * torch.randn_like(clean)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if CUDA else None
    generator = torch.Generator().manual_seed(0)
    benchmark.group = "stage-1 sandwich step (n = 4)"
    # the two random configs change every step: the ends of the sandwich bound its cost
    ends = {"largest": net.space.largest(), "smallest": net.space.smallest()}
    describe(benchmark, backend=backend, mode=mode, batch=len(clean), size=clean.shape[-1], sandwich=4,
             dtype="float32 weights, bfloat16 autocast" if CUDA else "float32",
             widths={end: config.to_dict() for end, config in ends.items()},
             macs_per_pixel={end: macs_per_pixel(net, config) for end, config in ends.items()})

    kwargs = {"autocast": autocast} if autocast else {}
    # the ends at their own widths, the random middle masked, as stage 1 trains with graphs
    masked = MaskedSandwich(net, fixed=ends_fixed(ends["largest"], ends["smallest"], 4), **kwargs) \
        if mode == "graphed" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        configs = sandwich_configs(net.space, 4, generator)
        if masked is None:
            losses = sandwich_step(net, noisy, clean, configs, **kwargs)
        else:  # read as the training loop reads them: one transfer
            losses = as_floats(masked(noisy, clean, configs))
        optimizer.step()
        return losses

    losses = benchmark(step)
    assert {"largest", "random1", "random2", "smallest"} <= set(losses)  # and whatever else the step logs
