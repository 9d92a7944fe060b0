"""DynamicGate: fused Triton inference path (under the interpreter on CPU) against an
independent fp64 reference of Eq. 8-10, reference-path gradients, dispatch and errors."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dds_fast.gate import DynamicGate, GateOutput
from dds_fast.kernels import gate as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative error bounds of the fused path against fp64, per input dtype (bf16 stores
# truncate under the interpreter, so a full bf16 unit of error is allowed)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_gate(channels, num_choices, device=DEVICE, **kwargs):
    """A gate in eval mode on ``device`` with every parameter and running statistic random,
    so that no term of the heads is trivially zero or one (the same values on any device)."""
    torch.manual_seed(0)
    gate = DynamicGate(channels, num_choices, **kwargs)
    with torch.no_grad():
        gate.fc2.weight.normal_(0, 0.5)
        gate.fc2.bias.normal_(0, 0.5)
        gate.fc4.weight.normal_(0, 2.0)  # spread the logits: no near-ties in argmax
        gate.bn.weight.uniform_(0.5, 1.5)
        gate.bn.bias.normal_(0, 0.2)
        gate.bn.running_mean.normal_(0, 0.1)
        gate.bn.running_var.uniform_(0.5, 2.0)
    return gate.to(device).eval()


def reference(gate, x, bn_batch_stats=False, means=None):
    """Eq. 8-10 in fp64 from the gate's parameters, written independently of the module
    (differentiable in the parameters of an fp64 gate), on the device of ``x``; ``means``
    replace the squeeze of ``x``."""
    p = {k: v.double() for k, v in [*gate.named_parameters(), *gate.named_buffers()]}
    x = x.double()
    u = x.mean((2, 3)) if means is None else means.double()
    r = F.relu(u @ p["fc1.weight"].T + p["fc1.bias"])
    scale = 1 + torch.tanh(r @ p["fc2.weight"].T + p["fc2.bias"]) if gate.attention else torch.ones_like(x[:, :, 0, 0])
    h = r @ p["fc3.weight"].T + p["fc3.bias"]
    if bn_batch_stats:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = p["bn.running_mean"], p["bn.running_var"]
    h = F.relu((h - mean) / torch.sqrt(var + gate.bn.eps) * p.get("bn.weight", 1) + p.get("bn.bias", 0))
    logits = h @ p["fc4.weight"].T + p["fc4.bias"]
    return GateOutput(x * scale[:, :, None, None], scale, logits, logits.softmax(1), logits.argmax(1))


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "prefix":  # active channel prefix of a wider channels_last buffer, NaN beyond it
        wide = torch.full((x.shape[0], x.shape[1] + 5, *x.shape[2:]), float("nan"), dtype=x.dtype, device=x.device)
        wide = wide.contiguous(memory_format=torch.channels_last)
        wide[:, :x.shape[1]] = x
        return wide[:, :x.shape[1]]
    if kind == "crop":  # spatial axes that do not flatten: copied by the kernel wrapper
        big = torch.randn(x.shape[0], x.shape[1], x.shape[2] + 2, x.shape[3] + 3, dtype=x.dtype, device=x.device)
        big[:, :, 1:-1, 2:-1] = x
        return big[:, :, 1:-1, 2:-1]
    return x


def assert_matches(out, ref, dtype):
    tol = TOL[dtype]
    assert rel_err(out.features, ref.features) < tol
    assert rel_err(out.scale, ref.scale) < tol
    assert rel_err(out.logits, ref.logits) < tol
    assert (out.probs - ref.probs).abs().max().item() < tol
    assert out.choice.dtype == torch.int32
    assert torch.equal(out.choice.long(), ref.choice)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, c, e, kind", [(1, 24, 2, "nchw"), (7, 20, 16, "channels_last"), (3, 24, 5, "prefix")])
def test_fused_matches_reference(dtype, n, c, e, kind):
    gate = make_gate(c, e, backend="triton")
    x = layout(torch.randn(n, c, 6, 7).to(DEVICE, dtype), kind)
    with torch.no_grad():
        out = gate(x)
    memory_format = torch.contiguous_format if kind == "nchw" else torch.channels_last
    assert out.features.dtype == dtype and out.features.is_contiguous(memory_format=memory_format)
    assert_matches(out, reference(gate, x), dtype)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_fused_small_tiles(monkeypatch, kind):
    """The GPU's tiling, several channel and pixel blocks per image, and a partial last block
    of each, instead of the interpreter's one block per image."""
    monkeypatch.setattr(kernels, "_tile", lambda c, hw: (16, 8))
    gate = make_gate(20, 6, backend="triton")
    x = layout(torch.randn(2, 20, 6, 7).to(DEVICE, torch.float16), kind)
    with torch.no_grad():
        out = gate(x)
    assert_matches(out, reference(gate, x), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_half_gates_do_the_heads_math_in_fp32_on_every_path(dtype, autocast):
    """A BatchNorm of small running variance multiplies its input by hundreds: in fp16 the
    prediction head overflowed to NaN on the reference path (taken whenever gradients are on)
    and routed the image elsewhere than the fused path's fp32 head."""
    gate = make_gate(20, 4, backend="triton")
    with torch.no_grad():
        gate.bn.running_var.fill_(1e-5)
    gate = gate.to(dtype)
    x = (torch.rand(2, 20, 6, 7) * 1000).to(DEVICE, dtype)
    ref = reference(gate, x)
    assert ref.logits.abs().max() > 7e4  # beyond fp16's range
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=autocast):
        with torch.no_grad():
            fused = gate(x)
        slow = gate(x)  # gradients on: the reference path
    assert slow.logits.requires_grad and not fused.logits.requires_grad
    for out in (fused, slow):
        assert out.logits.dtype == out.probs.dtype == out.scale.dtype == torch.float32
        assert out.features.dtype == dtype
        assert_matches(out, ref, dtype)


@pytest.mark.parametrize("e", [4, 5])
def test_non_finite_values_route_as_torch_does(e):
    """A NaN or infinite pixel gives NaN logits and torch's choice, not a confident route; a
    NaN logit wins the argmax, as in torch.argmax (E = 5 also pads the argmax)."""
    gate = make_gate(20, e, backend="triton")
    x = torch.randn(3, 20, 6, 7).to(DEVICE)
    x[0, 3, 2, 2] = float("nan")
    x[1, 5, 1, 1] = float("inf")
    for nan_bias in (False, True):
        if nan_bias:
            with torch.no_grad():
                gate.fc4.bias[e - 2] = float("nan")
        with torch.no_grad():
            out = gate(x)
        ref = reference(gate, x)
        assert ref.logits[:2].isnan().all() and not ref.logits[2].isnan().all()
        torch.testing.assert_close(out.logits.double(), ref.logits, equal_nan=True, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.probs.double(), ref.probs, equal_nan=True, rtol=1e-4, atol=1e-5)
        assert torch.equal(out.choice.long(), ref.choice)
    assert out.choice[2].item() == e - 2


@pytest.mark.parametrize("channels, hidden", [(6, 16), (8, 5)])  # 3 reduced lanes, or 5 hidden: padded
def test_an_infinite_pixel_that_torch_routes_is_routed_alike(channels, hidden):
    """Positive weights carry an infinite squeeze to +inf and -inf logits (not NaN) in torch;
    the fused head's padding lanes (zero weights times infinity) must not turn them NaN."""
    gate = make_gate(channels, 3, reduction=2, hidden=hidden, backend="triton")
    with torch.no_grad():
        for layer in (gate.fc1, gate.fc2, gate.fc3):
            layer.weight.abs_()
        gate.bn.weight.abs_()
        gate.fc4.weight.copy_(-gate.fc4.weight.abs())
        gate.fc4.weight[2].abs_()
    x = torch.randn(1, channels, 4, 4).to(DEVICE)
    x[0, 0, 0, 0] = float("inf")
    with torch.no_grad():
        out = gate(x)
    ref = reference(gate, x)
    assert ref.choice.tolist() == [2] and not ref.logits.isnan().any()
    assert torch.equal(out.logits.double(), ref.logits) and out.choice.tolist() == [2]
    torch.testing.assert_close(out.scale.double(), ref.scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn", [dict(affine=False), dict(track_running_stats=False)])
@pytest.mark.parametrize("backend, training", [("torch", False), ("triton", False), ("torch", True)])
def test_batch_norms_without_affine_or_statistics(bn, backend, training):
    gate = make_gate(20, 4, backend=backend)
    gate.bn = nn.BatchNorm1d(gate.hidden, **bn).to(DEVICE)
    gate.train(training)
    x = torch.randn(3, 20, 5, 6).to(DEVICE)
    with torch.set_grad_enabled(training):  # (the fused head serves inference only)
        out = gate(x)
    # a BatchNorm without statistics normalises by the batch's in eval mode too
    ref = reference(gate, x, bn_batch_stats=training or not gate.bn.track_running_stats)
    torch.testing.assert_close(out.logits.double(), ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.choice.long(), ref.choice)
    if not gate.bn.track_running_stats or training:  # batch statistics of one image: refused by name
        with torch.no_grad(), pytest.raises(ValueError, match="DynamicGate: its BatchNorm .* needs 2 or more images"):
            gate(x[:1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_norm_put_in_train_mode_alone_normalises_by_the_batch_and_updates(backend):
    """(gate.eval(); gate.bn.train(), to re-estimate its statistics: the fused head would use
    the stored ones and update none)"""
    gate = make_gate(20, 4, backend=backend).eval()
    gate.bn.train()
    x = torch.randn(3, 20, 5, 6).to(DEVICE)
    before = gate.bn.running_mean.clone()
    with torch.no_grad():
        out = gate(x)
    ref = reference(gate, x, bn_batch_stats=True)
    torch.testing.assert_close(out.logits.double(), ref.logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(gate.bn.running_mean, before)


def test_a_half_precision_gate_trains_its_batch_norm_in_fp32():
    """A pre-BN value past fp16's 65504 overflows an fp16 BatchNorm; the update lands in the
    fp16 buffers."""
    gate = make_gate(20, 3, backend="torch").half().train()
    with torch.no_grad():  # h around 6e4, spread by about 1e4 over the batch
        gate.fc3.bias.fill_(6e4)
        gate.fc3.weight.mul_(1e4)
    x = torch.randn(4, 20, 5, 6).to(DEVICE).half()
    before = gate.bn.running_mean.clone()
    out = gate(x)
    ref = reference(gate, x, bn_batch_stats=True)
    assert out.logits.isfinite().all()
    torch.testing.assert_close(out.logits.double(), ref.logits, rtol=2e-2, atol=2e-2)
    assert gate.bn.running_mean.dtype == torch.float16 and not torch.equal(gate.bn.running_mean, before)
    assert int(gate.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("attention", [True, False])
def test_given_means_replace_the_squeeze(attention):
    """A tile given its whole image's channel means is routed and scaled as that image."""
    gate = make_gate(20, 5, backend="triton")
    gate.attention = attention
    x = torch.randn(2, 20, 6, 7).to(DEVICE)
    means = (torch.randn(2, 20, 9, 9) + 0.5).mean((2, 3)).to(DEVICE)
    expected = reference(gate, x, means=means)
    assert not torch.equal(expected.logits, reference(gate, x).logits)
    with torch.no_grad():
        assert_matches(gate(x, means=means), expected, torch.float32)
        gate.backend = "torch"
        assert_matches(gate(x, means=means), expected, torch.float32)
        features, scale = gate.attend(x, means=means)
    if attention:
        assert rel_err(scale, expected.scale) < TOL[torch.float32]
    for bad in (means[:1], means[:, :4], means.long(), means.tolist()):
        with pytest.raises(ValueError, match=r"means must be a floating-point \[2, 20\] tensor"):
            gate(x, means=bad)


def test_means_that_need_gradients_take_the_autograd_path():
    """The kernels have no backward: a frozen gate given means that require grad must not cut
    their graph (stage 3 could feed a differentiable squeeze)."""
    gate = make_gate(20, 5, backend="triton").requires_grad_(False)
    x = torch.randn(2, 20, 6, 7).to(DEVICE)
    means = (x.mean((2, 3)) + 0.3).requires_grad_()
    gate(x, means=means).logits.sum().backward()
    means_ref = means.detach().double().requires_grad_()
    reference(gate, x, means=means_ref).logits.sum().backward()
    assert means.grad is not None and rel_err(means.grad, means_ref.grad) < 1e-5


def test_a_batch_beyond_the_kernels_grid_takes_the_reference_path(monkeypatch):
    monkeypatch.setattr(kernels, "MAX_BATCH", 2)  # stands for 65535
    gate = make_gate(8, 3, backend="triton")
    x = torch.randn(3, 8, 4, 5).to(DEVICE)
    with torch.no_grad():
        assert_matches(gate(x), reference(gate, x), torch.float32)


def test_fused_crop_view_and_reference_module():
    gate = make_gate(16, 3, reduction=2, hidden=12, backend="triton")
    x = layout(torch.randn(2, 16, 5, 4).to(DEVICE), "crop")
    with torch.inference_mode():
        fused = gate(x)
        gate.backend = "torch"
        module = gate(x)
    ref = reference(gate, x)
    assert_matches(fused, ref, torch.float32)
    assert_matches(module, ref, torch.float32)


@pytest.mark.parametrize("chunk", [None, 100])
def test_squeeze_partials(chunk):
    # 48x48 at 20 channels: more pixels than one interpreter block (2048), so the chunk loop
    # runs twice; chunk=100 splits each image into 18 chunks of one 128-pixel block
    x = torch.randn(2, 20, 48, 48).to(DEVICE).contiguous(memory_format=torch.channels_last)
    part = kernels.squeeze_partials(x, chunk=chunk)
    assert part.shape[::2] == (2, 20)
    if chunk is not None:
        assert part.shape[1] == 18
    elif kernels.INTERPRET:
        assert part.shape[1] == 1  # one chunk per image
    else:
        assert part.shape[1] > 1  # a GPU splits each image to fill its SMs
    assert torch.allclose(part.sum(1).double(), x.double().sum((2, 3)), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("max_folds", [128, 2])
def test_gate_head_sums_many_partials(monkeypatch, max_folds):
    # 300 partial rows at 24 channels, folded by five programs per image (300 = 4 x 64 + 44), or
    # by two of 150 rows when at most two may fold; the last of them to arrive runs the heads.
    # Twice, on new values, since on a GPU the second call of a signature goes to the compiled
    # kernel's launcher, and the ticket counters must be back at zero for it.
    from dds_fast.kernels import gate as gate_kernels
    monkeypatch.setattr(gate_kernels, "MAX_FOLDS", max_folds)
    gate = make_gate(24, 7)
    for _ in range(2):
        part = torch.randn(3, 300, 24).to(DEVICE)
        head = kernels.gate_head(part, 1000, *head_args(gate))
        u = part.double().sum(1) / 1000
        ref = reference(gate, u[:, :, None, None])
        assert rel_err(head.scale, ref.scale) < 2e-5 and rel_err(head.logits, ref.logits) < 2e-5
        assert torch.equal(head.choice.long(), ref.choice)
        assert not gate_kernels._arrivals(part.device).any()


@pytest.mark.parametrize("affine", [True, False])
def test_gate_head_applies_the_eval_batchnorm(affine):
    gate = make_gate(12, 5)
    bn = torch.nn.BatchNorm1d(gate.hidden, affine=affine, eps=0.3).to(DEVICE).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    args = head_args(gate)
    args[6] = kernels.BatchNormStats.of(bn)
    part = torch.randn(2, 3, 12, device=DEVICE)
    head = kernels.gate_head(part, 10, *args)
    r = F.relu(part.double().sum(1) / 10 @ gate.fc1.weight.double().T + gate.fc1.bias.double())
    h = bn.double()(r @ gate.fc3.weight.double().T + gate.fc3.bias.double())
    logits = F.relu(h) @ gate.fc4.weight.double().T + gate.fc4.bias.double()
    assert rel_err(head.logits, logits) < 2e-5
    with pytest.raises(ValueError, match="running statistics"):
        kernels.BatchNormStats.of(torch.nn.BatchNorm1d(10, track_running_stats=False))
    args[6] = kernels.BatchNormStats.of(torch.nn.BatchNorm1d(gate.hidden + 1).to(DEVICE))
    with pytest.raises(ValueError, match=rf"bn.mean has shape \({gate.hidden + 1},\), expected \({gate.hidden},\)"):
        kernels.gate_head(part, 10, *args)


def test_fused_gate_reads_parameters_changed_in_place():
    """Nothing derived from the parameters is cached: edits through ``.data`` (which bump no
    version counter), a new eps, and a gate made under inference_mode all take effect."""
    gate = make_gate(20, 4, backend="triton")
    x = torch.randn(2, 20, 5, 5).to(DEVICE)
    reference_gate = make_gate(20, 4, device="cpu", backend="torch")  # CPU: fp32 matmuls never in TF32
    with torch.no_grad():
        first = gate(x)
        gate.fc3.weight.data.mul_(-3)
        gate.bn.running_mean.data.add_(0.5)
        gate.bn.eps = 0.25
        changed = gate(x)
    assert not torch.allclose(changed.logits, first.logits)
    reference_gate.load_state_dict(gate.state_dict())
    reference_gate.bn.eps = 0.25
    with torch.no_grad():
        torch.testing.assert_close(changed.logits.cpu(), reference_gate(x.cpu()).logits.float(), rtol=2e-5, atol=2e-5)
    with torch.inference_mode():
        inference_gate = make_gate(20, 4, backend="triton")
        torch.testing.assert_close(inference_gate(x).logits, first.logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_off_is_identity(backend):
    gate = make_gate(20, 4, backend=backend)
    x = torch.randn(3, 20, 5, 5).to(DEVICE)
    with torch.no_grad():
        on = gate(x)
        gate.attention = False
        off = gate(x)
    assert off.features is x
    assert torch.equal(off.scale, torch.ones(3, 20, device=DEVICE))
    assert not torch.equal(on.scale, off.scale)
    # the prediction head reads R, which the attention does not change
    assert torch.allclose(on.logits, off.logits) and torch.equal(on.choice, off.choice)


def test_fresh_gate_starts_as_identity():
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(DynamicGate(8, 3, backend="torch")(x).features, x)


def test_outputs_fully_written(monkeypatch):
    gate = make_gate(24, 9, backend="triton")
    x = torch.randn(4, 24, 5, 6).to(DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        clean = gate(x)
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -(2 ** 30))

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    with torch.no_grad():
        out = gate(x)
    monkeypatch.undo()
    for name, a, b in zip(GateOutput._fields, out, clean):
        assert torch.equal(a, b), name


def test_attention_head_gradients():
    """Stage 1: attention on, train mode. backend='triton' still trains (reference autograd,
    whatever the device: checked on the CPU)."""
    gate = make_gate(12, 3, device="cpu", backend="triton").train()
    x = torch.randn(4, 12, 5, 3, requires_grad=True)
    probe = torch.randn(4, 12, 5, 3)
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    params = dict(gate.named_parameters())
    got = torch.autograd.grad((gate(x).features * probe).sum(), [x] + [params[k] for k in names])

    ref_gate = copy.deepcopy(gate).double()
    ref_params = dict(ref_gate.named_parameters())
    xd = x.detach().double().requires_grad_()
    features = reference(ref_gate, xd).features
    want = torch.autograd.grad((features * probe.double()).sum(), [xd] + [ref_params[k] for k in names])
    for name, a, b in zip(["x"] + names, got, want):
        assert rel_err(a, b) < 1e-5, name

    def attention(x, w1, b1, w2, b2):
        return torch.func.functional_call(ref_gate, {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2,
                                                     "fc2.bias": b2}, (x,)).features
    small = torch.randn(2, 12, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention, (small, *[ref_params[k] for k in names]))


def test_prediction_head_gradients():
    """Stage 3: attention off, train mode (BatchNorm on batch statistics)."""
    gate = make_gate(12, 5, device="cpu", backend="triton").train()
    gate.attention = False
    x = torch.randn(6, 12, 4, 4)
    probe = torch.randn(6, 5)
    names = ["fc1.weight", "fc1.bias", "fc3.weight", "fc3.bias", "bn.weight", "bn.bias", "fc4.weight", "fc4.bias"]
    params = dict(gate.named_parameters())
    out = gate(x)
    assert out.features is x
    loss = (out.logits * probe).sum()
    got = torch.autograd.grad(loss, [params[k] for k in names] + [params["fc2.weight"]], allow_unused=True)
    assert got[-1] is None  # W2 is not used while the attention is off

    ref_gate = copy.deepcopy(gate).double()
    ref_params = dict(ref_gate.named_parameters())
    logits = reference(ref_gate, x.double(), bn_batch_stats=True).logits
    want = torch.autograd.grad((logits * probe.double()).sum(), [ref_params[k] for k in names])
    # BatchNorm on batch statistics cancels any shift shared by the batch, so the gradients
    # of b3 (and of b1 where a unit is active for every image) are zero up to fp32 rounding
    # of the large ones: bound each error by its own size plus a floor from the largest.
    top = max(b.abs().max().item() for b in want)
    for name, a, b in zip(names, got, want):
        assert (a.double() - b).abs().max().item() <= 1e-5 * b.abs().max().item() + 2e-5 * top, name

    def head(w3, b3, w4, b4):
        return torch.func.functional_call(ref_gate, {"fc3.weight": w3, "fc3.bias": b3, "fc4.weight": w4,
                                                     "fc4.bias": b4}, (x.double(),)).logits
    assert torch.autograd.gradcheck(head, tuple(ref_params[k] for k in ["fc3.weight", "fc3.bias", "fc4.weight",
                                                                          "fc4.bias"]))


def test_dispatch(monkeypatch):
    calls = []
    gate_head = kernels.gate_head
    monkeypatch.setattr(kernels, "gate_head", lambda *a, **k: calls.append(1) or gate_head(*a, **k))
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        make_gate(8, 2, device="cpu", backend="auto")(x)  # auto on CPU: reference
        assert not calls
        x = x.to(DEVICE)
        gate = make_gate(8, 2, backend="auto")
        gate(x)                       # auto: fused for CUDA tensors only
        assert len(calls) == (DEVICE == "cuda")
        calls.clear()
        gate.backend = "torch"
        gate(x)
        gate.backend = "triton"
        gate(x.double())              # fp64: reference
        gate.train()(x)               # train mode: batch statistics, reference
        gate.eval()(x)
    assert len(calls) == 1
    gate(x)                           # gradients needed: reference
    gate.requires_grad_(False)
    gate(x)                           # nothing needs a gradient: fused
    assert len(calls) == 2


def test_a_fused_gate_compiles_and_is_counted_through_the_reference_ops():
    """The gate's kernels are no registered op: under torch.compile, fake tensors or
    FlopCounterMode the gate takes the reference ops (it failed in Dynamo's trace of its
    launch, and counted no FLOPs)."""
    from torch._dynamo.testing import CompileCounter
    from torch.utils.flop_counter import FlopCounterMode

    torch._dynamo.reset()
    gate = make_gate(8, 3, backend="triton")
    reference = copy.deepcopy(gate)
    reference.backend = "torch"
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    counter = CompileCounter()
    with torch.no_grad():
        compiled = torch.compile(gate, backend=counter, fullgraph=True)(x)
        expected = reference(x)
        torch.testing.assert_close(compiled.probs, expected.probs, rtol=1e-5, atol=1e-6)
        assert torch.equal(compiled.choice, expected.choice)
        with FlopCounterMode(display=False) as counted:
            gate(x)
        with FlopCounterMode(display=False) as counted_reference:
            reference(x)
    assert counter.frame_count == 1
    assert counted.get_total_flops() == counted_reference.get_total_flops() > 0


def test_constructor_errors():
    with pytest.raises(ValueError, match="channels must be an int >= 1, got 0"):
        DynamicGate(0, 3)
    with pytest.raises(ValueError, match="num_choices must be an int >= 2, got 1"):
        DynamicGate(8, 1)
    with pytest.raises(ValueError, match="reduction must be an int >= 1, got 0"):
        DynamicGate(8, 3, reduction=0)
    with pytest.raises(ValueError, match="num_choices must be an int >= 2, got True"):
        DynamicGate(8, True)
    with pytest.raises(ValueError, match="backend must be one of"):
        DynamicGate(8, 3, backend="cuda")
    gate = DynamicGate(8, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        gate.backend = "cuda"
    with pytest.raises(ValueError, match="attention must be true or false, got 'off'"):
        gate.attention = "off"
    assert (gate.backend, gate.attention) == ("auto", True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_errors(backend):
    gate = DynamicGate(8, 3, backend=backend).eval()
    with pytest.raises(ValueError, match=r"4-D tensor \[N, 8, H, W\], got \(8, 4, 4\)"):
        gate(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="input has 6 channels, the gate was built for 8"):
        gate(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        gate(torch.randn(1, 8, 0, 4))
    with pytest.raises(ValueError, match="floating point"):
        gate(torch.ones(1, 8, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="input is a torch.sparse_coo tensor"):
        gate(torch.randn(1, 8, 4, 4).to_sparse())


def head_args(gate):
    return [gate.fc1.weight, gate.fc1.bias, gate.fc2.weight, gate.fc2.bias, gate.fc3.weight, gate.fc3.bias,
            kernels.BatchNormStats.of(gate.bn), gate.fc4.weight, gate.fc4.bias]


def test_kernel_argument_errors():
    args = head_args(make_gate(8, 3))
    with pytest.raises(ValueError, match=r"w2 has shape \(6, 2\), expected \(8, 2\)"):
        kernels.gate_head(torch.randn(1, 1, 8, device=DEVICE), 4, *args[:2], torch.randn(6, 2, device=DEVICE),
                          *args[3:])
    with pytest.raises(ValueError, match="partials must be fp32"):
        kernels.gate_head(torch.randn(1, 1, 8, dtype=torch.float64, device=DEVICE), 4, *args)
    with pytest.raises(ValueError, match=r"need T >= 1 rows of sums .* got \(2, 0, 8\)"):
        kernels.gate_head(torch.randn(2, 0, 8, device=DEVICE), 4, *args)
    many = torch.randn(1, 1, 8, device=DEVICE).expand(65536, 1, 8)  # a view: nothing is allocated
    with pytest.raises(ValueError, match="a batch of 65536 images; the kernel takes at most 65535"):
        kernels.gate_head(many, 4, *args)
    with pytest.raises(ValueError, match="at most 65535"):
        kernels.squeeze_partials(torch.randn(65536, 2, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"scale must be fp32 \[2, 8\]"):
        kernels.apply_scale(torch.randn(2, 8, 3, 3, device=DEVICE), torch.ones(2, 7, device=DEVICE))
    fused = make_gate(8, 3, backend="triton").eval()
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    for sums, got in ((torch.zeros(2, 1, 7, device=DEVICE), r"torch.float32 \(2, 1, 7\)"), ([[0.0] * 8] * 2, "list"),
                      (torch.zeros(2, 1, 8, dtype=torch.float64, device=DEVICE), r"torch.float64 \(2, 1, 8\)")):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"DynamicGate: channel_sums must be fp32 \[2, T, 8\], "
                                                              rf"got {got}"):
            fused(x, channel_sums=sums)
    for hw in (True, 15.5, torch.tensor(16)):  # ran (True, 15.5: wrong logits), or failed deep in the kernel
        with pytest.raises(ValueError, match=re.escape(f"gate_head: hw must be an int >= 1 (the pixels the "
                                                       f"partials sum over), got {hw!r}")):
            kernels.gate_head(torch.randn(1, 1, 8, device=DEVICE), hw, *args)
    for chunk in (0, 2.5):  # 2.5 got as far as torch.empty, with a float size
        with pytest.raises(ValueError, match=f"chunk must be an int >= 1, got {chunk}"):
            kernels.squeeze_partials(torch.randn(1, 8, 3, 3, device=DEVICE), chunk=chunk)


@pytest.mark.parametrize("n", [1, 5, 1500])  # 1500: more images than one block of the kernel's loop
@pytest.mark.parametrize("routes", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_route_flags(n, routes, dtype):
    g = torch.Generator().manual_seed(n * routes)
    cases = [torch.full((n,), k) for k in range(routes)] + [torch.full((n,), routes), torch.full((n,), -1)]
    if n > 1:
        mixed = torch.randint(0, routes + 1, (n,), generator=g)
        mixed[-1] = (mixed[0] + 1) % (routes + 1)  # the last image alone differs: the loop's tail
        cases.append(mixed)
    for choice in cases:
        flags = kernels.route_flags(choice.to(dtype=dtype, device=DEVICE), routes)
        want = [bool((choice == k).all()) for k in range(routes)]
        assert flags.dtype == torch.bool and flags.tolist() == want + [not any(want)], choice.tolist()


def test_route_flags_errors():
    with pytest.raises(ValueError, match="non-empty 1-D int32 or int64"):
        kernels.route_flags(torch.zeros(0, dtype=torch.int32, device=DEVICE), 2)
    with pytest.raises(ValueError, match="non-empty 1-D int32 or int64"):
        kernels.route_flags(torch.zeros(2, device=DEVICE), 2)
    with pytest.raises(ValueError, match="num_routes must be an int >= 1, got 0"):
        kernels.route_flags(torch.zeros(2, dtype=torch.int32, device=DEVICE), 0)


@pytest.mark.skipif(kernels.INTERPRET, reason="the interpreter runs the kernels on CPU tensors")
def test_cpu_tensors_get_a_clear_error_from_kernels_compiled_for_a_gpu():
    gate = make_gate(8, 3, device="cpu", backend="triton")
    x = torch.randn(2, 8, 3, 3)
    message = "tensors are on the CPU but the Triton kernels were compiled for a GPU"
    with torch.no_grad(), pytest.raises(ValueError, match=f"squeeze_partials: {message}"):
        gate(x)
    with pytest.raises(ValueError, match=f"gate_head: {message}"):
        kernels.gate_head(torch.ones(2, 1, 8), 9, *head_args(gate))
    with pytest.raises(ValueError, match=f"apply_scale: {message}"):
        kernels.apply_scale(x, torch.ones(2, 8))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool, torch.float64])
def test_the_kernels_name_features_of_a_dtype_they_do_not_take(dtype):
    x = torch.ones(2, 16, 5, 5, device=DEVICE, dtype=dtype)
    for what, kernel in (("squeeze_partials", kernels.squeeze_partials),
                         ("apply_scale", lambda x: kernels.apply_scale(x, torch.ones(2, 16, device=DEVICE)))):
        with pytest.raises(ValueError, match=rf"{what}: x is {dtype}; the kernels take float32, float16 and bfloat16"):
            kernel(x)


def test_a_lazily_negated_input_is_read_by_its_values():
    """A view whose negation bit is set holds the negation of its values in memory: the
    kernels, which read memory, refuse it, and the fused gate steps aside for the reference."""
    values = torch.rand(2, 16, 5, 5, device=DEVICE)
    negated = torch.complex(torch.zeros_like(values), -values).conj().imag
    assert negated.is_neg() and torch.equal(negated, values)
    for kernel in (kernels.squeeze_partials, lambda x: kernels.apply_scale(x, torch.ones(2, 16, device=DEVICE))):
        with pytest.raises(ValueError, match=r"x is a lazily negated view \(is_neg\(\)\); pass x.resolve_neg\(\)"):
            kernel(negated)
    gate = make_gate(16, 3, backend="triton").eval()
    torch.nn.init.normal_(gate.fc2.weight)
    with torch.no_grad():
        got, expected = gate(negated), gate(values)
    for name in ("features", "scale", "logits", "choice"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-5)


def test_torch_func_transforms_take_the_reference_path():
    """vmap wraps its tensors, whose raw pointers the kernels cannot read: the fused gate
    steps aside, as the convs do, even where nothing needs a gradient."""
    gate = make_gate(16, 3, backend="triton")
    x = torch.rand(3, 16, 5, 5, device=DEVICE)
    with torch.no_grad():
        batched = torch.vmap(lambda image: gate(image[None]).logits[0])(x)
        torch.testing.assert_close(batched, gate(x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dual", ["input", "parameter"])
def test_forward_mode_ad_and_jit_trace_take_the_reference_path(dual):
    """The kernels have no jvp (the tangent came out None, silently) and a trace would record
    their launch with its sizes as tensors (it failed in the kernel's arguments)."""
    import torch.autograd.forward_ad as forward_ad

    gate = make_gate(16, 3, backend="triton").requires_grad_(False)
    with torch.no_grad():
        gate.fc2.weight.normal_(0, 0.5)  # a trained attention head
    reference = copy.deepcopy(gate)
    reference.backend = "torch"
    x, tangent = torch.rand(2, 16, 5, 5, device=DEVICE), torch.randn(2, 16, 5, 5, device=DEVICE)
    w2_tangent = torch.randn_like(gate.fc2.weight)
    outputs = []
    for model in (gate, reference):
        with forward_ad.dual_level(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's warning
            if dual == "input":
                out = model(forward_ad.make_dual(x, tangent))
            else:
                w2 = forward_ad.make_dual(model.fc2.weight, w2_tangent)
                out = torch.func.functional_call(model, {"fc2.weight": w2}, (x,))
            outputs.append(forward_ad.unpack_dual(out.features).tangent)
    assert outputs[0] is not None
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda image: gate(image).features, (x,), check_trace=False)
        other = torch.rand(3, 16, 4, 6, device=DEVICE)
        torch.testing.assert_close(traced(other), reference(other).features, rtol=1e-4, atol=1e-5)


def test_squeeze_and_scale_of_channels_whose_offsets_pass_int32():
    """An NCHW image of 2**31 elements or more (or a channel-strided view): channel offsets in
    int64. A storage that starts 2**31 elements before the view keeps a wrapped offset inside
    the allocation (about 8 GiB, hardly touched)."""
    start, channel_stride = 2 ** 31, 2 ** 30
    storage = torch.empty(start + 2 * channel_stride + 16, dtype=torch.float16, device=DEVICE)
    storage[:4096].fill_(100.0)
    x = storage.as_strided((1, 3, 4, 4), (3 * channel_stride, channel_stride, 4, 1), start)
    x.copy_(torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2)).half())
    torch.testing.assert_close(kernels.squeeze_partials(x).sum(1), x.float().sum((2, 3)), rtol=1e-3, atol=1e-3)
    scale = torch.rand(1, 3, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    torch.testing.assert_close(kernels.apply_scale(x, scale).float(), x.float() * scale[:, :, None, None],
                               rtol=2e-3, atol=2e-3)


def test_a_scale_near_zero_stays_positive_on_both_paths():
    """1 + tanh(z) rounds to 0 in fp32 for z below about -9 (and loses digits well before):
    an infinite pixel of such a channel came out NaN on the reference path, inf on the fused."""
    gate = make_gate(4, 3, backend="torch").eval()
    with torch.no_grad():
        gate.fc2.bias.copy_(torch.tensor([-20.0, -7.0, 0.0, 3.0]))
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    x[0, :, 1, 1] = float("inf")
    means = torch.zeros(1, 4, device=DEVICE)  # the squeeze of x without its infinite pixels
    with torch.no_grad():
        reference_out = gate(x, means=means)
        gate.backend = "triton"
        fused = gate(x, means=means)
    fc1, fc2 = (copy.deepcopy(fc).double() for fc in (gate.fc1, gate.fc2))
    with torch.no_grad():
        z = fc2(fc1(means.double()).relu())
    expected = 2 * torch.sigmoid(2 * z)  # 1 + tanh(z), with the digits fp64's 1 + tanh would lose too
    assert expected[0, 0] < 1e-16 and expected[0, 3] > 1
    for out in (reference_out, fused):
        assert (out.scale > 0).all()
        torch.testing.assert_close(out.scale[0].double(), expected[0], rtol=1e-5, atol=0)
        assert out.features[0, :, 1, 1].isposinf().all()


def test_scale_of_views_whose_channels_fall_between_rows_and_columns():
    """Overlapping windows (an unfold's) and interleaved channels: the pixels of the view
    flatten, but a tensor laid out as its strides sort does not; the output is dense."""
    generator = torch.Generator().manual_seed(4)
    windows = torch.randn(2, 40, generator=generator).to(DEVICE).unfold(1, 16, 3).view(2, 9, 4, 4)
    interleaved = torch.randn(64, generator=generator).to(DEVICE).as_strided((1, 2, 2, 4), (64, 3, 8, 2))
    for x in (windows, interleaved):
        scale = torch.rand(x.shape[:2], generator=generator).to(DEVICE) + 0.5
        torch.testing.assert_close(kernels.apply_scale(x, scale), x * scale[:, :, None, None], rtol=1e-6, atol=1e-6)
    gate = make_gate(9, 3, backend="triton").eval()
    with torch.no_grad():
        fused = gate(windows).features
        gate.backend = "torch"
        torch.testing.assert_close(fused, gate(windows).features, rtol=1e-5, atol=1e-6)


def test_a_gate_launch_stopped_part_way_leaves_the_next_right(monkeypatch):
    """Its ticket counters, shared by every call on a device, are zeroed again."""
    gate = make_gate(16, 3, backend="triton")
    x = torch.rand(3, 16, 5, 5, device=DEVICE)
    with torch.no_grad():
        expected = gate(x).logits
        launch = kernels.launch

        def interrupted(kernel, grid, *args, **kwargs):
            if kernel is kernels._gate_kernel:
                kernels._arrivals(x.device)[:2] += 1  # some programs arrived, then Ctrl-C
                raise KeyboardInterrupt
            return launch(kernel, grid, *args, **kwargs)

        monkeypatch.setattr(kernels, "launch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            gate(x)
        monkeypatch.setattr(kernels, "launch", launch)
        torch.testing.assert_close(gate(x).logits, expected, rtol=0, atol=0)
