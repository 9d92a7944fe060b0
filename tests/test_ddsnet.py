import copy
import gc
import re
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dds_fast
from dds_fast import DDSNet, DynamicGate, RoutingEntry, SlimDnCNN, SlimUNet, export_static, macs_per_pixel, slim_conv
from dds_fast.graph_if import conditional_graph_nodes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_ddsnet(make_net=lambda: SlimUNet(in_channels=3, base_width=8, depth=3), num_choices=3, seed=0):
    torch.manual_seed(seed)
    net = make_net().double()
    generator = torch.Generator().manual_seed(seed)
    configs = [net.space.smallest(), net.space.sample(generator), net.space.largest()][:num_choices]
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in configs]
    gate = brightness_gate(net, len(routes))
    gate.attention = False
    return DDSNet(net, gate, routes).eval()


def images(n=6, size=(11, 13), seed=1):
    g = torch.Generator().manual_seed(seed)
    # images of different brightness and contrast, so the gate sees different statistics
    base = torch.rand(n, 3, *size, generator=g, dtype=torch.float64)
    return base * torch.linspace(0.2, 3.0, n, dtype=torch.float64).view(n, 1, 1, 1)


def brightness_gate(net, num_choices: int) -> DynamicGate:
    """A gate whose choice steps up with the mean of the stem's output, at thresholds that
    split ``images()`` evenly between the routes: test batches mix routes by design, not by
    the luck of a random gate. Its other parameters keep their random initialisation."""
    gate = DynamicGate(net.stem_channels, num_choices).double()
    with torch.no_grad():
        net.set_config(net.space.largest())
        level = net.stem(images()).mean(dim=(1, 2, 3)).sort().values  # what fc1's first row reads
        for layer in (gate.fc1, gate.fc3, gate.fc4):
            layer.weight.zero_()
            layer.bias.zero_()
        gate.fc1.weight[0] = 1 / net.stem_channels
        gate.fc1.bias[0] = 1 - level[0]  # r0 = 1 + (level - lowest): positive through the ReLU
        gate.fc3.weight[0, 0] = 1.0
        # logit k = k * r0 - (t_1 + ... + t_k): route k wins for r0 between t_k and t_k+1
        edges = [len(level) * k // num_choices for k in range(1, num_choices)]
        thresholds = [1 + (level[i - 1] + level[i]) / 2 - level[0] for i in edges]
        gate.fc4.weight[:, 0] = torch.arange(num_choices, dtype=torch.float64)
        gate.fc4.bias[1:] = -torch.tensor(thresholds, dtype=torch.float64).cumsum(0)
    return gate


def test_dynamic_output_equals_each_image_through_its_static_subnetwork():
    model = make_ddsnet()
    x = images()
    with torch.no_grad():
        routes = model.route(x)
        out = model(x)
        assert len({id(r) for r in routes}) > 1, "the test needs a batch whose images choose different configs"
        for i, route in enumerate(routes):
            static = export_static(model.supernet, route.config)
            torch.testing.assert_close(out[i : i + 1], static(x[i : i + 1]), rtol=1e-10, atol=1e-10)


def test_mixed_batch_equals_per_image_runs():
    model = make_ddsnet(lambda: SlimDnCNN(in_channels=3, base_width=8, depth=4), num_choices=3, seed=2)
    x = images(seed=3)
    with torch.no_grad():
        assert len({id(r) for r in model.route(x)}) > 1
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)


def test_choice_overrides_the_gate():
    model = make_ddsnet()
    x = images(n=5)
    choice = torch.tensor([2, 0, 1, 0, 2])
    with torch.no_grad():
        out = model(x, choice=choice)
        for i, index in enumerate(choice.tolist()):
            static = export_static(model.supernet, model.routing_space[index].config)
            torch.testing.assert_close(out[i : i + 1], static(x[i : i + 1]), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x, choice=model.gate_forward(x)[1].choice), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("choice, message", [
    (torch.tensor([0, 3]), r"choice holds \[0, 3\]; routing indices run from 0 to 2"),
    (torch.tensor([-1, 0]), "routing indices run from 0 to 2"),
    (torch.tensor([0]), r"shape \(2,\)"),
    (torch.tensor([0.0, 1.0]), "int32 or int64"),
    ([0, 1], "int32 or int64"),
])
def test_bad_choice(choice, message):
    model = make_ddsnet()
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(images(n=2), choice=choice)
    model.set_budget(float("inf"))
    with torch.no_grad(), pytest.raises(ValueError, match="dynamic mode"):
        model(images(n=2), choice=torch.tensor([0, 1]))


@pytest.mark.parametrize("attention", [False, True])
def test_an_empty_batch_gives_an_empty_output_in_every_mode(attention):
    """As the super-network (and nn.Conv2d) do; the gate, which refuses an empty input, never
    sees it."""
    model = make_ddsnet()
    model.gate.attention = attention
    x = images(n=1)[:0]
    with torch.no_grad():
        assert model(x).shape == (0, 3, *x.shape[2:]) and model.route(x) == [] and model.routed_macs(x) == []
        assert model(x, choice=torch.zeros(0, dtype=torch.int64)).shape == (0, 3, *x.shape[2:])
        with pytest.raises(ValueError, match="input has 1 channels"):
            model(x[:, :1])
        model.set_budget(float("inf"))
        assert model(x).shape == (0, 3, *x.shape[2:]) and model.route(x) == []
        if not attention:
            return  # (no AttentionSupernet over a gate whose attention is off)
        attended = dds_fast.AttentionSupernet(model.supernet, model.gate)  # (as stage 1 trains the two)
        assert attended(x).shape == (0, 3, *x.shape[2:])
        attended.set_masked_widths(torch.tensor(attended.binding_widths(model.routing_space[0].config)))
        assert attended(x).shape == (0, 3, *x.shape[2:])


def test_attention_scales_the_stem_features_the_body_reads():
    model = make_ddsnet()
    model.gate.attention = True
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)
    x = images(n=2)
    with torch.no_grad():
        padded, gate_out = model.gate_forward(x)
        index = int(gate_out.choice[0])
        config = model.routing_space[index].config
        stem = model.supernet.stem(padded)
        scaled = stem * gate_out.scale[:, :, None, None]
        model.supernet.set_config(config)
        expected = model.supernet.body(scaled[:1, : config["enc0.mid"]], padded[:1])[..., :11, :13]
        torch.testing.assert_close(model(x[:1]), expected)


def test_attention_supernet_runs_a_config_as_the_ddsnet_routes_an_image_to_it(tmp_path):
    """Stage 1's model: any config of the space behind the attention head equals the DDSNet
    (attention on) with every image routed to that config; it keeps a routing space and
    round-trips through a checkpoint; the prediction head takes no gradient."""
    model = make_ddsnet()
    model.gate.attention = True
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)
    attended = dds_fast.AttentionSupernet(model.supernet, model.gate)
    x = images(n=3)
    for index, entry in enumerate(model.routing_space):
        attended.set_config(entry.config)
        with torch.no_grad():
            expected = model(x, choice=torch.full((len(x),), index))
            torch.testing.assert_close(attended(x), expected)
    attended.set_config(model.routing_space[1].config)
    attended.train()
    attended(x).square().mean().backward()
    gate = attended.gate
    assert gate.fc1.weight.grad is not None and gate.fc2.weight.grad is not None
    assert gate.fc3.weight.grad is None and gate.fc4.weight.grad is None
    attended.routing_space = model.routing_space
    assert attended.supernet.routing_space == model.routing_space
    dds_fast.save(attended, tmp_path / "stage1.safetensors")
    loaded = dds_fast.load(tmp_path / "stage1.safetensors").double().eval()
    assert isinstance(loaded, dds_fast.AttentionSupernet) and loaded.routing_space == model.routing_space
    assert loaded.get_config() == model.routing_space[1].config
    attended.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), attended(x))
    with pytest.raises(ValueError, match="the gate reads 5 channels but the network's stem has"):
        dds_fast.AttentionSupernet(model.supernet, DynamicGate(5, 2))


def test_attention_supernet_refuses_a_gate_whose_attention_is_off():
    """Its body runs behind the attention head; with the head off a config is the super-network
    alone, so a gate switched off (when built, assigned, or since) is refused, not scaled anyway."""
    model = make_ddsnet()  # (its gate's attention is off)
    off = "AttentionSupernet: its gate's attention head is off"
    with pytest.raises(ValueError, match=off):
        dds_fast.AttentionSupernet(model.supernet, model.gate)
    model.gate.attention = True
    attended = dds_fast.AttentionSupernet(model.supernet, model.gate)
    other = DynamicGate(model.gate.channels, 2).double()
    other.attention = False
    with pytest.raises(ValueError, match=off):
        attended.gate = other
    assert attended.gate is model.gate
    model.gate.attention = False
    with pytest.raises(ValueError, match=off):
        attended(images(n=1))
    attended.set_masked_widths(torch.tensor(attended.binding_widths(model.routing_space[0].config)))
    with pytest.raises(ValueError, match=off):
        attended(images(n=1))


def test_attention_supernet_and_stem_means_leave_the_config_and_masks_as_they_were():
    model = make_ddsnet()
    model.gate.attention = True
    supernet = dds_fast.AttentionSupernet(model.supernet, model.gate)
    small = model.routing_space[0].config
    supernet.set_config(small)
    with pytest.raises(ValueError, match="means"):
        supernet(images(), stem_means=torch.zeros(6, 5, dtype=torch.float64))
    assert supernet.get_config() == small
    supernet.stem_means(images())
    assert supernet.get_config() == small
    masked = dds_fast.AttentionSupernet(make_ddsnet().supernet, model.gate)
    masked.set_masked_widths(torch.tensor(masked.binding_widths(small)))
    with torch.no_grad():
        expected = masked(images())
        means = masked.stem_means(images(), block=4)
        assert masked.masked  # set_config would have ended the masks
        torch.testing.assert_close(masked(images(), stem_means=means), expected)


@pytest.mark.parametrize("stem", [dict(dilation=2, padding=2), dict(stride=2, padding=1), dict(padding=0),
                                  dict(padding=1, padding_mode="circular")])  # (wraps to the far side)
def test_stem_means_of_a_stem_that_is_not_local_take_the_whole_image(stem):
    model = make_ddsnet(lambda: SlimDnCNN(in_channels=3, base_width=8, depth=3))
    first = model.supernet.layers[0]
    model.supernet.layers[0] = dds_fast.SlimConv2d(3, first.out_channels, 3, activation=first.activation,
                                                   **stem).double()
    x = images(n=2, size=(13, 11))
    with torch.no_grad():
        squeezed = model.supernet.stem(model.supernet.pad(x)).mean(dim=(2, 3))  # what the gate reads of it whole
    torch.testing.assert_close(model.stem_means(x, block=4), squeezed.float())


def test_static_budget_mode():
    model = make_ddsnet()
    macs = [e.macs_per_pixel for e in model.routing_space]
    entry = model.set_budget(macs[1] + 1)
    assert entry is model.routing_space[1]
    assert all(r is entry for r in model.route(images()))
    with torch.no_grad():
        out = model(images())
    torch.testing.assert_close(out, export_static(model.supernet, entry.config)(images()))
    with pytest.raises(ValueError, match="no config fits"):
        model.set_budget(macs[0] - 1)
    assert model.set_budget(None) is None


def test_a_budget_without_psnrs_takes_the_route_dearest_in_the_cost_it_fits_by():
    """With the gate's attention on, a route's static cost counts the full-width stem: a narrow
    stem's route can cost more to run than a dearer config with a full stem."""
    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    generator = torch.Generator().manual_seed(0)
    costs = {c: macs_per_pixel(net, c) for c in (net.space.sample(generator) for _ in range(300))}
    stem, full = net.stem_group, net.stem_channels
    narrow = [(m, c) for c, m in costs.items() if c[stem] < full]
    wide = [(m, c) for c, m in costs.items() if c[stem] == full]
    # a full-stem config dearer than a narrow-stem one, but cheaper than it runs behind the gate
    (cheap, narrow_config), (dear, wide_config) = next(
        (a, b) for a in narrow for b in wide if a[0] < b[0] < a[0] + 27 * (full - a[1][stem]))
    model = DDSNet(net, DynamicGate(full, 2), [RoutingEntry(narrow_config, cheap), RoutingEntry(wide_config, dear)])
    assert model.static_macs_per_pixel(0) > model.static_macs_per_pixel(1)
    model.set_budget(model.static_macs_per_pixel(0))
    assert model.budget_index == 0


def test_static_mode_checks_the_input_and_ranks_a_psnr_of_zero_above_none():
    model = make_ddsnet()
    model.set_budget(float("inf"))
    for bad in (torch.rand(3, 6, 6), torch.rand(1, 1, 6, 6)):
        with pytest.raises(ValueError, match="input"):
            model.route(bad)
        with pytest.raises(ValueError, match="input"):
            model.routed_macs(bad)
    entries = model.routing_space
    model.routing_space = [RoutingEntry(e.config, e.macs_per_pixel, psnr)
                           for e, psnr in zip(entries, [None, 0.0, None])]
    assert model.set_budget(float("inf")) is model.routing_space[1]
    for macs, psnr in ((float("nan"), None), (-5.0, None), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="RoutingEntry"):
            RoutingEntry(entries[0].config, macs, psnr)


def test_static_budget_mode_with_attention_runs_the_config_behind_the_gate():
    model = make_ddsnet()
    model.gate.attention = True
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)
    entry = model.set_budget(model.dynamic_macs_per_pixel[1])
    assert entry is model.routing_space[1]
    x = images()
    assert model.routed_macs(x) == [model.dynamic_macs_per_pixel[1]] * len(x)
    with torch.no_grad():
        static = model(x)
        model.set_budget(None)
        torch.testing.assert_close(static, model(x, choice=torch.ones(len(x), dtype=torch.long)))
        # the narrow network alone differs: its features go unscaled
        assert not torch.allclose(static, export_static(model.supernet, entry.config)(x))


def test_budget_mode_in_training_runs_the_attention_head_alone():
    """Fine-tuning a route behind the attention head must leave the prediction head's
    BatchNorm statistics alone (and take one image, which a BatchNorm in training refuses)."""
    model = make_ddsnet()
    model.gate.attention = True
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)
    model.set_budget(model.dynamic_macs_per_pixel[1])
    x = images()[:1]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    statistics = {k: v.clone() for k, v in model.gate.state_dict().items() if "bn." in k}
    got = model(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert model.gate.fc2.weight.grad is not None
    for key, value in statistics.items():
        assert torch.equal(model.gate.state_dict()[key], value), key


def test_static_budget_with_attention_counts_the_full_width_stem_the_gate_reads():
    """With attention on, static mode runs the full-width stem and the gate: the budget
    bounds that cost, as routed_macs reports it, not the config's own MACs."""
    model = make_ddsnet()
    model.gate.attention = True
    own, static = model.routing_space[1].macs_per_pixel, model.dynamic_macs_per_pixel[1]
    assert own < static
    assert model.set_budget(own) is model.routing_space[0]
    assert model.routed_macs(images())[0] == model.static_macs_per_pixel(0) <= own
    with pytest.raises(ValueError, match="full-width stem"):
        model.set_budget(model.routing_space[0].macs_per_pixel)
    model.gate.attention = False  # the narrow network alone: its own MACs
    assert model.set_budget(own) is model.routing_space[1] and model.routed_macs(images())[0] == own


def test_expected_macs_counts_the_full_width_stem():
    model = make_ddsnet()
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    stem = model.supernet.stem_conv
    smallest = model.routing_space[0]
    extra = 9 * stem.in_channels * (stem.out_channels - smallest.config["enc0.mid"])
    expected = torch.tensor([smallest.macs_per_pixel + extra,
                             (smallest.macs_per_pixel + extra + model.routing_space[2].macs_per_pixel) / 2],
                            dtype=torch.float64)
    torch.testing.assert_close(model.expected_macs(probs), expected)



def test_expected_macs_of_half_probabilities_do_not_overflow():
    """MACs/pixel of a large network exceed fp16's 65504: a half-precision gate's softmax
    still gets a finite expected cost."""
    small = make_ddsnet()
    model = DDSNet(small.supernet, small.gate, [RoutingEntry(e.config, 100 * e.macs_per_pixel)
                                                for e in small.routing_space])
    probs = torch.tensor([[0.0, 0.5, 0.5]])
    expected = model.expected_macs(probs.double())
    got = model.expected_macs(probs.half())
    assert torch.isfinite(got).all() and expected.item() > 65504
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=0)

def test_checkpoint_round_trip(tmp_path):
    model = make_ddsnet().float()
    path = dds_fast.save(model, tmp_path / "dds.safetensors")
    loaded = dds_fast.load(path).eval()
    assert type(loaded) is DDSNet and loaded.gate.attention is False
    assert loaded.routing_space == model.routing_space
    x = images().float()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_ddsnet_and_attention_supernet_record_the_gate_and_supernet_alike(tmp_path):
    model = make_ddsnet().float()
    gate = model.gate
    gate.attention = True
    assert DynamicGate(**gate.arch_args).arch_args == gate.arch_args == {
        "channels": gate.channels, "num_choices": gate.num_choices, "reduction": gate.reduction, "hidden": gate.hidden}
    attended = dds_fast.AttentionSupernet(model.supernet, gate)
    assert {k: model.arch_args[k] for k in ("supernet", "gate")} == attended.arch_args
    assert model.receptive_radius == attended.receptive_radius == model.supernet.receptive_radius
    unknown = {"arch": "Conv2d", "args": {}}
    with pytest.raises(ValueError, match="DDSNet: unknown super-network architecture 'Conv2d'"):
        DDSNet.from_arch_args(**{**model.arch_args, "supernet": unknown})
    with pytest.raises(ValueError, match="AttentionSupernet: unknown super-network architecture 'Conv2d'"):
        dds_fast.AttentionSupernet.from_arch_args(**{**attended.arch_args, "supernet": unknown})



def test_a_new_routing_space_replaces_what_was_derived_from_the_old_one():
    """Reassigning ``routing_space`` (to record new PSNRs, or reorder the routes) is checked
    like the constructor's, and the costs, the budget and the device width tables follow it."""
    model = make_ddsnet()
    x = images()
    with torch.no_grad():
        before = model(x)
    model.set_budget(float("inf"))
    reordered = list(reversed(model.routing_space))
    model.routing_space = reordered
    assert model.routing_space == tuple(reordered) and model.budget_index is None  # back to dynamic mode
    fresh = DDSNet(model.supernet, model.gate, reordered)
    assert model.dynamic_macs_per_pixel == fresh.dynamic_macs_per_pixel
    routes = model.route(x)
    assert model.routed_macs(x) == [fresh.dynamic_macs_per_pixel[reordered.index(r)] for r in routes]
    with torch.no_grad():
        # the gate's choices are the same indices, which now name other configs
        assert not torch.allclose(model(x), before)
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="chooses among 3 sub-networks but the routing space has 2"):
        model.routing_space = reordered[:2]
    other = SlimDnCNN(in_channels=3, base_width=8, depth=3)
    with pytest.raises(ValueError, match="missing"):
        model.routing_space = [RoutingEntry(other.space.largest(), 1.0)] * 3
    assert model.routing_space == tuple(reordered)


def test_per_image_width_tables_follow_a_new_routing_space():
    pytest.importorskip("triton")
    model = make_ddsnet(lambda: SlimDnCNN(in_channels=3, base_width=8, depth=3), seed=4).float().to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    model.per_image = True
    x = images(n=2, size=(8, 8), seed=5).float().to(DEVICE)
    choice = torch.tensor([0, 2], device=DEVICE)
    with torch.no_grad():
        model(x, choice=choice)  # builds the width table of the first routing space
        old_table = weakref.ref(model._width_table(x.device)[0])
        model.routing_space = list(reversed(model.routing_space))
        # a CUDA graph captured before reads the old table: it must not be freed for reuse (no
        # graph holds a CPU one)
        gc.collect()
        assert (old_table() is not None) == (DEVICE == "cuda")
        per_image = model(x, choice=choice)
        model.per_image = False
        grouped = model(x, choice=choice)
    torch.testing.assert_close(per_image, grouped, rtol=1e-4, atol=1e-5)

def test_bad_construction():
    net = SlimUNet(in_channels=3, base_width=8, depth=3)
    route = [RoutingEntry(net.space.smallest(), 1.0), RoutingEntry(net.space.largest(), 2.0)]
    with pytest.raises(ValueError, match="gate reads 7 channels but the network's stem has 16"):
        DDSNet(net, DynamicGate(7, 2), route)
    with pytest.raises(ValueError, match="empty"):
        DDSNet(net, DynamicGate(16, 2), [])
    with pytest.raises(ValueError, match="chooses among 3 sub-networks but the routing space has 2"):
        DDSNet(net, DynamicGate(16, 3), route)
    other = SlimDnCNN(in_channels=3, base_width=8, depth=3)
    with pytest.raises(ValueError, match="missing"):
        DDSNet(net, DynamicGate(16, 2), [RoutingEntry(other.space.largest(), 1.0)] * 2)
    with pytest.raises(ValueError, match="must be a SlimNet"):
        DDSNet(torch.nn.Conv2d(3, 3, 1), DynamicGate(16, 2), route)
    with pytest.raises(ValueError, match="gate must be a DynamicGate, got NoneType"):
        DDSNet(net, None, route)
    with pytest.raises(ValueError, match="AttentionSupernet: gate must be a DynamicGate"):
        dds_fast.AttentionSupernet(net, None)
    for entries in ([e.config for e in route], None, [e.to_dict() for e in route]):
        with pytest.raises(ValueError, match="routing space must be a sequence of RoutingEntry"):
            DDSNet(net, DynamicGate(16, 2), entries)
    model = DDSNet(net, DynamicGate(16, 2), route)
    for budget in ("abc", [1e9], float("nan"), True, torch.tensor(True), torch.tensor(1e9 + 0j)):
        with pytest.raises(ValueError, match="the budget must be a number of MACs/pixel or None"):
            model.set_budget(budget)
    for budget in (torch.tensor(10 ** 12), torch.tensor([1e12])):  # a budget computed on tensors, any real dtype
        assert model.set_budget(budget) == model.set_budget(1e12)
    model.set_budget(None)
    for index in (2, -3, 1.0):
        with pytest.raises(ValueError, match="index must be a routing index from 0 to 1"):
            model.static_macs_per_pixel(index)
    with pytest.raises(ValueError, match=r"probs must be \[N, 2\]"):
        model.expected_macs(torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"call .eval\(\) on the model for inference"):
        model.train()(torch.rand(1, 3, 8, 8))  # the gate's BatchNorm, training, on one image


@pytest.mark.parametrize("make_net,attention", [(lambda: SlimUNet(in_channels=3, base_width=8, depth=2), False),
                                                (lambda: SlimUNet(in_channels=3, base_width=8, depth=2), True),
                                                (lambda: SlimDnCNN(in_channels=3, base_width=8, depth=3), False)])
def test_per_image_widths_on_the_kernels_equal_grouped_routing(make_net, attention):
    """One launch per layer with per-image widths (Triton, under the interpreter on CPU) against
    the reference grouping; the inactive channels of each buffer hold whatever was there. The
    gate runs on its fused kernels, with its attention scale on or off."""
    pytest.importorskip("triton")
    model = make_ddsnet(make_net, num_choices=3, seed=4).float().to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    model.gate.backend = "triton"
    model.gate.attention = attention
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)
    x = images(n=4, size=(8, 8), seed=5).float().to(DEVICE)
    choice = torch.tensor([1, 2, 0, 1], device=DEVICE)
    with torch.no_grad():
        assert len({id(r) for r in model.route(x)}) > 1
        model.per_image = False
        grouped, grouped_chosen = model(x), model(x, choice=choice)
        model.per_image = True
        per_image, per_image_chosen = model(x), model(x, choice=choice)
        # tiles sized for each layer's narrowest route: the same output
        model.per_image_tiles = "narrowest"
        narrow_tiles = model(x, choice=choice)
    torch.testing.assert_close(per_image, grouped, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(per_image_chosen, grouped_chosen, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(narrow_tiles, grouped_chosen, rtol=1e-4, atol=1e-5)
    convs = [m for m in model.modules() if isinstance(m, dds_fast.SlimConv2d)]
    assert all(m.per_image_widths is None and m.per_image_tile_widths is None for m in convs)
    layers = model._width_table(x.device)[1]
    # widths in steps of 8 are promised to the kernels (vector loads), each side apart: the
    # 3-channel output's inputs keep theirs, and an upsampling conv's out widths (4 filters a
    # channel) promise 32
    assert {m_in for _, _, (_, m_in), _ in layers} == {8}
    upsampling = any(conv.upscale_factor > 1 for conv, _, _, _ in layers)
    assert {m_out for _, _, (m_out, _), _ in layers} == ({3, 8, 32} if upsampling else {3, 8})
    smallest = model.routing_space[0].config
    model.supernet.set_config(smallest)
    for conv, _, _, (out, red) in layers:  # the smallest route is every layer's narrowest here
        assert out == (conv.active_out_channels or conv.out_channels)
    model.per_image_tiles = "smallest"
    with pytest.raises(ValueError, match="per_image_tiles must be one of"), torch.no_grad():
        model(x)


@dds_fast.register_architecture
class BodyKindNet(dds_fast.SlimNet):
    """A user's super-network whose body the per-image path gives one row of widths per layer:
    ``kind`` 'twice' runs a conv twice at the same widths (it can), 'twice_narrower' twice at
    other widths, 'plain' holds an nn.Conv2d, 'some_routes' runs a layer a second time but in
    the narrowest route (on max-width buffers it would run it in every route; they cannot)."""

    def __init__(self, kind="twice", width_mult=1.0, min_ratio=0.25, divisor=4):
        super().__init__(3, 3, dict(kind=kind, width_mult=width_mult, min_ratio=min_ratio, divisor=divisor))
        self.kind = kind
        feat = self._group("feat", 16)
        self.first = self._bind(dds_fast.SlimConv2d(3, feat, 3, padding=1, activation="relu"), "feat")
        self.mid = self._bind(dds_fast.SlimConv2d(feat, feat, 3, padding=1, activation="relu"), "feat")
        self.last = dds_fast.SlimConv2d(feat, 3, 3, padding=1)
        self.plain = torch.nn.Conv2d(3, 3, 1)
        self._finish()

    @property
    def stem_conv(self):
        return self.first

    @property
    def receptive_radius(self):
        return 4

    def body(self, features, x):
        h = self.mid(features)
        if self.kind == "twice":
            h = self.mid(h)
        elif self.kind == "twice_narrower":
            h = self.mid(h[:, :4])
        elif self.kind == "some_routes" and h.shape[1] > 4:
            h = self.mid(h)
        residual = self.plain(x) if self.kind == "plain" else x
        return self.last(h, residual=residual)


@pytest.mark.parametrize("kind,refusal", [
    ("twice", None),
    ("twice_narrower", r"its layer mid runs more than once in a forward, at widths \(8, 8\) and \(8, 4\)"),
    ("plain", "its layer plain is a Conv2d, not a SlimConv2d"),
    ("some_routes", r"its body runs other layers, or as many times, in route 1 as in route 0 \(3 convs against 2"),
])
def test_per_image_widths_of_a_body_that_runs_a_layer_twice_or_holds_a_plain_conv(kind, refusal):
    """The per-image path gives each layer one row of widths per image: a layer run twice in a
    forward took route 0's second call's row for route 1 (uninitialised channels, silently), a
    plain conv failed with an AttributeError, and a body whose layers depend on the width ran
    the widest route's layers for every image. It runs a layer twice at one set of widths, and
    refuses by name what it cannot run (grouping the batch when it chooses for itself)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    net = BodyKindNet(kind)
    configs = [net.space.smallest(), net.space.uniform(0.5), net.space.largest()]
    model = DDSNet(net, DynamicGate(net.stem_channels, 3), [RoutingEntry(c, macs_per_pixel(net, c))
                                                            for c in configs]).eval().to(DEVICE)
    on_kernels(model)
    x = images(n=3, size=(8, 8)).float().to(DEVICE)
    choice = torch.tensor([0, 1, 2], device=DEVICE)
    with torch.no_grad():
        model.per_image = False
        grouped = model(x, choice=choice)
        model.per_image = True
        if refusal is None:
            torch.testing.assert_close(model(x, choice=choice), grouped, rtol=1e-4, atol=1e-5)
        else:
            with pytest.raises(ValueError, match=f"per_image=True, but .*{refusal}"):
                model(x, choice=choice)
            model.per_image = None  # its own choice: the batch grouped by route
            torch.testing.assert_close(model(x, choice=choice), grouped)
        reference = copy.deepcopy(model.supernet).cpu().double()
        for module in reference.modules():
            if isinstance(module, dds_fast.SlimConv2d):
                module.backend = "torch"
        expected = []
        for i, k in enumerate(choice.tolist()):
            reference.set_config(configs[k])
            expected.append(reference(x[i:i + 1].cpu().double()))
        expected = torch.cat(expected)
    torch.testing.assert_close(grouped.cpu().double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_net", [lambda: SlimUNet(in_channels=3, base_width=8, depth=2),
                                      lambda: SlimDnCNN(in_channels=3, base_width=8, depth=3)])
def test_packed_per_image_buffers_change_nothing_but_the_layout(monkeypatch, make_net):
    """The per-image forward stores each layer's output packed (every image at its own width's
    pitch) and reads it back so: the output is bitwise that of max-width buffers. Not packed
    under a dispatch mode (FlopCounterMode), nor for a network that does not allow it."""
    pytest.importorskip("triton")
    from dds_fast.kernels import conv2d as K
    model = make_ddsnet(make_net, num_choices=3, seed=6).float().to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    model.per_image = True
    x = images(n=3, size=(8, 8), seed=7).float().to(DEVICE)
    choice = torch.tensor([0, 2, 1], device=DEVICE)
    packed_calls = []
    launch = K.slim_conv2d

    def spy(*args, packed_inputs=(), packed_output=False, **kwargs):
        packed_calls.append((tuple(packed_inputs), packed_output))
        return launch(*args, packed_inputs=packed_inputs, packed_output=packed_output, **kwargs)

    with torch.no_grad():
        model(x, choice=choice)  # builds the width table (which traces every route) first
    monkeypatch.setattr(K, "slim_conv2d", spy)
    monkeypatch.setattr(slim_conv, "_CHECKED_CALLS", {})  # no layer repeats a checked call unseen
    with torch.no_grad():
        packed = model(x, choice=choice)
        body_convs = len(model._width_table(x.device)[1])
        # every body conv stores packed (the stem, for the gate, does not); all but the first
        # read packed (the first reads the stem's dense output)
        assert sum(out for _, out in packed_calls) == body_convs == len(packed_calls) - 1
        assert sum(any(flags) for flags, _ in packed_calls) == body_convs - 1
        packed_calls.clear()
        other = images(n=3, size=(8, 8), seed=8).float().to(DEVICE)
        # every body layer repeats its checked call, packing as it did (the stem, which leaves the
        # gate its channel sums, makes its full call)
        repeated = model(other, choice=choice)
        assert packed_calls == [((), False)]
        model.packed_buffers = False
        monkeypatch.setattr(slim_conv, "_CHECKED_CALLS", {})
        assert torch.equal(repeated, model(other, choice=choice))
        model.packed_buffers = True
        monkeypatch.setattr(slim_conv, "_CHECKED_CALLS", {})
        packed_calls.clear()
        model.packed_buffers = False
        packed_calls.clear()
        dense = model(x, choice=choice)
        assert not any(out or any(flags) for flags, out in packed_calls)
        model.packed_buffers = True
        packed_calls.clear()
        with FlopCounterMode(display=False):
            counted = model(x, choice=choice)
        assert not any(out or any(flags) for flags, out in packed_calls)
        monkeypatch.setattr(type(model.supernet), "packs_per_image_buffers", False)
        packed_calls.clear()
        unpackable = model(x, choice=choice)
        assert not any(out or any(flags) for flags, out in packed_calls)
    assert torch.equal(packed, dense) and torch.equal(packed, counted) and torch.equal(packed, unpackable)


def test_forward_hooks_on_the_body_see_its_real_outputs_and_no_hidden_forwards():
    """A hook on a body layer gets the dense output, not a packed buffer whose shape does not
    describe it: a hook that returns a copy changes nothing. The width table's tracing, on the
    first per-image forward, does not reach the hook."""
    pytest.importorskip("triton")
    model = make_ddsnet(lambda: SlimDnCNN(in_channels=3, base_width=8, depth=4), num_choices=3, seed=6).float()
    model = model.to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    x = images(n=3, size=(6, 6), seed=7).float().to(DEVICE)
    choice = torch.tensor([0, 2, 1], device=DEVICE)
    seen = []
    handle = model.supernet.layers[1].register_forward_hook(lambda m, args, out: seen.append(out) or out * 1.0)
    with torch.no_grad():
        model.per_image = True
        hooked = model(x, choice=choice)
        assert len(seen) == 1, "the width table's tracing ran the user's hook"
        model.per_image = False
        seen.clear()
        grouped = model(x, choice=choice)
        handle.remove()
        model.per_image = True
        plain = model(x, choice=choice)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hooked, grouped, rtol=1e-4, atol=1e-5)


def test_macs_counting_does_not_run_the_users_hooks():
    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    calls = []
    net.register_forward_hook(lambda *args: calls.append("net"))
    net.stem_conv.register_forward_pre_hook(lambda *args: calls.append("stem"))
    macs_per_pixel(net)
    export_static(net)
    assert calls == []
    net(torch.rand(1, 3, 8, 8))
    assert calls == ["stem", "net"]  # set back as they were


def test_macs_and_flops_of_a_per_image_forward_count_each_image_s_route():
    """A per-image forward's layers read max-width buffers: counting by their shapes gave
    the largest route's MACs; the count reads each image's widths. A FlopCounterMode around
    the first per-image forward did not count its width table's traces either."""
    pytest.importorskip("triton")
    model = make_ddsnet().float()
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the count's input
    with torch.no_grad():
        assert model.route(x)[0] != model.routing_space[-1]
        routed = model.routed_macs(x)[0]
        for per_image in (False, True):
            model.per_image = per_image
            assert macs_per_pixel(model, input_shape=(3, 8, 8)) == routed
    fresh = make_ddsnet().float()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        macs_per_pixel(fresh)  # a count is not a forward of the caller's
    assert counter.get_total_flops() == 0


def test_repr_shows_the_routes_and_the_mode():
    model = make_ddsnet()
    macs = [e.macs_per_pixel for e in model.routing_space]
    assert f"3 routes of {macs[0]:,.0f} to {macs[-1]:,.0f} MACs/pixel, dynamic" in repr(model)
    model.set_budget(float("inf"))
    assert "budget: route 2" in repr(model)


def test_the_routing_space_is_read_only_but_for_its_setter():
    model = make_ddsnet()
    routes = model.routing_space
    with pytest.raises(TypeError):
        routes[0] = routes[2]
    with pytest.raises(AttributeError):
        routes.append(routes[0])
    assert list(routes) == list(model.routing_space)


def test_a_new_gate_or_supernet_is_checked_against_the_routing_space():
    model = make_ddsnet()
    with pytest.raises(ValueError, match="chooses among 5 sub-networks but the routing space has 3"):
        model.gate = DynamicGate(model.supernet.stem_channels, 5)
    with pytest.raises(ValueError, match="gate reads 7 channels"):
        model.gate = DynamicGate(7, 3)
    with pytest.raises(ValueError, match="missing"):
        model.supernet = SlimDnCNN(in_channels=3, base_width=8, depth=3)
    x = images()
    with torch.no_grad():
        before = model(x)
        model.gate = copy.deepcopy(model.gate)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        twin = copy.deepcopy(model.supernet)
        model.supernet = twin
        assert model.supernet is twin
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        model.supernet = SlimUNet(in_channels=1, base_width=8, depth=3).double()  # the same groups, gray
        assert model.in_channels == 1 and model(x[:, :1]).shape == x[:, :1].shape


def test_a_network_that_rewrites_the_body_must_declare_packing_again():
    """A subclass body may hand an intermediate to a torch op, which would read a packed buffer
    wrong: overriding ``body`` turns packing off unless the subclass declares it again."""
    class Scaled(SlimDnCNN):
        def body(self, features, x):
            return super().body(features * 0.5, x)

    class Declared(Scaled):
        packs_per_image_buffers = True

    class Same(SlimUNet):
        pass

    assert SlimDnCNN.packs_per_image_buffers and SlimUNet.packs_per_image_buffers
    assert not Scaled.packs_per_image_buffers and Declared.packs_per_image_buffers
    assert Same.packs_per_image_buffers


def test_a_packed_buffer_is_refused_as_a_residual():
    pytest.importorskip("triton")
    from dds_fast.slim_conv import PackedBuffers
    conv = dds_fast.SlimConv2d(8, 8, 3, padding=1, backend="triton").to(DEVICE)
    x = torch.randn(2, 8, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 8, 4, 4, device=DEVICE)
    conv.per_image_widths = torch.full((2, 2), 8, dtype=torch.int32, device=DEVICE)
    conv.per_image_packing = PackedBuffers()
    conv.per_image_packing.add(residual)
    with torch.no_grad(), pytest.raises(ValueError, match="packed per-image buffer cannot be a residual"):
        conv(x, residual=residual)


def test_per_image_widths_of_a_unet_in_steps_of_6():
    """Widths in steps of 6: an upsampling conv's per-image widths share no multiple of 4 with
    its inputs' (only its out widths, whole shuffled channels, are multiples of 4)."""
    pytest.importorskip("triton")
    model = make_ddsnet(lambda: SlimUNet(in_channels=3, base_width=8, depth=2, divisor=6), seed=4).float().to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    x = images(n=4, size=(8, 8), seed=5).float().to(DEVICE)
    choice = torch.tensor([1, 2, 0, 1], device=DEVICE)
    with torch.no_grad():
        model.per_image = False
        grouped = model(x, choice=choice)
        model.per_image = True
        per_image = model(x, choice=choice)
    torch.testing.assert_close(per_image, grouped, rtol=1e-4, atol=1e-5)


def attended_body_on_kernels() -> DDSNet:
    """A small DDSNet whose body runs on the kernels behind a trained-looking attention scale
    (its gate's backend is left to the test)."""
    model = make_ddsnet(lambda: SlimUNet(in_channels=3, base_width=8, depth=2), seed=4).float().to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    model.gate.attention = True
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)
    return model


def test_the_fused_gate_reads_the_channel_sums_of_the_stems_epilogue(monkeypatch):
    pytest.importorskip("triton")
    from dds_fast.kernels import gate as gate_kernels

    model = attended_body_on_kernels()
    model.per_image = False
    x = images(n=4, size=(8, 8), seed=5).float().to(DEVICE)
    with torch.no_grad():
        model.gate.backend = "torch"
        expected, expected_routes = model(x), model.route(x)
        model.gate.backend = "triton"

        def no_squeeze(*args, **kwargs):
            raise AssertionError("the gate squeezed the stem output again")

        monkeypatch.setattr(gate_kernels, "squeeze_partials", no_squeeze)
        got, routes = model(x), model.route(x)
    assert routes == expected_routes and len({id(r) for r in routes}) > 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert model.supernet.stem_conv.channel_sums is None and not model.supernet.stem_conv.emit_channel_sums


@pytest.mark.parametrize("hook", ["stem output changed in place", "gate handed another tensor"])
def test_the_fused_gate_squeezes_what_it_reads_behind_hooks(hook):
    """The stem epilogue's channel sums describe the conv's output as it stored it: a hook that
    changes it in place, or hands the gate another tensor, leaves them stale, so the fused
    gate squeezes what it reads, as the reference gate does."""
    pytest.importorskip("triton")
    model = attended_body_on_kernels()
    torch.nn.init.normal_(model.gate.fc1.weight, std=1.0)
    model.per_image = False
    if hook == "stem output changed in place":
        model.supernet.stem_conv.register_forward_hook(lambda module, args, out: out.mul_(-2).add_(1))
    else:
        model.gate.register_forward_pre_hook(lambda module, args: (args[0] * -2 + 1,))
    x = images(n=4, size=(8, 8), seed=5).float().to(DEVICE)
    with torch.no_grad():
        model.gate.backend = "torch"
        expected, expected_logits = model(x), model.gate_forward(x)[1].logits
        model.gate.backend = "triton"
        got, logits = model(x), model.gate_forward(x)[1].logits
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_layer_replaced_in_the_super_network_is_the_one_the_per_image_path_runs():
    """The per-image width tables name the layers they were built for: after a layer of the
    super-network is replaced (or one added), the next dynamic forward builds them again."""
    pytest.importorskip("triton")
    model = on_kernels(make_ddsnet(lambda: SlimUNet(in_channels=3, base_width=8, depth=2), seed=4)).float()
    model.to(DEVICE).per_image = True
    x, choice = images(n=3, size=(8, 8), seed=5).float().to(DEVICE), torch.tensor([0, 2, 1], device=DEVICE)
    with torch.no_grad():
        model(x, choice=choice)  # tables built for the layers as they are
        old = model.supernet.last
        new = dds_fast.SlimConv2d(old.in_channels, old.out_channels, 3, padding=1, backend="triton").to(DEVICE)
        new.load_state_dict({name: t * 1.5 for name, t in old.state_dict().items()})
        model.supernet.last = new
        got = model(x, choice=choice)
        model.per_image = False
        expected = model(x, choice=choice)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert any(conv is new for conv, _, _, _ in model._width_table(x.device)[1])
    assert new in model._body_modules and old not in model._body_modules


def test_a_layer_replaced_in_the_super_network_runs_each_routes_width():
    model = make_ddsnet(lambda: SlimDnCNN(in_channels=3, base_width=8, depth=4), seed=2)
    x, choice = images(n=3, seed=3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        expected = model(x, choice=choice)
        old = model.supernet.layers[1]
        new = dds_fast.SlimConv2d(old.in_channels, old.out_channels, 3, padding=1, activation=old.activation,
                                  negative_slope=old.negative_slope).double()
        new.load_state_dict(old.state_dict())
        model.supernet.layers[1] = new
        torch.testing.assert_close(model(x, choice=choice), expected, rtol=0, atol=0)


def test_per_image_widths_need_the_triton_backend():
    model = make_ddsnet()
    model.per_image = True
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "torch"
    with torch.no_grad(), pytest.raises(ValueError, match="per-image widths need the Triton backend"):
        model(images(n=2))


def on_kernels(model):
    for module in model.modules():
        if isinstance(module, (dds_fast.SlimConv2d, DynamicGate)):
            module.backend = "triton"
    return model


class RecordingGraph:
    """Stands in for the CUDA graph being captured: records each conditional node's predicate
    as it stands, and a copy of ``out`` as each branch closes. On the CPU nothing skips a
    branch, so every branch runs."""

    def __init__(self, out=None):
        self.out, self.flags, self.closed, self.open = out, [], [], 0

    def begin_capture_to_if_node(self, flag):
        assert self.open == 0 and flag.dim() == 0 and flag.dtype == torch.bool  # flat, scalar bool predicates
        self.flags.append(bool(flag))
        self.open += 1

    def end_capture_to_conditional_node(self):
        self.open -= 1
        self.closed.append(None if self.out is None else self.out.clone())


def branch_model(**kwargs):
    """A DDSNet whose largest route comes first (no branch leaves full widths behind) and a
    copy of it on torch's convs, grouping the batch by route: the reference."""
    model = make_ddsnet(lambda: SlimUNet(in_channels=3, base_width=8, depth=2), seed=4, **kwargs).float().to(DEVICE)
    model.routing_space = model.routing_space[::-1]
    reference = copy.deepcopy(model)
    reference.per_image = False
    return on_kernels(model), reference


@pytest.mark.parametrize("choice", [[1, 2, 0, 1], [2, 2], [0]])
def test_route_branches_run_each_route_static_and_a_mixed_batch_per_image(choice):
    """The conditional nodes' bodies and predicates (CUDA's skipping of the untaken branches is
    the GPU test's): the per-image body, taken when no route holds the whole batch, and one
    static body per route, taken when every image chose it; each writes the one output."""
    pytest.importorskip("triton")
    model, reference = branch_model()
    x = images(n=len(choice), size=(8, 8), seed=5).float().to(DEVICE).contiguous(memory_format=torch.channels_last)
    choice = torch.tensor(choice, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        padded, gate_out = model.gate_forward(x)
        graph = RecordingGraph(torch.full_like(padded, float("nan")))
        out = model._body_branches(gate_out.features, padded, choice, graph, graph.out)
        expected = [reference(x, choice=choice)] * (len(choice) > 1) + [
            reference(x, choice=torch.full_like(choice, k)) for k in range(3)]
    uniform = [bool((choice == k).all()) for k in range(3)]
    assert out is graph.out and graph.open == 0
    assert graph.flags == [not any(uniform)] * (len(choice) > 1) + uniform
    assert len(graph.closed) == len(expected)
    for written, want in zip(graph.closed, expected):
        torch.testing.assert_close(written, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("choice", [[3, 1], [3, 3], [-1], [2 ** 32 + 1, -(2 ** 32) + 2]])
def test_a_choice_that_cannot_be_checked_gives_nan_to_images_out_of_range(monkeypatch, choice):
    """A caller's choice on the device during a capture cannot be read: an index out of range
    must not reach the width table's gather (a device fault); its image comes out NaN, an
    int64 one too, which the cast to int32 would wrap into range."""
    pytest.importorskip("triton")
    model, reference = branch_model()
    model.per_image = True
    monkeypatch.setattr(model, "_choice_values_readable", lambda choice: False)
    x = images(n=len(choice), size=(8, 8), seed=5).float().to(DEVICE)
    with torch.no_grad():
        out = model(x, choice=torch.tensor(choice, device=DEVICE))
    for row, index in enumerate(choice):
        if 0 <= index < 3:
            torch.testing.assert_close(out[row:row + 1], reference(x[row:row + 1], choice=torch.tensor([index])),
                                       rtol=1e-4, atol=1e-5)
        else:
            assert out[row].isnan().all()


def test_route_branches_under_autocast_cast_their_own_weights():
    """Only the chosen branch runs at replay: a weight cast that autocast cached while one
    branch was captured must not be read by another, whose replay would find it unwritten.
    Each branch holds every cast its route makes when it runs alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _ = branch_model()
    for module in model.supernet.modules():
        module.backend = "torch"  # cuDNN's convs, which autocast feeds cast weights
    names = {id(p): name for name, p in model.supernet.named_parameters()}

    class WeightCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and id(args[0]) in names:
                self.names.add(names[id(args[0])])
            return func(*args, **(kwargs or {}))

    class CastsPerBranch(RecordingGraph):
        def begin_capture_to_if_node(self, flag):
            super().begin_capture_to_if_node(flag)
            self.mode = WeightCasts().__enter__()

        def end_capture_to_conditional_node(self):
            self.mode.__exit__(None, None, None)
            self.closed.append(self.mode.names)
            self.open -= 1

    x = images(n=1, size=(8, 8), seed=5).float().to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        padded, gate_out = model.gate_forward(x)
        graph = CastsPerBranch()
        model._body_branches(gate_out.features, padded, torch.tensor([0], device=DEVICE), graph,
                             torch.empty_like(padded, dtype=torch.bfloat16))
    alone = []
    for index in range(len(model.routing_space)):
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            padded, gate_out = model.gate_forward(x)  # the stem's casts: in the parent graph, always run
            with WeightCasts() as casts:
                model._route_body(index, gate_out.features, padded)
        alone.append(casts.names)
    # (a later route reads full-width weights that the largest, first, cast too)
    assert alone[1] & alone[0] and graph.closed == alone


def test_a_captured_forward_takes_the_branches_after_a_warm_up(monkeypatch):
    """forward's dispatch, with the capture faked: the warm-up outside it records the output's
    dtype and layout; inside it, the branches write an output of that kind; a capture with
    an input the warm-up did not see is refused."""
    pytest.importorskip("triton")
    model, reference = branch_model()
    for module in model.supernet.modules():
        module.backend = "torch"
    model.route_branches = True
    monkeypatch.setattr(model, "_takes_branches", lambda padded, per_image: True)
    x = images(n=1, size=(8, 8), seed=5).float().to(DEVICE)
    graph, capturing = RecordingGraph(), []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: bool(capturing))
    monkeypatch.setattr(dds_fast.ddsnet, "capturing_graph", lambda device: graph)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(eager, reference(x))
        # the layout a SlimNet pads into: channels_last on a CPU; on a GPU with torch's convs, NCHW
        layout = torch.channels_last if DEVICE == "cpu" else torch.contiguous_format
        assert list(model._warmed_branches.values()) == [(torch.float32, layout, (1, 3, 8, 8))]
        capturing.append(True)
        captured = model(x)
        chosen = [e.config for e in reference.routing_space].index(reference.route(x)[0].config)
        assert graph.flags == [k == chosen for k in range(3)]  # the gate's choice: no branch for a bad index
        # every branch ran on the CPU, the last route's last
        torch.testing.assert_close(captured, reference(x, choice=torch.tensor([2])), rtol=1e-5, atol=1e-6)
        assert captured.dtype == eager.dtype and captured.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(ValueError, match="run one forward with them outside the capture first"):
            model(images(n=1, size=(12, 8), seed=5).float().to(DEVICE))


def test_route_branches_apply_to_captures_that_can_hold_them(monkeypatch):
    class OnCuda:  # what _takes_branches reads of the padded input
        is_cuda = True

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    monkeypatch.setattr(dds_fast.ddsnet, "conditional_graph_nodes", lambda: True)
    model = make_ddsnet()
    assert not model._takes_branches(OnCuda(1), per_image=True)  # off by default
    model.route_branches = True
    with torch.no_grad():
        assert model._takes_branches(OnCuda(4), per_image=True)
        assert not model._takes_branches(OnCuda(4), per_image=False)  # a mixed batch would need a host sync
        assert model._takes_branches(OnCuda(1), per_image=False)  # one image: its route's static body
        x = images(n=3)
        assert not model._takes_branches(x, per_image=True)  # CPU tensors
        branched = model(x)
        model.route_branches = False
        torch.testing.assert_close(branched, model(x), rtol=0, atol=0)
    model.route_branches = True
    assert not model._takes_branches(OnCuda(1), per_image=True)  # gradients: no capture
    assert not model._warmed_branches


def test_route_branches_warm_every_route_once_per_input_signature(monkeypatch):
    pytest.importorskip("triton")
    # on the device a capture runs on: a GPU's, or the CPU's under the interpreter
    model = make_ddsnet().float().to(DEVICE)
    ran = []
    route_body = model._route_body
    monkeypatch.setattr(model, "_route_body", lambda index, *a: ran.append(index) or route_body(index, *a))
    with torch.no_grad():
        for size, backend in (((8, 8), "auto"), ((8, 8), "auto"), ((12, 8), "auto"), ((12, 8), "torch")):
            model.supernet.stem_conv.backend = backend
            padded, gate_out = model.gate_forward(images(n=2, size=size).float().to(DEVICE))
            model._warm_branches(gate_out.features, padded, gate_out.choice)
    assert ran == [0, 1, 2] * 3
    # the latest signatures are remembered, so that an input seen just before a capture is
    monkeypatch.setattr(dds_fast.ddsnet, "WARMED_BRANCH_KEYS", 2)
    model.supernet.stem_conv.backend = "auto"
    ran.clear()
    with torch.no_grad():
        for size in ((8, 8), (16, 8), (8, 8), (20, 8), (8, 8), (16, 8)):
            padded, gate_out = model.gate_forward(images(n=2, size=size).float().to(DEVICE))
            model._warm_branches(gate_out.features, padded, gate_out.choice)
    assert ran == [0, 1, 2] * 3  # (16, 8), (20, 8) and (16, 8) again: (8, 8) stayed among the latest two
    assert len(model._warmed_branches) == 2


@pytest.mark.skipif(not torch.cuda.is_available() or not conditional_graph_nodes(),
                    reason="CUDA-graph conditional nodes need a GPU and torch built with CUDA 12.4+")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_route_branches_replay_the_chosen_route(backend):
    """One graph with a conditional node per route: each replay with other choices equals the
    grouped reference. cuDNN convs (no per-image kernels) can be captured at batch 1."""
    model = make_ddsnet(num_choices=3, seed=0).float().cuda()
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = backend
    model.route_branches = True
    batch = 4 if backend == "triton" else 1
    choices = [[k] * batch for k in range(3)] + ([[1, 2, 0, 1]] if batch > 1 else [])
    inputs = [images(n=batch, size=(16, 16), seed=seed).float().cuda() for seed in (5, 6)]
    with torch.no_grad():
        static_x, static_choice = inputs[0].clone(), torch.zeros(batch, dtype=torch.int32, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream: every route's kernels
            for _ in range(2):
                model(static_x, choice=static_choice)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x, choice=static_choice)
        for x in inputs:
            for choice in choices:
                static_x.copy_(x)
                static_choice.copy_(torch.tensor(choice))
                static_out.fill_(float("nan"))
                graph.replay()
                model.per_image = False
                expected = model(x, choice=torch.tensor(choice, device="cuda"))
                model.per_image = None
                torch.testing.assert_close(static_out, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("route_branches", [False, True])
def test_one_cuda_graph_replays_inputs_that_choose_other_configs(route_branches):
    model = make_ddsnet(num_choices=3, seed=0).float().cuda()
    model.route_branches = route_branches
    with torch.no_grad():
        # one batch per distinct routing among the candidates: the brightness scale moves the
        # gate's choices, which the seed alone barely does
        by_route = {}
        for seed in (5, 6, 7, 8):
            for scale in (0.3, 1.0, 3.0):
                x = images(n=4, size=(16, 16), seed=seed).float().cuda() * scale
                by_route.setdefault(tuple(id(r) for r in model.route(x)), x)
        assert len(by_route) > 1, "the test needs batches that route differently"
        batches = list(by_route.values())
        static_x = batches[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream: compiles kernels, builds tables
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for x in batches:
            static_x.copy_(x)
            graph.replay()
            model.per_image = False
            expected = model(x)
            model.per_image = None
            torch.testing.assert_close(static_out, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("attention", [False, True])
def test_export_static_of_a_ddsnet_points_to_its_routes(attention):
    """The export it suggests runs what the DDSNet runs for a route (behind the attention
    scale when that is on: the super-network alone differed)."""
    model = make_ddsnet()
    model.gate.attention = attention
    with torch.no_grad():
        model.gate.fc2.weight.normal_(0, 0.5)  # a trained attention head scales the stem's features
    source, exported = (("AttentionSupernet(model.supernet, model.gate)",
                         dds_fast.AttentionSupernet(model.supernet, model.gate)) if attention
                        else ("model.supernet", model.supernet))
    with pytest.raises(ValueError, match=re.escape(f"export_static({source}, model.routing_space[index].config)")):
        export_static(model)
    x = images(n=2)
    model.set_budget(model.static_macs_per_pixel(1))
    with torch.no_grad():
        expected = model(x)
        static = export_static(exported, model.routing_space[model.budget_index].config)
        torch.testing.assert_close(static(x), expected)


def test_routing_indices_and_budgets_of_other_integer_and_tensor_types():
    net = SlimUNet(in_channels=3, base_width=8, depth=3)
    model = DDSNet(net, DynamicGate(16, 2), [RoutingEntry(net.space.smallest(), 1.0),
                                             RoutingEntry(net.space.largest(), 2.0)])
    model.gate.attention = False  # static costs: the configs' own
    for index in (np.int64(1), torch.tensor(1), -1):
        assert model.static_macs_per_pixel(index) == 2.0
    assert model.static_macs_per_pixel(-2) == 1.0  # as a sequence counts from its end: -len is the first
    assert model.set_budget(torch.tensor(1.5)).macs_per_pixel == 1.0  # a budget computed on tensors
    assert model.set_budget(10 ** 400).macs_per_pixel == 2.0  # past a float's range: no OverflowError
    with pytest.raises(ValueError, match="no config fits"):
        model.set_budget(-10 ** 400)


def test_without_triton_a_ddsnet_asked_for_the_kernels_falls_back_or_says_why(monkeypatch):
    """setup.py installs Triton on Linux only: elsewhere the gate must fall back as the convs
    do (it raised ModuleNotFoundError), and per-image widths must be refused by name (an
    AttributeError on the error string before)."""
    import sys

    from dds_fast import slim_conv

    model = make_ddsnet().float()
    x = images(n=3).float()
    with torch.no_grad():
        expected = model(x)
    import dds_fast.kernels

    for name in ("conv2d", "gate"):  # their imports now fail
        monkeypatch.setitem(sys.modules, f"dds_fast.kernels.{name}", None)
        monkeypatch.delattr(dds_fast.kernels, name, raising=False)
    monkeypatch.setattr(slim_conv, "_WARNED", set())
    slim_conv._kernels_module.cache_clear()
    try:
        for module in model.modules():
            if hasattr(module, "backend"):
                module.backend = "triton"
        with torch.no_grad(), pytest.warns(UserWarning, match="Triton is not available") as caught:
            got = model(x)
        assert any("DynamicGate" in str(w.message) for w in caught)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        model.per_image = True
        with torch.no_grad(), pytest.raises(ValueError, match="per-image widths need the Triton backend"):
            model(x)
    finally:
        slim_conv._kernels_module.cache_clear()


@pytest.mark.parametrize("missing", [("_body_modules", "_supernet_tree"), ("_supernet_tree",), "unnamed tree"])
def test_whole_module_pickles_of_earlier_versions_load(missing):
    """Users torch.save whole modules: attributes that were plain then are read into place,
    and what later versions derive is derived on loading."""
    import pickle

    model = make_ddsnet()
    x = images()
    with torch.no_grad():
        expected = model(x)
    model.set_budget(float("inf"))
    old = copy.deepcopy(model)  # in the layout of earlier versions
    if missing == "unnamed tree":
        old._supernet_tree = tuple((m or old.supernet, children) for _, m, children in old._supernet_tree)
    else:
        for name in missing:
            del old.__dict__[name]
    del old.supernet.__dict__["_bound_tree"]
    old.__dict__["_routing_space"] = list(old._routing_space)
    old.supernet.__dict__["arch_args"] = old.supernet.__dict__.pop("_arch_args")
    loaded = pickle.loads(pickle.dumps(old))
    assert isinstance(loaded.routing_space, tuple) and loaded.budget_index == 2
    assert loaded.supernet.arch_args == model.supernet.arch_args and loaded.supernet.routing_space is None
    assert [m or loaded.supernet for _, m, _ in loaded._supernet_tree] == list(loaded.supernet.modules())
    loaded.set_budget(None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_a_refused_choice_leaves_the_gate_as_it_was():
    model = make_ddsnet().train()
    before = model.gate.bn.num_batches_tracked.clone()
    with pytest.raises(ValueError):
        model(images(), choice=torch.tensor([0, 5, 1, 0, 0, 0]))
    assert torch.equal(model.gate.bn.num_batches_tracked, before)


def test_a_super_network_refused_part_way_leaves_the_ddsnet_as_it_was(monkeypatch):
    from dds_fast import ddsnet

    model = make_ddsnet()
    old = model.supernet

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ddsnet, "trace_convs", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.supernet = copy.deepcopy(old)
    assert model.supernet is old and all(conv in set(old.modules()) for conv in model._body_modules)


def test_the_gate_reads_the_stems_sums_only_of_what_it_is_given(monkeypatch):
    """A hook on the stem conv that hands on another tensor: the fused gate squeezes that,
    not the sums of the conv's own output."""
    pytest.importorskip("triton")
    model = make_ddsnet(seed=4).float().to(DEVICE)
    for module in model.supernet.modules():
        if isinstance(module, dds_fast.SlimConv2d):
            module.backend = "triton"
    model.gate.backend = "triton"
    model.supernet.stem_conv.register_forward_hook(lambda m, args, out: out * 0.25)
    x = images(size=(8, 8)).float().to(DEVICE)
    with torch.no_grad():
        fused = model.gate_forward(x)[1].logits
        model.gate.backend = "torch"
        reference = model.gate_forward(x)[1].logits
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_a_new_super_network_frees_the_old_one():
    model = make_ddsnet()
    layers = model._width_table(torch.device("cpu"))[1]  # a table of the old body's layers
    old = weakref.ref(layers[0][0])
    del layers
    model.supernet = copy.deepcopy(model.supernet)
    gc.collect()
    assert old() is None


@dds_fast.register_architecture
class BodyGroupFirstNet(dds_fast.SlimNet):
    """A user's super-network: its stem's group declared after the body's, and a stem that
    may be strided (an encoder's first conv)."""

    size_multiple = 2

    def __init__(self, stride=1, width_mult=1.0, min_ratio=0.25, divisor=4):
        super().__init__(1, 1, dict(stride=stride, width_mult=width_mult, min_ratio=min_ratio, divisor=divisor))
        self.stride = stride
        mid, feat = self._group("mid", 16), self._group("feat", 16)
        self.first = self._bind(dds_fast.SlimConv2d(1, feat, 3, stride=stride, padding=1, activation="relu"), "feat")
        self.middle = self._bind(dds_fast.SlimConv2d(feat, mid, 3, padding=1, activation="relu"), "mid")
        self.last = dds_fast.SlimConv2d(mid, stride ** 2, 1, upscale_factor=stride)
        self._finish()

    @property
    def stem_conv(self):
        return self.first

    @property
    def receptive_radius(self):
        return 2 * self.stride  # (3x3 convs at the input's scale, then at the stem's stride)

    def body(self, features, x):
        return self.last(self.middle(features)) + x


@pytest.mark.parametrize("stride", [1, 2])
def test_a_custom_supernet_whose_stem_group_is_not_the_first(stride, tmp_path):
    """The body reads the stem's output at the width of the stem's own group (it read the
    first declared group's: a wrong output), and dynamic mode counts the full-width stem at
    its stride (it counted it at every input pixel)."""
    torch.manual_seed(0)
    net = BodyGroupFirstNet(stride).double()
    configs = [{"mid": 16, "feat": 4}, {"mid": 4, "feat": 16}]
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in configs]
    model = DDSNet(net, DynamicGate(16, 2).double(), routes).eval()
    model.gate.attention = False
    x = images(n=2, size=(8, 10))[:, :1]
    with torch.no_grad():
        out = model(x, choice=torch.tensor([0, 1]))
        for i, route in enumerate(routes):
            torch.testing.assert_close(out[i:i + 1], export_static(net, route.config).eval()(x[i:i + 1]))
    stem_filter_macs = 9 / stride ** 2  # 3x3 over one input channel, on every stride-th row and column
    assert model.dynamic_macs_per_pixel == [routes[0].macs_per_pixel + stem_filter_macs * 12, routes[1].macs_per_pixel]
    dds_fast.save(model, tmp_path / "custom.safetensors")
    loaded = dds_fast.load(tmp_path / "custom.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, choice=torch.tensor([0, 1])), out)


def test_a_custom_supernet_that_breaks_the_stem_contract_is_refused():
    class BlockStem(BodyGroupFirstNet):
        def stem(self, x):
            return self.middle(self.first(x))

    class UnboundStem(BodyGroupFirstNet):
        def __init__(self):
            super().__init__()
            self._bindings = [b for b in self._bindings if b[0] is not self.first]

    for net, match in [(BlockStem(), "BlockStem overrides stem"),
                       (UnboundStem(), "the stem conv is bound to no width group")]:
        with pytest.raises(ValueError, match=match):
            DDSNet(net, DynamicGate(16, 2), [RoutingEntry(net.space.largest(), 1.0)] * 2)
        with pytest.raises(ValueError, match=match):
            dds_fast.AttentionSupernet(net, DynamicGate(16, 2))


def test_a_custom_supernet_that_misdeclares_its_groups_gets_clear_errors(monkeypatch, tmp_path):
    class NoWidthArgs(dds_fast.SlimNet):
        def __init__(self):
            super().__init__(1, 1, {})
            self._group("feat", 8)

    class UndeclaredGroup(dds_fast.SlimNet):
        def __init__(self):
            super().__init__(1, 1, dict(width_mult=1.0, min_ratio=0.5, divisor=4))
            self._bind(dds_fast.SlimConv2d(1, 8, 3), "feat")

    class TwiceDeclared(dds_fast.SlimNet):
        def __init__(self):
            super().__init__(1, 1, dict(width_mult=1.0, min_ratio=0.5, divisor=4))
            self._group("feat", 8), self._group("feat", 16)

    class WrongWidth(dds_fast.SlimNet):  # an upsampling conv bound without its multiplier of 4
        def __init__(self):
            super().__init__(1, 1, dict(width_mult=1.0, min_ratio=0.5, divisor=4))
            width = self._group("up", 8)
            self._bind(dds_fast.SlimConv2d(1, 4 * width, 1, upscale_factor=2), "up")

    class Unfinished(BodyGroupFirstNet):
        def _finish(self):
            pass  # (as a subclass that forgot to call it)

    class ArgsNotTheConstructors(BodyGroupFirstNet):
        @property
        def arch_args(self):
            return {**super().arch_args, "depth": 3}

    with pytest.raises(ValueError, match=r"arch_args must hold width_mult, min_ratio and divisor"):
        NoWidthArgs()
    with pytest.raises(ValueError, match=r"_bind to group 'feat', which no _group declared"):
        UndeclaredGroup()
    with pytest.raises(ValueError, match=r"group 'feat' is declared twice"):
        TwiceDeclared()
    with pytest.raises(ValueError, match=r"needs a SlimConv2d of 8 filters \(the group's largest width 8 times "
                                         r"multiplier 1\)"):
        WrongWidth()
    with pytest.raises(AttributeError, match=r"no width space yet: end __init__ with self._finish\(\)"):
        Unfinished().set_config({"mid": 4, "feat": 4})
    with pytest.raises(NotImplementedError, match="must define body"):
        dds_fast.SlimNet.body(Unfinished(), None, None)
    monkeypatch.setitem(dds_fast.ARCHITECTURES, "ArgsNotTheConstructors", ArgsNotTheConstructors)
    net = ArgsNotTheConstructors()
    for model in (net, dds_fast.AttentionSupernet(net, DynamicGate(16, 2))):  # (load builds the inner net too)
        with pytest.raises(ValueError, match=r"save: ArgsNotTheConstructors's arch_args .* do not fit its "
                                             r"constructor"):
            dds_fast.save(model, tmp_path / "unwritten.safetensors")
    assert not (tmp_path / "unwritten.safetensors").exists()


def test_route_branches_says_once_why_this_machine_cannot_take_them(monkeypatch):
    """Where CUDA graphs cannot hold conditional nodes, a captured forward runs the per-image
    body; the switch the user turned on says why, once, instead of nothing."""
    model = make_ddsnet()
    model.route_branches = True
    monkeypatch.setattr(dds_fast.ddsnet, "conditional_graph_nodes", lambda: False)
    monkeypatch.setattr(dds_fast.ddsnet, "conditional_nodes_unavailable_reason", lambda: "a reason of this test")

    class OnCuda:  # all that the decision reads of the padded input
        is_cuda = True

        def __len__(self):
            return 1
    with torch.no_grad(), pytest.warns(UserWarning, match=r"route_branches: .*\(a reason of this test\)"):
        assert not model._takes_branches(OnCuda(), per_image=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not model._takes_branches(OnCuda(), per_image=True)


def test_an_attention_supernets_parts_are_checked_when_replaced_and_read_fresh():
    """As a DDSNet's: a new super-network is checked against the gate, and what the wrapper
    reports of it (space, channels) is the new one's."""
    torch.manual_seed(0)
    net = SlimUNet(in_channels=3, base_width=8, depth=3)
    attended = dds_fast.AttentionSupernet(net, DynamicGate(net.stem_channels, 3))
    with pytest.raises(ValueError, match="AttentionSupernet: .*channels"):
        attended.supernet = SlimUNet(in_channels=3, base_width=16, depth=3)
    with pytest.raises(ValueError, match="AttentionSupernet: gate must be a DynamicGate"):
        attended.gate = torch.nn.Identity()
    assert attended.supernet is net
    gray = SlimUNet(in_channels=1, base_width=8, depth=2)
    attended.supernet = gray
    assert attended.in_channels == 1 and attended.space is gray.space and attended.get_config() == gray.space.largest()
    assert attended(torch.rand(1, 1, 8, 8)).shape == (1, 1, 8, 8)


class _UngatableStemNet(dds_fast.SlimNet):
    """A super-network whose stem no gate can read as one channel per width of its group: two
    filters per width (multiplier 2), or a pixel shuffle (a quarter of the channels)."""

    def __init__(self, multiplier=1, upscale_factor=1):
        super().__init__(1, 1, dict(width_mult=1.0, min_ratio=0.5, divisor=4))
        feat = self._group("feat", 8)
        self.first = self._bind(dds_fast.SlimConv2d(1, multiplier * feat, 3, padding=1, upscale_factor=upscale_factor),
                                "feat", multiplier=multiplier)
        self.last = dds_fast.SlimConv2d(multiplier * feat // upscale_factor ** 2, 1, 3, stride=upscale_factor,
                                        padding=1)
        self._finish()

    @property
    def stem_conv(self):
        return self.first

    @property
    def receptive_radius(self):
        return 3

    def body(self, features, x):
        return self.last(features) + x


@pytest.mark.parametrize("shape,gate_channels,message", [
    (dict(multiplier=2), 16, "the stem conv is bound to group 'feat' with multiplier 2"),
    (dict(upscale_factor=2), 8, "the stem conv of _UngatableStemNet shuffles pixels"),
])
def test_a_stem_no_gate_can_read_is_refused_by_the_gated_networks(shape, gate_channels, message):
    net = _UngatableStemNet(**shape)
    if "multiplier" in shape:
        with pytest.raises(ValueError, match=message):
            net.stem_group
    with pytest.raises(ValueError, match=message):
        DDSNet(net, DynamicGate(gate_channels, 2), [RoutingEntry(net.space.largest(), 1.0)] * 2)
    with pytest.raises(ValueError, match=message):
        dds_fast.AttentionSupernet(net, DynamicGate(gate_channels, 2))


def test_stem_means_of_a_masked_attention_supernet_read_the_whole_stem():
    """Under set_masked_widths the stem's output mask is lifted while stem_means runs: the
    means are those of the full-width stem (the gate's attention reads every channel), and
    feeding them back gives the masked forward's own output."""
    torch.manual_seed(0)
    net = SlimUNet(in_channels=3, base_width=8, depth=2).double()
    gate = DynamicGate(net.stem_channels, 2).double()
    gate.attention = True
    torch.nn.init.normal_(gate.fc2.weight, std=1.0)
    attended = dds_fast.AttentionSupernet(net, gate).eval()
    x = torch.rand(2, 3, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        full = attended.stem_means(x, block=4)
        attended.set_masked_widths(torch.tensor(attended.binding_widths(net.space.smallest())))
        means = attended.stem_means(x, block=4)
        assert attended.masked
        torch.testing.assert_close(means, full)
        torch.testing.assert_close(attended(x, stem_means=means), attended(x))


def test_route_branches_warm_again_for_another_batch_size():
    """The warmed branches' key holds the input's shape: its strides do not say its batch size,
    and a capture at a new batch size must not find the old batch's output shape."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    net = SlimDnCNN(in_channels=3, base_width=8, depth=3)
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    model = DDSNet(net, DynamicGate(net.stem_channels, 2), routes).eval()
    ran = []
    route_body = model._route_body
    model._route_body = lambda index, *args: ran.append(index) or route_body(index, *args)
    with torch.no_grad():
        for batch in (2, 3):
            padded, gate_out = model.gate_forward(torch.rand(batch, 3, 8, 8))
            model._warm_branches(gate_out.features, padded, gate_out.choice)
            assert model._branch_output(gate_out.features, padded).shape == (batch, 3, 8, 8)
    assert ran == [0, 1] * 2
