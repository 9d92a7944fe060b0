import torch

from dds_fast import RoutingEntry, SlimUNet, macs_per_pixel, save
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


def test_demo_runs_on_a_bundled_photo(capsys):
    torch.set_num_threads(1)
    assert main(["demo", "--size", "32", "--base-width", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "smallest" in out and "uniform 1" in out
    # every width's output equals the exported static network's
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("smallest", "uniform"))]
    assert all(float(row[-1]) == 0.0 for row in rows)
