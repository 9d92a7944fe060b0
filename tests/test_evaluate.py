import copy
import dataclasses
import re

import pytest
import torch

import dds_fast
from dds_fast import DDSNet, DynamicGate, RoutingEntry, SlimDnCNN, SlimUNet, macs_per_pixel
from dds_fast.bench import rig_gate
from dds_fast.cli import main
from dds_fast.evaluate import comparison_table, denoise, evaluate
from dds_fast.metrics import psnr
from dds_fast.training.data import read_image, save_image


def net():
    torch.manual_seed(0)
    return SlimDnCNN(in_channels=3, base_width=8, depth=4).eval()


def ddsnet():
    supernet = net()
    routes = [RoutingEntry(c, macs_per_pixel(supernet, c)) for c in (supernet.space.smallest(), supernet.space.largest())]
    gate = DynamicGate(supernet.stem_channels, 2)
    gate.attention = False
    return DDSNet(supernet, gate, routes).eval()


class ShapeRecorder(torch.nn.Module):
    """The identity, recording the shape of each input."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x.clone()


def test_an_image_larger_than_the_tile_one_way_only_is_tiled():
    """Memory stays bounded: a tall image narrower than the tile is still cut along its height."""
    model, image = ShapeRecorder(), torch.rand(1, 80, 16)
    assert torch.equal(denoise(model, image, tile=32, overlap=4), image) and len(model.shapes) > 1
    assert all(shape[-2] <= 32 and shape[-1] <= 32 for shape in model.shapes)


@pytest.mark.parametrize("size", [(40, 50), (70, 33)])
def test_tiled_denoise_equals_whole_image_for_a_local_network(size):
    # DnCNN-4's receptive field is 9x9: 8 pixels of overlap give every core pixel its full context
    model = net()
    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    whole = denoise(model, x, tile=1024)
    tiled = denoise(model, x, tile=24, overlap=8)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        denoise(model, x, tile=16, overlap=8)
    with pytest.raises(ValueError, match="denoise: overlap must be an int >= 0, got 2.5"):
        denoise(model, x, tile=24, overlap=2.5)
    with pytest.raises(ValueError, match=r"denoise: the image is empty, shape \(3, 30, 0\)"):
        denoise(model, torch.rand(3, 30, 0), tile=24)  # larger than a tile: no tile would run


@pytest.mark.parametrize("tile,overlap", [(61, 21), (45, 13)])
def test_tiled_denoise_keeps_a_unet_on_the_whole_image_pixel_grid(tile, overlap):
    """Tiles that start off the U-Net's downsampling grid (here, steps of 19 pixels) see
    other pooling windows than the whole image does; the tiler aligns them."""
    torch.manual_seed(0)
    model = dds_fast.SlimUNet(in_channels=3, base_width=8, depth=3).eval()
    x = torch.rand(3, 70, 50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(denoise(model, x, tile=tile, overlap=overlap), denoise(model, x, tile=1024),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="leaves no core"):
        denoise(model, x, tile=18, overlap=7)


def far_reaching_unet(depth, out_channels=None):
    """A U-Net whose weights are pushed away from zero, so every path to the deepest level
    changes the output measurably (at its initial weights, far pixels barely do)."""
    torch.manual_seed(0)
    model = dds_fast.SlimUNet(in_channels=3, out_channels=out_channels, base_width=8, depth=depth).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.sign(parameter))
    return model


def test_default_overlap_is_the_receptive_field_so_a_deep_unet_tiles_without_seams():
    model = far_reaching_unet(depth=4)  # a receptive field radius of 45 pixels
    x = torch.rand(3, 150, 140, generator=torch.Generator().manual_seed(1))
    whole = denoise(model, x, tile=1024)
    torch.testing.assert_close(denoise(model, x, tile=128), whole, rtol=1e-5, atol=1e-5)
    # 32 pixels of context, the old default, leave seams
    assert (denoise(model, x, tile=128, overlap=32) - whole).abs().max() > 1e-3


def gated_unet(attention):
    """A DDSNet over a U-Net whose gate has large random weights: its choice and attention
    scale depend on the image's content, so tiles squeezing their own pixels would differ."""
    supernet = far_reaching_unet(depth=2)
    routes = [RoutingEntry(c, macs_per_pixel(supernet, c)) for c in (supernet.space.smallest(),
                                                                      supernet.space.largest())]
    torch.manual_seed(2)  # a gate that sends the image's bright and dark halves to different routes
    gate = DynamicGate(supernet.stem_channels, 2)
    gate.attention = attention
    for name, parameter in gate.named_parameters():
        if name.startswith("fc"):
            torch.nn.init.normal_(parameter, std=2.0)
    return DDSNet(supernet, gate, routes).eval()


def half_dark_image():
    x = torch.rand(3, 120, 110, generator=torch.Generator().manual_seed(1))
    x[:, :, 55:] *= 0.2
    return x


@pytest.mark.parametrize("tiles_per_batch", [1, 3])
@pytest.mark.parametrize("attention,budget", [(True, None), (True, 1e9), (False, None)])
def test_tiles_of_a_gated_model_take_the_whole_image_gate(attention, budget, tiles_per_batch):
    model = gated_unet(attention)
    model.set_budget(budget)
    x = half_dark_image()
    whole = denoise(model, x, tile=1024)
    torch.testing.assert_close(denoise(model, x, tile=64, tiles_per_batch=tiles_per_batch), whole, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(model.stem_means(x[None], 32), model.stem_means(x[None], 1024), rtol=1e-6, atol=1e-7)
    # each tile squeezing its own pixels (what the tiler did before) leaves seams
    step = 64 - 2 * 12  # the tile's core: the overlap is the receptive radius, rounded up to the size multiple
    assert model.receptive_radius <= 12 and model.size_multiple == 2
    left, right = x[None, :, :, : step + 12], x[None, :, :, step * 2 - 12: step * 3 + 12]
    if budget is None:
        assert model.route(left) != model.route(right)
    else:
        assert (model(left) - whole[:, :, : step + 12]).abs().max() > 1e-3


def test_tiles_of_an_attention_supernet_take_the_whole_image_gate():
    model = gated_unet(attention=True)
    supernet = dds_fast.AttentionSupernet(model.supernet, model.gate).eval()
    supernet.set_config(supernet.space.largest())
    x = half_dark_image()
    whole = denoise(supernet, x, tile=1024)
    torch.testing.assert_close(denoise(supernet, x, tile=64), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoise(supernet, x, tile=64, tiles_per_batch=4), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"means must be a floating-point \[1, 16\] tensor on cpu, got torch.float32 \(1, 3\)"):
        supernet(x[None], stem_means=torch.zeros(1, 3))


def test_tiles_of_one_size_run_as_batches():
    """Up to tiles_per_batch tiles of one size go through the model together (edge tiles, of
    other sizes, apart), with the result of one tile at a time."""
    model = net()
    x = torch.rand(3, 70, 33, generator=torch.Generator().manual_seed(1))
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(tuple(args[0].shape)))
    one_at_a_time = denoise(model, x, tile=24, overlap=8)
    assert all(shape[0] == 1 for shape in batches)
    tiles = len(batches)
    batches.clear()
    batched = denoise(model, x, tile=24, overlap=8, tiles_per_batch=2)
    torch.testing.assert_close(batched, one_at_a_time, rtol=1e-5, atol=1e-5)
    assert sum(shape[0] for shape in batches) == tiles and max(shape[0] for shape in batches) == 2
    assert len(batches) < tiles and len({shape[2:] for shape in batches}) > 1  # sizes apart
    with pytest.raises(ValueError, match="denoise: tiles_per_batch must be an int >= 1, got 0"):
        denoise(model, x, tile=24, overlap=8, tiles_per_batch=0)


@pytest.mark.parametrize("shape", [(2, 16), (16,)])
def test_denoise_refuses_stem_means_that_are_not_the_image_s_one_row(shape):
    """Batched tiles share the image's row of means: any other shape is refused, not broadcast."""
    model = gated_unet(attention=True)
    for tile in (1024, 64):
        with pytest.raises(ValueError, match=rf"denoise: stem_means must be the image's one row \[1, C\], got "
                                             rf"{re.escape(str(shape))}"):
            denoise(model, half_dark_image(), tile=tile, stem_means=torch.rand(*shape), tiles_per_batch=2)


def test_tiles_take_the_output_channels_of_the_model():
    model = far_reaching_unet(depth=3, out_channels=1)
    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1))
    tiled = denoise(model, x, tile=60)
    assert tiled.shape == (1, 40, 50)
    torch.testing.assert_close(tiled, model(x[None])[0], rtol=1e-5, atol=1e-5)


def test_an_image_within_one_tile_runs_whole_whatever_the_overlap():
    model = far_reaching_unet(depth=3)
    x = torch.rand(3, 30, 20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(denoise(model, x, tile=32), model(x[None])[0])
    torch.testing.assert_close(denoise(model, x, tile=32, overlap=40), model(x[None])[0])
    with pytest.raises(ValueError, match=r"tile of 16 pixels leaves no core.*--tile.*--overlap"):
        denoise(model, x, tile=16)
    with pytest.raises(ValueError, match="no receptive_radius"):
        denoise(torch.nn.Identity(), x, tile=16)


def pairs(n=2, size=32):
    g = torch.Generator().manual_seed(2)
    clean = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    return [(c + 0.05 * torch.randn(c.shape, generator=g), c) for c in clean]


def test_evaluate_reports_psnr_ssim_and_macs():
    model = net()
    data = pairs()
    result = evaluate(model, data, "dncnn")
    expected = sum(psnr(model(n[None])[0], c) for n, c in data) / len(data)
    assert result.psnr == pytest.approx(expected)
    assert 0 < result.ssim <= 1 and result.images == 2
    assert result.macs_per_pixel == macs_per_pixel(model)
    dds = ddsnet()
    routed = evaluate(dds, data, "dds")
    expected_macs = sum(dds.routed_macs(n[None])[0] for n, _ in data) / len(data)
    assert routed.macs_per_pixel == pytest.approx(expected_macs)
    assert min(dds.dynamic_macs_per_pixel) <= routed.macs_per_pixel <= max(dds.dynamic_macs_per_pixel)
    table = comparison_table(dds, [model], data)
    # named by the route whose config it runs (the largest here), not by its place in the list
    assert "| I-Net 1 |" in table and "DDS dynamic" in table and table.count("\n") == 4
    smallest = copy.deepcopy(dds.supernet)
    smallest.set_config(dds.routing_space[0].config)
    baseline = torch.nn.Conv2d(3, 3, 3, padding=1)
    table = comparison_table(dds, [baseline, smallest], data)
    assert "| I-Net #0 (no route's config) |" in table and "| I-Net 0 |" in table
    with torch.no_grad():  # every image to the largest route: not what the last budget row runs
        dds.gate.fc4.weight.zero_()
        dds.gate.fc4.bias.copy_(torch.tensor([0.0, 1.0]))
    dynamic = evaluate(dds, data, "DDS dynamic")
    assert dynamic.macs_per_pixel == dds.dynamic_macs_per_pixel[1]
    assert dynamic.row() in comparison_table(dds, [smallest], data)  # (not scored in the budget mode before it)


@pytest.mark.parametrize("change,message", [
    (lambda clean: clean * 255, r"pair 1's clean image: expected float values in \[0, 1\]"),
    (lambda clean: clean[:, :-1], r"pair 1's clean image is \(\d+, \d+\) pixels, its noisy image"),
])
def test_evaluate_names_a_clean_image_that_cannot_be_scored_before_denoising_it(change, message, monkeypatch):
    import dds_fast.evaluate as evaluate_module

    data = pairs()
    data[1] = (data[1][0], change(data[1][1]))
    denoised = []
    real_denoise = evaluate_module.denoise
    monkeypatch.setattr(evaluate_module, "denoise", lambda *a, **k: denoised.append(1) or real_denoise(*a, **k))
    with pytest.raises(ValueError, match="evaluate: " + message):
        evaluate(net(), data)
    assert len(denoised) == 1  # the first pair's only


def test_comparison_rows_within_a_budget_cost_at_most_the_budget_with_attention_on():
    dds = ddsnet()
    dds.gate.attention = True  # static mode then runs the full-width stem too
    data = pairs(n=1)
    inet_rows = []
    for index, entry in enumerate(dds.routing_space):
        dds.supernet.set_config(entry.config)
        inet_rows.append(evaluate(dds.supernet, data, f"I-Net {index}"))
    table = comparison_table(dds, [], data, inet_rows)
    assert comparison_table(dds, iter([]), iter(data), iter(inet_rows)) == table  # each read more than once
    assert comparison_table(dds, iter([dds.supernet] * len(inet_rows)), data, iter(inet_rows)) == table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if "DDS at <=" in line]
    # rows that do not match the I-Nets, or were scored on other images, would not compare
    with pytest.raises(ValueError, match=f"comparison_table: {len(inet_rows) - 1} inet_rows for {len(inet_rows)} "
                                         f"I-Nets: one row each"):
        comparison_table(dds, [dds.supernet] * len(inet_rows), data, inet_rows[:-1])
    with pytest.raises(ValueError, match=r"comparison_table: inet_rows \['I-Net 1'\] were scored on other than "
                                         r"the 1 pairs"):
        comparison_table(dds, [], data, [inet_rows[0], dataclasses.replace(inet_rows[1], images=3)])
    # the smallest config costs more than its own MACs behind the full-width stem: nothing fits
    assert rows[0][0].strip() == f"DDS at <= {dds.routing_space[0].macs_per_pixel:,.0f}: no config fits"
    for label, macs, *_ in rows[1:]:
        budget = float(label.split("<=")[1].replace(",", ""))
        assert float(macs.replace(",", "")) <= budget


def test_denoise_command(tmp_path, capsys):
    dds = ddsnet()
    checkpoint = dds_fast.save(dds, tmp_path / "dds.safetensors")
    noisy = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(3))
    for bits, name in [(16, "in16.png"), (8, "in8.jpg")]:
        source = save_image(tmp_path / name, noisy, bits)
        out = tmp_path / f"out-{name.split('.')[0]}.png"
        assert main(["denoise", str(source), "-o", str(out), "--checkpoint", str(checkpoint)]) == 0
        result, out_bits = read_image(out)
        assert result.shape == noisy.shape and out_bits == bits
    gray = save_image(tmp_path / "gray.png", noisy[:1])
    assert main(["denoise", str(gray), "-o", str(tmp_path / "g.png"), "--checkpoint", str(checkpoint),
                 "--budget", "1e9"]) == 0
    assert read_image(tmp_path / "g.png")[0].shape == (1, 20, 30)
    assert "static mode" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["denoise", str(bad), "-o", str(tmp_path / "x.png"), "--checkpoint", str(checkpoint)]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert main(["denoise", str(gray), "-o", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "no")]) == 2
    capsys.readouterr()
    original = gray.read_bytes()
    (tmp_path / "link.png").symlink_to(gray)
    for out in (gray, tmp_path / "link.png"):  # the noisy original is never replaced
        assert main(["denoise", str(gray), "-o", str(out), "--checkpoint", str(checkpoint)]) == 2
        assert "is the input image" in capsys.readouterr().err
    assert gray.read_bytes() == original


def test_a_checkpoint_saved_in_static_mode_denoises_and_describes_itself_so(tmp_path, capsys):
    dds = ddsnet()
    dds.set_budget(dds.static_macs_per_pixel(0))
    checkpoint = dds_fast.save(dds, tmp_path / "dds.safetensors")
    source = save_image(tmp_path / "in.png", torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(3)))
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"static mode: config at {dds.static_macs_per_pixel(0):,.0f} MACs/pixel" in out and "dynamic" not in out
    assert main(["info", str(checkpoint)]) == 0
    assert "route 0 (static mode)" in capsys.readouterr().out


def test_denoise_command_reports_the_route_of_a_tiled_image_as_of_the_whole(tmp_path, capsys):
    """Tiles are routed from the whole image's squeeze; the report says where, without the
    whole image's stem output (which tiling keeps out of memory)."""
    dds = ddsnet()
    rig_gate(dds.gate, 1)
    checkpoint = dds_fast.save(dds, tmp_path / "dds.safetensors")
    source = save_image(tmp_path / "in.png", torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(3)))
    for tile, batch in (("64", "1"), ("24", "1"), ("24", "3")):
        out = tmp_path / f"out-{tile}-{batch}.png"
        assert main(["denoise", str(source), "-o", str(out), "--checkpoint", str(checkpoint), "--tile", tile,
                     "--overlap", "4", "--tiles-per-batch", batch]) == 0
        assert f"dynamic mode: routed to {dds.dynamic_macs_per_pixel[1]:,.0f} MACs/pixel" in capsys.readouterr().out
    # tiles batched by three give the 8-bit output of one at a time
    assert torch.equal(read_image(tmp_path / "out-24-3.png")[0], read_image(tmp_path / "out-24-1.png")[0])


@pytest.mark.parametrize("budget, squeezes", [(None, 1), (1e9, 0)])
def test_denoise_command_squeezes_the_whole_image_once_and_only_when_routed(tmp_path, monkeypatch, budget, squeezes):
    """The route report reused the tiles' squeeze (a second stem pass over the whole image
    ran 6% of a 12 MP denoise), and budget mode without attention, which runs its config
    alone, needs none (14% of a denoise)."""
    dds = ddsnet()
    checkpoint = dds_fast.save(dds, tmp_path / "dds.safetensors")
    source = save_image(tmp_path / "in.png", torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(3)))
    calls = []
    squeeze = DDSNet.stem_means
    monkeypatch.setattr(DDSNet, "stem_means", lambda self, *args: calls.append(1) or squeeze(self, *args))
    argv = ["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(checkpoint), "--tile", "24",
            "--overlap", "4"] + ([] if budget is None else ["--budget", str(budget)])
    assert main(argv) == 0
    assert len(calls) == squeezes


def test_evaluate_routes_a_large_image_tile_by_tile():
    """Its route came from the stem over the whole image at once (3.6 GB more at 4096x4096)."""
    model = gated_unet(attention=False)
    x = half_dark_image()
    sides = []
    gate_forward = model.gate_forward
    model.gate_forward = lambda inputs, *args: sides.append(max(inputs.shape[-2:])) or gate_forward(inputs, *args)
    result = evaluate(model, [(x, x)], tile=64)
    assert sides and max(sides) <= 64
    expected = model.dynamic_macs_per_pixel[model.routing_space.index(model.route(x[None])[0])]
    assert result.macs_per_pixel == expected


def test_route_from_given_means_is_the_route_of_the_image():
    model = gated_unet(attention=False)
    x = half_dark_image()[None]
    means = model.stem_means(x, 32)
    assert model.route(x, stem_means=means) == model.route(x)
    assert model.routed_macs(x, stem_means=means) == model.routed_macs(x)
    with pytest.raises(ValueError, match=r"stem_means must be floating-point \[1, 16\], one row per image, got "
                                         r"torch.float32 \(2, 16\)"):
        model.route(x, stem_means=means.expand(2, -1))
    with pytest.raises(ValueError, match=r"stem_means must be .* got torch.float32 \(1, 15\)"):
        model.route(x, stem_means=means[:, :15])
    with pytest.raises(ValueError, match=r"stem_means must be .* got torch.int32 \(1, 16\)"):  # (it blamed the input)
        model.route(x, stem_means=means.int())


def test_denoise_shows_its_progress_over_tiles_when_asked(capsys):
    model = far_reaching_unet(depth=2)
    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(1))
    denoise(model, x, tile=32, overlap=4, progress=True)
    assert "tiles" in capsys.readouterr().err
    denoise(model, x, tile=32, overlap=4)
    assert capsys.readouterr().err == ""


def test_denoise_command_warns_that_a_colour_model_keeps_a_gray_images_noise(tmp_path, capsys):
    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    for channels, warned in ((1, True), (3, False)):
        source = save_image(tmp_path / "in.png", torch.rand(channels, 20, 30, generator=torch.Generator().manual_seed(3)))
        assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(checkpoint)]) == 0
        err = capsys.readouterr().err
        assert ("is gray, and a colour model learns noise that differs between channels" in err) == warned
        assert "shipped model" not in err  # its figures are not this checkpoint's


@pytest.mark.parametrize("source,output", [("in.png", "out.png"), ("in16.png", "out.png"), ("in.jpg", "out.jpg"),
                                           ("in.tif", "out.png"), ("in.png", "out16.png")])
def test_denoise_command_keeps_the_inputs_colour_profile(tmp_path, source, output):
    """The pixels mean colours only with the input's ICC profile (a phone's Display P3 photo
    read as sRGB looks dull): the denoised copy carries it, 16-bit PNGs (pypng) included."""
    import tifffile
    from PIL import Image, ImageCms

    from dds_fast.training.data import read_icc_profile

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = (torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(3)) * 255).byte().permute(1, 2, 0).numpy()
    path = tmp_path / source
    if source.endswith(".tif"):
        tifffile.imwrite(path, pixels, photometric="rgb", iccprofile=profile)
    elif source == "in16.png":
        save_image(path, torch.from_numpy(pixels).permute(2, 0, 1) / 255, 16, icc_profile=profile)
    else:
        Image.fromarray(pixels).save(path, icc_profile=profile)
    assert read_icc_profile(path) == profile
    if output == "out16.png":  # a 16-bit input writes a 16-bit PNG
        path = save_image(tmp_path / "in16.png", read_image(path)[0], 16, icc_profile=profile)
        output = "out.png"
    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    assert main(["denoise", str(path), "-o", str(tmp_path / output), "--checkpoint", str(checkpoint)]) == 0
    assert read_icc_profile(tmp_path / output) == profile
    plain = tmp_path / "plain.png"
    Image.fromarray(pixels).save(plain)
    assert read_icc_profile(plain) is None
    assert main(["denoise", str(plain), "-o", str(tmp_path / "out-plain.png"), "--checkpoint", str(checkpoint)]) == 0
    assert read_icc_profile(tmp_path / "out-plain.png") is None


def test_a_profile_for_other_colours_than_the_output_is_left_out_with_a_warning(tmp_path, capsys):
    """A CMYK JPEG is read as RGB: its CMYK profile would misdescribe the RGB output (PNG
    readers drop such a chunk)."""
    from PIL import Image, ImageCms

    from dds_fast.training.data import read_icc_profile

    cmyk = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    cmyk[16:20] = b"CMYK"  # the colour space field is all a reader checks first
    pixels = (torch.rand(20, 30, 4, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    Image.fromarray(pixels, mode="CMYK").save(tmp_path / "in.jpg", icc_profile=bytes(cmyk))
    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    assert main(["denoise", str(tmp_path / "in.jpg"), "-o", str(tmp_path / "out.png"), "--checkpoint",
                 str(checkpoint)]) == 0
    assert "ICC profile is for CMYK images, which were read as RGB" in capsys.readouterr().err
    assert read_icc_profile(tmp_path / "out.png") is None
    with pytest.raises(ValueError, match="ICC profile for .*out2.png is for b'CMYK' images, not 3-channel ones"):
        save_image(tmp_path / "out2.png", torch.rand(3, 4, 4), icc_profile=bytes(cmyk))


def test_denoise_command_takes_half_precision_and_gray_checkpoints(tmp_path):
    noisy = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(3))
    source = save_image(tmp_path / "in.png", noisy, 16)
    noisy = read_image(source)[0]
    dds = ddsnet()
    for dtype in (torch.float16, torch.bfloat16):  # run widened to fp32 on the CPU
        checkpoint = dds_fast.save(dds.to(dtype), tmp_path / "half.safetensors")
        assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(checkpoint)]) == 0
        expected = dds_fast.load(checkpoint).float().eval()(noisy[None])[0].clamp(0, 1)
        assert (read_image(tmp_path / "out.png")[0] - expected).abs().max() <= 0.5 / 65535 + 1e-6
    torch.manual_seed(0)
    gray = SlimDnCNN(in_channels=1, base_width=8, depth=3).eval()
    checkpoint = dds_fast.save(gray, tmp_path / "gray.safetensors")
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(checkpoint)]) == 0
    # a gray model denoises each colour plane alone: the colours stay
    expected = gray(noisy[:, None])[:, 0].clamp(0, 1)
    assert (read_image(tmp_path / "out.png")[0] - expected).abs().max() <= 0.5 / 65535 + 1e-6


def test_denoise_command_tiles_with_the_overlap_asked_for(tmp_path, capsys):
    model = far_reaching_unet(depth=3)
    checkpoint = dds_fast.save(model, tmp_path / "unet.safetensors")
    noisy = save_image(tmp_path / "in.png", torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(3)), 16)
    image = read_image(noisy)[0]

    def run(*flags):
        out = tmp_path / "out.png"
        code = main(["denoise", str(noisy), "-o", str(out), "--checkpoint", str(checkpoint), *flags])
        return code, read_image(out)[0] if code == 0 else None

    whole = run("--tile", "64")[1]  # a tile below twice the receptive field, but the image fits in it
    torch.testing.assert_close(whole, model(image[None])[0].clamp(0, 1), rtol=0, atol=1 / 65535)
    # tiled, with the receptive field as overlap
    torch.testing.assert_close(run("--tile", "60")[1], whole, rtol=0, atol=1 / 65535)
    assert not torch.equal(run("--tile", "20", "--overlap", "4")[1], whole)  # too little context: seams
    assert run("--tile", "30")[0] == 2
    assert "--tile" in capsys.readouterr().err


@pytest.mark.parametrize("output,message", [("out.tif", "unsupported format '.tif'"), ("out", "unsupported format ''"),
                                            ("missing/out.png", "does not exist"), ("folder.png", "is a folder")])
def test_denoise_command_checks_the_output_path_before_denoising(tmp_path, capsys, monkeypatch, output, message):
    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    (tmp_path / "folder.png").mkdir()
    noisy = save_image(tmp_path / "in.png", torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(3)))

    def no_work(*args, **kwargs):
        raise AssertionError("denoised an image whose output cannot be written")

    monkeypatch.setattr(dds_fast.evaluate, "denoise", no_work)
    assert main(["denoise", str(noisy), "-o", str(tmp_path / output), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / output) in err


def test_denoise_command_checks_a_jpegs_side_limit_before_denoising(tmp_path, capsys, monkeypatch):
    from dds_fast.training import data

    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    noisy = save_image(tmp_path / "in.png", torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(3)))
    monkeypatch.setattr(data, "JPEG_MAX_SIDE", 25)  # (libjpeg's 65,500: an image that wide takes long)

    def no_work(*args, **kwargs):
        raise AssertionError("denoised an image whose output cannot be written")

    monkeypatch.setattr(dds_fast.evaluate, "denoise", no_work)
    assert main(["denoise", str(noisy), "-o", str(tmp_path / "out.jpg"), "--checkpoint", str(checkpoint)]) == 2
    assert "JPEG holds at most 25 pixels a side, the image is 20 x 30" in capsys.readouterr().err


@pytest.mark.parametrize("bits, channels", [(8, 4), (16, 4), (8, 2), (16, 2)])
def test_denoise_command_passes_the_alpha_plane_through(tmp_path, bits, channels):
    """An RGBA (or gray + alpha) PNG comes back with its alpha as it was and its colour
    denoised as the colour alone would be."""
    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(channels, 20, 30, generator=generator)
    source = save_image(tmp_path / "in.png", image, bits)
    colour_only = save_image(tmp_path / "colour.png", read_image(source, keep_alpha=True)[0][:-1], bits)
    for path, out in [(source, tmp_path / "out.png"), (colour_only, tmp_path / "out-colour.png")]:
        assert main(["denoise", str(path), "-o", str(out), "--checkpoint", str(checkpoint)]) == 0
    result, out_bits = read_image(tmp_path / "out.png", keep_alpha=True)
    assert result.shape == image.shape and out_bits == bits
    torch.testing.assert_close(result[-1:], read_image(source, keep_alpha=True)[0][-1:], rtol=0, atol=0)
    torch.testing.assert_close(result[:-1], read_image(tmp_path / "out-colour.png")[0], rtol=0, atol=0)
    assert read_image(tmp_path / "out.png")[0].shape[0] == channels - 1  # alpha dropped unless asked for


def test_denoise_command_refuses_a_model_that_changes_the_channels(tmp_path, capsys):
    checkpoint = dds_fast.save(SlimUNet(in_channels=3, out_channels=1, base_width=8, depth=2), tmp_path / "n.safetensors")
    source = save_image(tmp_path / "in.png", torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(6)))
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.png"), "--checkpoint", str(checkpoint)]) == 2
    assert "maps 3 to 1" in capsys.readouterr().err and not (tmp_path / "out.png").exists()


def test_denoise_command_says_what_a_multi_image_file_or_a_jpeg_output_loses(tmp_path, capsys):
    import numpy as np
    import tifffile
    from PIL import Image

    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    pages = np.random.default_rng(7).integers(0, 256, (3, 12, 14, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="rgb")  # three pages
    frames = [Image.fromarray(page) for page in pages[:2]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    # a thumbnail page (SubfileType 1) is no other picture
    with tifffile.TiffWriter(tmp_path / "thumbed.tif") as tiff:
        tiff.write(pages[0], photometric="rgb")
        tiff.write(pages[1][::2, ::2], photometric="rgb", subfiletype=1)
    # a frame past the first cut off: the first still reads, and only the count fails
    cut = (tmp_path / "anim.gif").read_bytes()
    (tmp_path / "cut.gif").write_bytes(cut[:len(cut) - 300])
    with pytest.raises(Exception), Image.open(tmp_path / "cut.gif") as image:
        image.n_frames
    single = save_image(tmp_path / "one.png", torch.rand(3, 12, 14, generator=torch.Generator().manual_seed(6)), 16)
    for source, output, warning in [("stack.tif", "out.png", "holds 3 images (pages or frames): only the first"),
                                    ("anim.gif", "out.png", "holds 2 images (pages or frames): only the first"),
                                    ("thumbed.tif", "out.png", None), ("cut.gif", "out.png", None),
                                    ("one.png", "out.jpg", "holds 8 bits per sample, of " + str(single) + "'s 16"),
                                    ("one.png", "out.png", None)]:
        assert main(["denoise", str(tmp_path / source), "-o", str(tmp_path / output), "--checkpoint",
                     str(checkpoint)]) == 0
        err = capsys.readouterr().err
        assert (warning in err) if warning else "warning" not in err, err
        assert read_image(tmp_path / output)[0].shape == (3, 12, 14)


def test_denoise_command_refuses_to_drop_an_alpha_plane_into_a_jpeg(tmp_path, capsys):
    checkpoint = dds_fast.save(net(), tmp_path / "net.safetensors")
    source = save_image(tmp_path / "in.png", torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(6)))
    assert main(["denoise", str(source), "-o", str(tmp_path / "out.jpg"), "--checkpoint", str(checkpoint)]) == 2
    assert "alpha channel" in capsys.readouterr().err and not (tmp_path / "out.jpg").exists()


def test_a_baseline_without_a_receptive_radius_is_evaluated_tile_by_tile_with_an_overlap():
    torch.manual_seed(0)
    baseline = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1))
    clean = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(8))
    noisy = (clean + 0.05).clamp(0, 1)
    with pytest.raises(ValueError, match="no receptive_radius"):
        evaluate(baseline, [(noisy, clean)], tile=32)
    whole = evaluate(baseline, [(noisy, clean)])
    assert evaluate(baseline, [(noisy, clean)], tile=32, overlap=4).psnr == pytest.approx(whole.psnr, abs=1e-9)


def test_a_model_without_parameters_is_evaluated_as_a_baseline():
    """The identity (the noisy input itself) costs nothing and scores as the noisy input."""
    generator = torch.Generator().manual_seed(7)
    clean = torch.rand(3, 16, 20, generator=generator)
    noisy = (clean + 0.1 * torch.randn(3, 16, 20, generator=generator)).clamp(0, 1)
    result = evaluate(torch.nn.Identity(), [(noisy, clean)])
    assert result.macs_per_pixel == 0 and result.psnr == pytest.approx(psnr(noisy, clean))


def test_comparison_table_leaves_the_callers_mode_when_a_row_fails():
    dds = ddsnet()
    dds.set_budget(float("inf"))
    with pytest.raises(Exception):
        comparison_table(dds, [net()], [(torch.rand(2, 3, 16, 16), torch.rand(3, 16, 16))])  # a batch, not an image
    assert dds.budget_index == 1
    comparison_table(dds, [net()], pairs(n=1))
    assert dds.budget_index == 1



def test_evaluate_reports_the_mean_of_the_routes_macs_in_eval_mode():
    """The mean over images (it reported the first's route), from a model put in eval mode and
    left there (a gate's BatchNorm in train mode scores by batch statistics)."""
    from test_ddsnet import images, make_ddsnet

    dds = make_ddsnet()  # its gate routes images() by brightness, the darkest to route 0
    x = images()
    pairs = [(x[0], x[0].clamp(0, 1)), (x[-1], x[-1].clamp(0, 1))]
    routed = [dds.routed_macs(noisy[None])[0] for noisy, _ in pairs]
    assert routed[0] != routed[1]
    dds.train()
    result = evaluate(dds, pairs)
    assert not dds.training and result.macs_per_pixel == pytest.approx(sum(routed) / 2)


def test_an_image_exactly_one_tile_wide_runs_whole():
    """(it was tiled, and a large overlap then left no core to a tile: an error)"""
    model = net()
    x = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(denoise(model, x, tile=24, overlap=24), model(x[None])[0])


def test_a_tiled_model_with_other_output_channels_fills_its_own_buffer():
    model = SlimDnCNN(in_channels=3, out_channels=1, base_width=8, depth=4).eval()
    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tiled = denoise(model, x, tile=24, overlap=8)
        assert tiled.shape == (1, 40, 50)
        torch.testing.assert_close(tiled, model(x[None])[0], rtol=1e-5, atol=1e-6)


def test_evaluate_scores_an_output_far_outside_0_1_as_clipped():
    """A poor model's output scores as the saved image would (clipped), not fails."""
    class Loud(torch.nn.Module):
        def forward(self, x):
            return x * 10 - 4

    clean = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(6))
    result = evaluate(Loud(), [(clean, clean)])
    expected = psnr((clean * 10 - 4).clamp(0, 1), clean)
    assert result.psnr == pytest.approx(expected)
    # but a noisy input on the 0..255 scale is the caller's slip, which the clamp would hide
    noisy = (clean * 255).round()
    with pytest.raises(ValueError, match=r"evaluate: pair 1's noisy image: expected float values in \[0, 1\]"):
        evaluate(Loud(), [(clean, clean), (noisy, clean)])
    # while unclipped noise, however strong, is a noisy image on the unit scale (sigma 400 here)
    loud_noise = clean + 400 / 255 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    assert loud_noise.min() < -4 and loud_noise.max() > 5
    assert evaluate(Loud(), [(loud_noise, clean)]).images == 1
