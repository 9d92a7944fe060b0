import pytest
import torch

import dds_fast
from dds_fast import DDSNet, DynamicGate, RoutingEntry, SlimDnCNN, macs_per_pixel
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
    assert "I-Net 0" in table and "DDS dynamic" in table and table.count("\n") == 4


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
