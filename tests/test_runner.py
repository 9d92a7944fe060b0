import json

import pytest
import torch

from dds_fast import RoutingEntry, SlimConv2d, SlimDnCNN, macs_per_pixel
from dds_fast.runner import DevicePeaks, LatencyRunner, Timing, capture_cuda_graph, default_configs


def test_timing_percentiles():
    timing = Timing.from_samples([5, 1, 4, 2, 3, 6, 7, 8, 9, 10, 11])
    assert (timing.median_ms, timing.p20_ms, timing.p80_ms, timing.repeats) == (6, 3, 9, 11)


def small_net():
    torch.manual_seed(0)
    return SlimDnCNN(in_channels=1, base_width=8, depth=3)


def test_runner_reports_every_config_on_cpu():
    net = small_net()
    runner = LatencyRunner(net, (1, 1, 16, 16), warmup=1, repeats=3)
    peaks = DevicePeaks(flops_per_s=1e9, bytes_per_s=1e9)
    report = runner.run(peaks=peaks)
    labels = [r.label for r in report.results]
    assert labels == ["smallest", "uniform 0.25", "uniform 0.5", "uniform 0.75", "largest"]
    assert report.device.startswith("CPU")
    largest = max(report.results, key=lambda r: r.macs_per_pixel)  # the first of equals
    for result in report.results:
        config = net.space.validate(result.config)
        assert result.macs_per_pixel == macs_per_pixel(net, config)
        assert result.theoretical_speedup == pytest.approx(largest.macs_per_pixel / result.macs_per_pixel)
        assert result.real_speedup == pytest.approx(largest.timing.median_ms / result.timing.median_ms)
        assert result.timing.repeats == 3 and result.timing.p20_ms <= result.timing.median_ms <= result.timing.p80_ms
        # 2 FLOPs per MAC at 1 GFLOP/s against bytes at 1 GB/s: the floor is the larger
        flops_ms = 2 * result.macs_per_pixel * 256 / 1e9 * 1e3
        assert result.floor_ms >= flops_ms - 1e-12 and result.floor_bound in ("FLOPs", "bytes")
    assert net.get_config() == net.space.largest()
    record = json.loads(report.to_json())
    assert record["device"] == report.device and record["dtype"] == "float32"
    assert {"torch", "triton"} <= set(record["environment"])
    assert "speedup_efficiency" in record["results"][0]
    assert "| smallest |" in report.to_markdown()


def test_runner_uses_the_routing_space_and_plain_modules():
    net = small_net()
    net.routing_space = [RoutingEntry(net.space.smallest(), 1.0), RoutingEntry(net.space.largest(), 2.0)]
    assert [label for label, _ in default_configs(net)] == ["route 0", "route 1"]
    conv = SlimConv2d(4, 4, 3, padding=1)
    report = LatencyRunner(conv, (1, 4, 8, 8), warmup=0, repeats=2).run(peaks=DevicePeaks(1e9, 1e9))
    assert [r.label for r in report.results] == ["as is"] and report.results[0].macs_per_pixel == 4 * 4 * 9


def test_measured_peaks_are_positive():
    runner = LatencyRunner(small_net(), (1, 1, 8, 8), warmup=1, repeats=2)
    peaks = runner.measure_peaks()
    assert peaks.flops_per_s > 0 and peaks.bytes_per_s > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(1, 1, 8)), "input_shape"),
    (dict(input_shape=(1, 1, 8, 8), repeats=0), "repeats"),
    (dict(input_shape=(1, 1, 8, 8), cuda_graph=True), "CUDA"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyRunner(small_net(), **kwargs)
    with pytest.raises(ValueError, match="no configs"):
        LatencyRunner(small_net(), (1, 1, 8, 8)).run([], peaks=DevicePeaks(1, 1))


def test_runner_times_a_ddsnet_dynamic_and_per_route():
    from dds_fast import DDSNet, DynamicGate

    net = small_net()
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = DynamicGate(net.stem_channels, 2)
    gate.attention = False
    model = DDSNet(net, gate, routes)
    report = LatencyRunner(model, (2, 1, 16, 16), warmup=1, repeats=2).run(peaks=DevicePeaks(1e9, 1e9))
    assert [r.label for r in report.results] == ["dynamic", "route 0", "route 1"]
    assert [r.macs_per_pixel for r in report.results[1:]] == [e.macs_per_pixel for e in routes]
    # dynamic mode: a routed config plus the full-width stem the gate reads
    assert report.results[0].macs_per_pixel in model.dynamic_macs_per_pixel
    assert net.get_config() == net.space.largest()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_graph_keeps_the_tensors_of_its_function_alive():
    """Seen on an H200: a graph whose index tensor was freed after capture read reused memory
    and failed index_copy_'s bounds assert on replay."""
    out = torch.zeros(8, device="cuda")

    def capture():
        rows = torch.tensor([1, 5], device="cuda")
        values = torch.tensor([2.0, 3.0], device="cuda")
        return capture_cuda_graph(lambda: out.index_copy_(0, rows, values), torch.device("cuda"))

    replay = capture()
    reuse = [torch.full((2,), 10 ** 6, dtype=torch.int64, device="cuda") for _ in range(64)]
    out.zero_()
    replay()
    torch.cuda.synchronize()
    assert out.tolist() == [0, 2, 0, 0, 0, 3, 0, 0] and len(reuse) == 64


def test_bench_targets_say_what_is_met_and_by_how_much():
    from dds_fast.bench import target_rows, targets_markdown
    from dds_fast.runner import ConfigResult, Report

    def layer(variant, ms):
        return dict(size=512, batch=8, ratio=0.25, width=16, variant=variant, macs=16 * 16 * 9 * 512 * 512 * 8,
                    median_ms=ms)

    layers = [layer("triton fused", 0.2), layer("(b) static", 0.25), layer("(a) sliced copy", 0.24)]
    peaks = DevicePeaks(flops_per_s=1e15, bytes_per_s=4e12)
    network = Report("GPU", {}, "float16", (8, 3, 512, 512), "triton", peaks, [
        ConfigResult("smallest", None, 1000.0, Timing(2.0, 1.9, 2.1, 10), 40.0, 20.0, 1.0, "bytes"),
        ConfigResult("largest", None, 40000.0, Timing(40.0, 39.0, 41.0, 10), 1.0, 1.0, 32.0, "FLOPs")])
    rows = {r["target"]: r for r in target_rows(layers, network, 2)}
    vs_b = rows["layer 512x512, batch 8, width 16: fused vs (b) static"]
    vs_a = rows["layer 512x512, batch 8, width 16: fused vs (a) sliced copy"]
    assert vs_b["met"] and vs_b["got"] == pytest.approx(1.25)
    assert not vs_a["met"] and vs_a["got"] == pytest.approx(1.2)
    # (2 x 16 channels x 512^2 x 8 images + weights and bias) x 2 bytes at 4 TB/s
    assert vs_a["bound"].startswith("bytes: floor 0.0336 ms")
    assert not rows["network batch 8, smallest: within 1.5x of its floor"]["met"]
    assert rows["network batch 8, largest: within 1.5x of its floor"]["met"]
    share = next(r for r in rows.values() if "MAC ratio" in r["target"])
    assert share["got"] == pytest.approx(0.5) and not share["met"]
    table = targets_markdown(list(rows.values()))
    assert "| no: 20% short |" in table and "| no: 1.3x over |" in table and "| no: 38% short |" in table
