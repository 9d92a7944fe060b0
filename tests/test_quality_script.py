"""benchmarks/quality.py, the script behind the README's quality tables, on a tiny DDSNet."""
import json

import pytest

from dds_fast import save
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
