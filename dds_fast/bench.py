"""``dds-fast bench``: per-layer and whole-network latency, written as JSON, a markdown
table and PNG plots (real against theoretical speedup; latency against MACs with the
roofline floor).

Per layer, at each width ratio, it times the same narrow convolution four ways, channels_last:
the Triton SlimConv2d with its fused epilogue (CUDA only), (a) the sliced-copy PyTorch path
(``weight[:o, :i]``, the stock convolution, bias, activation), (b) the stock convolution on a
contiguous static weight of the narrow shape with bias and activation (the best slicing
cannot reach) and (c) ``torch.compile`` of (b).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from .export import StaticConv2d
from .nets import SlimUNet
from .runner import DevicePeaks, LatencyRunner, Report, describe_device
from .slim_conv import SlimConv2d

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# The benchmark issue's targets: how many times faster than each baseline the fused layer
# must be, how close to its roofline floor each config must run, and what share of the
# MAC ratio the smallest config's real speedup must reach.
LAYER_TARGETS = {"(b) static": 1.0, "(a) sliced copy": 1.5}
FLOOR_TARGET = 1.5
SPEEDUP_SHARE_TARGET = 0.8


def layer_variants(channels: int, ratio: float, device, dtype, backends: list[str], compile_static: bool = True):
    """The layer's variants at one width ratio, each a callable taking the narrow input."""
    torch.manual_seed(0)
    width = max(1, math.ceil(ratio * channels))
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


def bench_layers(channels: int, sizes, batches, device, dtype, warmup: int, repeats: int,
                 compile_static: bool = True) -> list[dict]:
    backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    rows = []
    for size in sizes:
        for batch in batches:
            for ratio in WIDTHS:
                width, variants = layer_variants(channels, ratio, device, dtype, backends, compile_static)
                x = torch.rand(batch, width, size, size, device=device, dtype=dtype).to(
                    memory_format=torch.channels_last)
                runner = LatencyRunner(variants["(b) static"], x.shape, dtype, device, warmup, repeats)
                for name, layer in variants.items():
                    try:
                        timing = runner.time_fn(lambda: layer(x))
                    except Exception as error:  # torch.compile can be unavailable (no compiler): report it
                        rows.append(dict(size=size, batch=batch, ratio=ratio, width=width, variant=name,
                                         error=f"{type(error).__name__}: {error}"[:300]))
                        continue
                    rows.append(dict(size=size, batch=batch, ratio=ratio, width=width, variant=name,
                                     macs=width * width * 9 * size * size * batch, **asdict(timing)))
    return rows


def layer_markdown(rows: list[dict]) -> str:
    lines = ["| size | batch | ratio | width | variant | median ms | vs (b) static |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    static = {(r["size"], r["batch"], r["ratio"]): r["median_ms"] for r in rows if r["variant"] == "(b) static" and "median_ms" in r}
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['size']} | {r['batch']} | {r['ratio']} | {r['width']} | {r['variant']} | failed: {r['error']} | |")
            continue
        ratio = static[(r["size"], r["batch"], r["ratio"])] / r["median_ms"]
        lines.append(f"| {r['size']} | {r['batch']} | {r['ratio']} | {r['width']} | {r['variant']} | "
                     f"{r['median_ms']:.4f} | {ratio:.2f}x |")
    return "\n".join(lines)


def layer_floor_ms(row: dict, element_bytes: int, peaks: DevicePeaks) -> tuple[float, str]:
    """The layer's roofline floor: one read of the narrow input, one write of the output and
    the active weights and bias, against its FLOPs (2 per MAC)."""
    pixels = row["batch"] * row["size"] ** 2
    moved = (2 * pixels * row["width"] + row["width"] ** 2 * 9 + row["width"]) * element_bytes
    return peaks.floor_ms(moved, 2 * row["macs"])


def target_rows(layers: list[dict], network: Report, element_bytes: int) -> list[dict]:
    """Each target of the benchmark issue that this run measured: what it needs, what was
    measured, whether it is met, and the floor that bounds it (bytes or FLOPs)."""
    rows = []
    timed = {(r["size"], r["batch"], r["ratio"], r["variant"]): r for r in layers if "median_ms" in r}
    for (size, batch, ratio, variant), ours in timed.items():
        if variant != "triton fused":
            continue
        floor, bound = layer_floor_ms(ours, element_bytes, network.peaks)
        for baseline, need in LAYER_TARGETS.items():
            other = timed.get((size, batch, ratio, baseline))
            if other is not None:
                rows.append(dict(target=f"layer {size}x{size}, batch {batch}, width {ours['width']}: fused vs {baseline}",
                                 need=need, got=other["median_ms"] / ours["median_ms"], unit="x faster",
                                 bound=f"{bound}: floor {floor:.4f} ms, measured {ours['median_ms'] / floor:.1f}x it"))
    batch = network.input_shape[0]
    for r in network.results:
        rows.append(dict(target=f"network batch {batch}, {r.label}: within {FLOOR_TARGET}x of its floor",
                         need=FLOOR_TARGET, got=r.timing.median_ms / r.floor_ms, unit="x the floor", lower_is_better=True,
                         bound=f"{r.floor_bound}: floor {r.floor_ms:.4f} ms"))
    smallest = min(network.results, key=lambda r: r.macs_per_pixel)
    if smallest.theoretical_speedup > 1:
        rows.append(dict(target=f"network batch {batch}: {smallest.label}'s real speedup over the largest, as a share of "
                                f"its MAC ratio {smallest.theoretical_speedup:.1f}",
                         need=SPEEDUP_SHARE_TARGET, got=smallest.speedup_efficiency, unit=" of the MAC ratio",
                         bound=f"{smallest.floor_bound}: the smallest config runs at {smallest.floor_fraction:.2f} of "
                               f"its floor's speed"))
    for row in rows:
        row["met"] = row["got"] <= row["need"] if row.get("lower_is_better") else row["got"] >= row["need"]
    return rows


def targets_markdown(rows: list[dict]) -> str:
    lines = ["| target | needed | measured | met | bound |", "| --- | ---: | ---: | --- | --- |"]
    for r in rows:
        if r["met"]:
            verdict = "yes"
        elif r.get("lower_is_better"):
            verdict = f"no: {r['got'] / r['need']:.1f}x over"
        else:
            verdict = f"no: {1 - r['got'] / r['need']:.0%} short"
        relation = "at most" if r.get("lower_is_better") else "at least"
        lines.append(f"| {r['target']} | {relation} {r['need']:g}{r['unit']} | {r['got']:.2f} | {verdict} | {r['bound']} |")
    return "\n".join(lines)


def plot_network(report: Report, path: Path) -> Path | None:
    """Two panels: real against theoretical speedup; latency against MACs/pixel with the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    theory = [r.theoretical_speedup for r in report.results]
    real = [r.real_speedup for r in report.results]
    left.plot(theory, real, "o")
    top = max(theory + real) * 1.05
    left.plot([1, top], [1, top], "--", color="gray", label="real = theoretical")
    for r in report.results:
        left.annotate(r.label, (r.theoretical_speedup, r.real_speedup), fontsize=7)
    left.set(xlabel="theoretical speedup (MAC ratio)", ylabel="real speedup", title="speedup over the largest config")
    left.legend()
    ordered = sorted(report.results, key=lambda r: r.macs_per_pixel)
    macs = [r.macs_per_pixel for r in ordered]
    right.plot(macs, [r.timing.median_ms for r in ordered], "o-", label="measured (median)")
    right.plot(macs, [r.floor_ms for r in ordered], "s--", label="roofline floor")
    right.set(xlabel="MACs/pixel", ylabel="latency (ms)", title=f"{report.device}, {report.dtype}, {list(report.input_shape)}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_bench(out_dir, quick: bool = True, dtype: str = "float16", sizes=None, batches=None, channels: int = 64,
              model=None, device: str | None = None, warmup: int | None = None, repeats: int | None = None,
              cuda_graph: bool = False, compile_static: bool = True) -> dict:
    """Run the layer and network benchmarks; write ``bench.json``, ``bench.md`` and ``network.png``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"bench: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if device.type == "cpu" and torch_dtype != torch.float32:
        torch_dtype, dtype = torch.float32, "float32"  # half-precision convs are not what a CPU runs
    on_gpu = device.type == "cuda"
    if on_gpu:
        sizes = sizes or ([256] if quick else [256, 512])
        batches = batches or ([1] if quick else [1, 16])
        warmup = 10 if warmup is None else warmup
        repeats = (50 if quick else 200) if repeats is None else repeats
    else:  # a CPU run shows the pipeline, not GPU speed: keep it short
        sizes, batches = sizes or [64], batches or [1]
        warmup = 2 if warmup is None else warmup
        repeats = 5 if repeats is None else repeats
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    layers = bench_layers(channels, sizes, batches, device, torch_dtype, warmup, repeats, compile_static)
    model = model if model is not None else SlimUNet(in_channels=3, base_width=32, depth=4)
    runner = LatencyRunner(model, (batches[0], model.in_channels, sizes[0], sizes[0]), torch_dtype, device, warmup,
                           repeats, cuda_graph=cuda_graph and on_gpu)
    network = runner.run()
    targets = target_rows(layers, network, torch.finfo(torch_dtype).bits // 8)
    name, env = describe_device(device)
    result = {"device": name, "environment": env, "dtype": dtype, "layers": layers, "network": network.to_dict(),
              "targets": targets}
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    markdown = (f"# dds-fast bench\n\nDevice: {name}; {env}\n\n## One conv layer, {channels} channels max, "
                f"3x3, LeakyReLU, channels_last\n\n{layer_markdown(layers)}\n\n## Whole network\n\n"
                f"{network.to_markdown()}\n\n## Targets\n\n{targets_markdown(targets)}\n")
    (out_dir / "bench.md").write_text(markdown)
    plot_network(network, out_dir / "network.png")
    return result
