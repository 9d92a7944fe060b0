from dds_fast import RoutingEntry, SlimUNet, macs_per_pixel, save
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


def test_info_on_a_bad_file_fails_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["info", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2


def test_untrained_demo_slims_a_network_on_a_bundled_photo(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "none.safetensors")
    assert main(["demo", "--size", "32", "--base-width", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "smallest" in out and "uniform 1" in out
    # every width's output equals the exported static network's
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("smallest", "uniform"))]
    assert all(float(row[-1]) == 0.0 for row in rows)


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


def test_train_all_stages_from_a_config_file(tmp_path, capsys):
    import json

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
    assert main(["train", "refine", "--run-dir", str(run_dir), "--config", str(config)]) == 2
    assert "--refine-steps" in capsys.readouterr().err
    assert main(["info", str(run_dir / "stage2.safetensors")]) == 0
    assert "route 1" in capsys.readouterr().out
    assert main(["train", "stage1", "--run-dir", str(run_dir), "--config", str(tmp_path / "nope.json")]) == 2


def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    import json

    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--size", "16", "--channels", "8", "--no-compile", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["device"].startswith("CPU")
    variants = {row["variant"] for row in result["layers"]}
    assert variants == {"(a) sliced copy", "(b) static"}  # no Triton timing without a GPU
    assert len(result["network"]["results"]) == 5
    assert (out / "network.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Whole network" in printed and "## Targets" in printed
    # on CPU only the network targets apply (the layer targets need the Triton variant)
    targets = [t["target"] for t in result["targets"]]
    assert len(targets) == 6 and all(t.startswith("network batch 1") for t in targets)
