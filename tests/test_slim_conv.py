import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from dds_fast import SlimConv2d, convert_model


@given(
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    bias=st.booleans(),
    cin=st.integers(1, 12),
    cout=st.integers(1, 12),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_prefix_widths_equal_sliced_conv(k, stride, bias, cin, cout, h, w, data):
    i = data.draw(st.integers(1, cin))
    o = data.draw(st.integers(1, cout))
    conv = SlimConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias, backend="torch").double()
    conv.active_out_channels = o
    x = torch.randn(2, i, h, w, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight[:o, :i], None if conv.bias is None else conv.bias[:o], stride, k // 2)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 2), (3, 1, 0)])
def test_full_width_equals_nn_conv2d(k, stride, padding):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 10, k, stride=stride, padding=padding)
    slim = SlimConv2d(6, 10, k, stride=stride, padding=padding)
    assert list(slim.state_dict()) == list(plain.state_dict())
    slim.load_state_dict(plain.state_dict())
    x = torch.randn(3, 6, 13, 9)
    torch.testing.assert_close(slim(x), plain(x), rtol=0, atol=0)
    assert isinstance(slim, nn.Conv2d)


def test_full_width_uses_parameter_without_slicing():
    slim = SlimConv2d(4, 5, 3, padding=1)
    assert slim.active_weight([4], 5) is slim.weight
    with pytest.raises(ValueError, match=r"one input width per input block \(1\), got \[3, 2\]"):
        slim.active_weight([3, 2], 4)


@pytest.mark.parametrize("in_widths,out_width,match", [
    ((9, 3), 4, r"input width 0 must be at most 8, got 9"),  # would read block 1's first channel
    ((8, 5), 4, r"input width 1 must be at most 4, got 5"),
    ((-1, 2), 4, r"input width 0 must be an int >= 1, got -1"),
    ((0, 2), 4, r"input width 0 must be an int >= 1, got 0"),
    ((2.0, 2), 4, r"input width 0 must be an int >= 1, got 2.0"),
    ((8, 4), -2, r"out_width must be an int >= 1, got -2"),
    ((8, 4), 7, r"out_width must be at most 6, got 7"),
])
def test_active_weight_refuses_widths_outside_their_blocks(in_widths, out_width, match):
    slim = SlimConv2d(12, 6, 3, padding=1, in_segments=(8, 4))
    with pytest.raises(ValueError, match=match):
        slim.active_weight(in_widths, out_width)
    narrow = slim.active_weight((torch.tensor(3), np.int64(2)), 5)  # integer scalars of numpy and torch are widths
    torch.testing.assert_close(narrow, torch.cat([slim.weight[:5, :3], slim.weight[:5, 8:10]], 1), rtol=0, atol=0)


class _TracedBlock(nn.Module):
    """A concatenated input and a residual, as a U-Net decoder calls its convs."""

    def __init__(self):
        super().__init__()
        self.first = SlimConv2d(3, 4, 3, padding=1)
        self.joined = SlimConv2d(7, 4, 3, padding=1, in_segments=(4, 3), activation="relu")

    def forward(self, x):
        y = self.first(x)
        # a constant input beside a traced residual: the kernels' repeat check met the Proxy first
        z = self.first(torch.ones(1, 3, 6, 5), residual=y)
        return self.joined([y + z, x], residual=y) * 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_fx_traces_slim_convs_as_leaves_like_nn_conv2d(backend):
    torch.manual_seed(0)
    converted = convert_model(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1)))
    block = _TracedBlock()
    x = torch.randn(1, 3, 6, 5)
    for model in (converted, block):
        for layer in model.modules():
            if isinstance(layer, SlimConv2d):
                layer.backend = backend
        traced = torch.fx.symbolic_trace(model)
        calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
        assert sorted({name for name in calls if isinstance(traced.get_submodule(name), SlimConv2d)}) == \
            sorted(name for name, m in model.named_modules() if isinstance(m, SlimConv2d))
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"trace that module, not the layer alone"):
        torch.fx.symbolic_trace(SlimConv2d(3, 4, 3))


def test_padding_modes_match_nn_conv2d():
    torch.manual_seed(1)
    plain = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    slim = SlimConv2d(4, 6, 3, padding=1, padding_mode="reflect")
    slim.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 8, 7)
    torch.testing.assert_close(slim(x), plain(x))
    slim.active_out_channels = 3
    narrow = F.conv2d(F.pad(x[:, :2], (1, 1, 1, 1), mode="reflect"), slim.weight[:3, :2], slim.bias[:3])
    torch.testing.assert_close(slim(x[:, :2]), narrow)


@pytest.mark.parametrize("padding", ["same", "valid", 2])
def test_residual_shape_follows_padding(padding):
    conv = SlimConv2d(4, 4, 3, padding=padding)
    x = torch.randn(1, 4, 7, 6)
    y = conv(x)
    torch.testing.assert_close(conv(x, residual=y), 2 * y)


@pytest.mark.parametrize("activation,slope", [(None, 0.0), ("relu", 0.0), ("leaky_relu", 0.2)])
def test_epilogue_bias_residual_activation(activation, slope):
    torch.manual_seed(2)
    conv = SlimConv2d(7, 9, 3, padding=1, activation=activation, negative_slope=slope).double()
    conv.active_out_channels = 5
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    residual = torch.randn(2, 5, 6, 5, dtype=torch.float64)
    y = F.conv2d(x, conv.weight[:5, :4], conv.bias[:5], padding=1) + residual
    expected = {None: y, "relu": F.relu(y), "leaky_relu": F.leaky_relu(y, slope)}[activation]
    torch.testing.assert_close(conv(x, residual=residual), expected)


def test_upsampling_conv_is_the_pixel_shuffle_of_the_slice():
    torch.manual_seed(3)
    conv = SlimConv2d(6, 16, 1, activation="relu", upscale_factor=2).double()
    conv.active_out_channels = 8
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    expected = F.pixel_shuffle(F.relu(F.conv2d(x, conv.weight[:8, :5], conv.bias[:8])), 2)
    torch.testing.assert_close(conv(x), expected)
    assert "upscale_factor=2" in repr(conv)
    with pytest.raises(ValueError, match=r"active_out_channels.*multiple of 4.*6"):
        conv.active_out_channels = 6
    with pytest.raises(ValueError, match="residual with upscale_factor"):
        conv(x, residual=expected)
    # numpy and tensor integers, as the widths take them (numpy's were refused)
    for factor in (np.int64(2), torch.tensor(2)):
        taken = SlimConv2d(6, 16, 1, upscale_factor=factor)
        assert type(taken.upscale_factor) is int and taken.upscale_factor == 2


def test_concat_segments_use_each_blocks_prefix():
    torch.manual_seed(3)
    conv = SlimConv2d(10 + 6, 8, 3, padding=1, in_segments=(10, 6)).double()
    conv.active_out_channels = 5
    a = torch.randn(2, 7, 9, 8, dtype=torch.float64)
    b = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    weight = torch.cat([conv.weight[:5, :7], conv.weight[:5, 10:14]], 1)
    expected = F.conv2d(torch.cat([a, b], 1), weight, conv.bias[:5], padding=1)
    torch.testing.assert_close(conv([a, b]), expected)


def test_gradients_reach_only_the_active_prefix():
    torch.manual_seed(4)
    conv = SlimConv2d(6, 8, 3, padding=1)
    conv.active_out_channels = 3
    conv(torch.randn(2, 4, 5, 5)).square().sum().backward()
    assert conv.weight.grad[:3, :4].abs().sum() > 0
    assert conv.weight.grad[3:].abs().sum() == 0 and conv.weight.grad[:, 4:].abs().sum() == 0
    assert conv.bias.grad[3:].abs().sum() == 0


@pytest.mark.parametrize("make_error,match", [
    (lambda c: c(torch.randn(1, 7, 5, 5)), r"layer\(6->8\).*7 channels.*\[1, 6\]"),
    (lambda c: c(torch.randn(1, 0, 5, 5)), r"0 channels"),
    (lambda c: c(torch.randn(6, 5)), r"4-D \[N, C, H, W\] \(or one unbatched 3-D image\)"),
    (lambda c: c(torch.randn(7, 5, 5)), r"7 channels"),  # unbatched
    (lambda c: c([torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5)]), r"expects 1 input"),
    (lambda c: c(torch.randn(1, 6, 5, 5), residual=torch.randn(1, 8, 4, 5)), r"residual has shape"),
    (lambda c: setattr(c, "active_out_channels", 0), r"active_out_channels.*\[1, 8\].*0"),
    (lambda c: setattr(c, "active_out_channels", 9), r"active_out_channels.*\[1, 8\].*9"),
    (lambda c: setattr(c, "active_out_channels", 2.5), r"active_out_channels"),
    (lambda c: c("not a tensor"), r"tensor or a list"),
    # no pixels: nn.Conv2d refuses them, the kernels returned an empty output
    (lambda c: c(torch.randn(1, 6, 0, 5)), r"layer\(6->8\): an input of 0x5 pixels gives no output"),
    (lambda c: c(torch.randn(2, 6, 4, 0)), r"an input of 4x0 pixels"),
    (lambda c: c([torch.randn(1, 6, 0, 0)]), r"an input of 0x0 pixels"),
    # sparse tensors: named, on every backend (nn.Conv2d and the kernels failed deep inside on them)
    (lambda c: c(torch.randn(1, 6, 5, 5).to_sparse()), r"input is a torch.sparse_coo tensor"),
    (lambda c: c(torch.randn(6, 5, 5).to_sparse()), r"input is a torch.sparse_coo tensor"),
    (lambda c: c(torch.randn(6, 5, 5).to_sparse_csr()), r"input is a torch.sparse_csr tensor"),
    (lambda c: c(torch.randn(1, 6, 5, 5), residual=torch.randn(1, 8, 5, 5).to_sparse()),
     r"residual is a torch.sparse_coo tensor"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises_value_error_naming_layer_and_numbers(make_error, match, backend):
    conv = SlimConv2d(6, 8, 3, padding=1, backend=backend)
    conv.layer_name = "layer"
    with pytest.raises(ValueError, match=match):
        make_error(conv)


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=2), "groups=2"),
    (dict(backend="cuda"), "backend"),
    (dict(activation="gelu"), "activation"),
    (dict(in_segments=(3, 2)), "in_segments"),
    (dict(in_segments=(6, 0)), "in_segments"),
    (dict(in_segments=(3.7, 2.3)), "each of in_segments must be an int"),  # not truncated to (3, 2)
    (dict(in_segments=(True, 5)), "each of in_segments must be an int"),
    (dict(in_segments=6), "in_segments must be a sequence"),
    (dict(negative_slope=float("nan")), "negative_slope must be a finite number"),
    (dict(upscale_factor=3), "upscale_factor"),  # 8 filters are no multiple of 9
    (dict(upscale_factor=0), "upscale_factor"),
    (dict(upscale_factor=2.0), "upscale_factor"),
])
def test_unsupported_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlimConv2d(6, 8, 3, **kwargs)
    (name, value), = kwargs.items()
    if name != "groups":  # the settings are checked when assigned later too, and left as they were
        conv = SlimConv2d(6, 8, 3)
        before = getattr(conv, name)
        with pytest.raises(ValueError, match=match):
            setattr(conv, name, value)
        assert getattr(conv, name) == before
    with pytest.raises(ValueError, match="in_channels must be an int >= 1, got 2.5"):
        SlimConv2d(2.5, 8, 3)


def test_settings_assigned_later_take_effect():
    conv = SlimConv2d(16, 8, 3, padding=1).double()
    conv.in_segments = [10, 6]  # stored as a tuple
    conv.activation, conv.negative_slope = "leaky_relu", 0.3
    a, b = torch.randn(1, 7, 5, 5, dtype=torch.float64), torch.randn(1, 4, 5, 5, dtype=torch.float64)
    weight = torch.cat([conv.weight[:, :7], conv.weight[:, 10:14]], 1)
    expected = F.leaky_relu(F.conv2d(torch.cat([a, b], 1), weight, conv.bias, padding=1), 0.3)
    torch.testing.assert_close(conv([a, b]), expected)
    assert conv.in_segments == (10, 6)
    conv.active_out_channels = 6
    with pytest.raises(ValueError, match="upscale_factor"):  # 6 is no multiple of 4
        conv.upscale_factor = 2


def test_concat_input_errors():
    conv = SlimConv2d(10, 4, 3, padding=1, in_segments=(6, 4))
    with pytest.raises(ValueError, match=r"input 1 has 5 channels, must be in \[1, 4\]"):
        conv([torch.randn(1, 6, 5, 5), torch.randn(1, 5, 5, 5)])
    with pytest.raises(ValueError, match="disagree"):
        conv([torch.randn(1, 6, 5, 5), torch.randn(1, 4, 5, 6)])


class TinyUNet(nn.Module):
    """A plain U-Net with a concatenated skip, pixel shuffle and a grouped conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.up = nn.Conv2d(16, 32, 1)
        self.fuse = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.LeakyReLU(0.2))
        self.tail = nn.Conv2d(8, 3, 3, padding=1, bias=False)

    def forward(self, x):
        skip = F.leaky_relu(self.head(x), 0.2)
        h = F.leaky_relu(self.depthwise(self.down(skip)), 0.2)
        h = F.pixel_shuffle(self.up(h), 2)
        return x + self.tail(self.fuse(torch.cat([h, skip], 1)))


def test_takes_what_nn_conv2d_takes_unbatched_input_and_keyword_input():
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 8, 3, padding=1)
    slim = convert_model(plain)
    x, r = torch.randn(6, 5, 7), torch.randn(8, 5, 7)
    torch.testing.assert_close(slim(input=x), plain(input=x))
    torch.testing.assert_close(slim(x, residual=r), plain(x) + r)
    slim.active_out_channels = torch.tensor(3)  # integer types of numpy and torch, as configs take them
    assert slim.active_out_channels == 3 and type(slim.active_out_channels) is int
    torch.testing.assert_close(slim(x[:4]), F.conv2d(x[:4], plain.weight[:3, :4], plain.bias[:3], padding=1))


def test_convert_model_shares_parameters_and_keeps_outputs():
    torch.manual_seed(5)
    model = TinyUNet()
    x = torch.randn(2, 3, 10, 12)
    before = model(x)
    params = {name: p for name, p in model.named_parameters()}
    converted = convert_model(model)
    assert converted is model
    for name, p in converted.named_parameters():
        assert p is params[name]
    assert type(model.depthwise) is nn.Conv2d  # grouped: left as it is
    for name in ["head", "down", "up", "tail"]:
        assert isinstance(getattr(model, name), SlimConv2d)
        assert getattr(model, name).layer_name == name
    assert isinstance(model.fuse[0], SlimConv2d)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # Slimming a converted layer: the next layer reads the narrower input's prefix.
    model.fuse[0].active_out_channels = 5
    skip = F.leaky_relu(model.head(x), 0.2)
    h = F.pixel_shuffle(model.up(F.leaky_relu(model.depthwise(model.down(skip)), 0.2)), 2)
    fused = F.leaky_relu(F.conv2d(torch.cat([h, skip], 1), model.fuse[0].weight[:5], model.fuse[0].bias[:5],
                                  padding=1), 0.2)
    expected = x + F.conv2d(fused, model.tail.weight[:, :5], padding=1)
    torch.testing.assert_close(model(x), expected)


def test_convert_model_on_a_single_conv_returns_slim_copy():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    slim = convert_model(conv)
    assert isinstance(slim, SlimConv2d) and slim.weight is conv.weight
    with pytest.raises(ValueError, match="backend"):
        convert_model(conv, backend="tpu")


def test_convert_model_keeps_each_convs_train_or_eval_mode():
    """A model converted in eval mode stays in eval mode layer by layer (and one in train mode
    in train mode): the SlimConv2d copy takes its conv's ``training`` flag."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    convert_model(model)
    assert isinstance(model[0], SlimConv2d) and not model[0].training and not model[1].training
    single = convert_model(nn.Conv2d(3, 4, 3).eval())
    assert isinstance(single, SlimConv2d) and not single.training
    assert convert_model(nn.Conv2d(3, 4, 3).train()).training


class SharedConv(nn.Module):
    """One conv held under two names and applied twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x))


def test_convert_model_keeps_a_shared_conv_one_slimmable_module():
    torch.manual_seed(0)
    model = SharedConv()
    x = torch.randn(1, 4, 6, 5)
    before = model(x)
    convert_model(model)
    assert isinstance(model.a, SlimConv2d) and model.b is model.a
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    model.a.active_out_channels = 2  # both uses of the one conv narrow together
    w, b = model.a.weight, model.a.bias
    expected = F.conv2d(F.conv2d(x, w[:2], b[:2], padding=1), w[:2, :2], b[:2], padding=1)
    torch.testing.assert_close(model(x), expected)

    conv = nn.Conv2d(4, 4, 3, padding=1)  # shared by two containers
    model = convert_model(nn.ModuleDict(dict(left=nn.Sequential(conv), right=nn.Sequential(conv))))
    assert isinstance(model.left[0], SlimConv2d) and model.left[0] is model.right[0]


def test_convert_model_leaves_convs_with_hooks_as_they_are():
    torch.manual_seed(1)
    with pytest.warns(FutureWarning):  # the old API, still common in restoration nets (WDSR, EDSR)
        normed = nn.utils.weight_norm(nn.Conv2d(4, 4, 3, padding=1))
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    calls = []
    hooked.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), normed, hooked)
    x = torch.randn(1, 3, 5, 5)
    before = model(x)
    convert_model(model)
    assert isinstance(model[0], SlimConv2d)
    assert model[1] is normed and model[2] is hooked
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert len(calls) == 2  # the hook still runs


def test_convert_model_leaves_convs_holding_state_of_their_own():
    """A copy with only weight and bias would drop the rest (or fail on a weight that is no
    Parameter)."""
    torch.manual_seed(1)
    extra_parameter, extra_buffer, plain_weight, saved_extra = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
    extra_parameter.alpha = nn.Parameter(torch.ones(1))
    extra_buffer.register_buffer("scale", torch.ones(1))
    weight = plain_weight.weight.detach().clone()
    del plain_weight.weight
    plain_weight.weight = weight
    saved_extra._register_state_dict_hook(lambda module, state, prefix, local: state.update({prefix + "extra": 1}))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), extra_parameter, extra_buffer, plain_weight, saved_extra)
    keys = list(model.state_dict())
    convert_model(model)
    assert isinstance(model[0], SlimConv2d) and not any(isinstance(m, SlimConv2d) for m in model[1:])
    assert list(model.state_dict()) == keys


def test_a_parametrized_weight_is_computed_once_a_forward():
    """spectral_norm advances its power iteration on every read of the weight in training."""
    torch.manual_seed(2)
    slim = nn.utils.parametrizations.spectral_norm(SlimConv2d(3, 4, 3, padding=1, backend="torch"))
    plain = nn.Conv2d(3, 4, 3, padding=1)
    plain = nn.utils.parametrizations.spectral_norm(plain)
    plain.load_state_dict(slim.state_dict())
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        torch.testing.assert_close(slim(x), plain(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(slim.parametrizations.weight[0]._u, plain.parametrizations.weight[0]._u)


def test_repr_shows_the_fused_activation_and_the_static_export_keeps_it():
    from dds_fast import SlimUNet, export_static

    leaky = SlimConv2d(3, 4, 3, padding=1, activation="leaky_relu", negative_slope=0.2)
    assert "activation='leaky_relu', negative_slope=0.2" in repr(leaky)
    assert "negative_slope" not in repr(SlimConv2d(3, 4, 3, padding=1, activation="relu"))
    assert "activation" not in repr(SlimConv2d(3, 4, 3, padding=1))
    net = SlimUNet(base_width=8, depth=2)
    static = export_static(net, net.space.smallest())
    assert f"activation='leaky_relu', negative_slope={net.stem_conv.negative_slope:g}" in repr(static.stem_conv)
    assert "upscale_factor=2" in repr(static.ups[0])


def test_a_triton_that_fails_to_start_leaves_the_reference_path(monkeypatch):
    """The kernels are imported with the package: a Triton that raises anything on import
    (a driver it cannot use, not only a missing module) must leave dds_fast importable and
    its layers on the reference path, with the reason."""
    import builtins

    from dds_fast import slim_conv

    real_import = builtins.__import__

    def failing(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "triton":
            raise RuntimeError("driver too old")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", failing)
    slim_conv._kernels_module.cache_clear()
    try:
        assert slim_conv._kernels_module() == "Triton is not available (RuntimeError: driver too old)"
        conv = SlimConv2d(3, 4, 3, padding=1, backend="triton")
        x = torch.randn(1, 3, 5, 5)
        with pytest.warns(UserWarning, match="Triton is not available"):
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    finally:
        monkeypatch.undo()
        slim_conv._kernels_module.cache_clear()


def test_convert_model_leaves_a_conv_whose_forward_was_replaced():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    plain = conv.forward
    conv.forward = lambda x: 2 * plain(x)
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 5, 5)
    before = model(x)
    convert_model(model)
    assert model[0] is conv
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_whole_module_pickle_of_an_earlier_version_runs():
    """Layers pickled before segment_starts was kept as an attribute (it was a property) get it
    back on loading: their narrow calls read the weight's blocks from it."""
    import pickle

    torch.manual_seed(0)
    layer = SlimConv2d(6, 4, 3, padding=1, in_segments=[4, 2])
    layer.__dict__.pop("segment_starts")  # as such a pickle holds it
    loaded = pickle.loads(pickle.dumps(layer))
    a, b = torch.randn(1, 3, 5, 5), torch.randn(1, 1, 5, 5)
    expected = F.conv2d(torch.cat([a, b], 1), torch.cat([layer.weight[:, :3], layer.weight[:, 4:5]], 1), layer.bias,
                        padding=1)
    torch.testing.assert_close(loaded([a, b]), expected)
