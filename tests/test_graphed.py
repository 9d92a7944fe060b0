"""Masked widths (SlimNet.set_masked_widths) and CUDA-graph training steps (training/graphed.py)."""
import json
import math
import warnings

import pytest
import torch

import dds_fast

from dds_fast import DynamicGate, SlimConv2d, SlimDnCNN, SlimUNet, export_static
from dds_fast.ddsnet import AttentionSupernet
from dds_fast.training.graphed import GraphedStep
from dds_fast.training.sandwich import MaskedSandwich, ends_fixed, sandwich_configs, sandwich_step
from dds_fast.training.stages import Run, TrainConfig

CUDA = torch.cuda.is_available()


def nets():
    torch.manual_seed(0)
    return {
        "SlimUNet": SlimUNet(3, base_width=8, depth=3),
        "SlimDnCNN": SlimDnCNN(1, base_width=8, depth=4),
        "AttentionSupernet": AttentionSupernet(SlimUNet(3, base_width=8, depth=3), DynamicGate(16, 3)),
    }


def narrow_config(net, seed=3):
    config = net.space.sample(torch.Generator().manual_seed(seed))
    assert config != net.space.largest() and config != net.space.smallest()
    return config


def gradients(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def at_a_narrow_config(net, x):
    """(a narrow config, the output at it through set_config, every parameter's gradient of
    the output's sum of squares); the gradients are then cleared."""
    config = narrow_config(net)
    net.set_config(config)
    expected = net(x)
    expected.square().sum().backward()
    expected_grads = gradients(net)
    net.zero_grad(set_to_none=True)
    return config, expected, expected_grads


def assert_same_gradients(expected, got, atol):
    assert len(expected) == len(got)
    for index, (a, b) in enumerate(zip(expected, got)):
        assert (a is None) == (b is None), index
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=f"parameter {index}")


@pytest.mark.parametrize("name", ["SlimUNet", "SlimDnCNN", "AttentionSupernet"])
def test_masked_widths_compute_the_config_and_its_gradients(name):
    """fp64: the output and every gradient (zero outside the active slices) equal set_config's;
    the unused channels of every layer's output are exactly zero."""
    net = nets()[name].double()
    x = torch.rand(2, net.in_channels, 12, 10, dtype=torch.float64)  # 10: padded to the U-Net's multiple
    config, expected, expected_grads = at_a_narrow_config(net, x)
    widths = torch.tensor(net.binding_widths(config))
    net.set_masked_widths(widths)
    assert net.masked and net.get_config() == net.space.largest()
    outputs = {}
    supernet = net.supernet if name == "AttentionSupernet" else net
    hooks = [conv.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o)) for conv, _, _ in supernet._bindings]
    got = net(x)
    for hook in hooks:
        hook.remove()
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert_same_gradients(expected_grads, gradients(net), atol=1e-12)
    for (conv, _, _), width in zip(supernet._bindings, widths.tolist()):
        assert outputs[conv].shape[1] == conv.out_channels // conv.upscale_factor ** 2
        if name == "AttentionSupernet" and conv is supernet.stem_conv:
            continue  # the attention reads the whole stem; its mask cuts the attended features
        assert outputs[conv][:, width:].abs().sum() == 0, conv.layer_name
    net.set_config(config)  # ends the masks
    assert not net.masked and all(conv.output_mask is None for conv, _, _ in supernet._bindings)


def test_masks_stay_bool_when_the_net_is_cast_with_type():
    """Module.type() casts every tensor, bools included (.double() casts floats only); the
    masks move with the net but stay bool, which torch.where needs."""
    net = nets()["SlimDnCNN"]
    x = torch.rand(2, 1, 8, 7, dtype=torch.float64)
    config = narrow_config(net)
    net.set_masked_widths(torch.tensor(net.binding_widths(config)))
    net.type(torch.float64)
    assert all(conv.output_mask.dtype == torch.bool for conv, _, _ in net._bindings)
    got = net(x)
    net.set_config(config)
    torch.testing.assert_close(got, net(x), rtol=0, atol=1e-12)


# the kernels' mask too (GPU graphed training's), in a dtype they take
@pytest.mark.parametrize("backend, dtype, atol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)])
def test_masked_widths_keep_inactive_channels_that_overflowed_out_of_the_output(backend, dtype, atol):
    """set_config never reads the channels a config leaves out; under masks they are computed
    then zeroed, and an overflow there (inf, or NaN from inf - inf) must come out zero, not
    NaN (inf * 0) for the next layer to read."""
    net = nets()["SlimUNet"].to(dtype)
    for conv in net.modules():
        if isinstance(conv, SlimConv2d):
            conv.backend = backend
    x = torch.rand(2, net.in_channels, 12, 10, dtype=dtype)
    config = narrow_config(net)
    widths = net.binding_widths(config)
    with torch.no_grad():
        for (conv, _, _), width in zip(net._bindings, widths):
            if width * conv.upscale_factor ** 2 < conv.out_channels:
                conv.weight[width * conv.upscale_factor ** 2:] = float("inf")
    net.set_config(config)
    expected = net(x)
    net.set_masked_widths(torch.tensor(widths))
    got = net(x)
    assert expected.isfinite().all()
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_an_attended_stems_overflowed_inactive_channels_come_out_zero():
    """The attention scale can carry an inactive stem channel past fp's range: masked, it must
    read as zero (as the sliced forward, which never reads it), not inf * 0."""
    from dds_fast import DynamicGate, SlimUNet
    from dds_fast.ddsnet import AttentionSupernet

    torch.manual_seed(0)
    net = AttentionSupernet(SlimUNet(3, base_width=8, depth=3), DynamicGate(16, 3))
    config = net.space.smallest()
    width = config[net.supernet.stem_group]
    with torch.no_grad():  # 2e38, doubled by the scale: inf in fp32
        net.supernet.stem_conv.weight[width:] = 0
        net.supernet.stem_conv.bias[width:] = 2e38
        net.gate.fc2.weight[width:] = 0
        net.gate.fc2.bias[width:] = 10
    x, means = torch.rand(2, 3, 16, 16), torch.zeros(2, 16)
    net.set_config(config)
    expected = net(x, stem_means=means)
    net.set_masked_widths(torch.tensor(net.binding_widths(config)))
    got = net(x, stem_means=means)
    assert expected.isfinite().all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_binding_widths_count_an_upsampling_conv_after_its_shuffle():
    net = nets()["SlimUNet"]
    config = narrow_config(net)
    widths = net.binding_widths(config)
    for (conv, group, multiplier), width in zip(net._bindings, widths):
        assert width == config[group] * multiplier // conv.upscale_factor ** 2
    assert any(conv.upscale_factor == 2 for conv, _, _ in net._bindings)


class ResidualTiedNet(dds_fast.SlimNet):
    """Two convs tied in one group (a residual adds their outputs): one width for both."""

    def __init__(self):
        super().__init__(1, 1, dict(width_mult=1.0, min_ratio=0.25, divisor=4))
        feat = self._group("feat", 8)
        self.first = self._bind(SlimConv2d(1, feat, 3, padding=1, activation="relu"), "feat")
        self.second = self._bind(SlimConv2d(feat, feat, 3, padding=1), "feat")
        self.last = SlimConv2d(feat, 1, 1)
        self._finish()

    @property
    def stem_conv(self):
        return self.first

    @property
    def receptive_radius(self):
        return 2

    def body(self, features, x):
        return self.last(features + self.second(features))


def test_masked_widths_that_untie_a_group_are_refused():
    """In range, but the two layers of group feat at different widths: no config's output."""
    net = ResidualTiedNet()
    good = torch.tensor(net.binding_widths({"feat": 6}))
    net.set_masked_widths(good)
    with pytest.raises(ValueError, match="second and first are tied in group 'feat', but their widths set it to 5 "
                                         "and 6"):
        net.set_masked_widths(good - torch.tensor([0, 1]))
    assert net.masked and torch.equal(net.masked_widths, good)


def test_bad_masked_widths_are_named(tmp_path):
    net = nets()["SlimUNet"]
    count = len(net._bindings)
    good = torch.tensor(net.binding_widths(net.space.largest()))
    with pytest.raises(ValueError, match=rf"integer tensor of shape \({count},\)"):
        net.set_masked_widths(good[:-1])
    with pytest.raises(ValueError, match="integer tensor"):
        net.set_masked_widths(good.float())
    with pytest.raises(ValueError, match="integer tensor"):
        net.set_masked_widths(good.tolist())
    too_wide = good.clone()
    too_wide[2] += 1
    with pytest.raises(ValueError, match=rf"{net._bindings[2][0].layer_name} has width {too_wide[2]}"):
        net.set_masked_widths(too_wide)
    zero = good.clone()
    zero[0] = 0
    with pytest.raises(ValueError, match="has width 0"):
        net.set_masked_widths(zero)
    assert not net.masked
    net.set_masked_widths(good)
    with pytest.raises(ValueError, match="set_masked_widths"):
        export_static(net)
    with pytest.raises(ValueError, match="set_masked_widths"):
        dds_fast.save(net, tmp_path / "masked.safetensors")
    assert not (tmp_path / "masked.safetensors").exists()
    net.set_config(net.space.largest())
    static = export_static(net)
    with pytest.raises(ValueError, match="static network"):
        static.set_masked_widths(good)
    conv = net.stem_conv
    conv.output_mask = torch.ones(1, conv.out_channels, 1, 1, dtype=torch.bool)
    conv.per_image_widths = torch.ones(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="output mask and per-image widths"):
        conv(torch.rand(1, 3, 8, 8))


def batches(count, channels, size=12, n=2):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        clean = torch.rand(n, channels, size, size, generator=g, dtype=torch.float64)
        out.append((clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=torch.float64), clean))
    return out


@pytest.mark.parametrize("fixed_ends", [False, True])
@pytest.mark.parametrize("distillation", ["synergy", "inplace", "none"])
def test_masked_sandwich_matches_the_sandwich_step(distillation, fixed_ends):
    """Off CUDA the masked sandwich runs eagerly: the same losses and gradients as
    sandwich_step on the same configs, with every sub-network masked or the fixed ends at
    their own widths, and the net left at the largest config."""
    net = nets()["SlimUNet"].double()
    noisy, clean = batches(1, 3)[0]
    configs = sandwich_configs(net.space, 4, torch.Generator().manual_seed(1))
    expected = sandwich_step(net, noisy, clean, configs, distillation)
    expected_grads = gradients(net)
    net.zero_grad(set_to_none=True)
    fixed = [configs[0], None, None, configs[-1]] if fixed_ends else None
    masked = MaskedSandwich(net, distillation, fixed=fixed)
    got = masked(noisy, clean, configs)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dim() == 0 and not got[name].requires_grad  # read by the loop after its next batch
        assert float(got[name]) == pytest.approx(expected[name], rel=1e-12), name
    assert_same_gradients(expected_grads, gradients(net), atol=1e-12)
    assert net.get_config() == net.space.largest() and not net.masked
    assert masked.step.calls == 1 and not masked.step.captured  # no CUDA here: eager


def test_masked_sandwich_refuses_a_config_other_than_its_fixed_one():
    net = nets()["SlimDnCNN"]
    space = net.space
    masked = MaskedSandwich(net, fixed=[space.largest(), None, space.smallest()])
    noisy, clean = batches(1, 1)[0]
    noisy, clean = noisy.float(), clean.float()
    other = narrow_config(net)
    with pytest.raises(ValueError, match="sub-network 2 runs a fixed config"):
        masked(noisy, clean, [space.largest(), other, other])
    with pytest.raises(ValueError, match="2 configs for 3 sub-networks"):
        masked(noisy, clean, [space.largest(), space.smallest()])
    with pytest.raises(ValueError, match="n >= 2"):
        MaskedSandwich(net, fixed=[space.largest()])
    assert masked.step.calls == 0
    masked(noisy, clean, [space.largest(), other, space.smallest()])  # a varying middle is masked
    assert masked.step.calls == 1


def test_refine_with_graphs_runs_every_route_at_its_own_widths(tmp_path, monkeypatch):
    """A refine stage that trains every route at every step fixes all of them: no masks."""
    from test_training import image_folder, tiny_run_config

    from dds_fast.nets import SlimNet

    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    with pytest.warns(UserWarning, match="no CUDA graphs"):
        run = Run(tmp_path / "run", tiny_run_config(images=str(folder), steps=2, graphs=True, refine_steps=2,
                                                     sandwich=3, num_choices=3))
    run.stage1()
    run.stage2()
    masked = []
    set_masked_widths = SlimNet.set_masked_widths
    monkeypatch.setattr(SlimNet, "set_masked_widths", lambda net, widths: masked.append(1) or
                        set_masked_widths(net, widths))
    refined = run.refine()
    assert len(refined.routing_space) == 3 and masked == []
    log = [json.loads(line) for line in (run.dir / "refine.log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(record["largest"]) for record in log)


def test_graphed_step_checks_its_warmup():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda: {}, [], warmup=0)


def test_a_graphed_step_without_inputs_runs_eagerly_off_cuda():
    weight = torch.nn.Parameter(torch.ones(3))

    def step():
        loss = (2 * weight).sum()
        loss.backward()
        return {"loss": loss}
    assert GraphedStep(step, [weight])()["loss"].item() == 6.0 and weight.grad.tolist() == [2.0] * 3


def test_training_with_graphs_matches_training_without_on_cpu(tmp_path, monkeypatch):
    """``graphs`` changes how steps run, not what they compute: off CUDA, stage 1 and an I-Net
    log the same losses (up to rounding) with it as without it, the sandwich through masked
    widths."""
    from test_training import image_folder, tiny_run_config

    from dds_fast.nets import SlimNet

    masked = []
    set_masked_widths = SlimNet.set_masked_widths
    monkeypatch.setattr(SlimNet, "set_masked_widths", lambda net, widths: masked.append(1) or
                        set_masked_widths(net, widths))
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    logs = {}
    for graphs in (False, True):
        assert len(masked) == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = Run(tmp_path / f"graphs-{graphs}", tiny_run_config(images=str(folder), steps=3, graphs=graphs))
        assert any("no CUDA graphs on cpu" in str(w.message) for w in caught) == graphs
        run.stage1()
        run.stage2()
        run.inets(indices=[0])
        logs[graphs] = [json.loads(line) for stage in ("stage1", "inet-0")
                        for line in (run.dir / f"{stage}.log.jsonl").read_text().splitlines()]
    assert len(masked) == 3 * 2  # three steps of two random sub-networks; the ends run their own widths
    assert len(logs[True]) == len(logs[False]) == 6
    for plain, graphed in zip(logs[False], logs[True]):
        assert plain.keys() == graphed.keys()
        for name in plain:
            if name != "time":
                assert graphed[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-6), name


def test_graphs_is_a_training_option():
    assert TrainConfig(graphs=True).graphs
    with pytest.raises(ValueError, match="graphs must be"):
        TrainConfig.from_dict({"graphs": "yes"})


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_graphed_sandwich_trains_as_the_eager_one(backend, monkeypatch):
    """Six SGD steps on a GPU: the masked sandwich (its ends at their own widths, its middle
    masked), captured after its warm-up and replayed, against sandwich_step eagerly from the
    same weights on the same batches and configs."""
    # full fp32 convs: TF32's rounding differs between the sliced and the masked shapes
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    results = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        net = SlimUNet(3, base_width=8, depth=3).cuda().to(memory_format=torch.channels_last)
        for conv, _, _ in net._bindings:
            conv.backend = backend
        net.last.backend = backend
        # plain SGD: Adam's first steps follow the sign of near-zero gradients, rounding included
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
        ends = ends_fixed(net.space.largest(), net.space.smallest(), 4)  # as stage 1 fixes them
        masked = MaskedSandwich(net, warmup=2, fixed=ends) if graphed else None
        losses = []
        for step, (noisy, clean) in enumerate(batches(6, 3, size=16, n=2)):
            noisy, clean = noisy.float().cuda(), clean.float().cuda()
            configs = sandwich_configs(net.space, 4, torch.Generator().manual_seed(step))
            optimizer.zero_grad(set_to_none=True)
            losses.append({name: float(value) for name, value in masked(noisy, clean, configs).items()}
                          if graphed else sandwich_step(net, noisy, clean, configs))
            optimizer.step()
        results[graphed] = losses, [p.detach().clone() for p in net.parameters()]
        if graphed:
            assert masked.step.captured and masked.step.replays == 4 and masked.step.failure is None
    for plain, graphed in zip(results[False][0], results[True][0]):
        for name in plain:
            assert graphed[name] == pytest.approx(plain[name], rel=2e-3, abs=1e-5), name
    for a, b in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="device synchronisation needs a GPU")
def test_gpu_graphed_step_and_next_batch_queue_without_host_syncs():
    """What the loop does between reading one step's losses and the next: draw a batch (crops
    on the host, the camera/AWGN mix on the device) and replay a captured sandwich, with no
    host synchronisation (CUDA's sync debug mode raises on one), so the host's data work
    overlaps the GPU's step."""
    from dds_fast.training.data import NoisyPatches, bundled_images
    from dds_fast.training.noise import make_noise

    torch.manual_seed(0)
    net = SlimUNet(3, base_width=8, depth=3).cuda().to(memory_format=torch.channels_last)
    images = list(bundled_images(["astronaut", "coffee"], channels=3).values())
    data = NoisyPatches(images, make_noise("mix", models=[{"name": "camera"}, {"name": "awgn", "sigma": [5, 50]}]),
                        patch_size=32, length=64)
    masked = MaskedSandwich(net, warmup=1, fixed=ends_fixed(net.space.largest(), net.space.smallest(), 4))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    for step in range(3):  # a warm-up, the capture, a replay
        noisy, clean = data.batch(4 * step, 4, "cuda")
        configs = sandwich_configs(net.space, 4, torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        masked(noisy, clean, configs)
        optimizer.step()
    assert masked.step.captured
    # the noise models copy their constants to the device once: whichever they are, now
    make_noise("camera").pair(torch.rand(1, 3, 16, 16, device="cuda"), torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # several batches: the mixture's picks differ between them, so both of its models run
        for start in range(12, 64, 4):
            noisy, clean = data.batch(start, 4, "cuda")
        losses = masked(noisy, clean, sandwich_configs(net.space, 4, torch.Generator().manual_seed(3)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the capture's own replay, step 2's and this call's
    assert masked.step.replays == 3 and all(torch.isfinite(v) for v in losses.values())


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: GraphedStep's control flow without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's streams and graphs faked on the CPU, around torch's own graph.__exit__:
    GraphedStep's control flow without a GPU. ``state["capturing"]`` is the graph a capture
    is recording; a step may leave in ``state["body"]``, while captured, what a replay
    recomputes (its kernels rerun on the captured tensors). Returns (state, current), the
    current stream at ``current[0]``, the caller's at first."""
    current, state = [], {"capturing": None}

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.previous, current[0] = current[0], self.stream

        def __exit__(self, *args):
            current[0] = self.previous

    class CUDAGraph:
        invalidated = False

        def capture_begin(self, *args, **kwargs):
            state["capturing"] = self

        def capture_end(self):
            state["capturing"] = None
            if self.invalidated:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        def replay(self):
            state["replays"] = state.get("replays", 0) + 1
            state.get("body", lambda: None)()

    class graph(torch.cuda.graphs.graph):  # torch's own __exit__
        def __init__(self, cuda_graph, *args, **kwargs):
            self.cuda_graph, self.stream_ctx, self._enable_annotations = cuda_graph, StreamContext(Stream()), False

        def __enter__(self):
            self.stream_ctx.__enter__()
            self.cuda_graph.capture_begin()

    current.append(Stream())
    for name, value in dict(Stream=Stream, stream=StreamContext, CUDAGraph=CUDAGraph, graph=graph,
                            current_stream=lambda device=None: current[0],
                            set_stream=lambda stream: current.__setitem__(0, stream)).items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    return state, current


def test_a_graphed_step_replays_only_calls_like_the_captured_one(fake_cuda_graphs):
    """Warm-ups run eagerly, the next call captures, later calls of the captured shapes and
    dtypes replay with their own values, each call's gradients in ``.grad``; other calls run
    eagerly and leave the graph to the next call that fits it."""
    state, _ = fake_cuda_graphs
    weight = torch.nn.Parameter(torch.ones(3))
    eager_inputs = []

    def fn(x):
        accumulates = weight.grad is not None  # as autograd does, into a gradient already there
        loss = (x * weight).sum()
        loss.backward()
        if state["capturing"] is None:
            eager_inputs.append(x.clone())
        else:
            grad = weight.grad

            def body():  # d loss / d weight is x: the graph's gradient kernel, on the captured input
                if accumulates:
                    grad.add_(x)
                else:
                    grad.copy_(x)
            state["body"] = body
        return {"loss": loss}

    step = GraphedStep(fn, [weight], warmup=2)
    xs = [torch.randn(3).as_subclass(_OnCuda) for _ in range(5)]
    losses = step(xs[0])
    assert not losses["loss"].requires_grad  # the losses leave the step detached
    step(xs[1])  # the last warm-up's gradients left in .grad: the capture's are its own
    step(xs[2])
    assert step.captured and step.replays == 1 and len(eager_inputs) == 2  # a capture replays once itself
    assert torch.equal(weight.grad, xs[2])
    weight.grad = None
    step(xs[3])
    assert step.replays == 2 and len(eager_inputs) == 2 and torch.equal(weight.grad, xs[3])
    weight.grad = None
    for other in (torch.randn(2, 3).as_subclass(_OnCuda), torch.randn(3, dtype=torch.float64).as_subclass(_OnCuda)):
        step(other)
        weight.grad = None
    assert step.replays == 2 and len(eager_inputs) == 4
    step(xs[4])
    assert step.replays == 3 and torch.equal(weight.grad, xs[4])


def test_a_failed_capture_gives_the_callers_stream_back(fake_cuda_graphs):
    """torch.cuda.graph's __exit__ ends the capture before it leaves its capture stream, so when
    the capture was invalidated (a host sync inside the step, say) capture_end raises and the
    capture stream stays the current one. The eager fallback, and all the work after it, must
    run on the caller's stream again."""
    state, current = fake_cuda_graphs
    caller = current[0]
    weight = torch.nn.Parameter(torch.ones(3))

    def fn(x):
        loss = (x * weight).sum()
        loss.backward()
        if state["capturing"] is not None:  # found invalid after its backward: the eager one starts afresh
            state["capturing"].invalidated = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return {"loss": loss}

    step = GraphedStep(fn, [weight], warmup=1)
    x = torch.arange(3.0).as_subclass(_OnCuda)
    assert float(step(x)["loss"]) == 3 and current[0] is caller  # the warm-up, on a side stream
    weight.grad = None
    with pytest.warns(UserWarning, match="the capture failed"):
        losses = step(x)
    assert step.failure is not None and not step.captured
    assert current[0] is caller, "the capture stream was left current"
    assert float(losses["loss"]) == 3 and torch.equal(weight.grad, torch.arange(3.0))
    weight.grad = None
    with warnings.catch_warnings():  # every later step runs eagerly, with no second capture
        warnings.simplefilter("error")
        assert float(step(x)["loss"]) == 3 and not step.captured

    # a step whose input fails it eagerly too raises that error; graphs stay on for the next
    def fn2(x, target):
        if target.shape != x.shape:
            raise ValueError("a target of another size")
        loss = torch.nn.functional.mse_loss(x * weight, target)
        loss.backward()
        return {"loss": loss}

    step = GraphedStep(fn2, [weight], warmup=1)
    target = torch.zeros(3).as_subclass(_OnCuda)
    step(x, target)
    with pytest.raises(ValueError, match="a target of another size"):
        step(x, torch.zeros(4).as_subclass(_OnCuda))
    assert step.failure is None and current[0] is caller
    step(x, target)
    assert step.captured and state.get("replays", 0) >= 1


@pytest.mark.skipif(CUDA, reason="on a GPU the graphed sandwich test runs the kernels")
def test_masked_widths_on_the_triton_kernels_compute_the_config_and_its_gradients():
    """The masks on the Triton backend (interpreted here), channels_last as on a GPU: a U-Net
    (pixel-shuffle upsampling, concatenated inputs, the global residual) behind the attention."""
    pytest.importorskip("triton")
    from dds_fast.slim_conv import SlimConv2d

    net = nets()["AttentionSupernet"].to(memory_format=torch.channels_last)
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = "triton"
    x = torch.rand(2, 3, 12, 10).to(memory_format=torch.channels_last)
    config, expected, expected_grads = at_a_narrow_config(net, x)
    net.set_masked_widths(torch.tensor(net.binding_widths(config)))
    got = net(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(expected_grads, gradients(net)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_masked_widths_move_with_the_network_and_stay_out_of_its_state():
    net = nets()["SlimUNet"].eval()
    config = narrow_config(net)
    x = torch.rand(1, 3, 8, 8)
    net.set_masked_widths(torch.tensor(net.binding_widths(config)))
    with torch.no_grad():
        expected = net(x)
        net.double()
        torch.testing.assert_close(net(x.double()), expected.double(), rtol=1e-5, atol=1e-6)
        net.to("meta")  # a move: the masks follow as buffers do (to a GPU alike)
        assert all(conv.output_mask.device.type == "meta" for conv, _, _ in net._bindings)
    assert not any("output_mask" in key for key in net.state_dict())


def test_masked_widths_interrupted_part_way_are_ended_by_set_config():
    net = nets()["SlimUNet"].eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)

    class Interrupted(dds_fast.SlimConv2d):
        def __setattr__(self, name, value):
            if name == "output_mask" and value is not None:
                raise KeyboardInterrupt
            super().__setattr__(name, value)

    conv = net._bindings[3][0]
    conv.__class__ = Interrupted
    with pytest.raises(KeyboardInterrupt):
        net.set_masked_widths(torch.tensor(net.binding_widths(net.space.smallest())))
    conv.__class__ = dds_fast.SlimConv2d
    net.set_config(net.space.largest())
    assert all(c.output_mask is None for c, _, _ in net._bindings)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
