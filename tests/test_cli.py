import json
import os
import subprocess
import sys

import pytest
import torch

from dds_fast import RoutingEntry, SlimUNet, macs_per_pixel, read_metadata, save
from dds_fast import cli
from dds_fast.cli import main


def test_info_prints_architecture_widths_and_macs(tmp_path, capsys):
    net = SlimUNet(in_channels=3, base_width=8, depth=3)
    net.routing_space = [RoutingEntry(net.space.smallest(), macs_per_pixel(net, net.space.smallest()), 28.5)]
    path = save(net, tmp_path / "m.safetensors", note="hello")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SlimUNet" in out and "'note': 'hello'" in out
    assert f"{macs_per_pixel(net, net.space.largest()):,.0f}" in out
    assert f"{macs_per_pixel(net, net.space.smallest()):,.0f}" in out
    assert "route 0" in out and "28.50" in out
    assert "enc0.mid" in out


def test_info_on_a_static_export(tmp_path, capsys):
    from dds_fast import export_static

    net = SlimUNet(in_channels=3, base_width=8, depth=3)
    net.set_config(net.space.smallest())
    path = save(export_static(net), tmp_path / "static.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "static export of config" in out and f"{macs_per_pixel(net, net.space.smallest()):,.0f}" in out


CUSTOM_NET_MODULE = """
import dds_fast
from test_ddsnet import BodyGroupFirstNet  # a user's super-network

dds_fast.register_architecture(BodyGroupFirstNet)
"""


def test_the_cli_reads_a_super_network_of_the_users_own_after_importing_its_module(tmp_path, capsys, monkeypatch):
    import importlib
    import sys

    from dds_fast.nets import ARCHITECTURES

    (tmp_path / "cli_tiny_net.py").write_text(CUSTOM_NET_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    path = save(importlib.import_module("cli_tiny_net").BodyGroupFirstNet(), tmp_path / "mine.safetensors")
    monkeypatch.setattr(sys, "path", sys.path[1:])
    monkeypatch.delitem(sys.modules, "cli_tiny_net")
    monkeypatch.delitem(ARCHITECTURES, "BodyGroupFirstNet")  # a fresh process: nothing registered it
    assert main(["info", str(path)]) == 2
    assert "unknown architecture 'BodyGroupFirstNet'" in capsys.readouterr().err
    assert main(["--import", "cli_tiny_net", "info", str(path)]) == 0  # found from the current folder
    assert "BodyGroupFirstNet" in capsys.readouterr().out
    assert main(["--import", "no_such_module_here", "info", str(path)]) == 2
    assert "--import no_such_module_here: No module named 'no_such_module_here'" in capsys.readouterr().err
    assert main(["--import", "cli_tiny_net.py", "info", str(path)]) == 2
    assert "without .py: --import cli_tiny_net)" in capsys.readouterr().err


def test_info_on_a_bad_file_fails_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["info", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2


def test_untrained_demo_slims_a_network_on_a_bundled_photo(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "none.safetensors")
    assert main(["demo", "--size", "33", "--base-width", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "smallest" in out and "uniform 1" in out
    # every width's output equals the exported static network's
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("smallest", "uniform"))]
    assert all(float(row[-1]) == 0.0 for row in rows)
    # MACs as the photo runs, padded from 33 to 40 pixels a side
    space = SlimUNet(in_channels=3, base_width=8).space
    assert [rows[0][1], rows[-1][2]] == [f"{macs_per_pixel(SlimUNet(in_channels=3, base_width=8), c, (3, 33, 33)):,.0f}"
                                         for c in (space.smallest(), space.largest())]


def test_trained_demo_routes_a_held_out_photo(capsys, tmp_path):
    from dds_fast import DDSNet, DynamicGate

    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = DynamicGate(net.stem_channels, 2)
    gate.attention = False
    checkpoint = save(DDSNet(net, gate, routes).eval(), tmp_path / "dds.safetensors")
    assert main(["info", str(checkpoint)]) == 0
    info = capsys.readouterr().out
    assert "gate:" in info and "2 choices" in info and "route 1" in info
    picture = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", str(checkpoint), "--image", "coins", "--repeats", "1",
                 "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "gate chose sub-network" in out and "PSNR" in out and "route 1" in out
    from dds_fast.training.data import read_image

    image, _ = read_image(picture)
    assert image.shape == (3, 303, 3 * 384)  # noisy | denoised | clean


def small_ddsnet(in_channels=3, attention=False):
    from dds_fast import DDSNet, DynamicGate

    torch.manual_seed(0)
    net = SlimUNet(in_channels=in_channels, base_width=8, depth=2)
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = DynamicGate(net.stem_channels, 2)
    gate.attention = attention
    if attention:
        torch.nn.init.normal_(gate.fc2.bias, std=0.5)  # a trained attention head: its scale is not 1
    return DDSNet(net, gate, routes).eval()


def test_trained_demo_runs_each_route_behind_the_gates_attention(capsys, tmp_path):
    checkpoint = save(small_ddsnet(attention=True), tmp_path / "dds.safetensors")
    assert main(["demo", "--checkpoint", str(checkpoint), "--image", "coins", "--repeats", "1",
                 "--out", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    denoised = out.split("PSNR ")[1].split(" -> ")[1].split(" dB")[0]
    chosen = next(line.split() for line in out.splitlines() if "(chosen)" in line)
    # the chosen route's row is the model's own output: the same PSNR
    assert chosen[4] == denoised


def test_trained_demo_scores_a_large_sigma_as_it_saves_it(capsys, tmp_path):
    """A noisy image far outside [0, 1] (sigma 200) is scored clamped, as the PNG shows it."""
    from dds_fast.metrics import psnr
    from dds_fast.training.data import read_image

    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    picture = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", str(checkpoint), "--image", "coins", "--sigma", "200", "--repeats", "1",
                 "--out", str(picture)]) == 0
    noisy_db = float(capsys.readouterr().out.split("PSNR ")[1].split(" -> ")[0])
    image, _ = read_image(picture)
    noisy, _, clean = image.chunk(3, dim=2)
    assert noisy_db == round(psnr(noisy, clean), 2)


def test_trained_demo_on_a_gray_model_reads_the_photo_in_gray(capsys, tmp_path):
    from dds_fast.training.data import read_image

    checkpoint = save(small_ddsnet(in_channels=1), tmp_path / "dds.safetensors")
    picture = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", str(checkpoint), "--image", "chelsea", "--repeats", "1",
                 "--out", str(picture)]) == 0
    assert "gate chose sub-network" in capsys.readouterr().out
    assert read_image(picture)[0].shape == (1, 300, 3 * 451)


def test_train_all_stages_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"arch": "SlimDnCNN", "channels": 1, "base_width": 8, "depth": 3, "patch_size": 24,
                                  "batch_size": 4, "epoch_patches": 8, "validation_crops": 1, "validation_patch": 32,
                                  "slim_step": 8, "num_choices": 2, "progress": False, "gate_steps": 2,
                                  "gate_batch_size": 4, "gate_patch_size": 24}))
    run_dir = tmp_path / "run"
    assert main(["train", "all", "--run-dir", str(run_dir), "--config", str(config), "--steps", "2",
                 "--refine-steps", "1"]) == 0
    assert {"stage1.safetensors", "stage2.safetensors", "refine.safetensors", "dds.safetensors", "inet-0.safetensors",
            "inet-1.safetensors"} <= {p.name for p in run_dir.iterdir()}
    # each I-Net trains as many steps as each route (stage 1's 2 and refine's 1)
    assert len((run_dir / "inet-0.log.jsonl").read_text().splitlines()) == 3
    assert main(["train", "refine", "--run-dir", str(run_dir), "--config", str(config)]) == 2
    assert "--refine-steps" in capsys.readouterr().err
    assert main(["info", str(run_dir / "stage2.safetensors")]) == 0
    assert "route 1" in capsys.readouterr().out
    assert main(["train", "stage1", "--run-dir", str(run_dir), "--config", str(tmp_path / "nope.json")]) == 2


def test_shipped_model_is_a_small_ddsnet_and_the_demo_runs_with_no_argument(tmp_path, capsys):
    from dds_fast import DDSNet, load
    from dds_fast.training.data import read_image

    model = load(cli.SHIPPED_MODEL)
    assert isinstance(model, DDSNet) and len(model.routing_space) >= 2
    assert macs_per_pixel(model.supernet, model.supernet.space.largest()) <= 200_000
    picture = tmp_path / "demo.png"
    assert main(["demo", "--repeats", "1", "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "the shipped model" in out and "gate chose sub-network" in out and "(held out of training)" in out
    assert read_image(picture)[0].shape[0] == 3


TINY_TRAINING = {"arch": "SlimDnCNN", "channels": 1, "base_width": 8, "depth": 3, "patch_size": 16, "batch_size": 2,
                 "epoch_patches": 4, "gate_batch_size": 4, "validation_patch": 16, "gate_patch_size": 16,
                 "num_choices": 2, "progress": False}


def test_a_stage_another_process_trains_in_the_run_directory_is_refused(tmp_path, capsys):
    """Two processes trained one stage side by side, each resuming the other's checkpoints:
    the folder ended with one's weights beside the other's log. (An advisory lock, held here
    as another process would hold it; the I-Nets take one each, so they still share a folder.)"""
    from dds_fast.training.loop import sole_writer

    config = tmp_path / "train.json"
    config.write_text(json.dumps(TINY_TRAINING))
    run_dir = tmp_path / "run"
    train = ["--run-dir", str(run_dir), "--config", str(config), "--steps", "1"]
    with sole_writer(run_dir, "stage1"):
        assert main(["train", "stage1", *train]) == 2
        assert f"another process is training stage1 in {run_dir}" in capsys.readouterr().err
        assert not (run_dir / "stage1.safetensors").exists()
    assert main(["train", "stage1", *train]) == 0
    with sole_writer(run_dir, "stage2"):
        assert main(["train", "stage2", *train]) == 2
        assert f"another process is training stage2 in {run_dir}" in capsys.readouterr().err
    with sole_writer(run_dir, "inet-0"):
        assert main(["train", "stage2", *train]) == 0
        assert main(["train", "inets", "--inet", "1", *train]) == 0


def test_stage_2_reused_puts_back_the_log_of_its_search(tmp_path):
    """A search with other options, killed, had left its own cut records beside the result
    that a rerun then reused."""
    config = tmp_path / "train.json"
    config.write_text(json.dumps(TINY_TRAINING))
    run_dir = tmp_path / "run"
    train = ["--run-dir", str(run_dir), "--config", str(config), "--steps", "1"]
    assert main(["train", "stage1", *train]) == 0 and main(["train", "stage2", *train]) == 0
    log = run_dir / "stage2.log.jsonl"
    searched = log.read_text()
    assert len(searched.splitlines()) == len(read_metadata(run_dir / "stage2.safetensors")["user"]["trajectory"]) > 1
    log.write_text(searched.splitlines()[0][:20])  # what a killed search of other options leaves
    assert main(["train", "stage2", *train]) == 0
    assert log.read_text() == searched


def test_train_flags_for_noise_arguments_and_validation_images(tmp_path):
    from test_training import image_folder

    config = tmp_path / "train.json"
    config.write_text(json.dumps(TINY_TRAINING))
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    run_dir = tmp_path / "run"
    assert main(["train", "stage1", "--run-dir", str(run_dir), "--config", str(config), "--steps", "1",
                 "--images", str(folder), "--noise", "camera", "--noise-args", '{"shot_noise": 0.01}',
                 "--validation-images", "a.png", "b.png"]) == 0
    stored = read_metadata(run_dir / "stage1.safetensors")["user"]["train_config"]
    assert stored["noise"] == "camera" and stored["noise_args"] == {"shot_noise": 0.01}
    assert stored["validation_images"] == ["a.png", "b.png"]
    assert stored["attention"] is True and read_metadata(run_dir / "stage1.safetensors")["arch"] == "AttentionSupernet"
    plain = tmp_path / "plain"
    assert main(["train", "stage1", "--run-dir", str(plain), "--config", str(config), "--steps", "1",
                 "--images", str(folder), "--no-attention"]) == 0
    assert read_metadata(plain / "stage1.safetensors")["arch"] == "SlimDnCNN"
    with pytest.raises(SystemExit) as raised:
        main(["train", "stage1", "--run-dir", str(run_dir), "--noise-args", "{sigma: 5}"])
    assert raised.value.code == 2


def test_train_all_checks_stage_3_crops_before_stage_1(tmp_path, capsys):
    from test_training import image_folder

    config = tmp_path / "train.json"
    config.write_text(json.dumps({**TINY_TRAINING, "gate_patch_size": 100}))
    folder = image_folder(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    run = ["--run-dir", str(tmp_path / "run"), "--config", str(config), "--steps", "1", "--images", str(folder)]
    assert main(["train", "all", *run]) == 2
    assert "gate_patch_size 100 is larger than the training image" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stage1.log.jsonl").exists()
    assert main(["train", "stage1", *run]) == 0  # stage 1 does not crop at that size


def test_train_reports_bad_input_as_an_error_without_a_traceback(tmp_path, capsys):
    run = ["train", "stage1", "--run-dir", str(tmp_path / "run")]
    (tmp_path / "hostname").write_text("box\n")
    assert main(run + ["--images", str(tmp_path / "hostname")]) == 2
    assert "not a folder" in capsys.readouterr().err
    config = tmp_path / "train.json"
    for contents, message in [("[1, 2]", "expected a JSON object of training options, got list"),
                              ('{"steps": "ten"}', "steps must be an integer, got 'ten'"),
                              ('{"noise_args": [25]}', "noise_args must be a JSON object, got [25]")]:
        config.write_text(contents)
        assert main(run + ["--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dds-fast: error: ") and message in err, err
    assert main(run + ["--paired-root", str(tmp_path / "sidd")]) == 2
    assert str(tmp_path / "sidd" / "Data") in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(run + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    tiny = ["--run-dir", str(tmp_path / "empty"), "--arch", "SlimDnCNN", "--channels", "1", "--base-width", "8",
            "--depth", "3", "--slim-step", "8", "--num-choices", "2", "--device", "cpu"]
    for stage, needs in [("stage2", "stage1"), ("refine", "stage2"), ("stage3", "stage2"), ("inets", "stage2")]:
        extra = ["--refine-steps", "1"] if stage == "refine" else []
        assert main(["train", stage, *tiny, *extra]) == 2
        err = capsys.readouterr().err
        assert f"{needs}.safetensors does not exist: run `dds-fast train {needs}` first" in err, err
    (tmp_path / "afile").write_text("")
    assert main(["train", "stage2", *tiny[:1], str(tmp_path / "afile"), *tiny[2:]]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err


def test_inet_indices_are_checked_before_stage_1(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps(TINY_TRAINING))
    run = ["--run-dir", str(tmp_path / "run"), "--config", str(config), "--steps", "1"]
    assert main(["train", "all", *run, "--inet", "0", "--inet", "7"]) == 2
    assert "--inet [7]: stage 2 keeps num_choices 2 routing configs, 0 to 1" in capsys.readouterr().err
    assert main(["train", "stage1", *run, "--inet", "0"]) == 2
    assert "--inet picks I-Nets to train: it applies to train inets or all, not stage1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stage1.log.jsonl").exists()


def test_a_bad_training_option_is_blamed_on_where_it_came_from(tmp_path, capsys):
    run = ["train", "stage1", "--run-dir", str(tmp_path / "run")]
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**TINY_TRAINING, "steps": 2}))
    for flags, message in [(["--steps", "-5"], "--steps: steps must be >= 1, got -5"),
                           (["--distillation", "soft"], "--distillation: unknown distillation 'soft'"),
                           (["--device", "meta"], "device 'meta': dds-fast runs on cpu or cuda"),
                           # (an OverflowError deep in the loop, or a hang building the layers)
                           (["--epoch-patches", str(10 ** 20)], "--epoch-patches: epoch_patches must be at most "
                                                                "2147483647, got 100000000000000000000"),
                           (["--depth", str(10 ** 20)], "--depth: depth must be at most 2147483647")]:
        assert main(run + ["--config", str(config), *flags]) == 2
        assert message in capsys.readouterr().err
    config.write_text(json.dumps({**TINY_TRAINING, "lr": 10 ** 400}))  # (float() of it overflowed)
    assert main(run + ["--config", str(config)]) == 2
    assert f"{config}: lr must be a number within a float's range, got an integer of 401 digits" in \
        capsys.readouterr().err
    config.write_text(json.dumps({**TINY_TRAINING, "steps": 0}))
    assert main(run + ["--config", str(config), "--lr", "0.001"]) == 2
    assert f"{config}: steps must be >= 1, got 0" in capsys.readouterr().err
    assert main(run + ["--steps", "0"]) == 2
    assert "--steps: steps must be >= 1, got 0" in capsys.readouterr().err
    config.write_text(json.dumps({"batch_size": 4}))
    assert main(run + ["--config", str(config), "--epoch-patches", "3"]) == 2
    assert (f"batch_size from {config}, epoch_patches from --epoch-patches: batch_size 4 is larger than "
            f"epoch_patches 3") in capsys.readouterr().err
    assert main(run + ["--epoch-patches", "32"]) == 2
    assert ("gate_batch_size from the default, epoch_patches from --epoch-patches: gate_batch_size 64 is larger "
            "than epoch_patches 32") in capsys.readouterr().err


@pytest.mark.parametrize("options,message", [
    ({"gate_batch_size": 3}, "gate_batch_size 3 does not split over 2 processes"),
    ({"gate_batch_size": 2}, "gate_batch_size 2 over 2 processes leaves 1 image to each; the gate's BatchNorm "
                             "needs 2 or more"),
    ({"batch_size": 3}, "batch_size 3 does not split over 2 processes")])
def test_train_all_checks_the_batches_split_over_the_processes_before_stage_1(tmp_path, capsys, monkeypatch,
                                                                              options, message):
    from dds_fast.training import stages

    monkeypatch.setattr(stages, "rank_and_world", lambda: (0, 2))  # as under torchrun with two processes
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**TINY_TRAINING, "gate_batch_size": 4, **options}))
    assert main(["train", "all", "--run-dir", str(tmp_path / "run"), "--config", str(config), "--steps", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "stage1.log.jsonl").exists()


def test_a_gate_batch_of_one_image_is_refused():
    from dds_fast.training.stages import TrainConfig

    with pytest.raises(ValueError, match="gate_batch_size must be >= 2, got 1"):
        TrainConfig(gate_batch_size=1)


class Stop(Exception):
    pass


@pytest.mark.parametrize("device,expected", [("auto", [("set_device", 1), ("init", "nccl")]),
                                             ("cpu", [("init", "gloo")])])
def test_train_under_torchrun_binds_each_process_to_its_gpu_before_nccl(tmp_path, monkeypatch, device, expected):
    calls = []

    def init_process_group(backend):
        calls.append(("init", backend))
        raise Stop  # the rest needs a real process group

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        main(["train", "stage1", "--run-dir", str(tmp_path), "--device", device])
    assert calls == expected


def test_bench_is_quick_unless_asked_for_full():
    parser = cli.build_parser()
    assert [parser.parse_args(["bench", *flags]).full for flags in ([], ["--quick"], ["--full"])] == [False, False, True]


def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--size", "16", "--channels", "8", "--no-compile", "--quick",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["device"].startswith("CPU")
    # a CPU run times float32, and says which dtype was asked for
    assert (result["dtype"], result["requested_dtype"]) == ("float32", "bfloat16")
    assert "Dtype: float32 (bfloat16 asked for: a CPU run times float32)" in (out / "bench.md").read_text()
    variants = {row["variant"] for row in result["layers"]}
    assert variants == {"(a) sliced copy", "(b) static"}  # no Triton timing without a GPU
    assert len(result["network"][0]["results"]) == 5
    assert (out / "network.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Whole network" in printed and "## Targets" in printed
    # on CPU only the network targets apply (the layer targets need the Triton variant)
    targets = [t["target"] for t in result["targets"]]
    assert len(targets) == 6 and all(t.startswith("network batch 1") for t in targets)
    # which model the rows are of
    assert result["model"].startswith("an untrained SlimUNet({")
    assert f"Model: {result['model']}" in (out / "bench.md").read_text()


@pytest.mark.parametrize("value", ["nan", "-5", "inf"])
def test_demo_rejects_a_sigma_that_is_no_noise_level_by_name(value, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["demo", "--sigma", value])
    assert raised.value.code == 2
    assert f"argument --sigma: must be a finite number >= 0, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--seed", str(2 ** 64)], "argument --seed: must be an integer from -2**63 to 2**64 - 1"),
    (["demo", "--base-width", "0"], "argument --base-width: must be a positive integer"),
    (["denoise", "in.png", "-o", "out.png", "--tile", "0"], "argument --tile: must be a positive integer"),
    (["denoise", "in.png", "-o", "out.png", "--overlap=-1"], "argument --overlap: must be an integer >= 0, got -1"),
    (["denoise", "in.png", "-o", "out.png", "--tiles-per-batch", "0"],
     "argument --tiles-per-batch: must be a positive integer"),
])
def test_commands_name_the_flag_of_a_number_out_of_range(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--size", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_demo_rejects_a_non_positive_size_or_repeat_count_by_name(flag, value, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "none.safetensors")  # the untrained demo reads --size
    with pytest.raises(SystemExit) as raised:
        main(["demo", flag, value])
    assert raised.value.code == 2
    assert f"argument {flag}: must be a positive integer, got {value}" in capsys.readouterr().err


def test_an_interrupt_is_one_line_that_says_how_to_resume(monkeypatch, capsys, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert main(["train", "stage1", "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "dds-fast: interrupted; the same command resumes the run\n"


def test_a_reader_that_leaves_early_is_no_error():
    """``dds-fast info MODEL | head -1``: the pipe closes under the output."""
    reader = subprocess.Popen([sys.executable, "-m", "dds_fast", "info", str(cli.SHIPPED_MODEL)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()
    assert reader.wait(timeout=120) == 1
    assert reader.stderr.read() == b""


def test_a_file_name_that_is_no_utf8_prints_escaped(tmp_path):
    """A name of other bytes (os.fsdecode gives it surrogates) failed to print after the work
    was done, and the command said "error" with the output written."""
    net = SlimUNet(in_channels=1, base_width=8, depth=2)
    path = save(net, tmp_path / "n\udcff.safetensors")  # on disk: the byte 0xff
    done = subprocess.run([sys.executable, "-m", "dds_fast", "info", str(path)], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"checkpoint:    " + str(tmp_path).encode() + b"/n\\udcff.safetensors\n" in done.stdout


def test_trained_demo_refuses_the_untrained_demos_flags(capsys):
    assert main(["demo", "--size", "32", "--base-width", "8"]) == 2
    assert "--size and --base-width: only for the untrained demo" in capsys.readouterr().err


def test_trained_demo_checks_its_output_path_before_the_work(capsys, tmp_path):
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    for out, message in [(tmp_path / "demo.tif", "unsupported format '.tif'"),
                         (tmp_path / "missing" / "demo.png", f"folder {tmp_path / 'missing'} does not exist")]:
        assert main(["demo", "--checkpoint", str(checkpoint), "--image", "coins", "--repeats", "1",
                     "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and str(out) in captured.err
        assert "gate chose" not in captured.out  # stopped before denoising, not after


def test_empty_paths_and_null_flags_are_refused_by_name(tmp_path, capsys):
    """An empty path meant the defaults (--config), or the current folder (--images), and a
    null flag value was dropped as if the flag were not given."""
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**TINY_TRAINING, "steps": 1}))
    run = ["train", "stage1", "--run-dir", str(tmp_path / "run")]
    assert main(run + ["--config", ""]) == 2
    assert "cannot read training config" in capsys.readouterr().err
    for flag in ("--images", "--paired-root", "--sidd-validation"):
        assert main(run + ["--config", str(config), flag, ""]) == 2
        assert f"{flag}: {flag[2:].replace('-', '_')} must name a folder, got an empty path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(run + ["--config", str(config), "--noise-args", "null"])
    assert raised.value.code == 2
    assert "argument --noise-args: null is no value here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(run + ["--config", str(config), "--noise-args", '{"sigma": 10, "sigma": 25}'])
    assert raised.value.code == 2
    assert "argument --noise-args: not a JSON value (an object repeats the key(s) ['sigma'])" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", "", "--device", "cpu", "--out", str(tmp_path / "bench")]) == 2
    assert "checkpoint . is a folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bad_noise_model_is_blamed_on_where_it_came_from(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**TINY_TRAINING, "steps": 1, "noise": "awgn", "noise_args": {"sigma": -5}}))
    run = ["train", "stage1", "--run-dir", str(tmp_path / "run"), "--config", str(config)]
    assert main(run) == 2
    assert f"{config}: sigma must be non-negative" in capsys.readouterr().err
    assert main(run + ["--noise", "foo"]) == 2
    assert f"noise from --noise, noise_args from {config}: unknown noise model 'foo'" in capsys.readouterr().err


def test_import_of_a_path_or_an_empty_name_is_an_error_naming_the_flag(capsys):
    assert main(["--import", "./mine.py", "info", "x.safetensors"]) == 2
    assert "--import ./mine.py: " in capsys.readouterr().err
    assert main(["--import", "", "info", "x.safetensors"]) == 2
    assert "--import : Empty module name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0 and capsys.readouterr().out.strip() == f"dds-fast {cli.__version__}"


def test_bench_refuses_a_file_for_its_folder_and_sizes_below_one_by_flag(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["bench", "--device", "cpu", "--out", str(afile)]) == 2
    assert f"bench: the output folder {afile} is a file" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--size", "0"])
    assert raised.value.code == 2
    assert "argument --size: must be a positive integer, got 0" in capsys.readouterr().err


def test_bench_rejects_a_device_this_machine_lacks_before_benchmarking(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--device", "gpu0", "--out", str(out)]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(out)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "4800000000 bytes. Error code 12"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   MemoryError()])
def test_running_out_of_memory_is_an_error_without_a_traceback(error, monkeypatch, capsys, tmp_path):
    import dds_fast.cli

    def exhausted(args):
        raise error

    monkeypatch.setattr(dds_fast.cli, "cmd_denoise", exhausted)
    assert main(["denoise", str(tmp_path / "any.png"), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dds-fast: error: out of memory (") and "smaller --tile" in err
    monkeypatch.setattr(dds_fast.cli, "cmd_train", exhausted)  # (it said --tile, which train has not)
    assert main(["train", "stage1", "--run-dir", str(tmp_path / "run")]) == 2
    assert "a smaller network (--base-width, --depth), batch size or patch size needs less" in capsys.readouterr().err
    monkeypatch.setattr(dds_fast.cli, "cmd_info", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other runtime errors keep their traceback
        main(["info", "x"])


@pytest.mark.parametrize("argv,flag,message", [
    (["denoise", "a.png", "-o", "b.png", "--tile", "2.5"], "--tile", "must be a positive integer, got '2.5'"),
    (["denoise", "a.png", "-o", "b.png", "--overlap", "x"], "--overlap", "must be an integer >= 0, got 'x'"),
    (["demo", "--sigma", "abc"], "--sigma", "must be a number, got 'abc'"),
    (["demo", "--seed", "1e3"], "--seed", "must be an integer, got '1e3'"),
])
def test_a_flag_value_that_does_not_parse_is_named_without_our_function_names(argv, flag, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.splitlines()[-1].endswith(f"error: argument {flag}: {message}"), err


def test_a_warning_prints_as_one_line_of_ours(monkeypatch, capsys):
    import warnings

    def warns(args):
        warnings.warn("crops of 90 pixels are padded to 96", UserWarning)
        warnings.warn("an old option", DeprecationWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_info", warns)
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info", "any.safetensors"]) == 0
    assert capsys.readouterr().err == ("dds-fast: warning: crops of 90 pixels are padded to 96\n"
                                       "dds-fast: warning: DeprecationWarning: an old option\n")
    assert warnings.showwarning is shown  # the caller's handler back


def test_untrained_demo_takes_image_and_refuses_out(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "none.safetensors")
    assert main(["demo", "--out", str(tmp_path / "x.png"), "--size", "16"]) == 2
    assert "--out: only for the trained demo" in capsys.readouterr().err
    photos = []
    bundled = cli._bundled_photo
    monkeypatch.setattr(cli, "_bundled_photo", lambda name, *args, **kwargs: photos.append(name) or bundled(
        name, *args, **kwargs))
    assert main(["demo", "--image", "camera", "--size", "16", "--base-width", "8", "--repeats", "1"]) == 0
    assert "camera photo 16x16" in capsys.readouterr().out and photos == ["camera"]


def test_every_training_option_has_a_flag_with_help():
    import dataclasses

    from dds_fast.training.stages import TrainConfig

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {action.dest: action for action in train._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in flags and flags[field.name].help, field.name
    args = train.parse_args(["all", "--run-dir", "r", "--slim-step", "8", "--no-progress", "--lr-schedule",
                             "constant"])
    assert (args.slim_step, args.progress, args.lr_schedule) == (8, False, "constant")


def test_trained_demo_adds_the_sigma_it_names_and_claims_no_held_out_photo_of_a_users_model(capsys, tmp_path):
    # AWGN sigma 25 (0-255 units) on a photo: about 20.2 dB before clamping; of a user's checkpoint
    # the demo cannot tell which photos it trained on
    checkpoint = save(small_ddsnet(), tmp_path / "dds.safetensors")
    assert main(["demo", "--checkpoint", str(checkpoint), "--image", "coins", "--repeats", "1",
                 "--out", str(tmp_path / "demo.png")]) == 0
    out = capsys.readouterr().out
    assert 19.5 < float(out.split("PSNR ")[1].split(" -> ")[0]) < 21.5
    assert "held out" not in out


def test_demo_takes_sigma_zero_and_denoise_takes_overlap_zero():
    # 0 is the bound each type documents as allowed (">= 0")
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--sigma", "0"]).sigma == 0.0
    assert parser.parse_args(["denoise", "in.png", "-o", "out.png", "--overlap", "0"]).overlap == 0


def test_seed_takes_both_ends_of_torchs_range():
    # the message promises -2**63 to 2**64 - 1
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--seed", str(2 ** 64 - 1)]).seed == 2 ** 64 - 1
    assert parser.parse_args(["demo", "--seed", str(-2 ** 63)]).seed == -2 ** 63
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--seed", str(-2 ** 63 - 1)])


def test_an_interrupt_of_another_command_has_no_resume_hint(monkeypatch, capsys):
    # only train resumes
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info", "x.safetensors"]) == 130
    assert capsys.readouterr().err == "dds-fast: interrupted\n"


def test_demo_routes_dynamically_a_checkpoint_saved_in_static_mode(capsys, tmp_path):
    # the demo shows the gate's choice, whatever mode the checkpoint was saved in
    from dds_fast.bench import rig_gate

    model = small_ddsnet()
    rig_gate(model.gate, 1)
    model.set_budget(model.static_macs_per_pixel(0))  # static mode: route 0
    assert model.budget_index == 0
    checkpoint = save(model, tmp_path / "dds.safetensors")
    assert main(["demo", "--checkpoint", str(checkpoint), "--image", "coins", "--repeats", "1",
                 "--out", str(tmp_path / "demo.png")]) == 0
    assert "gate chose sub-network 1 of 2" in capsys.readouterr().out


def test_train_all_refuses_an_inet_index_one_past_the_routes(tmp_path, capsys, monkeypatch):
    # num_choices 2 keeps routes 0 and 1
    from dds_fast.training import stages

    def no_run(*args, **kwargs):
        raise AssertionError("the run was built: --inet 2 was not refused")

    monkeypatch.setattr(stages, "Run", no_run)
    assert main(["train", "all", "--run-dir", str(tmp_path / "run"), "--num-choices", "2", "--inet", "2"]) == 2
    assert "--inet [2]: stage 2 keeps num_choices 2 routing configs, 0 to 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class _FakeRun:
    """A training run that records which stages ran."""

    calls = []

    def __init__(self, run_dir, config):
        self.dir, self.config = run_dir, config

    def check_stages(self, stages):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: _FakeRun.calls.append(name)


def test_train_all_skips_refine_without_refine_steps(tmp_path, monkeypatch):
    # refine runs in train all only with refine_steps > 0
    from dds_fast.training import stages

    monkeypatch.setattr(stages, "Run", _FakeRun)
    _FakeRun.calls = []
    assert main(["train", "all", "--run-dir", str(tmp_path)]) == 0
    assert _FakeRun.calls == ["stage1", "stage2", "stage3", "inets"]
    _FakeRun.calls = []
    assert main(["train", "all", "--run-dir", str(tmp_path), "--refine-steps", "1"]) == 0
    assert _FakeRun.calls == ["stage1", "stage2", "refine", "stage3", "inets"]


def test_a_diverged_training_exits_3(tmp_path, monkeypatch, capsys):
    # a divergence is exit status 3, apart from bad input's 2
    from dds_fast.training import stages
    from dds_fast.training.loop import TrainingDiverged

    class Diverging(_FakeRun):
        def stage1(self):
            raise TrainingDiverged("loss is nan at step 3")

    monkeypatch.setattr(stages, "Run", Diverging)
    assert main(["train", "stage1", "--run-dir", str(tmp_path)]) == 3
    assert "dds-fast: error: loss is nan at step 3" in capsys.readouterr().err


def test_bench_command_is_quick_unless_full(tmp_path, monkeypatch):
    # --full reaches run_bench as quick=False, the default as quick=True
    from dds_fast import bench

    seen = []

    def fake(out, quick, **kwargs):
        seen.append(quick)
        (tmp_path / "bench.md").write_text("")
        return dict(device="cpu", written=[])

    monkeypatch.setattr(bench, "run_bench", fake)
    assert main(["bench", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert main(["bench", "--out", str(tmp_path), "--device", "cpu", "--full"]) == 0
    assert seen == [True, False]


def test_denoise_budget_on_a_plain_super_network_is_an_error(tmp_path, capsys):
    # --budget needs a DDSNet; a slimmable network is refused by name, no traceback
    from dds_fast.training.data import save_image

    checkpoint = save(SlimUNet(in_channels=3, base_width=4, depth=2).eval(), tmp_path / "net.safetensors")
    save_image(tmp_path / "in.png", torch.rand(3, 16, 16))
    assert main(["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--checkpoint",
                 str(checkpoint), "--budget", "1000"]) == 2
    assert "--budget needs a DDSNet checkpoint" in capsys.readouterr().err


def test_denoise_names_a_checkpoint_of_other_than_1_or_3_channels(tmp_path, capsys):
    from dds_fast.training.data import save_image

    checkpoint = save(SlimUNet(in_channels=4, base_width=4, depth=2).eval(), tmp_path / "four.safetensors")
    save_image(tmp_path / "in.png", torch.rand(3, 16, 16))
    assert main(["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--checkpoint",
                 str(checkpoint)]) == 2
    assert f"denoise takes gray or RGB images, and {checkpoint} denoises 4 channels" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_info_marks_the_static_route_a_checkpoint_was_saved_at(tmp_path, capsys):
    # the "(static mode)" label sits on the saved budget's route, not route 0
    model = small_ddsnet()
    model.set_budget(model.static_macs_per_pixel(1))
    assert model.budget_index == 1
    assert main(["info", str(save(model, tmp_path / "dds.safetensors"))]) == 0
    out = capsys.readouterr().out
    assert "route 1 (static mode)" in out and "route 0 (static mode)" not in out


def test_a_gray_model_denoises_each_colour_plane_with_its_own_gate_means(tmp_path):
    from dds_fast.training.data import read_image, save_image

    model = small_ddsnet(in_channels=1, attention=True)
    torch.nn.init.normal_(model.gate.fc2.weight, std=1.0)  # the attention's scale follows the means
    levels = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1)
    image = (levels + 0.05 * torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    save_image(tmp_path / "in.png", image)
    image, _ = read_image(tmp_path / "in.png")
    checkpoint = save(model, tmp_path / "gray.safetensors")
    assert main(["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--checkpoint",
                 str(checkpoint)]) == 0
    with torch.no_grad():
        expected = torch.cat([model(plane[None, None])[0] for plane in image]).clamp(0, 1)
    torch.testing.assert_close(read_image(tmp_path / "out.png")[0], expected, rtol=0, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("trained", [True, False])
def test_demo_names_a_sigma_whose_noise_overflows_inside_the_network(trained, capsys, monkeypatch, tmp_path):
    # finite noise that overflows float32 in the first convs: no NaN metrics, no NaN table rows, no picture
    if trained:
        model = ["--checkpoint", str(save(small_ddsnet(), tmp_path / "dds.safetensors")), "--image", "coins",
                 "--out", str(tmp_path / "demo.png")]
    else:  # (it writes no picture, and takes no --out)
        monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "none.safetensors")
        model = ["--size", "32", "--base-width", "4"]
    assert main(["demo", *model, "--sigma", "1e38", "--repeats", "1"]) == 2
    assert "--sigma 1e+38: " in capsys.readouterr().err
    assert not (tmp_path / "demo.png").exists()
