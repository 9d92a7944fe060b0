"""SlimConv2d(backend='triton') against its own reference path (kernels under the interpreter
on CPU, on CUDA tensors where a GPU is present). The kernels' own exhaustive tests are in
test_kernels_conv2d.py."""
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from dds_fast import SlimConv2d, SlimUNet, slim_conv

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records each call of the conv kernels (the input dtypes, the weight's dtype and the
    padding; None for a layer's repeat of a checked call), so that a test can tell the kernels
    ran and did not fall back to the reference, which its outputs are compared with. Each test
    starts with no checked calls to repeat."""
    from dds_fast.kernels import conv2d

    calls, inside = [], []
    run, repeat = conv2d.slim_conv2d, conv2d.repeat_call

    def recording(inputs, weight, *args, **kwargs):
        calls.append(dict(dtypes=[t.dtype for t in inputs], weight_dtype=weight.dtype, padding=kwargs["padding"]))
        inside.append(True)
        try:
            return run(inputs, weight, *args, **kwargs)
        finally:
            inside.pop()

    def recording_repeat(key, inputs, weight, *args):
        y = repeat(key, inputs, weight, *args)
        if y is not None and not inside:  # (slim_conv2d's own repeats are its calls, recorded)
            calls.append(dict(dtypes=[t.dtype for t in inputs], weight_dtype=weight.dtype, padding=None))
        return y

    monkeypatch.setattr(conv2d, "slim_conv2d", recording)
    monkeypatch.setattr(conv2d, "repeat_call", recording_repeat)
    monkeypatch.setattr(slim_conv, "_CHECKED_CALLS", {})
    return calls


def pair(**kwargs):
    """The Triton module on DEVICE and its reference twin on the CPU, whose fp32 convs never
    use TF32 (cuDNN's may, by default)."""
    torch.manual_seed(0)
    fast = SlimConv2d(backend="triton", **kwargs)
    slow = SlimConv2d(backend="torch", **kwargs)
    slow.load_state_dict(fast.state_dict())
    return fast.to(DEVICE), slow


@pytest.mark.parametrize("kwargs,active,in_width,stride", [
    (dict(in_channels=12, out_channels=10, kernel_size=3, padding=1, activation="leaky_relu", negative_slope=0.2),
     7, 5, 1),
    (dict(in_channels=12, out_channels=10, kernel_size=3, stride=2, padding=1, activation="relu"), 10, 12, 2),
    (dict(in_channels=9, out_channels=6, kernel_size=1, bias=False), 3, 9, 1),
    (dict(in_channels=8, out_channels=16, kernel_size=1, upscale_factor=2), 8, 6, 1),  # an upsampling conv
])
def test_forward_and_gradients_match_the_reference(kwargs, active, in_width, stride, kernel_calls):
    fast, slow = pair(**kwargs)
    fast.active_out_channels = slow.active_out_channels = active
    x = torch.randn(2, in_width, 9, 7)
    xf, xs = x.to(DEVICE, copy=True).requires_grad_(), x.clone().requires_grad_()
    yf, ys = fast(xf), slow(xs)
    assert len(kernel_calls) == 1
    torch.testing.assert_close(yf.cpu(), ys, rtol=1e-4, atol=1e-5)
    probe = torch.randn_like(ys)
    (yf * probe.to(DEVICE)).sum().backward()
    (ys * probe).sum().backward()
    torch.testing.assert_close(xf.grad.cpu(), xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad.cpu(), slow.weight.grad, rtol=1e-4, atol=1e-5)
    if fast.bias is not None:
        torch.testing.assert_close(fast.bias.grad.cpu(), slow.bias.grad, rtol=1e-4, atol=1e-5)


def test_concat_and_residual_match_the_reference(kernel_calls):
    fast, slow = pair(in_channels=14, out_channels=8, kernel_size=3, padding=1, in_segments=(8, 6),
                      activation="leaky_relu", negative_slope=0.2)
    fast.active_out_channels = slow.active_out_channels = 5
    a, b, r = torch.randn(1, 3, 7, 9), torch.randn(1, 4, 7, 9), torch.randn(1, 5, 7, 9)
    y = fast([a.to(DEVICE), b.to(DEVICE)], residual=r.to(DEVICE))
    assert [call["dtypes"] for call in kernel_calls] == [[torch.float32, torch.float32]]
    torch.testing.assert_close(y.cpu(), slow([a, b], residual=r), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel_size,padding", [(3, "same"), (1, "valid")])
def test_same_and_valid_padding_run_on_the_kernels(kernel_size, padding, kernel_calls):
    """Both are k//2 for an odd kernel at stride 1: no reason to fall back."""
    fast, slow = pair(in_channels=5, out_channels=6, kernel_size=kernel_size, padding=padding)
    x = torch.randn(1, 5, 6, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fallback's (Triton 3.6's interpreter raises numpy's own)
        y = fast(x.to(DEVICE))
    assert [call["padding"] for call in kernel_calls] == [kernel_size // 2]
    torch.testing.assert_close(y.cpu(), slow(x), rtol=1e-4, atol=1e-5)


def test_unsupported_settings_fall_back_with_one_warning(monkeypatch):
    from dds_fast import slim_conv

    monkeypatch.setattr(slim_conv, "_WARNED", set())  # whatever other tests of this process warned
    fast, slow = pair(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect")
    slow.to(DEVICE)  # the fallback is the reference path on DEVICE: the same ops, so compared there
    x = torch.randn(1, 4, 6, 6).to(DEVICE)
    with pytest.warns(UserWarning, match="falls back.*padding_mode 'reflect'"):
        y = fast(x)
    torch.testing.assert_close(y, slow(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(x)  # the same reason warns once
    wider, _ = pair(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2)
    with pytest.warns(UserWarning, match=r"dilation \(2, 2\) is not 1"):
        wider(x)
    wider.dilation = wider.padding = (3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wider(x)  # a reason's numbers aside (each new shape warned again, and the warned set grew)


def test_a_lazily_negated_input_falls_back_to_its_values(monkeypatch):
    """A view whose negation bit is set holds its values' negation in memory, which the kernels
    would read: the layer takes the reference path, which reads the values."""
    monkeypatch.setattr(slim_conv, "_WARNED", set())
    fast, slow = pair(in_channels=4, out_channels=4, kernel_size=3, padding=1)
    slow.to(DEVICE)
    x = torch.randn(1, 4, 6, 6).to(DEVICE)
    fast(torch.complex(torch.zeros_like(x), x).imag)  # a launch planned for the same strides, without the bit
    negated = torch.complex(torch.zeros_like(x), -x).conj().imag
    assert negated.is_neg() and torch.equal(negated, x)
    with pytest.warns(UserWarning, match="falls back.*lazily negated view"):
        y = fast(negated)
    torch.testing.assert_close(y, slow(x))


@pytest.mark.parametrize("geometry", [dict(kernel_size=np.int64(3), padding=1),
                                      dict(kernel_size=3, stride=np.int64(2), padding=np.int64(1)),
                                      dict(kernel_size=(np.int32(3), 3), stride=(2, np.int16(2)), padding=1)])
def test_numpy_integers_as_geometry_run_the_kernels_as_plain_ints(geometry, kernel_calls):
    """nn.Conv2d keeps numpy integers as given; the kernels took them for floats' kin and
    refused the call with a message about arguments the caller never passed them."""
    fast, slow = pair(in_channels=4, out_channels=6, **geometry)
    assert all(type(v) is int for name in ("kernel_size", "stride", "padding") for v in getattr(fast, name))
    x = torch.randn(1, 4, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        y = fast(x.to(DEVICE))
    assert len(kernel_calls) == 1
    torch.testing.assert_close(y.cpu(), slow(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,value", [("stride", 2), ("padding", 1), ("kernel_size", 3), ("dilation", 1),
                                        ("padding", [1, 1]), ("stride", np.int64(2))])
def test_geometry_assigned_after_construction_is_kept_as_pairs_of_ints(name, value, kernel_calls):
    """nn.Conv2d takes an int (or a list) assigned to its geometry as it is; this layer reads
    pairs of plain ints, so it keeps them so."""
    fast, slow = pair(in_channels=4, out_channels=4, kernel_size=3, padding=1)
    for layer in (fast, slow):
        setattr(layer, name, value)
    assert getattr(fast, name) == (int(np.asarray(value).flat[0]),) * 2 and type(getattr(fast, name)[0]) is int
    x, residual_of = torch.randn(1, 4, 6, 6), {1: torch.randn(1, 4, 6, 6), 2: torch.randn(1, 4, 3, 3)}
    residual = residual_of[fast.stride[0]]
    y = fast(x.to(DEVICE), residual=residual.to(DEVICE))
    assert len(kernel_calls) == 1
    torch.testing.assert_close(y.cpu(), slow(x, residual=residual), rtol=1e-4, atol=1e-5)


def test_same_padding_and_a_stride_set_after_construction_are_refused_as_the_constructor_refuses_them():
    """torch refuses the strided conv in its forward, the kernels would have run it."""
    from dds_fast import SlimConv2d

    same = SlimConv2d(4, 4, 3, padding="same")
    with pytest.raises(ValueError, match=r"SlimConv2d\(4->4\): padding='same' is not supported for strided "
                                         r"convolutions \(stride \(2, 2\)\)"):
        same.stride = 2
    strided = SlimConv2d(4, 4, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        strided.padding = "same"
    assert same.stride == (1, 1) and strided.padding == (1, 1)
    same.padding = "valid"
    same.stride = 2


def test_a_concat_of_two_dtypes_falls_back_as_torch_cat_would_promote():
    fast, slow = pair(in_channels=4, out_channels=3, kernel_size=3, padding=1, in_segments=[2, 2])
    slow.to(DEVICE)
    a, b = torch.randn(1, 2, 5, 5).to(DEVICE).half(), torch.randn(1, 2, 5, 5).to(DEVICE)
    with pytest.warns(UserWarning, match="falls back.*dtypes torch.float16 and torch.float32"):
        y = fast([a, b])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, slow([a, b]))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_a_fallback_reads_half_activations_over_fp32_weights_as_the_kernels_do(dtype, tolerance):
    """A layer the kernels do not cover (dilation 2) in a network whose other layers read
    fp16/bf16 activations over fp32 weights on the kernels: it casts its weight as they do,
    where torch's conv refused the mix deep inside the network."""
    fast, _ = pair(in_channels=4, out_channels=5, kernel_size=3, padding=2, dilation=2, activation="relu")
    fast.active_out_channels = 3
    x = torch.randn(2, 4, 6, 7).to(DEVICE, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fallback's one-time warning: another test's subject)
        y = fast(x)
    weight, bias = fast.weight[:3].to(dtype).double(), fast.bias[:3].to(dtype).double()
    expected = torch.nn.functional.conv2d(x.double(), weight, bias, padding=2, dilation=2).relu()
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)
    y.float().sum().backward()
    assert fast.weight.grad.dtype == torch.float32 and fast.weight.grad[:3].abs().sum() > 0


def test_a_channel_prefix_of_a_channels_last_tensor_gives_a_channels_last_output(kernel_calls):
    """As nn.Conv2d keeps it: a DDSNet route's body reads such a prefix of the stem's output,
    and the kernels' output was copied to NCHW there, then every layer after it."""
    fast, slow = pair(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    full = torch.randn(1, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    y = fast(full[:, :4].to(DEVICE))
    assert kernel_calls and y.is_contiguous(memory_format=torch.channels_last)
    assert slow(full[:, :4]).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu(), slow(full[:, :4]), rtol=1e-4, atol=1e-5)
    nchw = fast(torch.randn(1, 8, 6, 5)[:, :4].to(DEVICE))  # an NCHW prefix stays NCHW
    assert nchw.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_a_residual_of_another_dtype_is_added_as_torch_promotes_it(dtype, kernel_calls):
    """The reference path adds it with torch's type promotion; the kernels raised a ValueError,
    so code that ran on a CPU failed on CUDA under backend='auto'."""
    fast, slow = pair(in_channels=4, out_channels=6, kernel_size=3, padding=1, activation="relu")
    x = torch.randn(1, 4, 5, 5)
    residual = (torch.randn(1, 6, 5, 5) * 3).to(dtype)
    y = fast(x.to(DEVICE), residual=residual.to(DEVICE))
    expected = slow(x, residual=residual)
    assert kernel_calls and y.dtype == expected.dtype == torch.promote_types(torch.float32, dtype)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_channel_sums_of_a_masked_or_upsampling_layer():
    """The sums are the returned output's, masked channels zero (they summed the unmasked
    output); an upsampling conv leaves none (it raised: the kernels sum no shuffled output)."""
    conv = SlimConv2d(4, 6, 3, padding=1, backend="triton").to(DEVICE)
    conv.emit_channel_sums = True
    conv.output_mask = (torch.arange(6) < 3).view(1, 6, 1, 1).to(DEVICE)
    with torch.no_grad():
        out = conv(torch.randn(1, 4, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last))
    assert conv.channel_sums_of is out and out[:, 3:].abs().sum() == 0
    torch.testing.assert_close(conv.channel_sums.sum(1), out.sum((2, 3)).float())
    upsampling = SlimConv2d(4, 8, 3, padding=1, upscale_factor=2, backend="triton").to(DEVICE)
    upsampling.emit_channel_sums = True
    with torch.no_grad():
        assert upsampling(torch.randn(1, 4, 5, 5, device=DEVICE)).shape == (1, 2, 10, 10)
    assert upsampling.channel_sums is None


def test_auto_backend_uses_the_reference_on_cpu(monkeypatch):
    from dds_fast.kernels import conv2d

    def fail(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for a CPU tensor under backend='auto'")

    monkeypatch.setattr(conv2d, "slim_conv2d", fail)
    SlimConv2d(3, 3, 3, padding=1)(torch.randn(1, 3, 5, 5))


def test_a_slim_unet_on_the_triton_backend_matches_the_reference(kernel_calls):
    torch.manual_seed(1)
    net = SlimUNet(in_channels=1, base_width=8, depth=2)
    config = net.space.sample(torch.Generator().manual_seed(2))
    net.set_config(config)
    x = torch.rand(1, 1, 6, 6)
    reference = net(x)  # backend 'auto' on the CPU: the reference path
    net.to(DEVICE)
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = "triton"
    torch.testing.assert_close(net(x.to(DEVICE)).cpu(), reference, rtol=1e-4, atol=1e-5)
    assert len(kernel_calls) == sum(isinstance(m, SlimConv2d) for m in net.modules())


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_activations_over_fp32_master_weights(dtype, tolerance):
    """Mixed precision: the fp32 weight is read in place and cast in registers; the weight and
    bias gradients stay fp32. Compared with fp64 on the same (rounded) activations."""
    from dds_fast.kernels.conv2d import slim_conv2d

    torch.manual_seed(3)
    weight = torch.randn(10, 12, 3, 3).to(DEVICE).requires_grad_()
    bias = torch.randn(10).to(DEVICE).requires_grad_()
    x = torch.randn(2, 7, 9, 8).to(DEVICE, dtype).requires_grad_()
    y = slim_conv2d([x], weight, bias, out_channels=6, activation="leaky_relu", negative_slope=0.2)
    assert y.dtype == dtype
    w64, b64, x64 = (t.detach().double().requires_grad_() for t in (weight, bias, x))
    pre = torch.nn.functional.conv2d(x64, w64[:6, :7], b64[:6], padding=1)
    ref = torch.nn.functional.leaky_relu(pre, 0.2)
    assert (y.double() - ref).norm() <= tolerance * ref.norm()
    probe = torch.randn(ref.shape, dtype=torch.float64).to(DEVICE)
    (y.double() * probe).sum().backward()
    # The backward takes the activation's slope from the sign of the saved output. With the
    # weight rounded to the activations' dtype in the product, an output near zero can have
    # the other sign than in fp64 (seen in bf16 on an H200), so the reference takes the
    # slope where the kernel's output is.
    slope = torch.where(y.detach().double() > 0, 1.0, 0.2)
    (pre * slope * probe).sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert (weight.grad.double() - w64.grad).norm() <= tolerance * w64.grad.norm()
    assert weight.grad[6:].abs().sum() == 0 and weight.grad[:, 7:].abs().sum() == 0
    assert (x.grad.double() - x64.grad).norm() <= tolerance * x64.grad.norm()
    assert (bias.grad[:6].double() - b64.grad[:6]).norm() <= tolerance * b64.grad[:6].norm()
    assert bias.grad[6:].abs().sum() == 0


def test_autocast_runs_the_kernels_in_half_precision(kernel_calls):
    fast, slow = pair(in_channels=8, out_channels=8, kernel_size=3, padding=1, activation="relu")
    x = torch.randn(1, 8, 6, 6)
    fast(x.to(DEVICE))  # a checked fp32 call of these tensors first: the autocast one must not repeat it
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = fast(x.to(DEVICE))
    assert y.dtype == torch.bfloat16
    # the activations cast by the module, the fp32 master weight read as it is
    assert [(c["dtypes"], c["weight_dtype"]) for c in kernel_calls[1:]] == [([torch.bfloat16], torch.float32)]
    torch.testing.assert_close(y.float().cpu(), slow(x), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert fast.weight.grad.dtype == torch.float32


def test_autocast_to_another_half_dtype_than_the_weights_falls_back(kernel_calls):
    """An fp16 model under bf16 autocast: the kernels take bf16 activations only over an fp32
    or bf16 weight, so the layer falls back (as autocast would run it) instead of failing in
    the kernels' argument check."""
    fast, slow = pair(in_channels=8, out_channels=8, kernel_size=3, padding=1)
    fast, slow = fast.half(), slow.to(DEVICE).half()
    x = torch.randn(1, 8, 5, 5).to(DEVICE, torch.float16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="falls back to the PyTorch reference: .*bfloat16"):
            y = fast(x)
        expected = slow(x)
    assert not kernel_calls and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.bool])
def test_autocast_leaves_inputs_it_does_not_cast_to_the_reference(dtype, kernel_calls):
    """Autocast casts floating-point tensors other than float64: a float64 or integer input
    fails as it does on the reference path, instead of running the kernels quietly rounded."""
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x = (torch.randn(1, 3, 4, 4, dtype=torch.float64) * 50).to(dtype)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        with pytest.raises(RuntimeError) as on_reference:
            slow.to(DEVICE)(x.to(DEVICE))
        with pytest.raises(RuntimeError, match=re.escape(str(on_reference.value))):
            fast(x.to(DEVICE))
    assert not kernel_calls


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.float64])
def test_autocast_adds_a_wider_residual_in_its_own_dtype(residual_dtype, kernel_calls):
    """Autocast casts a conv's inputs, not an add's: a bf16 conv plus an fp32 (or float64)
    residual, such as a denoiser's input image, is a sum in that wider dtype on the reference
    path, and so on the kernels (which added it rounded to bf16, with an output in bf16)."""
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1, activation="relu")
    slow.to(DEVICE)  # autocast's bf16 conv on the same device: the same rounding of its inputs
    x = torch.randn(1, 3, 5, 5, device=DEVICE)
    residual = 4 * torch.rand(1, 4, 5, 5, device=DEVICE, dtype=residual_dtype)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = fast(x, residual)
        expected = slow(x, residual)
    assert y.dtype == expected.dtype == residual_dtype and y.is_contiguous()  # NCHW in, NCHW out
    assert [c["dtypes"] for c in kernel_calls] == [[torch.bfloat16]]
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)  # the convs' bf16 outputs' rounding


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_the_output_takes_the_inputs_layout_as_nn_conv2d_does(layout, kernel_calls):
    """The kernels write channels_last; an NCHW input gets an NCHW output back, whose .view a
    model may take (a LeNet's flatten)."""
    fast, slow = pair(in_channels=3, out_channels=6, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 5, 9)
    x = {"nchw": x, "channels_last": x.to(memory_format=torch.channels_last), "sliced": x[..., 1:]}[layout]
    y = fast(x.to(DEVICE))
    assert kernel_calls
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(y.cpu(), slow(x), rtol=1e-4, atol=1e-5)
    if layout == "nchw":
        y.view(2, -1)


def test_torch_func_transforms_run_the_reference(kernel_calls):
    """vmap and grad wrap their tensors, whose raw pointers the kernels cannot read (also where
    the same shapes ran the kernels before, a call a layer repeats unchecked)."""
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x = torch.randn(5, 3, 6, 6)
    fast(x.to(DEVICE)), fast(x[:1].to(DEVICE))
    kernel_calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        batched = torch.vmap(fast)(x.to(DEVICE)[:, None])
        grads = torch.func.grad(lambda w: torch.func.functional_call(fast, {"weight": w}, x.to(DEVICE)).sum())(
            fast.weight)
    torch.testing.assert_close(batched[:, 0].cpu(), slow(x), rtol=1e-4, atol=1e-5)
    slow(x).sum().backward()
    torch.testing.assert_close(grads.cpu(), slow.weight.grad, rtol=1e-4, atol=1e-4)
    assert not kernel_calls


def test_torch_func_over_the_bias_or_the_residual_runs_the_reference(kernel_calls):
    """A transform that wraps the bias or the residual alone (the layer's input plain) also
    takes the reference path (the kernels raised reading a wrapped tensor's storage)."""
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x, residuals = torch.randn(1, 3, 5, 5), torch.randn(3, 1, 4, 5, 5)
    fast(x.to(DEVICE)), fast(x.to(DEVICE), residuals[0].to(DEVICE))  # checked calls of these shapes
    kernel_calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        grad_bias = torch.func.grad(lambda b: torch.func.functional_call(fast, {"bias": b}, x.to(DEVICE)).sum())(
            fast.bias)
        batched = torch.vmap(lambda r: fast(x.to(DEVICE), r))(residuals.to(DEVICE))
    assert not kernel_calls
    torch.testing.assert_close(grad_bias.cpu(), torch.full((4,), 25.0))
    torch.testing.assert_close(batched.cpu(), torch.stack([slow(x, r) for r in residuals]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights_require_grad", [False, True])
def test_forward_mode_ad_runs_the_reference(weights_require_grad, kernel_calls):
    """Dual tensors: the kernels have no jvp (the tangent came out None, silently, for a
    frozen layer; torch's NotImplementedError otherwise)."""
    import torch.autograd.forward_ad as forward_ad

    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1, activation="leaky_relu")
    fast.requires_grad_(weights_require_grad)
    x, tangent = torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5)
    fast(x.to(DEVICE))  # a checked call of these shapes
    kernel_calls.clear()
    with warnings.catch_warnings(), forward_ad.dual_level():
        warnings.simplefilter("ignore")  # the fallback's warning
        y, y_tangent = forward_ad.unpack_dual(fast(forward_ad.make_dual(x.to(DEVICE), tangent.to(DEVICE))))
    assert not kernel_calls
    _, expected = torch.func.jvp(slow, (x,), (tangent,))
    torch.testing.assert_close(y_tangent.cpu(), expected, rtol=1e-4, atol=1e-5)
    assert fast(x.to(DEVICE)) is not None and kernel_calls  # outside the dual level: the kernels again


def test_torch_jit_trace_records_the_reference(kernel_calls):
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x, other = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 7, 6)
    fast(x.to(DEVICE))  # a checked call of the shape traced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's and the tracer's warnings
        traced = torch.jit.trace(fast, x.to(DEVICE))  # (its check runs the layer untraced: the kernels)
    kernel_calls.clear()
    torch.testing.assert_close(traced(other.to(DEVICE)).cpu(), slow(other), rtol=1e-4, atol=1e-5)
    assert not kernel_calls  # the trace recorded the reference's ops


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_repeated_call_skips_the_checks_it_passed(layout, grad, kernel_calls, monkeypatch):
    """A call like a checked one (the same tensors' shapes, strides, dtypes and alignment, the
    same widths and settings) launches again without the layer's checks, most of a small
    layer's host time, with the same result, layout and gradients."""
    fast, slow = pair(in_channels=6, out_channels=8, kernel_size=3, padding=1, activation="leaky_relu")
    fast.active_out_channels = slow.active_out_channels = 5
    x = torch.randn(2, 4, 5, 7)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    fast(x.to(DEVICE))
    other = torch.randn_like(x)
    xf, xs = other.to(DEVICE, copy=True).requires_grad_(grad), other.clone().requires_grad_(grad)
    ys = slow(xs)

    def checked_again(*args):
        raise AssertionError("a repeated call ran the checks")

    monkeypatch.setattr(SlimConv2d, "_check_inputs", checked_again)
    monkeypatch.setattr(SlimConv2d, "_triton_kernels", checked_again)
    yf = fast(xf)
    assert [c["padding"] for c in kernel_calls] == [1, None]
    assert yf.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(yf.cpu(), ys, rtol=1e-4, atol=1e-5)
    if grad:
        probe = torch.randn_like(ys)
        yf.backward(probe.to(DEVICE)), ys.backward(probe)
        torch.testing.assert_close(xf.grad.cpu(), xs.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.weight.grad.cpu(), slow.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,value", [("padding_mode", "circular"), ("padding", (0, 0)), ("stride", (1, 2)),
                                        ("dilation", (2, 2)), ("backend", "torch")])
def test_a_repeated_call_follows_settings_changed_since(name, value, kernel_calls):
    """A call like a checked one, after a setting that the kernels' key leaves out changed: the
    layer checks it again and falls back (it ran the kernels with the old settings)."""
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    fast(x.to(DEVICE))
    setattr(fast, name, value), setattr(slow, name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        y = fast(x.to(DEVICE))
    assert len(kernel_calls) == 1
    torch.testing.assert_close(y.cpu(), slow(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("asked", ["output mask", "channel sums"])
def test_a_repeated_call_follows_an_output_mask_or_channel_sums_asked_for_since(asked, kernel_calls):
    fast, slow = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    mask = torch.tensor([True, False, True, False]).reshape(1, 4, 1, 1)
    with torch.no_grad():  # (the sums come on the inference path)
        fast(x.to(DEVICE))
        if asked == "output mask":
            fast.output_mask = mask.to(DEVICE)
        else:
            fast.emit_channel_sums = True
        y = fast(x.to(DEVICE))
    expected = slow(x) * mask if asked == "output mask" else slow(x)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-5)
    if asked == "channel sums":
        torch.testing.assert_close(fast.channel_sums.sum(1).cpu(), expected.sum((2, 3)), rtol=1e-4, atol=1e-4)
    assert [c["padding"] for c in kernel_calls] == [1, 1]


def test_a_repeated_call_refuses_a_float_or_bool_stride_as_the_full_call_does(kernel_calls):
    """(1.0, 1.0) and (True, True) hash and compare as (1, 1) do: after a layer of int stride ran
    the same shapes, such a layer must still be refused, not repeat that layer's call."""
    x = torch.randn(1, 4, 5, 7, device=DEVICE)
    pair(in_channels=4, out_channels=6, kernel_size=3, padding=1)[0](x)
    for stride in [(1.0, 1.0), (True, True)]:
        odd, _ = pair(in_channels=4, out_channels=6, kernel_size=3, padding=1)
        odd.stride = stride
        with pytest.raises(ValueError, match="stride must be an int"):
            odd(x)


@pytest.mark.parametrize("setting", [dict(multiple=1.0), dict(multiple=True), dict(tile_widths=(8.0, 6))])
def test_a_repeated_per_image_call_refuses_float_or_bool_settings_as_the_full_call_does(setting, kernel_calls):
    fast, _ = pair(in_channels=6, out_channels=8, kernel_size=3, padding=1)
    x, widths = torch.randn(2, 6, 5, 5, device=DEVICE), torch.tensor([[8, 6], [4, 2]], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        fast.set_per_image_widths(widths, tile_widths=(8, 6) if "tile_widths" in setting else None)
        fast(x)  # the int settings' call, checked
        fast.set_per_image_widths(widths, **setting)
        with pytest.raises(ValueError, match="widths_multiple must be an int|tile_widths must be two positive"):
            fast(x)


def test_a_repeated_per_image_call_reads_and_checks_its_own_widths(kernel_calls):
    """Per-image widths count in a repeat by their shape, strides, dtype and device: each call
    reads its own values (checked on the CPU, as the full call checks them)."""
    fast, slow = pair(in_channels=6, out_channels=8, kernel_size=3, padding=1, activation="relu")
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        for widths in ([[8, 6], [4, 2]], [[3, 5], [8, 6]]):
            fast.set_per_image_widths(torch.tensor(widths, dtype=torch.int32, device=DEVICE))
            y = fast(x.to(DEVICE))
            for image, (out_width, in_width) in enumerate(widths):
                expected = torch.relu(torch.nn.functional.conv2d(
                    x[image:image + 1, :in_width], slow.weight[:out_width, :in_width], slow.bias[:out_width],
                    padding=1))
                torch.testing.assert_close(y[image:image + 1, :out_width].cpu(), expected, rtol=1e-4, atol=1e-5)
        assert [c["padding"] for c in kernel_calls] == [1, None]
        if DEVICE == "cpu":  # (a GPU's widths are not read on the host: the kernel clamps them)
            fast.set_per_image_widths(torch.tensor([[9, 6], [4, 2]], dtype=torch.int32))
            with pytest.raises(ValueError, match=r"widths\[0, 0\] = 9 not in \[0, 8\]"):
                fast(x)


def test_batched_gradients_are_refused_by_name(kernel_calls):
    fast, _ = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 5, 5, device=DEVICE, requires_grad=True)
    y = fast(x)
    assert kernel_calls
    with pytest.raises(RuntimeError, match="takes no batched gradient.*use backend='torch'"):
        torch.autograd.grad(y, x, torch.randn(2, *y.shape, device=DEVICE), is_grads_batched=True)


def test_meta_tensors_run_the_reference(kernel_calls):
    fast, _ = pair(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fast.to("meta")(torch.randn(2, 3, 6, 6, device="meta")).shape == (2, 4, 6, 6)
    assert not kernel_calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_slimnet_runs_its_layers_channels_last_on_a_gpu():
    """An NCHW batch (a training batch) is padded into channels_last, so that no layer copies
    its output back to NCHW."""
    net = SlimUNet(base_width=8, depth=2).cuda()
    for x in (torch.rand(2, 3, 16, 16, device="cuda"), torch.rand(2, 3, 13, 11, device="cuda")):
        assert net.pad(x).is_contiguous(memory_format=torch.channels_last)
        seen = []
        hook = net.stem_conv.register_forward_hook(lambda m, args, out: seen.append(out))
        net(x)
        hook.remove()
        assert seen[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_layer_on_the_second_gpu_runs_there_whatever_the_current_device():
    """Triton launches on the current device: a model moved to cuda:1 while cuda:0 is
    current must still run its kernels on cuda:1, forward and backward."""
    fast, slow = pair(in_channels=5, out_channels=6, kernel_size=3, padding=1, activation="relu")
    fast = fast.to("cuda:1")
    x = torch.randn(2, 5, 9, 10)
    with torch.cuda.device(0):
        y = fast(x.to("cuda:1"))
        y.sum().backward()
    expected = slow(x)
    expected.sum().backward()
    assert y.device == torch.device("cuda:1")
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.weight.grad.cpu(), slow.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", None])
def test_nan_in_active_channels_propagates_as_in_torch(activation, kernel_calls):
    """A NaN pixel reaches the same outputs as on the reference path: an activation that
    dropped it would hide a corrupt image (and give it a confident route behind a gate)."""
    fast, slow = pair(in_channels=3, out_channels=8, kernel_size=3, padding=1, activation=activation)
    x = torch.rand(2, 3, 6, 7)
    x[1, 2, 3, 3] = float("nan")
    y, expected = fast(x.to(DEVICE)).cpu(), slow(x)
    assert kernel_calls and expected.isnan().sum() == 9 * 8
    assert torch.equal(y.isnan(), expected.isnan())
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    # and back: the activation's derivative at a NaN output is torch's (ReLU passes the gradient)
    xf, xs = x.to(DEVICE).requires_grad_(), x.clone().requires_grad_()
    fast_grads = torch.autograd.grad(fast(xf).sum(), [xf, fast.bias])
    slow_grads = torch.autograd.grad(slow(xs).sum(), [xs, slow.bias])
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_a_layer_and_a_network_on_the_kernels_compile_into_one_graph():
    """torch.compile(fullgraph=True) traces a SlimConv2d and a SlimDnCNN on the Triton
    backend (their dispatch checks included, without Dynamo's warning about tracing through
    their caches) and gives the eager results and gradients."""
    from torch._dynamo.testing import CompileCounter

    from dds_fast import SlimDnCNN

    torch._dynamo.reset()
    fast, slow = pair(in_channels=6, out_channels=8, kernel_size=3, padding=1, activation="relu")
    fast.active_out_channels = slow.active_out_channels = 5
    x = torch.randn(2, 4, 5, 5)
    counter = CompileCounter()
    xf = x.to(DEVICE, copy=True).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(fast, backend=counter, fullgraph=True)(xf)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    y.sum().backward()
    xs = x.clone().requires_grad_()
    slow(xs).sum().backward()
    torch.testing.assert_close(y.cpu(), slow(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xf.grad.cpu(), xs.grad, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    net = SlimDnCNN(1, base_width=8, depth=3).to(DEVICE).eval()
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = "triton"
    net.set_config(net.space.smallest())
    image = torch.rand(1, 1, 6, 6, device=DEVICE)
    with torch.no_grad():
        compiled = torch.compile(net, backend=counter, fullgraph=True)(image)
        torch.testing.assert_close(compiled, net(image), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2


def test_a_layer_on_the_reference_path_compiles_into_one_graph(monkeypatch):
    """A layer whose settings fall back (reflect padding) traces under torch.compile(fullgraph=True)
    before and after its one-time warning: the warning and the debug log stay out of the trace."""
    from torch._dynamo.testing import CompileCounter

    from dds_fast import slim_conv

    monkeypatch.setattr(slim_conv, "_WARNED", set())
    fast, slow = pair(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect")
    slow.to(DEVICE)
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    for warned in (False, True):
        torch._dynamo.reset()
        counter = CompileCounter()
        torch.testing.assert_close(torch.compile(fast, backend=counter, fullgraph=True)(x), slow(x))
        assert counter.frame_count == 1
        if not warned:
            with pytest.warns(UserWarning, match="falls back"):
                fast(x)


def test_flop_counter_counts_the_first_kernel_call_of_a_process():
    """FlopCounterMode copies the flop formulas' registry when it is created: the kernels'
    formulas are registered with the package, so a first call inside a counter is counted."""
    script = textwrap.dedent(f"""
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        import dds_fast
        conv = dds_fast.SlimConv2d(8, 6, 3, padding=1, backend="triton").to("{DEVICE}")
        with FlopCounterMode(display=False) as counter:
            conv(torch.randn(1, 8, 6, 5, device="{DEVICE}"))
        print(counter.get_total_flops())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == 2 * 6 * 8 * 9 * 6 * 5


def test_channel_sums_hold_no_training_output():
    """Asked for channel sums, a layer keeps them and the output they sum; a call that needs
    gradients has none, and must keep no reference to its output (and the graph behind it)."""
    import weakref

    conv = SlimConv2d(3, 8, 3, padding=1, backend="triton").to(DEVICE)
    conv.emit_channel_sums = True
    x = torch.randn(1, 3, 6, 6, device=DEVICE)
    with torch.no_grad():
        out = conv(x)
    assert conv.channel_sums_of is out
    torch.testing.assert_close(conv.channel_sums.sum(1), out.sum((2, 3)).float())
    out = conv(x.requires_grad_())
    assert conv.channel_sums is None and conv.channel_sums_of is None
    freed = weakref.ref(out)
    del out
    assert freed() is None


def test_a_layer_under_fake_tensors_reads_no_pointers_and_repeats_nothing(kernel_calls):
    """Under a dispatch mode (fake tensors) a layer neither keys its call by the tensors'
    pointers (which torch deprecates reading from fake tensors) nor repeats a checked call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fast, _ = pair(in_channels=6, out_channels=8, kernel_size=3, padding=1, activation="relu")
    fast.active_out_channels = 5
    x = torch.randn(1, 6, 5, 5, device=DEVICE)
    with torch.no_grad():
        fast(x)  # (a checked call a repeat could find)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = fast(mode.from_tensor(x))
    assert not [str(w.message) for w in caught if "data pointer" in str(w.message)]
    assert fake.shape == (1, 5, 5, 5)
    assert [call["padding"] is None for call in kernel_calls] == [False, False]  # two full calls, no repeat
