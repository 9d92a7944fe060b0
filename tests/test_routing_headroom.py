"""benchmarks/routing_headroom.py: the oracle gate and the static frontier it is measured against."""
import json

import numpy as np
import pytest

from dds_fast import save
from dds_fast.evaluate import evaluate
from tests.scripts import load_benchmark
from tests.test_cli import small_ddsnet


@pytest.fixture
def headroom(monkeypatch):
    return load_benchmark(monkeypatch, "routing_headroom")


def test_oracle_sends_each_image_to_its_best_route_for_the_price(headroom):
    # image 0 gains nothing from the dearer route, image 1 gains 2 dB
    route_psnr = np.array([[30.0, 30.0], [25.0, 27.0]])
    macs = np.array([1000.0, 3000.0])
    points = headroom.oracle_points(route_psnr, macs)
    choices = [tuple(p["choice"]) for p in points]
    assert len(choices) == len(set(choices))
    assert (0, 1) in choices  # the split a gate that reads the image would make
    split = points[choices.index((0, 1))]
    assert split["macs_per_pixel"] == pytest.approx(2000.0)
    assert split["psnr"] == pytest.approx(28.5)
    # the frontier at 2000 MACs/pixel is halfway between the routes run alone: 27.5 and 28.5
    frontier = headroom.frontier_psnr(macs, route_psnr.mean(axis=0), 2000.0)
    assert frontier == pytest.approx(28.0)
    for point in points:
        weight = point["lambda_db_per_mac"]
        assert point["choice"] == np.argmax(route_psnr - weight * macs, axis=1).tolist()


def test_script_rows_are_the_model_run_statically_and_dynamically(headroom, tmp_path):
    dds = small_ddsnet()
    checkpoint = save(dds, tmp_path / "dds.safetensors")
    out = tmp_path / "headroom.json"
    assert headroom.main([str(checkpoint), "--images", "coins", "--sigma", "25", "--camera", "1",
                          "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {row["name"]: row for row in record["rows"]}
    pairs = headroom.noisy_pairs(["coins"], headroom.GaussianNoise(25), 3)
    pairs += headroom.noisy_pairs(["coins"], headroom.CameraNoise(), 3, seed=1000)
    for index in range(len(dds.routing_space)):
        dds.set_budget(dds.static_macs_per_pixel(index))
        alone = evaluate(dds, pairs)
        assert rows[f"route {index} alone"]["psnr"] == pytest.approx(alone.psnr)
        assert rows[f"route {index} alone"]["gain_db"] == pytest.approx(0.0, abs=1e-9)
    dds.set_budget(None)
    dynamic = evaluate(dds, pairs)
    assert rows["trained gate"]["psnr"] == pytest.approx(dynamic.psnr)
    assert rows["trained gate"]["macs_per_pixel"] == pytest.approx(dynamic.macs_per_pixel)
    assert len(record["route_psnr"]) == len(record["pairs"]) == 2


@pytest.mark.parametrize("argv, message", [(["--camera", "-1"], "--camera"), (["--sigma", "--camera", "0"], "no noise")])
def test_script_refuses_bad_arguments(headroom, capsys, argv, message):
    with pytest.raises(SystemExit):
        headroom.main(argv)
    assert message in capsys.readouterr().err


def test_script_sets_each_row_against_the_static_networks_given(headroom, tmp_path):
    """With ``--inets``, each row is also set against the static networks' frontier: a route
    saved alone as a static network is that route, so its row sits on that frontier."""
    dds = small_ddsnet()
    checkpoint = save(dds, tmp_path / "dds.safetensors")
    inets = []
    for index in reversed(range(len(dds.routing_space))):  # given out of MACs order
        dds.supernet.set_config(dds.routing_space[index].config)
        inets.append(str(save(dds.supernet, tmp_path / f"inet-{index}.safetensors")))
    out = tmp_path / "headroom.json"
    assert headroom.main([str(checkpoint), "--images", "coins", "--sigma", "10", "50", "--camera", "0",
                          "--inets", *inets, "--out", str(out)]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    for index in range(len(dds.routing_space)):
        route, inet = rows[f"route {index} alone"], rows[f"inet-{index}"]
        assert inet["macs_per_pixel"] == pytest.approx(route["macs_per_pixel"])
        assert inet["psnr"] == pytest.approx(route["psnr"], abs=1e-6)
        assert route["inet_frontier_psnr"] == pytest.approx(route["psnr"], abs=1e-6)
    # the oracle over the static networks lies on the upper hull: never below the straight lines
    for row in rows.values():
        assert row["inet_oracle_psnr"] >= row["inet_frontier_psnr"] - 1e-9


def test_gate_squeeze_is_the_channel_means_of_the_full_width_stem(headroom):
    import torch

    dds = small_ddsnet()
    dds.supernet.set_config(dds.supernet.space.smallest())  # the gate reads the full width whatever runs
    x = torch.rand(2, 3, 16, 16)
    dds.supernet.set_config(dds.supernet.space.largest())
    expected = dds.supernet.stem(x).double().mean(dim=(2, 3)).detach().numpy()
    dds.supernet.set_config(dds.supernet.space.smallest())
    np.testing.assert_allclose(headroom.gate_squeeze(dds, x), expected, rtol=1e-6, atol=1e-9)


def test_script_fits_the_gain_on_training_crops(headroom, tmp_path):
    dds = small_ddsnet()
    checkpoint = save(dds, tmp_path / "dds.safetensors")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"arch": "SlimUNet", "channels": 3, "base_width": 8, "depth": 2,
                                  "gate_patch_size": 16, "gate_batch_size": 4, "epoch_patches": 64}))
    out = tmp_path / "headroom.json"
    assert headroom.main([str(checkpoint), "--images", "coins", "--sigma", "10", "50", "--camera", "1",
                          "--fit-config", str(config), "--fit-crops", "40", "--out", str(out)]) == 0
    fit = json.loads(out.read_text())["gain_fit"]
    assert fit["crops"] == 40 and 0 <= fit["r2_on_crops"] <= 1
    assert -1 <= fit["correlation_on_pairs"] <= 1


def _no_routes(*args, **kwargs):
    raise AssertionError("the arguments should have been refused before the routes ran")


@pytest.mark.parametrize("bad, message", [
    ({"epoch_patches": 0}, "epoch_patches must be >= 1"),  # TrainConfig's own checks
    ({"no_such_option": 1}, "unknown training options"),
    ({"epoch_patches": 16}, "--fit-crops 40 is more than the 16 crops"),
    ("missing", "cannot read training config"),
])
def test_script_checks_the_fit_config_before_the_routes(headroom, monkeypatch, tmp_path, capsys, bad, message):
    monkeypatch.setattr(headroom, "per_pair_psnr", _no_routes)
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    config = tmp_path / "train.json"
    if bad != "missing":
        config.write_text(json.dumps({"arch": "SlimUNet", "channels": 3, "base_width": 8, "depth": 2,
                                      "gate_patch_size": 16, "batch_size": 4, "gate_batch_size": 4, **bad}))
    with pytest.raises(SystemExit) as exit_:
        headroom.main([str(checkpoint), "--images", "coins", "--fit-config", str(config), "--fit-crops", "40"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and ("--fit-config" in err or "--fit-crops" in err)


@pytest.mark.parametrize("bad", ["out", "inets"])
def test_script_checks_its_paths_before_the_routes(headroom, monkeypatch, tmp_path, capsys, bad):
    monkeypatch.setattr(headroom, "per_pair_psnr", _no_routes)
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    argv = {"out": ["--out", str(tmp_path / "no" / "headroom.json")],
            "inets": ["--inets", str(tmp_path / "gone.safetensors")]}[bad]
    with pytest.raises(SystemExit) as exit_:
        headroom.main([str(checkpoint), "--images", "coins", *argv])
    assert exit_.value.code == 2 and f"--{bad}" in capsys.readouterr().err


def test_script_writes_an_undefined_correlation_as_null(headroom, tmp_path, capsys):
    """One pair has no correlation: null in the JSON (which has no NaN), "undefined" in the table."""
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"arch": "SlimUNet", "channels": 3, "base_width": 8, "depth": 2,
                                  "gate_patch_size": 16, "batch_size": 4, "gate_batch_size": 4, "epoch_patches": 8}))
    out = tmp_path / "headroom.json"
    assert headroom.main([str(checkpoint), "--images", "coins", "--sigma", "25", "--camera", "0",
                          "--fit-config", str(config), "--fit-crops", "8", "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"bare {constant} in the JSON")

    assert json.loads(out.read_text(), parse_constant=refuse)["gain_fit"]["correlation_on_pairs"] is None
    assert "correlation with the real gain on these pairs undefined" in capsys.readouterr().out


def test_frontier_and_oracle_take_the_routes_in_any_order(headroom):
    # a DDSNet keeps its routes in the order it was given them, not always ascending MACs
    route_psnr = np.array([[30.0, 30.0, 31.0], [25.0, 27.0, 28.0]])
    macs = np.array([1000.0, 3000.0, 5000.0])
    order = [2, 0, 1]
    assert headroom.frontier_psnr(macs[order], route_psnr.mean(axis=0)[order], 2000.0) == pytest.approx(28.0)

    def points(psnr, cost):
        return [(p["macs_per_pixel"], p["psnr"]) for p in headroom.oracle_points(psnr, cost)]
    assert points(route_psnr[:, order], macs[order]) == points(route_psnr, macs)


def test_pairs_are_scored_on_outputs_clamped_to_the_image_range(headroom):
    import torch

    dds = small_ddsnet().eval()
    with torch.no_grad():  # outputs far outside [0, 1]: scored as 8-bit images are, not refused
        for p in dds.supernet.parameters():
            p.mul_(50)
    clean = torch.rand(3, 16, 16)
    scores = headroom.per_pair_psnr(dds, [(clean, clean)])
    assert np.isfinite(scores).all() and scores[0] < 20


def test_the_gain_fit_refuses_a_route_its_budget_does_not_run(headroom):
    """set_budget runs the best PSNR within a budget: the largest route's cost runs route 0
    when route 0 recorded the better PSNR, and the gain would be of route 0 over itself."""
    import torch

    from dds_fast import RoutingEntry

    dds = small_ddsnet()
    dds.routing_space = [RoutingEntry(e.config, e.macs_per_pixel, psnr) for e, psnr in zip(dds.routing_space, (40, 30))]
    crops = [(torch.rand(3, 8, 8), torch.rand(3, 8, 8)) for _ in range(2)]
    with pytest.raises(SystemExit, match="route 1's own cost selects route 0 in static mode"):
        headroom.fit_gain(dds, crops, crops=2)
