"""benchmarks/quality.py, the script behind the README's quality tables, on a tiny DDSNet."""
import dataclasses
import json
import sys
import types

import pytest
import torch

from dds_fast import DDSNet, load, save
from dds_fast.metrics import psnr
from tests.scripts import load_benchmark
from tests.test_cli import small_ddsnet


@pytest.fixture
def quality(monkeypatch):
    module = load_benchmark(monkeypatch, "quality")
    monkeypatch.setattr(module, "bm3d_row", lambda pairs, sigmas: None)  # slow, and optional
    return module


@pytest.mark.parametrize("attention", [False, True])
def test_each_route_alone_is_the_model_in_static_mode(quality, tmp_path, capsys, attention):
    """Route rows run the model as it runs a route (behind the gate's attention scale when
    that is on, with its full-width stem counted); the I-Net table pairs each route with its
    I-Net."""
    dds = small_ddsnet(attention=attention)
    checkpoint = save(dds, tmp_path / "dds.safetensors")
    inets = []
    for index, entry in enumerate(dds.routing_space):
        dds.supernet.set_config(entry.config)
        inets.append(str(save(dds.supernet, tmp_path / f"inet-{index}.safetensors")))
    out = tmp_path / "quality.json"
    assert quality.main([str(checkpoint), "--images", "coins", "--inets", *inets, "--out", str(out)]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    for index in range(len(dds.routing_space)):
        dds.set_budget(dds.static_macs_per_pixel(index))
        alone = quality.evaluate(dds, quality.noisy_pairs(["coins"], quality.GaussianNoise(25), 3), "alone")
        assert rows[f"route {index} alone"]["psnr"] == pytest.approx(alone.psnr)
        assert rows[f"route {index} alone"]["macs_per_pixel"] == pytest.approx(dds.static_macs_per_pixel(index))
    table = capsys.readouterr().out
    inet_psnr = float(next(line for line in table.splitlines() if line.startswith("| I-Net 0 |")).split("|")[3])
    if not attention:  # a route alone is then its I-Net's very network
        assert inet_psnr == pytest.approx(rows["route 0 alone"]["psnr"], abs=0.006)


def test_gray_pairs_are_gray_photos_read_as_colour(quality, tmp_path):
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    out = tmp_path / "quality.json"
    assert quality.main([str(checkpoint), "--images", "coins", "--gray", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["gray"] and record["noise"] == "gray, AWGN sigma 25"
    (noisy, clean), = quality.noisy_pairs(["coins"], quality.GrayNoise(quality.GaussianNoise(25)), 3)
    assert torch.equal(noisy, noisy[:1].expand_as(noisy)) and torch.equal(clean, clean[:1].expand_as(clean))
    assert record["rows"][0]["psnr"] == pytest.approx(psnr(noisy, clean))


def test_bm3d_denoises_a_gray_pair_on_its_one_plane(monkeypatch):
    module = load_benchmark(monkeypatch, "quality")
    calls = []

    def denoiser(kind):
        return lambda image, sigma: calls.append((kind, image.shape)) or image

    monkeypatch.setitem(sys.modules, "bm3d", types.SimpleNamespace(bm3d=denoiser("gray"), bm3d_rgb=denoiser("rgb")))
    clean = torch.rand(3, 12, 12)
    gray, colour = torch.rand(1, 12, 12).expand(3, -1, -1), torch.rand(3, 12, 12)
    row = module.bm3d_row([(gray, clean), (colour, clean)], [25, 25])
    assert calls == [("gray", (12, 12)), ("rgb", (12, 12, 3))]
    assert row.psnr == pytest.approx((psnr(gray, clean) + psnr(colour, clean)) / 2)


def test_ablate_refine_saves_the_refined_ddsnet_with_its_gate(monkeypatch, tmp_path, capsys):
    from tests.test_training import tiny_run_config

    ablate = load_benchmark(monkeypatch, "ablate_refine")
    dds = small_ddsnet()
    config = tiny_run_config(arch="SlimUNet", channels=3, depth=2, validation_patch=16)
    checkpoint = save(dds, tmp_path / "dds.safetensors", train_config=dataclasses.asdict(config))
    out = tmp_path / "refined.safetensors"
    assert ablate.main([str(checkpoint), "--steps", "2", "--save", str(out), "--out", str(tmp_path / "r.json")]) == 0
    with pytest.raises(SystemExit, match="not a file in a folder that exists"):  # before the steps
        ablate.main([str(checkpoint), "--steps", "2", "--save", str(tmp_path)])
    refined = load(out)
    after = json.loads((tmp_path / "r.json").read_text())["validation_psnr_after"]
    assert isinstance(refined, DDSNet) and [e.psnr for e in refined.routing_space] == pytest.approx(after)
    for name, tensor in dds.gate.state_dict().items():
        assert torch.equal(refined.gate.state_dict()[name], tensor), name
    assert not torch.equal(refined.supernet.stem_conv.weight, dds.supernet.stem_conv.weight)  # it trained
