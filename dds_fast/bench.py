"""``dds-fast bench``: per-layer and whole-network latency, written as JSON, a markdown
table and PNG plots (real against theoretical speedup; latency against MACs with the
roofline floor).

Per layer, at each width ratio, it times the same narrow convolution four ways, channels_last:
the Triton SlimConv2d with its fused epilogue (CUDA only), (a) the sliced-copy PyTorch path
(``weight[:o, :i]``, the stock convolution, bias, activation), (b) the stock convolution on a
contiguous static weight of the narrow shape with bias and activation (the best slicing
cannot reach) and (c) ``torch.compile`` of (b); and forward plus backward of the fused layer
and of (b). The network is timed at each batch, with the gate head it routes with.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write
from .config import RoutingEntry, SubnetConfig
from .ddsnet import PER_IMAGE_TILES, DDSNet
from .export import StaticConv2d
from .gate import DynamicGate
from .graph_if import conditional_graph_nodes
from .nets import SlimNet, SlimUNet
from .runner import (WIDTHS, DevicePeaks, LatencyRunner, Report, backend_of, describe_device, timing_device,
                     width_at)
from .slim_conv import SlimConv2d

# The benchmark issue's targets: how many times faster than each baseline the fused layer
# must be (forward, and forward plus backward), how close to its roofline floor each config
# must run, what share of the MAC ratio the smallest config's real speedup must reach at
# batch 8, what share of the smallest config's latency the gate and routing may add, and how
# much faster than eager the fused gate head must be.
LAYER_TARGETS = {("forward", "(b) static"): 1.0, ("forward", "(a) sliced copy"): 1.5,
                 ("forward+backward", "(b) static"): 0.8}
FLOOR_TARGET = 1.5
SPEEDUP_SHARE_TARGET, SPEEDUP_BATCH = 0.8, 8
GATE_TARGET = 0.05
GATE_SPEEDUP_TARGET = 5.0  # the fused gate head against eager PyTorch, at batch 1
# Per step: its MACs in forward convs, and the activation- and weight-sized tensors it moves
# at least once. The forward reads the input and writes the output; the backward also reads
# the output's gradient, the input (for the weight gradient) and the output (the
# activation's slope) and writes the input's and the weights' gradients.
STEPS = {"forward": (1, 2, 1), "forward+backward": (3, 6, 3)}
# forward+backward is timed for the pair its target compares (on a CPU, (b) alone)
BACKWARD_VARIANTS = ("triton fused", "(b) static")


def layer_variants(channels: int, ratio: float, device, dtype, backends: list[str], compile_static: bool = True):
    """The layer's variants at one width ratio, each a callable taking the narrow input (their
    weights drawn from seed 0, leaving the caller's random streams as they were)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return _layer_variants(channels, ratio, device, dtype, backends, compile_static)


def _layer_variants(channels: int, ratio: float, device, dtype, backends: list[str], compile_static: bool):
    width = width_at(ratio, channels)
    variants = {}
    for backend in backends:
        slim = SlimConv2d(channels, channels, 3, padding=1, activation="leaky_relu", negative_slope=0.2,
                          backend=backend).to(device, dtype).to(memory_format=torch.channels_last)
        slim.active_out_channels = width
        variants["triton fused" if backend == "triton" else "(a) sliced copy"] = slim
    reference = next(iter(variants.values()))
    static = StaticConv2d(width, width, 3, 1, 1, 1, True, "zeros", "leaky_relu", 0.2).to(device, dtype)
    with torch.no_grad():
        static.weight.copy_(reference.weight[:width, :width])
        static.bias.copy_(reference.bias[:width])
    static = static.to(memory_format=torch.channels_last)
    variants["(b) static"] = static
    if compile_static:
        variants["(c) compiled static"] = torch.compile(static)
    return width, variants


def backward_step(layer, x: torch.Tensor):
    """One training step of ``layer``: the forward, then the backward of a fixed output
    gradient into the input and the weights."""
    x = x.detach().requires_grad_()
    probe = torch.randn_like(x)  # a width -> width 3x3 conv keeps the input's shape

    def step():
        with torch.enable_grad():  # the runner times under no_grad
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(probe)
    return step


def bench_layers(channels: int, sizes, batches, device, dtype, warmup: int, repeats: int,
                 compile_static: bool = True):
    """The layer rows, each yielded as it is timed (a run stopped midway keeps those before)."""
    backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    for size in sizes:
        for batch in batches:
            for ratio in WIDTHS:
                width, variants = layer_variants(channels, ratio, device, dtype, backends, compile_static)
                x = torch.rand(batch, width, size, size, device=device, dtype=dtype).to(
                    memory_format=torch.channels_last)
                runner = LatencyRunner(variants["(b) static"], x.shape, dtype, device, warmup, repeats)
                for name, layer in variants.items():
                    steps = {"forward": lambda: layer(x)}
                    if name in BACKWARD_VARIANTS:
                        steps["forward+backward"] = backward_step(layer, x)
                    for step, fn in steps.items():
                        row = dict(size=size, batch=batch, ratio=ratio, width=width, variant=name, step=step)
                        try:
                            timing = runner.time_fn(fn)
                        except Exception as error:  # torch.compile can be unavailable (no compiler): report it
                            yield dict(row, error=error_summary(error))
                            continue
                        if device.type == "cuda":
                            try:  # the GPU's own time, without the host's launch cost
                                row["graph_median_ms"] = runner.time_fn(fn, cuda_graph=True).median_ms
                            except Exception as error:  # a capture that fails keeps the eager timing
                                row["graph_error"] = error_summary(error)
                        yield dict(row, macs=STEPS[step][0] * width * width * 9 * size * size * batch,
                                   **asdict(timing))


def error_summary(error: BaseException) -> str:
    """An exception as one line of at most 300 characters, for a row of the JSON and a cell of
    the markdown (torch.compile's errors run over many lines, and a blank one ends a table)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}"[:300] if lines else type(error).__name__


def layer_markdown(rows: list[dict]) -> str:
    """The layer table; on a GPU, each step also timed as a CUDA-graph replay (the GPU's
    time alone: at batch 1 the eager call's time is mostly the host's)."""
    graphs = any("graph_median_ms" in r for r in rows)
    lines = ["| size | batch | ratio | width | step | variant | median ms | vs (b) static |"
             + (" graph replay ms | vs (b) |" if graphs else ""),
             "| ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |" + (" ---: | ---: |" if graphs else "")]
    timed = {(r["size"], r["batch"], r["ratio"], r["step"]): r for r in rows
             if r["variant"] == "(b) static" and "median_ms" in r}
    for r in rows:
        where = f"| {r['size']} | {r['batch']} | {r['ratio']} | {r['width']} | {r['step']} | {r['variant']} |"
        if "median_ms" not in r:
            cell = r["error"].replace("|", "\\|")  # a bare | would start another column
            lines.append(f"{where} failed: {cell} | |" + (" | |" if graphs else ""))
            continue
        static = timed.get((r["size"], r["batch"], r["ratio"], r["step"]))
        if static is None:  # the baseline failed: no ratio
            line = f"{where} {r['median_ms']:.4f} | |"
        else:
            line = f"{where} {r['median_ms']:.4f} | {static['median_ms'] / r['median_ms']:.2f}x |"
        if graphs:
            if static is not None and "graph_median_ms" in r and "graph_median_ms" in static:
                line += f" {r['graph_median_ms']:.4f} | {static['graph_median_ms'] / r['graph_median_ms']:.2f}x |"
            else:
                line += " | |"
        lines.append(line)
    return "\n".join(lines)


def layer_floor_ms(row: dict, element_bytes: int, peaks: DevicePeaks) -> tuple[float, str]:
    """The layer step's roofline floor: the fewest activation- and weight-sized tensors it
    moves (``STEPS``), against its FLOPs (2 per MAC)."""
    _, activations, weights = STEPS[row["step"]]
    pixels = row["batch"] * row["size"] ** 2
    moved = (activations * pixels * row["width"] + weights * (row["width"] ** 2 * 9 + row["width"])) * element_bytes
    return peaks.floor_ms(moved, 2 * row["macs"])


GATE_CALLS_PER_GRAPH = 20


def _per_call_in_graph(runner: LatencyRunner, fn) -> float | None:
    """``fn``'s time per call inside one CUDA graph of ``GATE_CALLS_PER_GRAPH`` calls (its GPU
    time as a network's graph runs it, without a lone replay's launch); None off CUDA."""
    if runner.device.type != "cuda":
        return None

    def calls():
        for _ in range(GATE_CALLS_PER_GRAPH):
            fn()
    return runner.time_fn(calls, cuda_graph=True).median_ms / GATE_CALLS_PER_GRAPH


def ddsnet_over(net: SlimNet, routes: list[RoutingEntry], gate: DynamicGate | None = None) -> DDSNet:
    """A DDSNet routing ``net`` among ``routes`` (as many as the gate has choices), in eval mode,
    with a copy of ``gate`` on the stem's device and dtype (a copy: rigging must leave a model's
    own gate alone), else a DynamicGate of DDS-Net's shape as stage 3 leaves it (attention off)."""
    if gate is None:
        gate = DynamicGate(net.stem_channels, len(routes))
        gate.attention = False
    stem = net.stem_conv.weight
    gate = copy.deepcopy(gate).to(stem.device, stem.dtype).eval()
    return DDSNet(net, gate, routes[:gate.num_choices]).eval()


def rig_gate(gate: DynamicGate, index: int) -> None:
    """Make ``gate`` send every image to choice ``index``: with its last layer's weights zero,
    its logits are that layer's one-hot bias, whatever the image."""
    with torch.no_grad():
        gate.fc4.weight.zero_()
        gate.fc4.bias.copy_((torch.arange(gate.num_choices) == index).to(gate.fc4.bias.dtype))


def time_gate(runner: LatencyRunner, network: Report) -> dict | None:
    """The gate's cost at the runner's input, timed as the network was (CUDA-graph replay
    included), with a DDSNet's own gate, else a DynamicGate of DDS-Net's shape over the timed
    configs as stage 3 leaves it (attention off); None for a network without a stem or with
    fewer than two configs to route between (a static export, a single route):

    - ``fused_ms``, ``eager_ms``: the gate head alone on the full-width stem's output, on its
      kernels (reading the channel sums the stem's epilogue leaves, as DDSNet runs it) and on
      eager PyTorch ops; ``fused_in_graph_ms``, ``eager_in_graph_ms`` the same per call inside
      a CUDA graph of many calls (on CUDA), where a lone replay's own launch, several times
      the fused head's few microseconds, drops out;
    - ``routed_smallest_ms``: the dynamic forward with the gate sending every image to the
      smallest config, against that config alone (``smallest_ms``, the network's row): what
      the gate and the routing add, the full-width stem the gate reads included (an
      AttentionSupernet's rows run that stem and the attention themselves: there, the
      prediction head and the routing);
      ``routed_largest_ms`` the same for the gate's dearest route (``largest_ms``); each also
      ``*_narrow_tiles_ms``, with the per-image launches' tiles sized for each layer's
      narrowest route (``DDSNet.per_image_tiles``) instead of its widest, and, when the runner
      replays CUDA graphs and conditional nodes can be captured (``graph_if``),
      ``*_branches_ms``: the graph routing through a conditional node per route
      (``DDSNet.route_branches``), which runs the chosen route's static launches alone, or
      ``routed_branches_error`` if that failed; ``routed_peak_memory_mib``, on CUDA, the
      device memory reserved at the peak of each of those timings (per-image buffers, or the
      branches' memory: torch captures each branch on a stream of its own, whose freed blocks
      the others do not reuse; the driver's nodes, one stream for all of them).
    """
    net = getattr(runner.model, "supernet", runner.model)
    configured = sorted(network.configured(), key=lambda r: r.macs_per_pixel)
    if not hasattr(net, "stem_conv") or len(configured) < 2:  # a gate has two choices at least
        return None
    routed = ddsnet_over(net, [RoutingEntry(SubnetConfig.from_dict(r.config), r.macs_per_pixel) for r in configured],
                         getattr(runner.model, "gate", None))
    gate = routed.gate
    routes = configured[:gate.num_choices]
    fused_backend = backend_of(gate, runner.device)
    previous, backend = net.get_config(), gate.backend
    stem = net.stem_conv

    peaks_mib = {}

    def routed_ms(index: int, policy: str) -> float:
        """The dynamic forward with every image sent to route ``index``: per-image launches on
        the tiles of ``policy``, or the graph's conditional ``branches``. On CUDA, also the
        device memory's peak while it ran (a graph's pool included)."""
        rig_gate(gate, index)
        routed.route_branches = policy == "branches"
        routed.per_image_tiles = PER_IMAGE_TILES[0] if routed.route_branches else policy
        cuda = runner.device.type == "cuda"
        if cuda:  # reserved, not allocated: a graph's pool keeps blocks its capture freed
            with torch.no_grad():
                routed(runner.inputs)  # the one-time warm-ups (branches: every route) before the count
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(runner.device)
        median = runner.time_fn(lambda: routed(runner.inputs), runner.cuda_graph).median_ms
        if cuda:
            peaks_mib[f"{routes[index].label}, {policy}"] = torch.cuda.max_memory_reserved(runner.device) / 2 ** 20
        return median

    try:
        # off CUDA the batch is grouped by route, with no per-image launches to size tiles for
        policies = PER_IMAGE_TILES if runner.device.type == "cuda" else PER_IMAGE_TILES[:1]
        ends = (0, len(routes) - 1)
        routed_times = {(index, policy): routed_ms(index, policy) for index in ends for policy in policies}
        net.set_config(net.space.largest())  # the gate reads the full-width stem
        stem.emit_channel_sums = True
        with torch.no_grad():
            features = stem(net.pad(runner.inputs))
        sums = stem.channel_sums
        fused = runner.time_fn(lambda: gate(features, channel_sums=sums), runner.cuda_graph)
        fused_in_graph = _per_call_in_graph(runner, lambda: gate(features, channel_sums=sums))
        gate.backend = "torch"
        eager = runner.time_fn(lambda: gate(features), runner.cuda_graph)
        eager_in_graph = _per_call_in_graph(runner, lambda: gate(features))
    finally:
        stem.emit_channel_sums, stem.channel_sums = False, None
        gate.backend = backend  # the branches are compared with routed rows timed on the fused head
        net.set_config(previous)
    # last, and a failure kept as a reading: the driver's conditional nodes (torch 2.11) are new
    branches_error = None
    if runner.cuda_graph and conditional_graph_nodes():
        try:
            for index in ends:
                routed_times[index, "branches"] = routed_ms(index, "branches")
        except Exception as error:
            branches_error = error_summary(error)
        finally:
            net.set_config(previous)
    # the head alone: one read of the channel sums or of the stem's output (and, with
    # attention, a scaled copy of it); its FLOPs are negligible
    read = features.numel() * features.element_size() if sums is None else sums.numel() * 4
    floor, bound = network.peaks.floor_ms(read + (2 * features.numel() * features.element_size()
                                                  if gate.attention else 0), 0)
    return dict(batch=runner.input_shape[0], channels=net.stem_channels, num_choices=gate.num_choices,
                attention=gate.attention, backend=fused_backend, reads_stem_sums=sums is not None,
                fused_ms=fused.median_ms, eager_ms=eager.median_ms, fused_in_graph_ms=fused_in_graph,
                eager_in_graph_ms=eager_in_graph, floor_ms=floor, floor_bound=bound,
                routed_smallest_ms=routed_times[0, "widest"], smallest=routes[0].label,
                smallest_ms=routes[0].timing.median_ms,
                routed_smallest_narrow_tiles_ms=routed_times.get((0, "narrowest")),
                routed_largest_ms=routed_times[len(routes) - 1, "widest"],
                routed_largest_narrow_tiles_ms=routed_times.get((len(routes) - 1, "narrowest")),
                routed_smallest_branches_ms=routed_times.get((0, "branches")),
                routed_largest_branches_ms=routed_times.get((len(routes) - 1, "branches")),
                routed_branches_error=branches_error, routed_peak_memory_mib=peaks_mib or None,
                largest=routes[-1].label, largest_ms=routes[-1].timing.median_ms)


def target_rows(layers: list[dict], networks: list[Report], element_bytes: int, peaks: DevicePeaks,
                gates: list[dict] = ()) -> list[dict]:
    """Each target of the benchmark issue that this run measured: what it needs, what was
    measured, whether it is met, and the floor that bounds it (bytes or FLOPs, at ``peaks``).
    ``networks`` are the network's reports, one per batch; ``gates`` the gate timings of
    ``time_gate``."""
    rows = []
    timed = {(r["size"], r["batch"], r["ratio"], r["step"], r["variant"]): r for r in layers if "median_ms" in r}
    for (size, batch, ratio, step, variant), ours in timed.items():
        if variant != "triton fused":
            continue
        floor, bound = layer_floor_ms(ours, element_bytes, peaks)
        for (target_step, baseline), need in LAYER_TARGETS.items():
            other = timed.get((size, batch, ratio, step, baseline))
            if target_step == step and other is not None:
                what = "fused" if step == "forward" else f"fused {step}"
                rows.append(dict(target=f"layer {size}x{size}, batch {batch}, width {ours['width']}: {what} vs "
                                        f"{baseline}",
                                 need=need, got=other["median_ms"] / ours["median_ms"], unit="x faster",
                                 bound=f"{bound}: floor {floor:.4f} ms, measured {ours['median_ms'] / floor:.1f}x it"))
                if "graph_median_ms" in ours and "graph_median_ms" in other:
                    # the GPU's time alone: where an eager call is host bound, what a captured step runs at
                    rows.append(dict(target=f"layer {size}x{size}, batch {batch}, width {ours['width']}: {what} vs "
                                            f"{baseline}, both as CUDA-graph replays",
                                     need=need, got=other["graph_median_ms"] / ours["graph_median_ms"],
                                     unit="x faster", bound=f"{bound}: floor {floor:.4f} ms, replayed "
                                                            f"{ours['graph_median_ms'] / floor:.1f}x it"))
    for network in networks:
        batch = network.input_shape[0]
        for r in network.results:
            rows.append(dict(target=f"network batch {batch}, {r.label}: within {FLOOR_TARGET}x of its floor",
                             need=FLOOR_TARGET, got=r.timing.median_ms / r.floor_ms, unit="x the floor",
                             lower_is_better=True, bound=f"{r.floor_bound}: floor {r.floor_ms:.4f} ms",
                             unjudged="measured under its floor: the peaks understate this device" if r.floor_beaten
                             else None))
        smallest = min(network.configured(), key=lambda r: r.macs_per_pixel)
        if batch == SPEEDUP_BATCH and smallest.theoretical_speedup > 1:
            rows.append(dict(target=f"network batch {batch}: {smallest.label}'s real speedup over the largest, as a "
                                    f"share of its MAC ratio {smallest.theoretical_speedup:.1f}",
                             need=SPEEDUP_SHARE_TARGET, got=smallest.speedup_efficiency, unit=" of the MAC ratio",
                             bound=f"{smallest.floor_bound}: the smallest config runs at {smallest.floor_fraction:.2f} "
                                   f"of its floor's speed"))
        for gate in (g for g in gates if g["batch"] == batch):
            def routing_row(what: str, routed_ms: float, bound: str) -> dict:
                added = (routed_ms - gate["smallest_ms"]) / gate["smallest_ms"]
                return dict(target=f"network batch {batch}{what}: gate and routing add at most {GATE_TARGET:.0%} to "
                                   f"{gate['smallest']}'s latency", need=GATE_TARGET, got=added,
                            unit=f" of {gate['smallest_ms']:.4f} ms", lower_is_better=True, bound=bound,
                            # more work in clearly less time: the two timings' noise, not the routing's cost
                            unjudged="the routed forward timed faster than the route alone" if added < -GATE_TARGET
                            else None)

            rows.append(routing_row("", gate["routed_smallest_ms"],
                                    f"the gate head alone {gate['fused_ms']:.4f} ms, {gate['floor_bound']} floor "
                                    f"{gate['floor_ms']:.4f} ms; the rest is the full-width stem and the routing"))
            if gate.get("routed_smallest_narrow_tiles_ms") is not None:
                rows.append(routing_row(", per-image tiles for the narrowest route",
                                        gate["routed_smallest_narrow_tiles_ms"],
                                        f"routed to {gate['largest']}: {gate['routed_largest_narrow_tiles_ms']:.4f} ms, "
                                        f"{gate['routed_largest_ms']:.4f} with the widest route's tiles, "
                                        f"{gate['largest_ms']:.4f} alone"))
            if gate.get("routed_smallest_branches_ms") is not None:
                rows.append(routing_row(", a conditional graph node per route", gate["routed_smallest_branches_ms"],
                                        f"routed to {gate['largest']}: {gate['routed_largest_branches_ms']:.4f} ms, "
                                        f"{gate['largest_ms']:.4f} alone"))
            if gate["backend"] == "triton" and batch == 1 and gate.get("fused_in_graph_ms"):
                rows.append(dict(target=f"gate head at batch 1, per call in a graph of {GATE_CALLS_PER_GRAPH}: fused "
                                        f"at least {GATE_SPEEDUP_TARGET:g}x faster than eager", need=GATE_SPEEDUP_TARGET,
                                 got=gate["eager_in_graph_ms"] / gate["fused_in_graph_ms"], unit="x faster",
                                 bound=f"fused {gate['fused_in_graph_ms'] * 1000:.1f} us, eager "
                                       f"{gate['eager_in_graph_ms'] * 1000:.1f} us a call"))
            if gate["backend"] == "triton" and batch == 1:
                rows.append(dict(target=f"gate head at batch 1: fused at least {GATE_SPEEDUP_TARGET:g}x faster than "
                                        f"eager", need=GATE_SPEEDUP_TARGET, got=gate["eager_ms"] / gate["fused_ms"],
                                 unit="x faster",
                                 bound=f"{gate['floor_bound']}: floor {gate['floor_ms']:.4f} ms, fused "
                                       f"{gate['fused_ms'] / gate['floor_ms']:.1f}x it"))
    for row in rows:
        if row.get("unjudged"):
            row["met"] = None
        else:
            row.pop("unjudged", None)
            row["met"] = row["got"] <= row["need"] if row.get("lower_is_better") else row["got"] >= row["need"]
    return rows


def targets_markdown(rows: list[dict]) -> str:
    lines = ["| target | needed | measured | met | bound |", "| --- | ---: | ---: | --- | --- |"]
    for r in rows:
        if r["met"] is None:
            verdict = f"no verdict: {r['unjudged']}"
        elif r["met"]:
            verdict = "yes"
        elif r.get("lower_is_better"):  # a near miss is no "1.0x the target"
            over = r["got"] / r["need"]
            verdict = f"no: {over:.1f}x the target" if over >= 1.1 else f"no: {over - 1:.1%} above it"
        else:
            short = 1 - r["got"] / r["need"]
            verdict = f"no: {short:.0%} short" if short >= 0.1 else f"no: {short:.1%} short"
        relation = "at most" if r.get("lower_is_better") else "at least"
        lines.append(f"| {r['target']} | {relation} {r['need']:g}{r['unit']} | {r['got']:.3g} | {verdict} | {r['bound']} |")
    return "\n".join(lines)


def plot_network(reports: list[Report], path: Path) -> Path | None:
    """Two panels, one series per batch: real against theoretical speedup; latency against
    MACs/pixel with the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed: {path} is not drawn (pip install 'dds-fast[bench]')",
                      stacklevel=2)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    top = 1.0
    for report in reports:
        batch = f"batch {report.input_shape[0]}"
        theory = [r.theoretical_speedup for r in report.results]
        real = [r.real_speedup for r in report.results]
        left.plot(theory, real, "o", label=batch)
        top = max([top] + theory + real)
        for r in report.results:
            left.annotate(r.label, (r.theoretical_speedup, r.real_speedup), fontsize=7)
        ordered = sorted(report.results, key=lambda r: r.macs_per_pixel)
        macs = [r.macs_per_pixel for r in ordered]
        line, = right.plot(macs, [r.timing.median_ms for r in ordered], "o-", label=f"{batch}: measured (median)")
        right.plot(macs, [r.floor_ms for r in ordered], "s--", color=line.get_color(), label=f"{batch}: roofline floor")
    left.plot([1, top * 1.05], [1, top * 1.05], "--", color="gray", label="real = theoretical")
    left.set(xlabel="theoretical speedup (MAC ratio)", ylabel="real speedup", title="speedup over the largest config")
    left.legend()
    first = reports[0]
    right.set(xlabel="MACs/pixel", ylabel="latency (ms)",
              title=f"{first.device}, {first.dtype}, {list(first.input_shape[1:])}")
    right.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def gate_markdown(gates: list[dict]) -> str:
    def narrow(g: dict) -> str:
        if g.get("routed_smallest_narrow_tiles_ms") is None:
            return ""
        return (f"; with the per-image tiles sized for each layer's narrowest route, "
                f"{g['routed_smallest_narrow_tiles_ms']:.4f} ms routed to {g['smallest']} and "
                f"{g['routed_largest_narrow_tiles_ms']:.4f} ms routed to {g['largest']} (widest route's tiles "
                f"{g['routed_largest_ms']:.4f} ms, {g['largest_ms']:.4f} ms alone)")

    def branches(g: dict) -> str:
        if g.get("routed_branches_error"):
            return f"; through a conditional graph node per route: failed ({g['routed_branches_error']})"
        if g.get("routed_smallest_branches_ms") is None:
            return ""
        return (f"; through a conditional graph node per route, {g['routed_smallest_branches_ms']:.4f} ms routed to "
                f"{g['smallest']} and {g['routed_largest_branches_ms']:.4f} ms routed to {g['largest']}")

    def in_graph(g: dict) -> str:
        if g.get("fused_in_graph_ms") is None:
            return ""
        return (f" (per call in a graph of {GATE_CALLS_PER_GRAPH} calls: {g['fused_in_graph_ms']:.4f} ms fused, "
                f"{g['eager_in_graph_ms']:.4f} ms eager)")

    return "\n\n".join(
        f"Gate at batch {g['batch']} ({g['channels']} channels, {g['num_choices']} choices, attention "
        f"{'on' if g['attention'] else 'off'}): the head {g['fused_ms']:.4f} ms on {g['backend']}"
        f"{' (reading the stem epilogue' + chr(39) + 's channel sums)' if g['reads_stem_sums'] else ''}, "
        f"{g['eager_ms']:.4f} ms eager{in_graph(g)}; the dynamic forward routed to {g['smallest']} "
        f"{g['routed_smallest_ms']:.4f} ms against {g['smallest_ms']:.4f} ms for it alone{narrow(g)}{branches(g)}"
        for g in gates)


def run_bench(out_dir, quick: bool = True, dtype: str | None = None, sizes=None, batches=None, channels: int = 64,
              model=None, device: str | None = None, warmup: int | None = None, repeats: int | None = None,
              cuda_graph: bool = False, compile_static: bool = True, model_name: str | None = None) -> dict:
    """Run the layer and network benchmarks; write ``bench.json``, ``bench.md`` and, when a
    network row was timed and matplotlib is there, ``network.png``. The network is timed at
    ``sizes[0]`` and each of ``batches``. Returns what ``bench.json`` holds, with ``written``:
    the files written. A run stopped by any exception, an interrupt included, writes what it
    measured before, with what stopped it, then raises it. ``dtype``: float16 on a GPU unless
    given; a CPU run times float32 whatever is given. ``model_name`` says which model the
    results are of (a checkpoint's path; default: the model's class and arguments)."""
    device = timing_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "bench")
    if model is not None and not (isinstance(model, nn.Module) and type(getattr(model, "in_channels", None)) is int):
        raise ValueError(f"bench: the model must be an nn.Module with an int in_channels (its input's channels), "
                         f"got {type(model).__name__}")
    requested = dtype
    dtype = dtype or ("float16" if device.type == "cuda" else "float32")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"bench: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"bench: --cuda-graph needs a CUDA device, got {device}")
    if device.type == "cpu" and torch_dtype != torch.float32:
        torch_dtype, dtype = torch.float32, "float32"  # half-precision convs are not what a CPU runs
    if device.type == "cuda":
        sizes = sizes or ([256] if quick else [256, 512])
        batches = batches or ([1] if quick else [1, 8, 16])  # 8: SPEEDUP_BATCH, the speedup-share target's
        warmup = 10 if warmup is None else warmup
        repeats = (50 if quick else 200) if repeats is None else repeats
    else:  # a CPU run shows the pipeline, not GPU speed: keep it short
        sizes, batches = sizes or [64], batches or [1]
        warmup = 2 if warmup is None else warmup
        repeats = 5 if repeats is None else repeats
    for name, values in (("sizes", sizes), ("batches", batches), ("channels", [channels])):
        if min(values) < 1:  # else torch fails deep inside, on a negative dimension
            raise ValueError(f"bench: {name} must be positive, got {values}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"bench: the output folder {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "network.png").unlink(missing_ok=True)  # an earlier run's plot must not pass for this one's

    if model is None:
        model = SlimUNet(in_channels=3, base_width=32, depth=4)
        model_name = model_name or f"an untrained {type(model).__name__}({model.arch_args})"
    model_name = model_name or f"{type(model).__name__}({getattr(model, 'arch_args', '')})"
    layers, networks, gates, peaks, failure = [], [], [], None, None
    try:
        # measured once per run, first: the layer targets' floors need them without a network row
        peaks = LatencyRunner(model, (batches[0], model.in_channels, sizes[0], sizes[0]), torch_dtype, device,
                              warmup, repeats).measure_peaks()
        layers.extend(bench_layers(channels, sizes, batches, device, torch_dtype, warmup, repeats, compile_static))
        for batch in batches:
            runner = LatencyRunner(model, (batch, model.in_channels, sizes[0], sizes[0]), torch_dtype, device,
                                   warmup, repeats, cuda_graph=cuda_graph)
            networks.append(runner.run(peaks=peaks))
            gate = time_gate(runner, networks[-1])
            if gate is not None:
                gates.append(gate)
    except BaseException as error:  # an interrupt too (gpu_session.sh stops a run with SIGINT): written, then raised
        failure = error
    targets = target_rows(layers, networks, torch.finfo(torch_dtype).bits // 8, peaks, gates) if peaks else []
    name, env = describe_device(device)
    result = {"device": name, "environment": env, "model": model_name, "dtype": dtype, "requested_dtype": requested,
              "layers": layers,
              "network": [network.to_dict() for network in networks], "gate": gates, "targets": targets}
    stopped = ""
    if failure is not None:
        result["error"] = error_summary(failure)
        stopped = f"**Stopped early** ({result['error']}): the rows below are what was measured before.\n\n"
    written = [atomic_write(out_dir / "bench.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))]
    tables = "\n\n".join(network.to_markdown() for network in networks)
    timed_in = dtype if requested in (None, dtype) else f"{dtype} ({requested} asked for: a CPU run times float32)"
    targets_note = "" if device.type == "cuda" else (
        "The targets are the benchmark issue's, for an H100 in float16: this run's verdicts are the CPU's, and say "
        "nothing of them.\n\n")
    markdown = (f"# dds-fast bench\n\nDevice: {name}; {env}\n\nModel: {model_name}\n\nDtype: {timed_in}\n\n{stopped}"
                f"## One conv layer, "
                f"{channels} channels max, 3x3, LeakyReLU, channels_last\n\n{layer_markdown(layers)}\n\n## Whole network\n\n"
                f"{tables}\n\n{gate_markdown(gates)}\n\n## Targets\n\n{targets_note}{targets_markdown(targets)}\n")
    written.append(atomic_write(out_dir / "bench.md", lambda tmp: tmp.write_text(markdown)))
    if networks:
        written.append(plot_network(networks, out_dir / "network.png"))
    if failure is not None:
        raise failure
    return dict(result, written=[str(path) for path in written if path is not None])
