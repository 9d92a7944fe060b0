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
    record = json.loads(out.read_text())
    assert record["inets"] == inets  # (7,000- and 19,000-step I-Net results differed by their file names only)
    rows = {row["name"]: row for row in record["rows"]}
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


def test_channel_orders_give_each_colour_photo_in_all_six(quality, tmp_path):
    """The identity order first, with the noise a run without orders draws; then the other
    five, each a permutation of the photo's channels with noise of its own."""
    plain = quality.noisy_pairs(["chelsea"], quality.GaussianNoise(25), 3)
    pairs = quality.noisy_pairs(["chelsea"], quality.GaussianNoise(25), 3, channel_orders=True)
    assert len(pairs) == 6 and all(torch.equal(a, b) for a, b in zip(pairs[0], plain[0]))
    clean = plain[0][1]
    orders = {tuple(k for c in range(3) for k in range(3) if torch.equal(pair[1][c], clean[k])) for pair in pairs}
    assert len(orders) == 6
    assert len({round(float((noisy - c).std()), 6) for noisy, c in pairs}) == 6  # (each its own noise)
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    out = tmp_path / "quality.json"
    assert quality.main([str(checkpoint), "--images", "coins", "--channel-orders", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["channel_orders"] and record["rows"][0]["images"] == 6


def test_a_large_sigma_is_scored_as_its_images_are_saved(quality, tmp_path):
    """Sigma 200 puts noisy pixels far outside [0, 1], where the metrics refuse to guess the
    scale: the noisy row and the model's rows score them clamped, as a saved image is."""
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    out = tmp_path / "quality.json"
    assert quality.main([str(checkpoint), "--images", "coins", "--sigma", "200", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    (noisy, clean), = quality.noisy_pairs(["coins"], quality.GaussianNoise(200), 3)
    assert noisy.min() < -2 and rows[0]["psnr"] == pytest.approx(psnr(noisy.clamp(0, 1), clean))
    assert all(row["psnr"] > 0 for row in rows)
    assert quality.main([str(checkpoint), "--images", "coins", "--sigma", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["psnr"] is None  # the noisy input is the clean one: inf dB


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


@pytest.mark.parametrize("attention", [False, True])
def test_ablate_refine_saves_the_refined_ddsnet_with_its_gate(monkeypatch, tmp_path, capsys, attention):
    from test_training import tiny_run_config

    from dds_fast.training.gate_stage import per_image_psnr
    from dds_fast.training.stages import Run

    ablate = load_benchmark(monkeypatch, "ablate_refine")
    dds = small_ddsnet(attention=attention)
    config = tiny_run_config(arch="SlimUNet", channels=3, depth=2, validation_patch=16, attention=attention)
    checkpoint = save(dds, tmp_path / "dds.safetensors", train_config=dataclasses.asdict(config))
    out = tmp_path / "refined.safetensors"
    assert ablate.main([str(checkpoint), "--steps", "2", "--save", str(out), "--out", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):  # before the steps
        ablate.main([str(checkpoint), "--steps", "2", "--save", str(tmp_path)])
    assert "not a file in a folder that exists" in capsys.readouterr().err
    refined = load(out)
    result = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(refined, DDSNet) and [e.psnr for e in refined.routing_space] == pytest.approx(
        result["validation_psnr_after"])
    # each route measured as the DDSNet runs it: behind its gate's attention scale where that is on
    # (the bare super-network was measured, refined and saved behind a scale it never trained with)
    batches = Run(tmp_path / "run", config).validation_batches()
    for route, (before, after) in enumerate(zip(result["validation_psnr_before"], result["validation_psnr_after"])):
        for model, reported in ((dds, before), (refined, after)):
            model.eval().set_budget(model.static_macs_per_pixel(route))
            with torch.no_grad():
                scores = torch.cat([per_image_psnr(model(noisy), clean) for noisy, clean in batches])
            assert float(scores.mean()) == pytest.approx(reported, abs=1e-6)
    attention_head = ("fc1.", "fc2.")  # (W1, W2: the prediction head's, unused behind the scale, stay)
    for name, tensor in dds.gate.state_dict().items():
        assert torch.equal(refined.gate.state_dict()[name], tensor) != (attention and name.startswith(attention_head)), name
    assert not torch.equal(refined.supernet.stem_conv.weight, dds.supernet.stem_conv.weight)  # it trained


def test_ablate_slimming_slims_a_ddsnet_behind_its_attention_scale(monkeypatch, tmp_path):
    from test_training import tiny_run_config

    from dds_fast.training.gate_stage import per_image_psnr
    from dds_fast.training.stages import Run

    ablate = load_benchmark(monkeypatch, "ablate_slimming")
    dds = small_ddsnet(attention=True)
    config = tiny_run_config(arch="SlimUNet", channels=3, depth=2, validation_patch=16, attention=True)
    checkpoint = save(dds, tmp_path / "dds.safetensors", train_config=dataclasses.asdict(config))
    assert ablate.main([str(checkpoint), "--criteria", "psnr", "--out", str(tmp_path / "s.json")]) == 0
    largest_macs, largest_psnr = json.loads((tmp_path / "s.json").read_text())["criteria"]["psnr"]["trajectory"][0]
    dds.set_budget(dds.static_macs_per_pixel(len(dds.routing_space) - 1))  # the largest config, as the net runs it
    with torch.no_grad():
        scores = torch.cat([per_image_psnr(dds(noisy), clean)
                            for noisy, clean in Run(tmp_path / "run", config).validation_batches()])
    assert largest_psnr == pytest.approx(float(scores.mean()), abs=1e-6)


def _no_evaluation(*args, **kwargs):
    raise AssertionError("the arguments should have been refused before any evaluation")


@pytest.mark.parametrize("bad", ["out-folder", "out-parent", "inet-missing", "inet-corrupt", "inets-of-slimnet"])
def test_quality_refuses_bad_paths_before_evaluating(quality, monkeypatch, tmp_path, capsys, bad):
    """--out and --inets are used after the whole evaluation (BM3D included): checked first."""
    monkeypatch.setattr(quality, "evaluate", _no_evaluation)
    dds = small_ddsnet()
    checkpoint = str(save(dds, tmp_path / "dds.safetensors"))
    inet = str(save(dds.supernet, tmp_path / "inet.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a checkpoint")
    argv, message = {
        "out-folder": ([checkpoint, "--out", str(tmp_path)], "not a file in a folder that exists"),
        "out-parent": ([checkpoint, "--out", str(tmp_path / "no" / "q.json")], "not a file in a folder that exists"),
        "inet-missing": ([checkpoint, "--inets", inet, str(tmp_path / "gone.safetensors")], "gone.safetensors"),
        "inet-corrupt": ([checkpoint, "--inets", str(tmp_path / "corrupt.safetensors")], "corrupt.safetensors"),
        "inets-of-slimnet": ([inet, "--inets", inet], "holds a SlimUNet"),
    }[bad]
    with pytest.raises(SystemExit) as exit_:
        quality.main([*argv, "--images", "coins"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and ("--out" in err if bad.startswith("out") else "--inets" in err)


@pytest.mark.parametrize("argv,message", [
    (["--sigma", "-5"], "argument --sigma: must be a finite number >= 0, got -5"),
    (["--images", "nosuch"], "--images: "),
    (["--inets", "GRAY"], "--inets: GRAY takes 1 channels, "),
])
def test_quality_refuses_bad_arguments_by_their_flag(quality, monkeypatch, tmp_path, capsys, argv, message):
    monkeypatch.setattr(quality, "evaluate", _no_evaluation)
    checkpoint = str(save(small_ddsnet(), tmp_path / "dds.safetensors"))
    gray = str(save(small_ddsnet(in_channels=1).supernet, tmp_path / "gray.safetensors"))
    argv = [gray if value == "GRAY" else value for value in argv]
    with pytest.raises(SystemExit) as exit_:
        quality.main([checkpoint, *argv])
    assert exit_.value.code == 2 and message.replace("GRAY", gray) in capsys.readouterr().err


def test_quality_writes_bm3d_s_unknown_macs_as_null(quality, monkeypatch, tmp_path):
    """JSON has no NaN: the BM3D row's MACs/pixel is null, and any other NaN fails the write."""
    baseline = quality.Evaluation("BM3D (true sigma)", 30.0, 0.9, float("nan"), 1)
    monkeypatch.setattr(quality, "bm3d_row", lambda pairs, sigmas: baseline)
    checkpoint = str(save(small_ddsnet().supernet, tmp_path / "net.safetensors"))
    out = tmp_path / "quality.json"
    assert quality.main([checkpoint, "--images", "coins", "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"bare {constant} in the JSON")

    rows = json.loads(out.read_text(), parse_constant=refuse)["rows"]
    assert rows[-1]["name"] == "BM3D (true sigma)" and rows[-1]["macs_per_pixel"] is None
    baseline.psnr = float("nan")
    with pytest.raises(ValueError, match="JSON compliant"):
        quality.main([checkpoint, "--images", "coins", "--out", str(out)])


@pytest.mark.parametrize("script", ["ablate_refine", "ablate_slimming"])
def test_ablations_name_a_checkpoint_without_its_training_options(monkeypatch, tmp_path, capsys, script):
    ablate = load_benchmark(monkeypatch, script)
    monkeypatch.setattr(ablate, "Run", _no_evaluation)
    checkpoint = str(save(small_ddsnet(), tmp_path / "dds.safetensors"))  # no train_config metadata
    with pytest.raises(SystemExit) as exit_:
        ablate.main([checkpoint])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert checkpoint in err and "train_config" in err


@pytest.mark.parametrize("script", ["ablate_refine", "ablate_slimming"])
def test_ablations_check_out_before_any_work(monkeypatch, tmp_path, capsys, script):
    ablate = load_benchmark(monkeypatch, script)
    monkeypatch.setattr(ablate.dds_fast, "load", _no_evaluation)
    with pytest.raises(SystemExit) as exit_:
        ablate.main([str(tmp_path / "any.safetensors"), "--out", str(tmp_path / "no" / "r.json")])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_ablate_refine_refuses_zero_steps_by_name(monkeypatch, tmp_path, capsys):
    ablate = load_benchmark(monkeypatch, "ablate_refine")
    monkeypatch.setattr(ablate.dds_fast, "load", _no_evaluation)
    with pytest.raises(SystemExit) as exit_:
        ablate.main([str(tmp_path / "any.safetensors"), "--steps", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--steps" in err and "checkpoint_every" not in err
