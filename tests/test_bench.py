import json

import pytest

import torch
from torch import nn

from dds_fast import DDSNet, DynamicGate, RoutingEntry, SlimConv2d, SlimDnCNN, macs_per_pixel
from dds_fast.bench import (error_summary, gate_markdown, layer_markdown, layer_variants, run_bench, target_rows,
                            targets_markdown, time_gate)
from dds_fast.runner import ConfigResult, DevicePeaks, LatencyRunner, Report, Timing
from tests.test_runner import PEAKS, small_net


def test_layer_table_shows_graph_replay_times_beside_eager_ones():
    def row(variant, ms, graph_ms):
        return dict(size=512, batch=1, ratio=0.25, width=16, variant=variant, step="forward", median_ms=ms,
                    graph_median_ms=graph_ms)

    table = layer_markdown([row("triton fused", 0.1, 0.01), row("(b) static", 0.05, 0.02)])
    assert "graph replay ms | vs (b) |" in table
    assert "| triton fused | 0.1000 | 0.50x | 0.0100 | 2.00x |" in table
    eager_only = [{k: v for k, v in row("(b) static", 0.05, 0.0).items() if k != "graph_median_ms"}]
    assert "graph" not in layer_markdown(eager_only)
    # a failed baseline leaves our row without a ratio, not the table without a row
    failed = dict(size=512, batch=1, ratio=0.25, width=16, variant="(b) static", step="forward", error="boom")
    table = layer_markdown([row("triton fused", 0.1, 0.01), failed])
    assert "| triton fused | 0.1000 | | | |" in table and "failed: boom" in table


def test_a_long_error_stays_in_its_cell():
    """torch.compile's errors run over lines (a blank one ends a markdown table) and may hold |."""
    summary = error_summary(RuntimeError("no compiler | found\n\nSet TORCHDYNAMO_VERBOSE=1 " + "x" * 400))
    assert summary == "RuntimeError: no compiler | found" and error_summary(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert len(error_summary(ValueError("y" * 400))) == 300
    failed = dict(size=8, batch=1, ratio=1, width=4, variant="(c) compiled static", step="forward", error=summary)
    fine = dict(failed, variant="(b) static", median_ms=0.5)
    del fine["error"]
    lines = layer_markdown([failed, fine]).splitlines()
    assert len(lines) == 4 and all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])
    assert "failed: RuntimeError: no compiler \\| found |" in lines[2]


def test_bench_targets_say_what_is_met_and_by_how_much():
    def layer(variant, ms, step="forward"):
        return dict(size=512, batch=8, ratio=0.25, width=16, variant=variant, step=step,
                    macs=(3 if step != "forward" else 1) * 16 * 16 * 9 * 512 * 512 * 8, median_ms=ms)

    layers = [layer("triton fused", 0.2), layer("(b) static", 0.25), layer("(a) sliced copy", 0.24),
              layer("triton fused", 0.5, "forward+backward"), layer("(b) static", 0.45, "forward+backward")]
    peaks = DevicePeaks(flops_per_s=1e15, bytes_per_s=4e12)

    def network(batch):
        return Report("GPU", {}, "float16", (batch, 3, 512, 512), "triton", peaks, [
            ConfigResult("smallest", {"a": 8}, 1000.0, Timing(2.0, 1.9, 2.1, 10, 1.8), 40.0, 20.0, 1.0, "bytes"),
            ConfigResult("largest", {"a": 64}, 40000.0, Timing(40.0, 39.0, 41.0, 10, 38.0), 1.0, 1.0, 32.0, "FLOPs")])

    gates = [dict(batch=8, backend="triton", fused_ms=0.02, eager_ms=0.3, floor_ms=0.01, floor_bound="bytes",
                  routed_smallest_ms=2.2, smallest="smallest", smallest_ms=2.0, routed_smallest_narrow_tiles_ms=2.08,
                  routed_largest_ms=41.0, routed_largest_narrow_tiles_ms=44.0, largest="largest", largest_ms=40.0,
                  routed_smallest_branches_ms=2.06, routed_largest_branches_ms=40.5),
             dict(batch=1, backend="triton", fused_ms=0.02, eager_ms=0.06, floor_ms=0.005, floor_bound="bytes",
                  fused_in_graph_ms=0.004, eager_in_graph_ms=0.044, routed_smallest_ms=2.05, smallest="smallest",
                  smallest_ms=2.0)]
    rows = {r["target"]: r for r in target_rows(layers, [network(1), network(8)], 2, peaks, gates)}
    vs_b = rows["layer 512x512, batch 8, width 16: fused vs (b) static"]
    vs_a = rows["layer 512x512, batch 8, width 16: fused vs (a) sliced copy"]
    assert vs_b["met"] and vs_b["got"] == pytest.approx(1.25)
    assert not vs_a["met"] and vs_a["got"] == pytest.approx(1.2)
    # (2 x 16 channels x 512^2 x 8 images + weights and bias) x 2 bytes at 4 TB/s
    assert vs_a["bound"].startswith("bytes: floor 0.0336 ms")
    training = rows["layer 512x512, batch 8, width 16: fused forward+backward vs (b) static"]
    # 6 activation-sized and 3 weight-sized tensors: (6 x 16 x 512^2 x 8 + 3 x 2320) x 2 bytes
    assert training["met"] and training["got"] == pytest.approx(0.9)
    assert training["bound"].startswith("bytes: floor 0.1007")
    assert not rows["network batch 8, smallest: within 1.5x of its floor"]["met"]
    assert rows["network batch 1, largest: within 1.5x of its floor"]["met"]
    share = [r for r in rows.values() if "MAC ratio" in r["target"]]  # the target is at batch 8
    assert len(share) == 1 and share[0]["target"].startswith("network batch 8")
    assert share[0]["got"] == pytest.approx(0.5) and not share[0]["met"]
    gate = rows["network batch 8: gate and routing add at most 5% to smallest's latency"]
    assert gate["got"] == pytest.approx(0.1) and not gate["met"]
    assert rows["network batch 1: gate and routing add at most 5% to smallest's latency"]["met"]
    narrow = rows["network batch 8, per-image tiles for the narrowest route: gate and routing add at most 5% to "
                  "smallest's latency"]
    assert narrow["got"] == pytest.approx(0.04) and narrow["met"] and "44.0000 ms, 41.0000" in narrow["bound"]
    branches = rows["network batch 8, a conditional graph node per route: gate and routing add at most 5% to "
                    "smallest's latency"]
    assert branches["got"] == pytest.approx(0.03) and branches["met"] and "40.5000 ms, 40.0000" in branches["bound"]
    assert not any("conditional" in r["target"] for r in rows.values() if r["target"].startswith("network batch 1"))
    text = gate_markdown([dict(g, channels=32, num_choices=4, attention=False, reads_stem_sums=True) for g in gates])
    assert "conditional graph node per route, 2.0600 ms routed to smallest and 40.5000 ms routed to largest" in text
    assert text.count("conditional") == 1  # the batch-1 gate was not timed that way
    failed = gate_markdown([dict(gates[1], channels=32, num_choices=4, attention=False, reads_stem_sums=True,
                                 routed_branches_error="RuntimeError: CUDA driver call failed")])
    assert "conditional graph node per route: failed (RuntimeError: CUDA driver call failed)" in failed
    speedup = [r for r in rows.values() if r["target"].startswith("gate head at batch 1: ")]  # batch 1 only
    assert len(speedup) == 1 and speedup[0]["got"] == pytest.approx(3.0) and not speedup[0]["met"]
    in_graph = rows["gate head at batch 1, per call in a graph of 20: fused at least 5x faster than eager"]
    assert in_graph["got"] == pytest.approx(11.0) and in_graph["met"] and "4.0 us" in in_graph["bound"]
    table = targets_markdown(list(rows.values()))
    assert "| no: 20% short |" in table and "| no: 1.3x the target |" in table and "| no: 38% short |" in table
    assert "| no: 2.0x the target |" in table
    near = targets_markdown([dict(target="t", need=1.5, got=1.54, unit="x", bound="", lower_is_better=True, met=False),
                             dict(target="u", need=0.8, got=0.797, unit="", bound="", met=False)])
    assert "| at most 1.5x | 1.54 | no: 2.7% above it |" in near and "| 0.797 | no: 0.4% short |" in near


def test_targets_give_no_verdict_on_a_time_under_its_floor_or_a_routing_that_saves_time():
    """A measured time under its floor means peaks that understate the device, and a routed
    forward faster than its route alone means noise: neither may read as a target met (a CPU
    run said "yes" to a routing overhead of -99%)."""
    peaks = DevicePeaks(flops_per_s=1e9, bytes_per_s=1e9)
    network = Report("CPU", {}, "float32", (1, 3, 16, 16), "torch", peaks, [
        ConfigResult("smallest", {"a": 8}, 1000.0, Timing(2.0, 1.9, 2.1, 10, 1.8), 2.0, 2.0, 2.4, "FLOPs"),
        ConfigResult("largest", {"a": 64}, 2000.0, Timing(4.0, 3.9, 4.1, 10, 3.8), 1.0, 1.0, 1.0, "FLOPs")])
    gate = dict(batch=1, backend="torch", fused_ms=0.02, eager_ms=0.03, floor_ms=0.01, floor_bound="bytes",
                routed_smallest_ms=0.5, smallest="smallest", smallest_ms=2.0)
    rows = {r["target"]: r for r in target_rows([], [network], 4, peaks, [gate])}
    beaten = rows["network batch 1, smallest: within 1.5x of its floor"]
    assert beaten["met"] is None and network.results[0].floor_beaten
    assert rows["network batch 1, largest: within 1.5x of its floor"]["met"] is False  # judged: 4x its floor
    routed = rows["network batch 1: gate and routing add at most 5% to smallest's latency"]
    assert routed["got"] == pytest.approx(-0.75) and routed["met"] is None
    # within the target's width of zero it is noise around a routing that costs nothing: met
    near = target_rows([], [network], 4, peaks, [dict(gate, routed_smallest_ms=1.95)])
    assert [r["met"] for r in near if "gate and routing" in r["target"]] == [True]
    table = targets_markdown(list(rows.values()))
    assert "| no verdict: measured under its floor: the peaks understate this device |" in table
    assert "| no verdict: the routed forward timed faster than the route alone |" in table
    assert "(under the floor: the peaks understate this device)" in network.to_markdown()
    assert json.loads(json.dumps(network.to_dict()))["results"][0]["floor_beaten"] is True


def test_layer_targets_also_compare_graph_replays_where_both_were_replayed():
    def layer(variant, ms, graph_ms=None, step="forward+backward"):
        row = dict(size=512, batch=1, ratio=0.25, width=16, variant=variant, step=step,
                   macs=3 * 16 * 16 * 9 * 512 * 512, median_ms=ms)
        return row if graph_ms is None else dict(row, graph_median_ms=graph_ms)

    peaks = DevicePeaks(flops_per_s=1e15, bytes_per_s=4e12)
    network = Report("GPU", {}, "float16", (1, 3, 512, 512), "triton", peaks, [
        ConfigResult("largest", {"a": 64}, 40000.0, Timing(40.0, 39.0, 41.0, 10, 38.0), 1.0, 1.0, 32.0, "FLOPs")])
    rows = {r["target"]: r for r in target_rows(
        [layer("triton fused", 0.9, 0.2), layer("(b) static", 0.4, 0.25),
         layer("triton fused", 0.06, 0.02, "forward"), layer("(b) static", 0.05, None, "forward")], [network], 2,
        peaks)}
    name = "layer 512x512, batch 1, width 16: fused forward+backward vs (b) static"
    assert rows[name]["got"] == pytest.approx(0.4 / 0.9) and not rows[name]["met"]
    replayed = rows[name + ", both as CUDA-graph replays"]
    assert replayed["got"] == pytest.approx(1.25) and replayed["met"] and "replayed" in replayed["bound"]
    # the forward's baseline was not replayed: its eager row only
    assert "layer 512x512, batch 1, width 16: fused vs (b) static" in rows
    assert "layer 512x512, batch 1, width 16: fused vs (b) static, both as CUDA-graph replays" not in rows


def test_bench_times_the_network_at_every_batch_on_cpu(tmp_path):
    result = run_bench(tmp_path, sizes=[8], batches=[1, 8], channels=4, model=SlimDnCNN(1, base_width=8, depth=3),
                       device="cpu", warmup=0, repeats=1, compile_static=False)
    assert [n["input_shape"][0] for n in result["network"]] == [1, 8]
    assert all(n["backend"] == "torch" and n["cuda_graph"] is False for n in result["network"])
    assert {(r["variant"], r["step"]) for r in result["layers"]} == {
        ("(a) sliced copy", "forward"), ("(b) static", "forward"), ("(b) static", "forward+backward")}
    assert [(g["batch"], g["backend"]) for g in result["gate"]] == [(1, "torch"), (8, "torch")]
    assert all(g["routed_smallest_ms"] > 0 and g["smallest_ms"] > 0 and g["eager_ms"] > 0 for g in result["gate"])
    assert all(g["routed_largest_ms"] > 0 and g["routed_smallest_narrow_tiles_ms"] is None for g in result["gate"])
    assert all(g["routed_peak_memory_mib"] is None and g["routed_smallest_branches_ms"] is None
               and g["routed_branches_error"] is None for g in result["gate"])
    targets = [t["target"] for t in result["targets"]]
    # on the reference backend the fused-against-eager target does not apply
    assert sum("MAC ratio" in t for t in targets) == 1 and sum("gate and routing" in t for t in targets) == 2
    assert not any(t.startswith("gate head") for t in targets)
    assert json.loads((tmp_path / "bench.json").read_text())["targets"] == result["targets"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "Gate at batch 8" in markdown
    # no dtype asked for: a CPU run's float32 is its default, not a replacement
    assert (result["dtype"], result["requested_dtype"]) == ("float32", None) and "Dtype: float32\n" in markdown


def test_time_gate_times_the_head_on_the_stems_channel_sums_and_the_routed_forward():
    """On the kernels (the interpreter here), the head reads the sums the stem's epilogue left."""
    pytest.importorskip("triton")
    net = SlimDnCNN(1, base_width=8, depth=3)
    for module in net.modules():
        if isinstance(module, SlimConv2d):
            module.backend = "triton"
    gate = DynamicGate(net.stem_channels, 2, backend="triton")
    model = DDSNet(net, gate, [RoutingEntry(c, macs_per_pixel(net, c)) for c in (net.space.smallest(),
                                                                                  net.space.largest())])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine the kernels need CUDA tensors
    runner = LatencyRunner(model, (1, 1, 8, 8), torch.float32, device, warmup=0, repeats=1)
    before = {name: value.clone() for name, value in model.gate.state_dict().items()}
    report = runner.run(peaks=DevicePeaks(flops_per_s=1e12, bytes_per_s=1e11))
    timing = time_gate(runner, report)
    for name, value in model.gate.state_dict().items():  # timed on a rigged copy
        assert torch.equal(value, before[name].to(value.device)), name
    assert timing["backend"] == "triton" and timing["reads_stem_sums"] and timing["attention"] is True
    assert timing["smallest"] == "route 0" and timing["routed_smallest_ms"] > 0
    assert (timing["fused_in_graph_ms"] is None) == (device == "cpu")  # graphs need CUDA
    assert model.gate.backend == "triton"
    assert not net.stem_conv.emit_channel_sums and net.stem_conv.channel_sums is None


def test_no_gate_is_timed_over_a_single_route():
    net = small_net()
    net.routing_space = [RoutingEntry(net.space.smallest(), macs_per_pixel(net, net.space.smallest()))]
    runner = LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=1)
    report = runner.run(peaks=PEAKS)
    assert [r.label for r in report.results] == ["route 0"]
    assert time_gate(runner, report) is None  # a gate chooses between two configs at least


@pytest.mark.parametrize("kwargs,name", [
    (dict(sizes=[-4]), "sizes"),
    (dict(sizes=[0]), "sizes"),
    (dict(batches=[0]), "batches"),
    (dict(channels=-1), "channels"),
])
def test_bench_rejects_non_positive_sizes_batches_and_channels(tmp_path, kwargs, name):
    args = dict(sizes=[8], batches=[1], channels=4, model=small_net(), device="cpu", warmup=0, repeats=1,
                compile_static=False)
    with pytest.raises(ValueError, match=f"bench: {name} must be positive"):
        run_bench(tmp_path, **{**args, **kwargs})


def test_a_failed_branch_timing_is_recorded_and_the_gate_rows_kept(monkeypatch):
    """The conditional nodes' timings come last, and their failure, of any kind, is a reading."""
    import dds_fast.bench

    def takes_branches(self, padded, per_image):
        if self.route_branches:
            raise TypeError("a driver call refused its arguments\nsecond line")
        return False

    monkeypatch.setattr(dds_fast.bench, "conditional_graph_nodes", lambda: True)
    monkeypatch.setattr(DDSNet, "_takes_branches", takes_branches)
    net = small_net()
    runner = LatencyRunner(net, (1, 1, 8, 8), warmup=0, repeats=1)
    report = runner.run(peaks=PEAKS)
    runner.cuda_graph = True  # as on a GPU (the constructor takes it on CUDA only); the CPU times eagerly
    timing = time_gate(runner, report)
    assert timing["routed_branches_error"] == "TypeError: a driver call refused its arguments"
    assert timing["routed_smallest_branches_ms"] is None and timing["routed_smallest_ms"] > 0
    assert timing["eager_ms"] > 0 and net.get_config() == net.space.largest()


def test_bench_writes_what_it_measured_before_a_failure(tmp_path, monkeypatch):
    import dds_fast.bench

    def gate_failing_at_batch_2(runner, network):
        if runner.input_shape[0] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return None

    monkeypatch.setattr(dds_fast.bench, "time_gate", gate_failing_at_batch_2)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_bench(tmp_path, sizes=[8], batches=[1, 2, 4], channels=4, model=SlimDnCNN(1, base_width=8, depth=3),
                  device="cpu", warmup=0, repeats=1, compile_static=False)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert [n["input_shape"][0] for n in written["network"]] == [1, 2]  # batch 2's network was timed
    assert written["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert written["layers"] and written["targets"]
    assert "**Stopped early** (RuntimeError: CUDA error" in (tmp_path / "bench.md").read_text()


def test_the_branch_timings_run_the_gate_head_the_routed_rows_ran(monkeypatch):
    """The eager head's timing sets the gate to torch; the branches it is compared with must not inherit that."""
    import dds_fast.bench

    seen = []

    def takes_branches(self, padded, per_image):
        seen.append((self.route_branches, self.gate.backend))
        return False

    monkeypatch.setattr(dds_fast.bench, "conditional_graph_nodes", lambda: True)
    monkeypatch.setattr(DDSNet, "_takes_branches", takes_branches)
    runner = LatencyRunner(small_net(), (1, 1, 8, 8), warmup=0, repeats=1)
    report = runner.run(peaks=PEAKS)
    runner.cuda_graph = True  # as on a GPU; the CPU times eagerly
    time_gate(runner, report)
    per_image = {backend for branches, backend in seen if not branches}
    assert per_image == {"auto"} and {backend for branches, backend in seen if branches} == per_image


BENCH_ARGS = dict(sizes=[8], batches=[1], channels=4, device="cpu", warmup=0, repeats=1, compile_static=False)


def test_an_interrupt_writes_what_was_measured_then_is_raised(tmp_path, monkeypatch):
    """`timeout -s INT` (benchmarks/gpu_session.sh) stops a run with a KeyboardInterrupt."""
    import dds_fast.bench

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dds_fast.bench, "time_gate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tmp_path, model=SlimDnCNN(1, base_width=8, depth=3), **BENCH_ARGS)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["error"] == "KeyboardInterrupt" and written["layers"] and len(written["network"]) == 1
    assert written["targets"] and "**Stopped early** (KeyboardInterrupt)" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "network.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "network.png"]  # no temp file left

    # in the layer phase: the rows timed before it are kept
    calls = []

    def time_fn(self, fn, cuda_graph=False):
        calls.append(fn)
        if len(calls) > 3:  # the peaks' matmul and copy, then a layer row
            raise KeyboardInterrupt
        return Timing(1.0, 1.0, 1.0, 1, 1.0)

    monkeypatch.setattr(LatencyRunner, "time_fn", time_fn)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tmp_path, model=SlimDnCNN(1, base_width=8, depth=3), **BENCH_ARGS)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["error"] == "KeyboardInterrupt" and len(written["layers"]) == 1 and written["network"] == []
    assert not (tmp_path / "network.png").exists()  # the earlier run's, removed: this run timed no network


def test_layer_targets_are_kept_when_the_network_phase_fails_first(tmp_path, monkeypatch):
    import dds_fast.bench

    def layers(*args):  # a GPU's rows: the layer targets compare the fused variant
        return [dict(size=8, batch=1, ratio=1.0, width=4, variant=variant, step="forward", macs=4 * 4 * 9 * 64,
                     median_ms=ms) for variant, ms in (("triton fused", 0.1), ("(b) static", 0.2))]

    def out_of_memory(self, configs=None, peaks=None):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(dds_fast.bench, "bench_layers", layers)
    monkeypatch.setattr(LatencyRunner, "run", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_bench(tmp_path, model=SlimDnCNN(1, base_width=8, depth=3), **BENCH_ARGS)
    targets = json.loads((tmp_path / "bench.json").read_text())["targets"]
    assert [t["target"] for t in targets] == ["layer 8x8, batch 1, width 4: fused vs (b) static"]
    assert targets[0]["got"] == pytest.approx(2.0)


def test_bench_reports_the_files_it_wrote_and_leaves_no_earlier_plot(tmp_path, monkeypatch, capsys):
    import dds_fast.bench
    from dds_fast.cli import main

    monkeypatch.setattr(dds_fast.bench, "plot_network", lambda reports, path: None)  # as without matplotlib
    (tmp_path / "network.png").write_bytes(b"an earlier run's plot")
    assert main(["bench", "--device", "cpu", "--size", "8", "--channels", "4", "--no-compile",
                 "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "network.png").exists()
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.endswith(f"written: {tmp_path / 'bench.json'}, {tmp_path / 'bench.md'}")


def test_a_plot_skipped_for_want_of_matplotlib_says_so(tmp_path, monkeypatch):
    import sys

    from dds_fast.bench import plot_network

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now fails
    with pytest.warns(UserWarning, match=r"matplotlib is not installed: .*network.png is not drawn"):
        assert plot_network([], tmp_path / "network.png") is None


@pytest.mark.parametrize("change,match", [
    (dict(device="meta"), "bench: times on CUDA devices and the CPU, got device meta"),
    (dict(model=nn.Sequential(nn.Conv2d(3, 3, 3))), "bench: the model must be an nn.Module with an int in_channels"),
    pytest.param(dict(device="cuda"), "bench: device cuda asked for, but this torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
])
def test_bench_refuses_a_device_or_model_it_cannot_time_before_any_work(tmp_path, change, match):
    # (a device torch could not name was reported by that failure's AttributeError or AssertionError)
    with pytest.raises(ValueError, match=match):
        run_bench(tmp_path / "out", **{**BENCH_ARGS, "model": small_net(), **change})
    assert not (tmp_path / "out").exists()


def test_layer_variants_leave_the_callers_random_stream():
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        layer_variants(8, 0.5, torch.device("cpu"), torch.float32, ["torch"], compile_static=False)
        draws.append(torch.rand(3))
        torch.manual_seed(seed)
        assert torch.equal(draws[-1], torch.rand(3))
    weights = [layer_variants(8, 0.5, torch.device("cpu"), torch.float32, ["torch"], False)[1]["(b) static"].weight
               for _ in range(2)]
    assert torch.equal(*weights)  # the layers' own weights: seed 0's, each time


def test_bench_refuses_cuda_graphs_off_cuda(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        run_bench(tmp_path / "out", model=small_net(), cuda_graph=True, **BENCH_ARGS)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_layer_rows_count_a_training_steps_macs_as_three_forwards():
    # forward+backward is the forward's MACs plus the input's and the weights' gradients
    from dds_fast.bench import bench_layers

    rows = list(bench_layers(8, [8], [1], torch.device("cpu"), torch.float32, 0, 1, compile_static=False))
    for row in rows:
        per_forward = row["width"] ** 2 * 9 * 8 * 8
        assert row["macs"] == (3 if row["step"] == "forward+backward" else 1) * per_forward
    assert {r["step"] for r in rows} == {"forward", "forward+backward"}


def test_a_layer_steps_floor_counts_its_activations_and_its_weights_by_hand():
    from dds_fast.bench import layer_floor_ms

    row = dict(step="forward", batch=2, size=8, width=8, macs=2 * 64 * 8 * 8 * 9)
    # input and output (2 x 2 x 64 pixels x 8 channels) and the 8x8x3x3 weight with its bias, fp32
    moved = (2 * 2 * 64 * 8 + 8 * 8 * 9 + 8) * 4
    assert layer_floor_ms(row, 4, DevicePeaks(flops_per_s=1e15, bytes_per_s=1e9)) == (moved / 1e9 * 1e3, "bytes")
    backward = dict(row, step="forward+backward", macs=3 * row["macs"])  # three times each
    floor_ms, _ = layer_floor_ms(backward, 4, DevicePeaks(flops_per_s=1e15, bytes_per_s=1e9))
    assert floor_ms == pytest.approx(3 * moved / 1e6)
