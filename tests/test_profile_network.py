"""benchmarks/profile_network.py off CUDA: its command line and the routed DDSNet it profiles."""
import sys

import pytest
import torch

from dds_fast import SlimUNet
from dds_fast.bench import rig_gate
from dds_fast.runner import LatencyRunner
from tests.scripts import load_benchmark
from tests.test_runner import PEAKS


@pytest.fixture
def script(monkeypatch):
    return load_benchmark(monkeypatch, "profile_network")


def test_routed_options_default_to_both_tile_policies_beside_the_routes_alone(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["profile_network.py", "--routed", "largest", "--batch", "2", "out.txt",
                                      "--routed", "smallest"])
    args = script.arguments()
    assert (args.routed, args.tiles, args.config, args.buffers) == (["largest", "smallest"], ["widest", "narrowest"],
                                                                    ["largest", "smallest"], ["packed"])
    assert (args.batch, args.size, args.out) == (2, 512, "out.txt")
    monkeypatch.setattr(sys, "argv", ["profile_network.py", "--tiles", "narrowest", "--buffers", "max-width",
                                      "--buffers", "packed"])
    args = script.arguments()
    assert (args.routed, args.tiles, args.config, args.buffers) == ([], ["narrowest"], ["smallest"],
                                                                    ["max-width", "packed"])
    assert args.grid == ["narrow"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"):
            script.main()
    # v27's grids apart on the narrowest tiles, where they differ; one profile on the widest
    monkeypatch.setattr(sys, "argv", ["profile_network.py", "--routed", "smallest", "--grid", "narrow",
                                      "--grid", "widest"])
    args = script.arguments()
    assert script.routed_cases(args) == [("widest", "packed", "narrow"), ("narrowest", "packed", "narrow"),
                                         ("narrowest", "packed", "widest")]
    # the conditional nodes route inside a capture: graph replays only
    monkeypatch.setattr(sys, "argv", ["profile_network.py", "--routed", "smallest", "--tiles", "branches"])
    with pytest.raises(SystemExit, match="add --graphs"):
        script.arguments()
    monkeypatch.setattr(sys, "argv", ["profile_network.py", "--routed", "smallest", "--tiles", "branches", "--graphs"])
    args = script.arguments()
    assert (args.tiles, args.graphs) == (["branches"], True)


def test_the_rigged_gate_sends_every_image_to_the_benchs_route(script):
    torch.manual_seed(0)
    net = SlimUNet(in_channels=3, base_width=8, depth=2).eval()
    labels, routed = script.bench_routes(net, 16)
    # the routes time_gate takes from the bench's network report at this input
    report = LatencyRunner(net, (1, 3, 16, 16), warmup=0, repeats=1).run(peaks=PEAKS)
    bench = sorted(report.configured(), key=lambda r: r.macs_per_pixel)
    assert labels == [r.label for r in bench]
    assert [e.macs_per_pixel for e in routed.routing_space] == pytest.approx([r.macs_per_pixel for r in bench])
    assert not routed.gate.attention and routed.gate.num_choices == len(labels)
    x = torch.rand(3, 3, 16, 16)
    for index in (0, len(labels) - 1):
        rig_gate(routed.gate, index)
        assert routed.route(x) == [routed.routing_space[index]] * len(x)
