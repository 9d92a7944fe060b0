import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dds_fast import SlimConv2d, SlimDnCNN, SlimUNet, export_static
from dds_fast.slim_conv import pixel_shuffle


def small_unet(**kw):
    return SlimUNet(in_channels=3, base_width=8, depth=3, **kw).double()


def small_dncnn(**kw):
    return SlimDnCNN(in_channels=1, base_width=8, depth=4, **kw).double()


@pytest.mark.parametrize("make", [small_unet, small_dncnn])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (16, 16), (17, 30)])
def test_any_size_is_accepted_and_cropped_back(make, size):
    net = make()
    x = torch.rand(2, net.in_channels, *size, dtype=torch.float64)
    assert net(x).shape == x.shape


@pytest.mark.parametrize("make", [small_unet, small_dncnn])
def test_export_static_equals_slim_at_random_configs(make):
    torch.manual_seed(0)
    net = make()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, net.in_channels, 13, 11, dtype=torch.float64)
    for config in [net.space.largest(), net.space.smallest()] + [net.space.sample(generator) for _ in range(4)]:
        net.set_config(config)
        static = export_static(net)
        torch.testing.assert_close(static(x), net(x), rtol=1e-12, atol=1e-12)
        assert not any(isinstance(m, SlimConv2d) for m in static.modules())
        shared = {id(p) for p in net.parameters()} & {id(p) for p in static.parameters()}
        assert not shared
        assert static.get_config() == config
        with pytest.raises(ValueError, match="static"):
            static.set_config(config)


def test_export_static_has_the_narrow_shapes():
    net = small_unet()
    config = net.space.smallest().replace(**{"enc0": 16, "up0": 8})
    static = export_static(net, config)
    first, second = static.encoders[0]
    assert first.weight.shape == (8, 3, 3, 3)
    assert second.weight.shape == (16, 8, 3, 3)
    assert static.ups[-1].weight.shape == (4 * 8, config["dec1"], 1, 1)
    assert static.decoders[-1][0].weight.shape == (config["dec0.mid"], 8 + 16, 3, 3)
    assert net.get_config() == net.space.largest()  # exporting another config leaves the net as it was


def test_export_static_freezes_a_super_network_inside_another_module():
    """An AttentionSupernet (or any wrapper) exported at a config other than its active one:
    its super-network's copy is frozen at that config, computes it, and refuses set_config."""
    from torch import nn

    from dds_fast import AttentionSupernet, DynamicGate

    torch.manual_seed(4)
    net = small_unet()
    attended = AttentionSupernet(net, DynamicGate(net.stem_channels, 2).double()).eval()
    small = net.space.smallest()
    x = torch.rand(1, 3, 9, 7, dtype=torch.float64)
    static = export_static(attended, small)
    assert attended.get_config() == net.space.largest()
    attended.set_config(small)
    torch.testing.assert_close(static(x), attended(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(static.stem_means(x), attended.stem_means(x), rtol=1e-6, atol=0)
    assert static.get_config() == small and static.supernet.is_static
    with pytest.raises(ValueError, match="static"):
        static.set_config(net.space.largest())

    wrapped = export_static(nn.Sequential(net), input_shape=(3, 8, 8))
    assert wrapped[0].get_config() == small
    with pytest.raises(ValueError, match="static"):
        wrapped[0].set_config(net.space.largest())


def test_unet_slim_output_is_the_sliced_computation():
    """A hand-written narrow U-Net forward on the weights' prefixes equals the slim net."""
    torch.manual_seed(2)
    net = small_unet()
    cfg = net.space.sample(torch.Generator().manual_seed(3))
    net.set_config(cfg)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)

    def conv(layer, h, o, stride=1, act=True):
        k = layer.kernel_size[0]
        y = F.conv2d(h, layer.weight[:o, : h.shape[1]], layer.bias[:o], stride, k // 2)
        return F.leaky_relu(y, 0.2) if act else y

    e0 = conv(net.encoders[0][1], conv(net.encoders[0][0], x, cfg["enc0.mid"]), cfg["enc0"])
    e1 = conv(net.encoders[1][1], conv(net.encoders[1][0], e0, cfg["enc1.mid"], 2), cfg["enc1"])
    e2 = conv(net.encoders[2][1], conv(net.encoders[2][0], e1, cfg["enc2.mid"], 2), cfg["enc2"])
    h = e2
    for up, (first, second), skip, level in zip(net.ups, net.decoders, [e1, e0], [1, 0]):
        u = F.pixel_shuffle(conv(up, h, 4 * cfg[f"up{level}"], act=False), 2)
        w = first.weight
        max_up = first.in_segments[0]
        weight = torch.cat([w[: cfg[f"dec{level}.mid"], : u.shape[1]],
                            w[: cfg[f"dec{level}.mid"], max_up: max_up + skip.shape[1]]], 1)
        mid = F.leaky_relu(F.conv2d(torch.cat([u, skip], 1), weight, first.bias[: weight.shape[0]], padding=1), 0.2)
        h = conv(second, mid, cfg[f"dec{level}"])
    expected = x + F.conv2d(h, net.last.weight[:, : h.shape[1]], net.last.bias, padding=1)
    torch.testing.assert_close(net(x), expected)


def test_dncnn_output_is_the_sliced_computation_with_its_global_residual():
    """A hand-written narrow DnCNN forward (every layer's weight prefix, ReLU between, the input
    added to the last conv) equals the slim net, at a config whose layers' widths differ."""
    torch.manual_seed(0)
    net = SlimDnCNN(in_channels=1, base_width=8, depth=4).double()
    config = net.space.smallest().replace(layer1=net.space.largest()["layer1"])
    net.set_config(config)
    x = torch.rand(2, 1, 7, 6, dtype=torch.float64)
    h = x
    for layer, group in zip(net.layers, ["layer0", "layer1", "layer2"]):
        width = config[group]
        h = F.relu(F.conv2d(h, layer.weight[:width, : h.shape[1]], layer.bias[:width], padding=1))
    expected = x + F.conv2d(h, net.last.weight[:, : h.shape[1]], net.last.bias, padding=1)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    # with other output channels than input channels there is no residual
    plain = SlimDnCNN(in_channels=1, out_channels=2, base_width=8, depth=2).double()
    stem = F.relu(F.conv2d(x, plain.layers[0].weight, plain.layers[0].bias, padding=1))
    torch.testing.assert_close(plain(x), F.conv2d(stem, plain.last.weight, plain.last.bias, padding=1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [small_unet, small_dncnn])
def test_full_width_stem_prefix_equals_narrow_stem(make):
    """The gate reads the stem at full width; the body reading its prefix is the narrow net."""
    torch.manual_seed(4)
    net = make()
    cfg = net.space.sample(torch.Generator().manual_seed(5))
    net.set_config(cfg)
    x = torch.rand(2, net.in_channels, 8, 8, dtype=torch.float64)
    stem_group = net.space.groups[0].name
    narrow_stem = net.stem(x)
    assert narrow_stem.shape[1] == cfg[stem_group]
    net.set_config(cfg.replace(**{stem_group: net.stem_channels}))
    wide_stem = net.stem(x)
    assert wide_stem.shape[1] == net.stem_channels
    torch.testing.assert_close(wide_stem[:, : cfg[stem_group]], narrow_stem)
    net.set_config(cfg)
    torch.testing.assert_close(net.body(wide_stem[:, : cfg[stem_group]], x), net(x))


def test_config_round_trip_and_errors():
    net = small_unet()
    assert net.get_config() == net.space.largest()
    cfg = net.space.smallest()
    net.set_config(cfg)
    assert net.get_config() == cfg
    net.set_config(cfg.to_dict())
    assert net.get_config() == cfg
    with pytest.raises(ValueError, match="missing"):
        net.set_config({"enc0": 8})
    with pytest.raises(ValueError, match="outside"):
        net.set_config(cfg.replace(enc0=10_000))
    assert net.get_config() == cfg  # a rejected config changes nothing


def test_arch_args_are_a_copy_the_caller_may_change():
    net = small_unet()
    args = net.arch_args
    args["base_width"] = 16
    assert net.arch_args["base_width"] == 8


@pytest.mark.parametrize("bad,match", [
    (torch.rand(3, 8, 8), "4-D"),
    (torch.rand(1, 2, 8, 8), "2 channels, the network takes 3"),
    (torch.rand(1, 3, 0, 8), "empty"),
    (torch.rand(1, 3, 8, 0), r"SlimUNet: empty image of size \(8, 0\)"),
    ((torch.rand(1, 3, 8, 8) * 255).to(torch.uint8), "input dtype torch.uint8 is not floating point"),
    (torch.rand(1, 3, 8, 8, dtype=torch.float64), "input dtype torch.float64 differs from the network's torch.float32"),
    # the reference path on the CPU: only the Triton kernels read half inputs over fp32 weights
    (torch.rand(1, 3, 8, 8, dtype=torch.float16), "input dtype torch.float16 differs"),
    (torch.rand(1, 3, 8, 8).to_sparse(), "input is a torch.sparse_coo tensor"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        small_unet().float()(bad)


def test_input_dtypes_the_layers_take_are_accepted():
    net = small_unet()  # float64 weights: float64 inputs on the reference path
    assert net(torch.rand(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    net = small_unet().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.check_input(torch.rand(1, 3, 8, 8, dtype=torch.bfloat16))
    # the kernels read fp16 over fp32 weights: a GPU's tensors there (a GPU build of them
    # refuses CPU tensors), the CPU's where they run under the interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = "triton"
    net.check_input(torch.rand(1, 3, 8, 8, dtype=torch.float16, device=device))


@pytest.mark.parametrize("make,depth", [(lambda d: SlimUNet(in_channels=1, base_width=8, depth=d), 2),
                                        (lambda d: SlimUNet(in_channels=1, base_width=8, depth=d), 3),
                                        (lambda d: SlimUNet(in_channels=1, base_width=8, depth=d), 4),
                                        (lambda d: SlimDnCNN(in_channels=1, base_width=8, depth=d), 5)])
def test_receptive_radius_is_the_farthest_an_input_pixel_reaches(make, depth):
    torch.manual_seed(0)
    net = make(depth).eval()
    with torch.no_grad():
        for parameter in net.parameters():  # away from zero, so no path cancels out
            parameter.add_(0.05 * torch.sign(parameter))
        size = 2 * net.receptive_radius + 2 * net.size_multiple + 1
        base = net(torch.zeros(1, 1, size, size))
        reach = 0
        centre = size // 2 - net.size_multiple // 2
        for offset in range(net.size_multiple):  # every position on the downsampling grid
            x = torch.zeros(1, 1, size, size)
            x[..., centre + offset, centre + offset] = 1
            rows, cols = ((net(x) - base)[0, 0] != 0).nonzero(as_tuple=True)
            reach = max(reach, (rows - centre - offset).abs().max().item(), (cols - centre - offset).abs().max().item())
    assert reach == net.receptive_radius


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=1), "depth must be an int >= 2"), (dict(base_width=0), "base_width"),
    (dict(in_channels=0), "in_channels"), (dict(depth=3.0), "depth must be an int"),
    (dict(in_channels=True), "in_channels must be an int"), (dict(base_width=4.5), "base_width must be an int"),
    (dict(base_width="8"), "base_width must be an int"), (dict(divisor=2.5), "divisor must be an int"),
    (dict(out_channels=0), "out_channels"), (dict(width_mult=float("inf")), "width_mult must be a finite"),
    (dict(min_ratio=float("nan")), "min_ratio must be a finite"),
])
@pytest.mark.parametrize("arch", [SlimUNet, SlimDnCNN])
def test_bad_architecture_arguments(arch, kwargs, match):
    with pytest.raises(ValueError, match=f"{arch.__name__}: {match}"):
        arch(**kwargs)
    with pytest.raises(ValueError, match="SlimUNet: negative_slope must be a finite number"):
        SlimUNet(negative_slope=float("nan"))


def test_layers_are_named_in_errors():
    net = small_unet()
    with pytest.raises(ValueError, match=r"encoders\.1\.0"):
        net.encoders[1][0](torch.rand(1, 99, 4, 4, dtype=torch.float64))


def test_dncnn_groups_are_per_layer():
    net = small_dncnn()
    assert net.space.names() == ["layer0", "layer1", "layer2"]
    assert net.stem_channels == 16


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# (2, 8, 1, 1): a 1x1 input is also NCHW-contiguous, and a reshape alone returns it NCHW
@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (1, 4, 1, 1), (3, 32, 4, 6), (2, 8, 1, 1)])
def test_pixel_shuffle_keeps_channels_last_in_at_most_one_copy(shape):
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    with _CountOps() as counted:
        y = pixel_shuffle(x, 2)
    assert counted.ops.count("clone") <= 1 and "pixel_shuffle" not in counted.ops  # one copy at most
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, F.pixel_shuffle(x, 2))
    probe = torch.randn_like(y)
    y.backward(probe)
    assert torch.equal(x.grad, F.pixel_unshuffle(probe, 2))
    nchw = x.detach().contiguous()  # any other layout: F.pixel_shuffle itself
    assert torch.equal(pixel_shuffle(nchw, 2), F.pixel_shuffle(nchw, 2))
    with pytest.raises(ValueError, match="not a multiple of 2"):
        pixel_shuffle(torch.randn(1, 6, 2, 2).to(memory_format=torch.channels_last), 2)
    empty = pixel_shuffle(torch.randn(0, 8, 3, 3).to(memory_format=torch.channels_last), 2)  # an empty batch
    assert empty.shape == (0, 2, 6, 6) and empty.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("make", [lambda: SlimUNet(in_channels=3, base_width=8, depth=2),
                                  lambda: SlimDnCNN(in_channels=3, base_width=8, depth=3),
                                  lambda: SlimDnCNN(in_channels=1, base_width=8, depth=3)])
def test_a_net_on_the_cpu_runs_its_layers_channels_last(make):
    """torch's CPU convolutions ran the shipped model's 512x512 inference 3.3x faster in
    channels_last (training steps 1.3x): an NCHW input is padded into it. A 1-channel image is
    NCHW and channels_last at once, which a conv answers in NCHW: the stem's output is turned
    (every layer after it ran NCHW)."""
    net = make().eval()
    seen = []
    for conv in net.modules():
        if isinstance(conv, SlimConv2d) and conv is not net.stem_conv:
            conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(2, net.in_channels, 13, 11)
    with torch.no_grad():
        got = net(x)
    assert seen and all(t.is_contiguous(memory_format=torch.channels_last) for t in seen if not isinstance(t, list))
    channels_last_pad = net.pad
    net.pad = lambda t: channels_last_pad(t).contiguous()  # the NCHW computation
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-6)


def test_repr_shows_the_active_config_a_static_export_and_masked_widths():
    net = small_unet()
    net.set_config(net.space.smallest())
    widths = ", ".join(f"{group}={width}" for group, width in net.get_config().items())
    assert f"config: {widths}" in repr(net)
    assert f"static: {widths}" in repr(export_static(net))
    net.set_masked_widths(torch.tensor(net.binding_widths(net.space.smallest())))
    assert "masked widths" in repr(net)
    assert "masked_out_channels=" in repr(net.stem_conv)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (the hooks' own deprecation)
def test_export_static_refuses_what_no_static_copy_computes():
    """A masked network or layer, and a DDSNet, nested in a wrapper as at the top."""
    from torch import nn

    from dds_fast import DDSNet, DynamicGate, RoutingEntry, macs_per_pixel

    net = small_unet()
    net.set_masked_widths(torch.tensor(net.binding_widths(net.space.smallest())))
    with pytest.raises(ValueError, match=r"network \('0' of the model\) runs masked widths"):
        export_static(nn.Sequential(net), input_shape=(3, 8, 8))
    net.set_config(net.space.largest())
    conv = net.stem_conv
    conv.output_mask = torch.ones(conv.out_channels, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"layer \('0\..*' of the model\) has an output_mask"):
        export_static(nn.Sequential(net), input_shape=(3, 8, 8))
    conv.output_mask = None
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    dds = DDSNet(net, DynamicGate(net.stem_channels, 2), routes)
    with pytest.raises(ValueError, match=r"a DDSNet \('0' of the model\) routes each image"):
        export_static(nn.Sequential(dds), input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="model must be an nn.Module, got str"):
        export_static("net")
    # the hooks recompute the weight from parameters a static copy has not: its forward failed
    for norm, remove in [(nn.utils.weight_norm, nn.utils.remove_weight_norm),
                         (nn.utils.spectral_norm, nn.utils.remove_spectral_norm)]:
        norm(conv)
        with pytest.raises(ValueError, match=r"layer \('0\..*' of the model\) has torch.nn.utils.weight_norm's or "
                                             r"spectral_norm's hook; use torch.nn.utils.parametrizations"):
            export_static(nn.Sequential(net), input_shape=(3, 8, 8))
        remove(conv)
    from torch.nn.utils import prune

    prune.l1_unstructured(conv, "weight", amount=0.5)  # its mask and original a static copy lacks
    with pytest.raises(ValueError, match=r"holds \['weight_mask', 'weight_orig'\] beside its weight and bias.*"
                                         r"prune.remove it first"):
        export_static(nn.Sequential(net), input_shape=(3, 8, 8))
    prune.remove(conv, "weight")
    with pytest.raises(ValueError, match="input_shape must be"):
        export_static(net, input_shape=5)

    class TwoWidths(nn.Module):  # one layer run at 8 input channels, then at 4
        def __init__(self):
            super().__init__()
            self.conv = SlimConv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x)[:, :4])
    with pytest.raises(ValueError, match=r"layer 'conv' runs at two widths in one forward"):
        export_static(TwoWidths(), input_shape=(8, 8, 8))


def test_export_static_keeps_hooks_and_frozen_parameters():
    torch.manual_seed(6)
    net = small_dncnn()
    conv = net.stem_conv
    conv.register_forward_hook(lambda module, args, output: output * 0.5)
    backward_calls = []
    conv.register_full_backward_hook(lambda module, grad_in, grad_out: backward_calls.append(module))
    for p in net.parameters():
        p.requires_grad_(False)
    small = net.space.smallest()
    static = export_static(net, small)
    net.set_config(small)
    x = torch.rand(1, 1, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(static(x), net(x), rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in static.parameters())
    static(x.requires_grad_()).sum().backward()
    assert len(backward_calls) == 1  # on the static copy of the hooked layer
    with pytest.raises(ValueError, match="exported as a static network"):
        static.binding_widths(small)


def test_pad_reflects_where_the_image_allows_and_replicates_where_it_is_too_small():
    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    m = net.size_multiple
    x = torch.rand(1, 3, 2 * m + 1, 3 * m - 2)
    ph, pw = (-x.shape[2]) % m, (-x.shape[3]) % m
    torch.testing.assert_close(net.pad(x), F.pad(x, (0, pw, 0, ph), mode="reflect"))
    tiny = torch.rand(1, 3, 1, 2)  # too small to reflect m - 1 rows
    torch.testing.assert_close(net.pad(tiny), F.pad(tiny, (0, m - 2, 0, m - 1), mode="replicate"))


def test_set_config_sets_every_layer_that_differs_from_the_config_even_at_the_config_it_holds():
    """set_config writes only the layers whose width changes (a DDSNet sets a config on every
    forward); a layer changed directly since is still set back."""
    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    config = net.space.smallest()
    net.set_config(config)
    widths = [conv.active_out_channels for conv, _, _ in net._bindings]
    changed = net._bindings[1][0]
    changed.active_out_channels = changed.out_channels
    net.set_config(config)
    assert [conv.active_out_channels for conv, _, _ in net._bindings] == widths
    assert changed.active_out_channels != changed.out_channels


def test_export_in_train_mode_copies_a_spectral_normed_weight_as_the_layer_then_holds():
    """Each read of a spectral-normed weight in train mode steps its power iteration: the copy
    read it once, then read it again for its gradient flag, leaving the layer a step past it."""
    torch.manual_seed(0)
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3).double()
    torch.nn.utils.parametrizations.spectral_norm(net.last)
    net.set_config(net.space.smallest())
    with torch.no_grad():  # (the flag comes from the parameters, not from a view read under no_grad)
        static = export_static(net.train())
    assert all(p.requires_grad for p in static.parameters())
    assert all(module.training for module in static.modules())  # its static convs too, as the rest of the copy
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(net.eval()(x), static.eval()(x))


def test_autocast_does_not_excuse_a_float64_mismatch():
    """Autocast casts fp32, fp16 and bf16, never fp64: such a mismatch is the network's clear
    error, not torch's inside a conv."""
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="input dtype torch.float64 differs from the network's torch.float32"):
            net(torch.rand(1, 1, 8, 8, dtype=torch.float64))
        with pytest.raises(ValueError, match="input dtype torch.float32 differs from the network's torch.float64"):
            SlimDnCNN(in_channels=1, base_width=8, depth=3).double()(torch.rand(1, 1, 8, 8))


def test_a_conv_bound_to_two_groups_is_refused():
    """Its filters would follow the last group's width and ignore the first's."""
    import dds_fast

    class Twice(dds_fast.SlimNet):
        def __init__(self, in_channels=1, base_width=8):
            super().__init__(in_channels, in_channels, dict(in_channels=in_channels, base_width=base_width,
                                                            width_mult=1.0, min_ratio=0.5, divisor=4))
            a, _ = self._group("a", base_width), self._group("b", base_width)
            self.first = self._bind(SlimConv2d(in_channels, a, 3, padding=1), "a")
            self._bind(self.first, "b")

    with pytest.raises(ValueError, match=r"Twice: _bind of SlimConv2d\(.* to group 'b': it is bound to group 'a' "
                                         r"already"):
        Twice()


def _replacement(conv):
    twin = SlimConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                      activation=conv.activation, negative_slope=conv.negative_slope)
    twin.load_state_dict(conv.state_dict())
    return twin


def test_a_replaced_layer_runs_the_width_its_group_sets(tmp_path):
    import copy

    import dds_fast

    net = SlimDnCNN(in_channels=1, base_width=8, depth=4)
    twin = copy.deepcopy(net)
    small = net.space.smallest()
    x = torch.rand(2, 1, 8, 8)
    net.layers[1] = _replacement(net.layers[1])  # before a config is set
    net.set_config(small)
    twin.set_config(small)
    assert net.layers[1].active_out_channels == twin.layers[1].active_out_channels < 16
    net.layers[2] = _replacement(net.layers[2])  # after: the next forward binds it
    torch.testing.assert_close(net(x), twin(x), rtol=0, atol=0)
    assert dds_fast.macs_per_pixel(net, small) == dds_fast.macs_per_pixel(twin, small)
    assert net.layers[2].layer_name == "layers.2"
    dds_fast.save(net, tmp_path / "net.safetensors")
    torch.testing.assert_close(dds_fast.load(tmp_path / "net.safetensors")(x), twin(x), rtol=0, atol=0)
    # masked widths carry over to a layer replaced while they hold
    widths = torch.tensor(net.binding_widths(small))
    net.set_masked_widths(widths)
    net.layers[1] = _replacement(net.layers[1])
    torch.testing.assert_close(net(x), twin(x))
    assert net.layers[1].output_mask is not None


def test_a_bound_layer_moved_or_wrapped_keeps_its_binding_and_a_net_frees_without_the_collector():
    import gc
    import weakref

    net = SlimDnCNN(in_channels=1, base_width=8, depth=4)
    x = torch.rand(1, 1, 8, 8)
    small = net.space.smallest()
    net.set_config(small)
    expected = net(x)
    wrapped = net.layers[1]
    net.layers[1] = torch.nn.Sequential(wrapped)  # (a checkpointing or quantising wrapper, say)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    net.set_config(net.space.largest())
    net.set_config(small)
    assert wrapped.active_out_channels == small["layer1"]
    # the inserted layer is no group's; the others keep theirs, not the groups of the places they moved to
    shifted = net.layers[2]
    net.layers.insert(2, SlimConv2d(16, 16, 3, padding=1))
    net.set_config(small)
    assert shifted.active_out_channels == small["layer2"] and net.layers[2].active_out_channels is None
    # its own module-tree snapshot holds no reference to the net: no cycle for the collector to find
    gc.disable()
    try:
        net = SlimDnCNN(in_channels=1, base_width=8, depth=4)
        alive = weakref.ref(net)
        del net
        assert alive() is None
    finally:
        gc.enable()


def test_a_bound_layer_replaced_by_no_fitting_layer_is_named():
    net = SlimDnCNN(in_channels=1, base_width=8, depth=4)
    x = torch.rand(1, 1, 8, 8)
    net.layers[1] = torch.nn.Conv2d(16, 16, 3, padding=1)
    with pytest.raises(ValueError, match=r"layer 'layers.1', bound to width group 'layer1', was replaced by Conv2d"):
        net(x)
    net = SlimDnCNN(in_channels=1, base_width=8, depth=4)
    net.layers[1] = net.layers[2]
    # (one layer would run one group's width, the other's ignored)
    with pytest.raises(ValueError, match=r"layer 'layers.1', bound to width group 'layer1', left the net, and the "
                                         r"layer now at its name is bound to group 'layer2'"):
        net.set_config(net.space.smallest())
    net = SlimDnCNN(in_channels=1, base_width=8, depth=4)
    del net.layers[1]
    with pytest.raises(ValueError, match=r"layer 'layers.1', bound to width group 'layer1', left the net"):
        net(x)
    unet = SlimUNet(in_channels=1, base_width=8, depth=2)
    unet.ups = torch.nn.ModuleList()
    with pytest.raises(ValueError, match=r"layer 'ups.0', bound to width group 'up0', was removed; put a SlimConv2d"):
        unet(x)
