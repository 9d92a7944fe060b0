import json

import pytest
import torch
from torch import nn

from dds_fast import DynamicGate, RoutingEntry, SlimConv2d, SlimDnCNN, export_static, macs_per_pixel
from dds_fast.bench import time_gate
from dds_fast.cost import trace_convs
from dds_fast.ddsnet import AttentionSupernet
from dds_fast.runner import (ConfigResult, DevicePeaks, LatencyRunner, Report, Timing, capture_cuda_graph,
                             default_configs)


def test_timing_percentiles():
    timing = Timing.from_samples([5, 1, 4, 2, 3, 6, 7, 8, 9, 10, 11])
    assert (timing.median_ms, timing.p20_ms, timing.p80_ms, timing.repeats) == (6, 3, 9, 11)
    # one slow outlier, which a mean would follow; p20 of 4 samples is rank 0.6, rounded to 1
    skewed = Timing.from_samples([10, 1, 3, 2])
    assert (skewed.median_ms, skewed.p20_ms, skewed.p80_ms, skewed.repeats) == (2.5, 2, 3, 4)


def tiny_runner(**kwargs):
    torch.manual_seed(0)
    return LatencyRunner(nn.Conv2d(1, 2, 3, padding=1), (1, 1, 8, 8), device="cpu", **kwargs)


def test_time_fn_warms_up_then_times_its_repeats():
    runner = tiny_runner(warmup=3, repeats=5)
    calls = []
    timing = runner.time_fn(lambda: calls.append(1))
    assert len(calls) == 8 and timing.repeats == 5


def test_wall_clock_samples_are_milliseconds(monkeypatch):
    import dds_fast.runner as runner_module

    ticks = iter(range(1000))
    monkeypatch.setattr(runner_module.time, "perf_counter", lambda: 0.002 * next(ticks))  # 2 ms a call
    assert runner_module.wall_clock(lambda: None, warmup=0, repeats=3).median_ms == pytest.approx(2.0)


def test_measured_peaks_count_two_flops_per_mac_and_a_copys_read_and_write(monkeypatch):
    runner = tiny_runner(warmup=0, repeats=1)
    # a ceiling is the fastest repeat (1 ms), not the median (3 ms)
    monkeypatch.setattr(runner, "time_fn", lambda fn, cuda_graph=False: Timing(3.0, 2.0, 4.0, 5, 1.0))
    peaks = runner.measure_peaks()
    assert peaks.flops_per_s == 2 * 1024 ** 3 / 1e-3  # the CPU's 1024 x 1024 product
    assert peaks.bytes_per_s == 2 * 32 * 2 ** 20 * 4 / 1e-3  # 32 Mi fp32 values read and written


def test_a_half_precision_run_on_a_cpu_takes_the_faster_of_its_product_and_float32s(monkeypatch):
    """A CPU's float16 product ran at about 1 GFLOP/s here, its float16 convs far faster: a floor
    from it would sit 3.5-7x above the measured times."""
    runner = tiny_runner(dtype=torch.float16, warmup=0, repeats=1)
    times = iter([8.0, 2.0, 1.0])  # float16 product, float32 product, copy

    def timed(fn, cuda_graph=False):
        fastest = next(times)
        return Timing(fastest, fastest, fastest, 1, fastest)

    monkeypatch.setattr(runner, "time_fn", timed)
    assert runner.measure_peaks().flops_per_s == 2 * 1024 ** 3 / 2e-3


def test_a_half_precision_floor_moves_half_the_bytes():
    moved = {}
    for dtype in (torch.float32, torch.float16):
        runner = tiny_runner(dtype=dtype, warmup=0, repeats=1)
        groups, _ = runner._cost(runner.model, runner.inputs)
        moved[dtype], _ = runner._traffic(groups)
    assert moved[torch.float16] * 2 == moved[torch.float32]


def test_floor_fraction_is_the_floor_over_the_measured_time():
    result = ConfigResult("x", None, 1.0, Timing(4.0, 3.0, 5.0, 3, 2.0), floor_ms=1.0, floor_bound="bytes")
    assert result.floor_fraction == 0.25  # a run 4x slower than its floor


PEAKS = DevicePeaks(flops_per_s=1e9, bytes_per_s=1e9)  # no peak to measure: the tests time nothing real


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
    largest = report.results[-1]  # "largest" (uniform 0.75 ties it here)
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
    assert record["backend"] == "torch" and record["cuda_graph"] is False  # 'auto' on CPU tensors
    assert {"torch", "triton"} <= set(record["environment"])
    # the kernel choices the run was made with (v14-v16 and v27 options)
    assert record["environment"]["kernel_options"] == {"tma_forward": False, "taps_in_k_channels": [1, 2, 3, 4, 8],
                                                       "per_image_narrow_grid": True}
    assert "speedup_efficiency" in record["results"][0]
    assert "| smallest |" in report.to_markdown()


def test_speedups_are_over_the_largest_row_when_another_ties_it():
    """SlimDnCNN(base_width=16)'s uniform 0.75 is its largest config: the row labelled
    largest is the speedups' reference (the first of the tied rows was)."""
    net = SlimDnCNN(in_channels=1, base_width=16, depth=4)
    report = LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=2).run(peaks=PEAKS)
    tied = [r for r in report.results if r.macs_per_pixel == report.results[-1].macs_per_pixel]
    assert [r.label for r in tied] == ["uniform 0.75", "largest"]
    assert report.results[-1].real_speedup == 1


def test_runner_uses_the_routing_space_and_plain_modules():
    net = small_net()
    net.routing_space = [RoutingEntry(net.space.smallest(), 1.0), RoutingEntry(net.space.largest(), 2.0)]
    assert [label for label, _ in default_configs(net)] == ["route 0", "route 1"]
    plain = LatencyRunner(torch.nn.Conv2d(4, 4, 3, padding=1), (1, 4, 8, 8), warmup=0, repeats=1)
    plain = plain.run(peaks=DevicePeaks(1e9, 1e9))
    assert [r.label for r in plain.results] == ["as is"] and plain.results[0].macs_per_pixel == 4 * 4 * 9


def test_runner_times_a_slim_conv_at_width_ratios():
    conv = SlimConv2d(8, 4, 3, padding=1, in_segments=(4, 4))
    runner = LatencyRunner(conv, (1, 8, 8, 8), warmup=0, repeats=2)
    report = runner.run(peaks=DevicePeaks(1e9, 1e9))
    assert [r.label for r in report.results] == ["width 0.25", "width 0.5", "width 0.75", "width 1"]
    # each input block is sliced to its own prefix: 1, 2, 3, 4 channels of each of the two
    assert [r.config for r in report.results] == [dict(ratio=r, in_widths=[w, w], out_width=w)
                                                  for r, w in zip((0.25, 0.5, 0.75, 1.0), (1, 2, 3, 4))]
    assert [r.macs_per_pixel for r in report.results] == [w * 2 * w * 9 for w in (1, 2, 3, 4)]
    assert [r.theoretical_speedup for r in report.results] == pytest.approx([16, 4, 16 / 9, 1])
    assert report.results[-1].real_speedup == 1 and conv.active_out_channels is None
    # ceil(0.28 * 25) is 7, though in floats the product is 7.000000000000001
    odd = LatencyRunner(SlimConv2d(25, 25, 3, padding=1), (1, 25, 4, 4), warmup=0, repeats=1)
    assert odd.run([("width 0.28", 0.28)], peaks=PEAKS).results[0].config["out_width"] == 7
    with pytest.raises(ValueError, match=r"width ratios in \(0, 1\]"):
        runner.run([("too wide", 1.5)], peaks=DevicePeaks(1e9, 1e9))
    with pytest.raises(ValueError, match="input_shape has 4"):
        LatencyRunner(conv, (1, 4, 8, 8)).run([("half", 0.5)], peaks=DevicePeaks(1e9, 1e9))
    with pytest.raises(ValueError, match="width ratios apply to a bare SlimConv2d"):
        LatencyRunner(small_net(), (1, 1, 8, 8)).run([("half", 0.5)], peaks=DevicePeaks(1e9, 1e9))


def test_runner_times_an_upsampling_conv_at_whole_shuffled_channels():
    # 40 filters are 10 output channels: width 0.25 keeps 3 of them (12 filters), not 10 filters
    conv = SlimConv2d(8, 40, 1, upscale_factor=2)
    report = LatencyRunner(conv, (1, 8, 4, 4), warmup=0, repeats=1).run(peaks=PEAKS)
    assert [r.config["out_width"] for r in report.results] == [12, 20, 32, 40]
    assert [r.macs_per_pixel for r in report.results] == [12 * 2, 20 * 4, 32 * 6, 40 * 8]


def test_measured_peaks_are_positive():
    runner = LatencyRunner(small_net(), (1, 1, 8, 8), warmup=1, repeats=2)
    peaks = runner.measure_peaks()
    assert peaks.flops_per_s > 0 and peaks.bytes_per_s > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(1, 1, 8)), "input_shape"),
    (dict(input_shape=(1, 1, 8, 8), repeats=0), "repeats"),
    (dict(input_shape=(1, 1, 8.9, 8)), r"input_shape must be \[N, C, H, W\] of positive ints, got \(1, 1, 8.9, 8\)"),
    (dict(input_shape=(1, True, 8, 8)), "input_shape"),
    (dict(input_shape=8), "input_shape"),
    (dict(input_shape=(1, 1, 8, 8), warmup=1.5), "warmup must be an int >= 0"),
    (dict(input_shape=(1, 1, 8, 8), cuda_graph=True), "CUDA"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyRunner(small_net(), **kwargs)
    with pytest.raises(ValueError, match="no configs"):
        LatencyRunner(small_net(), (1, 1, 8, 8)).run([], peaks=DevicePeaks(1, 1))


def test_bad_models_devices_and_dtypes():
    with pytest.raises(ValueError, match="Identity has no parameters to take the device from; pass device="):
        LatencyRunner(torch.nn.Identity(), (1, 1, 8, 8))
    with pytest.raises(ValueError, match="device 'garbage' is not a torch device"):
        LatencyRunner(small_net(), (1, 1, 8, 8), device="garbage")
    if not torch.cuda.is_available():  # not torch's AssertionError from moving the model
        with pytest.raises(ValueError, match="device cuda asked for, but this torch sees no CUDA device"):
            LatencyRunner(small_net(), (1, 1, 8, 8), device="cuda")
    with pytest.raises(ValueError, match="times on CUDA devices and the CPU, got device meta"):
        LatencyRunner(small_net(), (1, 1, 8, 8), device="meta")  # (a wall clock times another device's launches)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        LatencyRunner(small_net(), (1, 1, 8, 8), dtype=torch.int32)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        LatencyRunner(None, (1, 1, 8, 8))
    # no conv to count: no MAC ratio for its speedup (it divided by zero)
    with pytest.raises(ValueError, match=r"Linear runs no convolution to count .*0 MACs/pixel"):
        LatencyRunner(torch.nn.Linear(8, 8), (1, 1, 8, 8), warmup=0, repeats=1).run(peaks=DevicePeaks(1, 1))


def test_runner_times_a_ddsnet_dynamic_and_per_route():
    from dds_fast import DDSNet, DynamicGate

    net = small_net()
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = DynamicGate(net.stem_channels, 2)
    gate.attention = False
    model = DDSNet(net, gate, routes)
    runner = LatencyRunner(model, (2, 1, 16, 16), warmup=1, repeats=2)
    report = runner.run(peaks=DevicePeaks(1e9, 1e9))
    assert [r.label for r in report.results] == ["dynamic", "route 0", "route 1"]
    assert [r.macs_per_pixel for r in report.results[1:]] == [e.macs_per_pixel for e in routes]
    # dynamic mode: the mean routed config plus the full-width stem the gate reads
    assert report.results[0].macs_per_pixel == pytest.approx(sum(model.routed_macs(runner.inputs)) / 2)
    assert report.results[2].theoretical_speedup == 1 and report.results[2].real_speedup == 1
    assert net.get_config() == net.space.largest()


def test_dynamic_row_counts_its_routes_at_the_timed_size():
    """A U-Net pads an image to a multiple of its size; the routes' stored MACs are those of
    the size they were traced at. The dynamic row counts the convs the timed input runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from dds_fast import DDSNet, DynamicGate, SlimUNet
    from dds_fast.bench import rig_gate

    torch.manual_seed(0)
    net = SlimUNet(in_channels=1, base_width=8, depth=3)
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = DynamicGate(net.stem_channels, 2)
    gate.attention = False
    model = DDSNet(net, gate, routes).eval()
    rig_gate(model.gate, 0)
    shape = (2, 1, 15, 13)
    report = LatencyRunner(model, shape, warmup=0, repeats=1).run(peaks=DevicePeaks(1e9, 1e9))
    dynamic, smallest = report.results[:2]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(shape))
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert dynamic.macs_per_pixel == pytest.approx(conv_flops / 2 / (2 * 15 * 13))
    assert dynamic.macs_per_pixel > smallest.macs_per_pixel  # its route behind the full-width stem


def test_dynamic_row_counts_the_routes_chosen_on_the_per_image_path():
    """The per-image path (CUDA; forced here under the interpreter) runs every conv on
    full-width buffers: a trace of it counts the largest config, not the routes chosen."""
    pytest.importorskip("triton")
    from dds_fast import DDSNet, DynamicGate, SlimConv2d

    class Alternating(DynamicGate):  # image i runs route i mod 2
        def forward(self, x, channel_sums=None):
            out = super().forward(x, channel_sums)
            return out._replace(choice=torch.arange(len(x), dtype=torch.int32, device=x.device) % self.num_choices)

    net = small_net()
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = "triton"
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    gate = Alternating(net.stem_channels, 2)
    gate.attention = False
    model = DDSNet(net, gate, routes)
    model.per_image = True
    device = "cuda" if torch.cuda.is_available() else None  # GPU-compiled kernels take no CPU tensors
    runner = LatencyRunner(model, (2, 1, 8, 8), device=device, warmup=0, repeats=1)
    report = runner.run([("dynamic", None), ("route 1", routes[1].config)], peaks=DevicePeaks(1e9, 1e18))
    dynamic, largest = report.results
    # the 'auto' gate runs the reference on CPU tensors
    assert report.backend == ("triton" if runner.device.type == "cuda" else "torch,triton")
    assert dynamic.macs_per_pixel == pytest.approx(sum(model.dynamic_macs_per_pixel) / 2)
    # FLOPs-bound floor: 2 FLOPs per MAC of each image's route at 1 GFLOP/s, over 8x8 pixels
    assert dynamic.floor_ms == pytest.approx(2 * sum(model.dynamic_macs_per_pixel) * 64 / 1e9 * 1e3)
    assert largest.theoretical_speedup == 1 and dynamic.theoretical_speedup > 1


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


def test_a_grouped_convs_floor_counts_the_weights_it_holds():
    """A depthwise 3x3 conv holds one input channel per filter: 64 x 9 weights, not 64 x 64 x 9."""
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    report = LatencyRunner(conv, (1, 64, 2, 2), warmup=0, repeats=1).run(
        peaks=DevicePeaks(flops_per_s=1e18, bytes_per_s=1e9))
    # fp32: the input and the output (64 channels x 4 pixels each), the weights and the bias, at 1 GB/s
    moved = (2 * 64 * 4 + 64 * 9 + 64) * 4
    assert report.results[0].floor_bound == "bytes"
    assert report.results[0].floor_ms == pytest.approx(moved / 1e9 * 1e3)



@pytest.mark.parametrize("conv,side,in_pixels,out_pixels", [
    (lambda: SlimConv2d(8, 8, 3, padding=0), 16, 16 * 16, 14 * 14),  # unpadded: reads more than it writes
    (lambda: nn.Conv2d(8, 8, 3, padding=0), 16, 16 * 16, 14 * 14),  # traced, as a network's convs are
    (lambda: SlimConv2d(8, 8, 3, stride=2, padding=1), 15, 15 * 15, 8 * 8),  # the stride does not divide 15
    (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), 15, 15 * 15, 8 * 8),
])
def test_a_convs_floor_reads_its_real_input(conv, side, in_pixels, out_pixels):
    report = LatencyRunner(conv(), (1, 8, side, side), warmup=0, repeats=1).run(
        [("as is", None)], peaks=DevicePeaks(flops_per_s=1e18, bytes_per_s=1e9))
    # fp32: 8 channels in and out, the 8 x 8 x 9 weights and the 8 biases, at 1 GB/s
    moved = (8 * in_pixels + 8 * out_pixels + 8 * 8 * 9 + 8) * 4
    assert report.results[0].floor_ms == pytest.approx(moved / 1e9 * 1e3)


def test_a_networks_floor_reads_each_residual_and_bias():
    """A DnCNN's last conv adds the input back in its epilogue: one more output-sized read."""
    net = SlimDnCNN(in_channels=1, base_width=8, depth=3)
    report = LatencyRunner(net, (2, 1, 8, 8), warmup=0, repeats=1).run(
        [("as is", None)], peaks=DevicePeaks(flops_per_s=1e18, bytes_per_s=1e9))
    calls, _ = trace_convs(net, None, (1, 8, 8))
    assert sum(call.residual for call in calls) == 1 and calls[-1].residual
    moved = 0
    for call in calls:
        weights = call.out_width * sum(call.in_widths) * 9 + call.out_width * (call.module.bias is not None)
        moved += 2 * (sum(call.in_widths) + call.out_width * (1 + call.residual)) * 64 + weights
    assert report.results[0].floor_ms == pytest.approx(moved * 4 / 1e9 * 1e3)


def test_an_as_is_row_times_the_model_as_it_came_not_at_the_row_before():
    net = small_net()
    runner = LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=1)
    report = runner.run([("smallest", net.space.smallest()), ("as is", None)], peaks=PEAKS)
    smallest, as_is = report.results
    assert smallest.macs_per_pixel == macs_per_pixel(net, net.space.smallest())
    assert as_is.macs_per_pixel == macs_per_pixel(net, net.space.largest()) and as_is.config is None
    assert net.get_config() == net.space.largest()


def test_a_masked_network_is_left_masked_at_its_widths():
    net = small_net()
    widths = torch.tensor(net.binding_widths(net.space.smallest()))
    net.set_masked_widths(widths)
    LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=1).run([("largest", net.space.largest())], peaks=PEAKS)
    assert net.masked and torch.equal(net.masked_widths, widths)
    net.set_config(net.space.largest())
    assert net.masked_widths is None


def test_configs_must_be_label_and_config_pairs():
    net = small_net()
    # a bare SubnetConfig iterates over its group names: once taken as a label and a config
    with pytest.raises(ValueError, match=r"\(label, config\) pairs"):
        LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=1).run([net.space.smallest()], peaks=PEAKS)
    with pytest.raises(ValueError, match=r"\(label, config\) pairs, got 0.5"):
        LatencyRunner(SlimConv2d(4, 4, 3, padding=1), (1, 4, 8, 8), warmup=0, repeats=1).run([0.5], peaks=PEAKS)


def test_configs_may_come_from_an_iterator():
    net = small_net()  # (checking the pairs used to exhaust it: nothing was timed)
    pairs = ((label, config) for label, config in [("smallest", net.space.smallest()), ("largest", net.space.largest())])
    report = LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=1).run(pairs, peaks=PEAKS)
    assert [r.label for r in report.results] == ["smallest", "largest"]


def test_a_stage1_attention_supernet_without_routes_gets_the_slimmable_defaults():
    """Stage 1 saves an AttentionSupernet: a supernet behind the gate, no routing space yet
    and no dynamic mode."""
    net = small_net()
    model = AttentionSupernet(net, DynamicGate(net.stem_channels, 2))
    assert [label for label, _ in default_configs(model)] == [
        "smallest", "uniform 0.25", "uniform 0.5", "uniform 0.75", "largest"]


def test_an_attention_supernet_is_timed_and_counted_with_its_stem_and_attention():
    """Its configs run behind the full-width stem and the gate's scale: the rows time and count
    the model, not the bare super-network inside it."""
    net = small_net()
    model = AttentionSupernet(net, DynamicGate(net.stem_channels, 2))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    smallest = net.space.smallest()
    report = LatencyRunner(model, (1, 1, 8, 8), warmup=0, repeats=2).run([("smallest", smallest)], peaks=PEAKS)
    assert report.results[0].macs_per_pixel == macs_per_pixel(model, smallest, (1, 8, 8))
    assert macs_per_pixel(model, smallest, (1, 8, 8)) > macs_per_pixel(net, smallest, (1, 8, 8))
    assert len(calls) >= 2  # the timed calls (and any of the trace)


def test_a_multi_input_conv_is_timed_as_it_is_on_one_tensor_per_block():
    conv = SlimConv2d(8, 4, 3, padding=1, in_segments=(5, 3))
    report = LatencyRunner(conv, (1, 8, 6, 6), warmup=0, repeats=1).run([("as is", None), ("half", 0.5)], peaks=PEAKS)
    assert report.results[0].macs_per_pixel == 4 * 8 * 9
    assert report.results[1].macs_per_pixel == 2 * (3 + 2) * 9


def test_a_ddsnet_in_budget_mode_is_labelled_so_and_numpy_ratios_are_numbers():
    from fractions import Fraction

    import numpy as np

    from dds_fast import DDSNet

    net = small_net()
    routes = [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(), net.space.largest())]
    model = DDSNet(net, DynamicGate(net.stem_channels, 2), routes)
    model.set_budget(model.static_macs_per_pixel(0))
    assert default_configs(model)[0] == ("budget (route 0)", None)
    conv = SlimConv2d(4, 4, 3, padding=1)
    report = LatencyRunner(conv, (1, 4, 6, 6), warmup=0, repeats=1).run(
        [("half", np.float32(0.5)), ("whole", Fraction(1))], peaks=PEAKS)
    assert report.results[0].config["out_width"] == 2
    assert [r["config"]["ratio"] for r in json.loads(report.to_json())["results"]] == [0.5, 1.0]  # (it raised)


def test_the_reported_backend_is_what_the_layers_run_here(monkeypatch):
    conv = SlimConv2d(4, 4, 3, padding=1, backend="triton")
    from dds_fast.slim_conv import _kernels_module

    interpreted = not isinstance(_kernels_module(), str) and _kernels_module().INTERPRET
    assert LatencyRunner(conv, (1, 4, 6, 6), device="cpu").backend == ("triton" if interpreted else "torch")
    from dds_fast.kernels import conv2d

    monkeypatch.setattr(conv2d, "INTERPRET", False)  # CPU tensors then fall back to the reference
    assert LatencyRunner(conv, (1, 4, 6, 6), device="cpu").backend == "torch"
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton', got 'cudnn'"):
        LatencyRunner(conv, (1, 4, 6, 6), device="cpu", backend="cudnn")
    # (now both resolve to the reference on the CPU)
    assert LatencyRunner(conv, (1, 4, 6, 6), device="cpu", backend="triton").backend == "torch"


def test_a_backend_named_for_the_report_must_be_what_the_layers_run():
    from dds_fast.slim_conv import _kernels_module

    if isinstance(_kernels_module(), str) or not _kernels_module().INTERPRET:
        pytest.skip("needs the Triton kernels under the interpreter (the tests' conftest sets it)")
    conv = SlimConv2d(4, 4, 3, padding=1, backend="triton")
    assert LatencyRunner(conv, (1, 4, 6, 6), device="cpu", backend="triton").backend == "triton"
    with pytest.raises(ValueError, match="backend='torch' runs 'torch' on cpu, but the model's layers run 'triton'"):
        LatencyRunner(conv, (1, 4, 6, 6), device="cpu", backend="torch")
    with pytest.raises(ValueError, match="backend='triton' runs 'triton' on cpu, but the model's layers run 'torch'"):
        LatencyRunner(nn.Conv2d(4, 4, 3), (1, 4, 6, 6), device="cpu", backend="triton")


def test_a_report_says_how_it_timed_and_over_which_row():
    net = small_net()
    for channels_last in (True, False):
        runner = LatencyRunner(net, (1, 1, 16, 16), warmup=2, repeats=3, channels_last=channels_last)
        report = runner.run([("narrow", net.space.smallest()), ("a | b", net.space.uniform(0.5))], peaks=PEAKS)
        assert (report.channels_last, report.warmup, report.timer, report.reference) == (
            channels_last, 2, "wall clock", "a | b")
        header, _, _, _, first, second = report.to_markdown().splitlines()
        layout = "channels_last" if channels_last else "contiguous (NCHW)"
        assert f"input [1, 1, 16, 16] {layout};" in header and "wall clock, 2 warm-up calls" in header
        assert "speedups over 'a | b'" in header and second.startswith("| a \\| b |")
        assert first.count(" | ") == second.count(" | ")  # the bar in the label escaped: still one cell
        assert json.loads(report.to_json())["timer"] == "wall clock"
    assert report.device.startswith("CPU: ") and "threads)" in report.device


def test_floors_under_a_thousandth_of_a_ms_keep_their_digits():
    result = ConfigResult("x", None, 1.0, Timing(0.02, 0.01, 0.03, 3, 0.01), floor_ms=0.00042, floor_bound="bytes")
    report = Report("CPU", {}, "float32", (1, 1, 4, 4), "torch", PEAKS, [result])
    assert "| 0.000420 (bytes) |" in report.to_markdown()
    result.floor_ms = 0.0000123
    assert "| 0.0000123 (bytes) |" in report.to_markdown()


def test_the_runner_times_the_inputs_it_is_given():
    torch.manual_seed(0)
    net = SlimDnCNN(in_channels=3, base_width=8, depth=3)
    images = torch.rand(2, 3, 12, 12)  # NCHW: the runner times them channels_last
    runner = LatencyRunner(net, (2, 3, 12, 12), warmup=0, repeats=1, inputs=images)
    assert torch.equal(runner.inputs, images) and runner.inputs.is_contiguous(memory_format=torch.channels_last)
    for bad in (torch.rand(1, 3, 12, 12), images.numpy()):
        with pytest.raises(ValueError, match=r"inputs must be a tensor of input_shape \[2, 3, 12, 12\]"):
            LatencyRunner(net, (2, 3, 12, 12), inputs=bad)


def test_bad_peaks_and_inputs_without_output_pixels_are_named():
    for bad in ((0, 1e9), (1e9, float("inf")), (True, 1e9), ("1e9", 1e9)):
        with pytest.raises(ValueError, match="DevicePeaks: (flops|bytes)_per_s must be a positive finite rate"):
            DevicePeaks(*bad)
    runner = LatencyRunner(SlimConv2d(4, 4, 3), (1, 4, 2, 2), warmup=0, repeats=1)
    with pytest.raises(ValueError, match="peaks must be DevicePeaks"):
        runner.run(peaks=(1e9, 1e9))
    with pytest.raises(ValueError, match=r"a 2x2 input gives SlimConv2d.* no output pixels \(kernel \(3, 3\)"):
        runner.run(peaks=PEAKS)


def test_a_static_export_is_timed_as_it_is_and_has_no_gate_to_time():
    net = small_net()
    static = export_static(net, net.space.smallest())
    runner = LatencyRunner(static, (1, 1, 8, 8), warmup=0, repeats=1)
    report = runner.run(peaks=PEAKS)  # its widths are fixed: set_config raises
    assert [(r.label, r.macs_per_pixel) for r in report.results] == [
        ("as is", macs_per_pixel(net, net.space.smallest()))]
    assert time_gate(runner, report) is None


def test_a_static_export_behind_the_attention_head_is_timed_as_it_is():
    from dds_fast import AttentionSupernet, DynamicGate, SlimUNet

    net = SlimUNet(in_channels=3, base_width=8, depth=2)
    static = export_static(AttentionSupernet(net, DynamicGate(net.stem_channels, 2)), net.space.smallest())
    assert static.is_static
    report = LatencyRunner(static, (1, 3, 8, 8), warmup=0, repeats=1).run(peaks=DevicePeaks(1, 1))
    assert [r.label for r in report.results] == ["as is"]


def test_a_cuda_report_records_whether_tf32_was_on(monkeypatch):
    """A float32 cuDNN baseline with TF32 computes in 10-bit mantissas, the kernels in fp32."""
    from dds_fast import runner

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a GPU")
    monkeypatch.setattr(runner, "_cuda_driver", lambda: "1.0")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    name, env = runner.describe_device(torch.device("cuda"))
    assert name == "a GPU" and env["tf32"] == {"cudnn": False, "matmul": torch.backends.cuda.matmul.allow_tf32}
