"""Latency runner: real against theoretical speedup of width configs, with a roofline floor.

For each config it times the forward pass properly (warm-up, then many repeats, median with
p20 and p80; CUDA events on a GPU, optionally CUDA-graph replay; the wall clock on a CPU,
labelled as such) and reports MACs/pixel, the theoretical speedup over the largest config
(the MAC ratio), the real speedup, their ratio, and the roofline floor: the larger of
FLOPs over the device's peak rate and the fewest bytes over its bandwidth, both measured
once per run on the same device. A network's FLOPs and bytes are the sums over its convs
(each reads its inputs, active weights, bias and residual once and writes its output once),
set against the peaks as one: a lower floor than the sum of each layer's own, which
``benchmarks/network_layers.py`` reports (up to 29% higher where bytes-bound and FLOP-bound
layers mix). A bare SlimConv2d is timed at width ratios of its output and
input; a DDSNet in dynamic mode at the routes its gate picks.
"""
from __future__ import annotations

import json
import math
import numbers
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from ._version import __version__
from .config import SubnetConfig, checked_int, width_at
from .cost import ConvCall, trace_convs
from .ddsnet import DDSNet
from .gate import DynamicGate
from .slim_conv import SlimConv2d, _kernels_module

WIDTHS = (0.25, 0.5, 0.75, 1.0)  # the width ratios a bare layer is timed at


@dataclass
class Timing:
    """A timing's median, its 20th and 80th percentiles (nearest rank) and its fastest sample,
    over ``repeats`` samples."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    fastest_ms: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        ordered = sorted(samples_ms)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
        return cls(statistics.median(ordered), pick(0.2), pick(0.8), len(ordered), ordered[0])


@dataclass
class DevicePeaks:
    """Measured ceilings: matrix-product rate in the run's dtype and copy bandwidth."""

    flops_per_s: float
    bytes_per_s: float

    def __post_init__(self):
        for name in ("flops_per_s", "bytes_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
                raise ValueError(f"DevicePeaks: {name} must be a positive finite rate, got {value!r}")

    def floor_ms(self, nbytes: float, flops: float) -> tuple[float, str]:
        """The roofline floor of moving ``nbytes`` and computing ``flops``: (ms, the bound)."""
        bytes_ms, flops_ms = nbytes / self.bytes_per_s * 1e3, flops / self.flops_per_s * 1e3
        return max(bytes_ms, flops_ms), ("FLOPs" if flops_ms >= bytes_ms else "bytes")


@dataclass
class ConfigResult:
    label: str
    config: dict | None
    macs_per_pixel: float
    timing: Timing
    theoretical_speedup: float = 1.0
    real_speedup: float = 1.0
    floor_ms: float = 0.0
    floor_bound: str = ""

    @property
    def speedup_efficiency(self) -> float:
        """Real over theoretical speedup: 1.0 means the MAC savings all became speed."""
        return self.real_speedup / self.theoretical_speedup

    @property
    def floor_fraction(self) -> float:
        """Roofline floor over measured time: 1.0 would be at the floor."""
        return self.floor_ms / self.timing.median_ms

    @property
    def floor_beaten(self) -> bool:
        """Whether the measured time is under its floor: then the measured peaks understate the
        device (a busy CPU when they were measured, or convs that beat the matrix product, as a
        CPU's Winograd 3x3 convs do), and the floor bounds nothing."""
        return self.floor_fraction > 1


@dataclass
class Report:
    device: str
    environment: dict
    dtype: str
    input_shape: tuple[int, ...]
    backend: str
    peaks: DevicePeaks
    results: list[ConfigResult] = field(default_factory=list)
    cuda_graph: bool = False
    channels_last: bool = True
    warmup: int = 0
    timer: str = ""  # "CUDA events" or "wall clock"
    reference: str = ""  # the row the speedups are over: the costliest configured one

    def configured(self) -> list[ConfigResult]:
        """The rows timed at a given config (not a DDSNet's dynamic mode or a model as it is),
        or every row when none was: the speedups' reference and the smallest come from these."""
        return [r for r in self.results if r.config is not None] or self.results

    def to_dict(self) -> dict:
        out = asdict(self)
        for record, result in zip(out["results"], self.results):
            record["speedup_efficiency"] = result.speedup_efficiency
            record["floor_fraction"] = result.floor_fraction
            record["floor_beaten"] = result.floor_beaten
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        graphs = "; CUDA-graph replay" if self.cuda_graph else ""
        layout = "channels_last" if self.channels_last else "contiguous (NCHW)"
        timed = f"; {self.timer}, {self.warmup} warm-up calls, then the median of each row's repeats" if self.timer \
            else ""
        over = f"; speedups over {self.reference!r}" if self.reference else ""
        lines = [f"Device: {self.device}; dtype {self.dtype}; input {list(self.input_shape)} {layout}; backend "
                 f"{self.backend}{graphs}{timed}{over}",
                 "",
                 "| config | MACs/pixel | median ms (p20-p80) | theoretical speedup | real speedup | real/theoretical "
                 "| roofline floor ms | floor/measured |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.results:
            t = r.timing
            beaten = " (under the floor: the peaks understate this device)" if r.floor_beaten else ""
            lines.append(f"| {_cell(r.label)} | {r.macs_per_pixel:,.0f} | {_ms(t.median_ms)} ({_ms(t.p20_ms)}-"
                         f"{_ms(t.p80_ms)}) | {r.theoretical_speedup:.2f} | {r.real_speedup:.2f} | "
                         f"{r.speedup_efficiency:.2f} | {_ms(r.floor_ms)} ({r.floor_bound}) | "
                         f"{r.floor_fraction:.2f}{beaten} |")
        return "\n".join(lines)


def _ms(value: float) -> str:
    """Milliseconds to three places, or to three significant digits below a thousandth (a floor
    of a few microseconds is not 0.000)."""
    if value >= 0.001 or value <= 0 or not math.isfinite(value):
        return f"{value:.3f}"
    return f"{value:.{2 - math.floor(math.log10(value))}f}"


def _cell(text: str) -> str:
    """``text`` inside a markdown table cell: a bar would end the cell."""
    return text.replace("|", "\\|")


def wall_clock(fn: Callable[[], object], warmup: int, repeats: int) -> Timing:
    """Host-clock timing of ``fn`` (CPU work, or anything that synchronises itself)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing.from_samples(samples)


def timing_device(device, who: str) -> torch.device:
    """``device`` as a torch.device that ``who`` can time on: the CPU, or a CUDA device this
    torch sees."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{who}: device {device!r} is not a torch device: {error}") from None
    if device.type not in ("cpu", "cuda"):  # the wall clock would time another device's launches only
        raise ValueError(f"{who}: times on CUDA devices and the CPU, got device {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{who}: device {device} asked for, but this torch sees no CUDA device")
    return device


def describe_device(device: torch.device) -> tuple[str, dict]:
    env = {"torch": torch.__version__, "dds_fast": __version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    kernels = _kernels_module()
    if not isinstance(kernels, str):  # the kernel choices a run was made with
        env["kernel_options"] = {"tma_forward": kernels.TMA_FORWARD,
                                 "taps_in_k_channels": list(kernels.TAPS_IN_K_CHANNELS),
                                 "per_image_narrow_grid": kernels.PER_IMAGE_NARROW_GRID}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        # in float32 a cuDNN baseline with TF32 on computes in 10-bit mantissas, the kernels in fp32
        env["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        env["driver"] = _cuda_driver()
        return name, env
    if kernels is not None and not isinstance(kernels, str) and kernels.INTERPRET:
        env["triton_interpreter"] = True  # Triton kernels on the CPU run interpreted: no speed to read in them
    return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads)", env


def _cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda_driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def capture_cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """Warm ``fn`` up on a side stream, capture one call in a CUDA graph and return its replay.
    The replay reads and writes the tensors ``fn`` used at capture, and holds ``fn`` (so the
    tensors its closure holds): freed, their memory would be reused under the graph."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay() -> None:
        graph.replay()
    replay.captured = fn
    return replay


class LatencyRunner:
    """Times a model's forward at each width config on one input shape.

    ``model`` is a SlimConv2d, a slimmable network (anything with ``set_config``) or any
    module; ``configs`` are ``(label, config)`` pairs: a SubnetConfig for a network, a width
    ratio in (0, 1] for a SlimConv2d (of its output and of each input block, the input sliced
    to that prefix), ``None`` to time the model as it is (a DDSNet: its dynamic mode). On
    CUDA, timing uses CUDA events and, with ``cuda_graph=True``, replays one captured graph
    per config; on CPU it uses the wall clock. The model is moved to the runner's device and
    dtype (and with ``channels_last``, the default, to that layout: the caller's model, in
    place) and put in eval mode. ``warmup`` calls precede ``repeats`` timed ones. The reported
    ``backend`` is what its layers run on that device ('auto' resolved); ``backend=``, if
    given, must say the same (it changes no layer's backend). ``inputs``: the tensor to time
    on, of ``input_shape`` (default: uniform random values, which a DDSNet's gate routes as it
    would such an image; pass real images to time the routes it picks for them).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None, warmup: int = 10, repeats: int = 100,
                 channels_last: bool = True, cuda_graph: bool = False, backend: str | None = None,
                 inputs: torch.Tensor | None = None):
        try:
            shape = tuple(checked_int(s, "input_shape", "LatencyRunner") for s in input_shape)
        except (TypeError, ValueError):  # not a sequence, or a size that is no positive int (8.9 was cut to 8)
            shape = ()
        if len(shape) != 4:
            raise ValueError(f"LatencyRunner: input_shape must be [N, C, H, W] of positive ints, got {input_shape!r}")
        warmup = checked_int(warmup, "warmup", "LatencyRunner", low=0)
        repeats = checked_int(repeats, "repeats", "LatencyRunner")
        if not isinstance(model, nn.Module):
            raise ValueError(f"LatencyRunner: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"LatencyRunner: dtype must be a floating-point torch.dtype, got {dtype!r}")
        parameter = next(model.parameters(), None)
        if device is None and parameter is None:
            raise ValueError(f"LatencyRunner: {type(model).__name__} has no parameters to take the device from; "
                             f"pass device=")
        self.device = timing_device(parameter.device if device is None else device, "LatencyRunner")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("LatencyRunner: cuda_graph=True needs a CUDA device")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, dtype, memory_format=self.memory_format).eval()
        self.input_shape = shape
        self.dtype, self.warmup, self.repeats, self.cuda_graph = dtype, warmup, repeats, cuda_graph
        self.backend = backend_of(model, self.device)
        if backend is not None and _resolved(backend, self.device) != self.backend:
            raise ValueError(f"LatencyRunner: backend={backend!r} runs {_resolved(backend, self.device)!r} on "
                             f"{self.device}, but the model's layers run {self.backend!r}: set the layers' backend "
                             f"(SlimConv2d.backend, DynamicGate.backend); the report names what they run")
        if inputs is None:
            inputs = torch.rand(self.input_shape, device=self.device, dtype=dtype)
        elif not isinstance(inputs, torch.Tensor) or tuple(inputs.shape) != shape:
            raise ValueError(f"LatencyRunner: inputs must be a tensor of input_shape {list(shape)}, got "
                             f"{list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
        self.inputs = inputs.to(self.device, dtype).contiguous(memory_format=self.memory_format)

    # -- timing -------------------------------------------------------------------------
    def time_fn(self, fn: Callable[[], object], cuda_graph: bool = False) -> Timing:
        """Warm up, then time ``repeats`` calls of ``fn`` (replays of its CUDA graph if asked)."""
        with torch.no_grad():
            for _ in range(self.warmup):
                fn()
            if self.device.type != "cuda":
                return wall_clock(fn, 0, self.repeats)
            if cuda_graph:
                fn = self._graphed(fn)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(self.repeats)]
            torch.cuda.synchronize(self.device)
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            return Timing.from_samples([start.elapsed_time(end) for start, end in events])

    def _graphed(self, fn):
        return capture_cuda_graph(fn, self.device)

    # -- costs --------------------------------------------------------------------------
    def _cost(self, target: nn.Module, inputs) -> tuple[list[tuple[list[ConvCall], int]], float]:
        """The convs one forward of ``target`` on ``inputs`` runs, in groups of (calls, images),
        and its MACs per input pixel."""
        n, _, h, w = self.input_shape
        # in budget mode a DDSNet runs one config for every image, which a trace counts right
        if isinstance(target, DDSNet) and target.budget_index is None:
            return self._routed_cost(target)
        if isinstance(target, SlimConv2d):  # its shapes are known, and a list input cannot be traced
            if min(target.output_size(h, w)) <= 0:
                raise ValueError(f"LatencyRunner: a {h}x{w} input gives {target._label()} no output pixels "
                                 f"(kernel {target.kernel_size}, stride {target.stride}, padding {target.padding})")
            widths = tuple(t.shape[1] for t in inputs) if isinstance(inputs, list) else (inputs.shape[1],)
            calls = [ConvCall("", target, widths, target.active_out_channels or target.out_channels,
                              target.output_size(h, w), (h, w))]
        else:
            calls, _ = trace_convs(target, None, (inputs.shape[1], h, w))
        return [(calls, n)], sum(call.macs for call in calls) / (h * w)

    def _routed_cost(self, model: DDSNet) -> tuple[list[tuple[list[ConvCall], int]], float]:
        """A DDSNet in dynamic mode runs each image's route behind the full-width stem its gate
        reads. Traced as it is, its per-image path (CUDA) runs every conv on full-width
        buffers and would count the largest config: so each route the gate picks for the
        runner's inputs is traced over its images, and the MACs are the mean routed cost at
        the runner's size (the routes' stored MACs are at the size they were traced at,
        whose padding may differ)."""
        n, c, h, w = self.input_shape
        chosen = Counter(model.routing_space.index(entry) for entry in model.route(self.inputs))
        stem = model.supernet.stem_conv
        groups = []
        for index, images in sorted(chosen.items()):
            calls, _ = trace_convs(model.supernet, model.routing_space[index].config, (c, h, w))
            groups.append(([replace(call, out_width=stem.out_channels) if call.module is stem else call
                            for call in calls], images))
        return groups, sum(images * sum(call.macs for call in calls) for calls, images in groups) / (n * h * w)

    def _traffic(self, groups: list[tuple[list[ConvCall], int]]) -> tuple[int, int]:
        """The fewest bytes and the FLOPs (2 per MAC) of the calls, each group over its images:
        each conv reads its input, active weights, bias and residual once and writes its output
        once."""
        element = torch.empty((), dtype=self.dtype).element_size()
        moved = flops = 0
        for calls, n in groups:
            for call in calls:
                kh, kw = call.module.kernel_size
                out_pixels = call.out_size[0] * call.out_size[1]
                in_pixels = call.in_size[0] * call.in_size[1]
                # a grouped conv's filters each hold in/groups channels, as ConvCall.macs counts
                outputs = n * call.out_width * out_pixels
                moved += element * (n * sum(call.in_widths) * in_pixels + outputs * (1 + call.residual)
                                    + call.out_width * (sum(call.in_widths) // call.module.groups) * kh * kw
                                    + call.out_width * (call.module.bias is not None))
                flops += 2 * n * call.macs
        return moved, flops

    def measure_peaks(self) -> DevicePeaks:
        """A large matrix product in the run's dtype and a large device copy, timed like the
        model, each at its fastest repeat: a ceiling is the best rate seen, not a typical one
        (on a shared CPU the median fell under the rate the convs then reached). A CPU takes
        the faster of its product in the run's dtype and in float32: most CPUs do half
        precision through float32, and their half-precision product is far slower than their
        convs."""
        size = 8192 if self.device.type == "cuda" else 1024
        dtypes = [self.dtype] if self.device.type == "cuda" or self.dtype == torch.float32 else [self.dtype,
                                                                                                torch.float32]
        fastest_ms = []
        for dtype in dtypes:
            a = torch.randn(size, size, device=self.device, dtype=dtype)
            b = torch.randn(size, size, device=self.device, dtype=dtype)
            fastest_ms.append(self.time_fn(lambda: a @ b).fastest_ms)
        numel = (256 if self.device.type == "cuda" else 32) * 2 ** 20
        src = torch.rand(numel, device=self.device, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy = self.time_fn(lambda: dst.copy_(src))
        return DevicePeaks(flops_per_s=2 * size ** 3 / (min(fastest_ms) / 1e3),
                           bytes_per_s=2 * src.numel() * 4 / (copy.fastest_ms / 1e3))

    # -- the run ------------------------------------------------------------------------
    def _select(self, configurable: nn.Module, config) -> tuple[nn.Module, object, dict | None]:
        """Set ``config``; return what to time, its input and the config as recorded."""
        if config is None:
            if isinstance(self.model, SlimConv2d) and len(self.model.in_segments) > 1:  # one tensor per block
                return self.model, [self.inputs[:, start:start + size].contiguous(memory_format=self.memory_format)
                                    for start, size in zip(self.model.segment_starts, self.model.in_segments)], None
            return self.model, self.inputs, None
        if isinstance(configurable, SlimConv2d):
            return self._conv_at(configurable, config)
        if isinstance(config, numbers.Real) or not hasattr(configurable, "set_config"):
            raise ValueError(f"LatencyRunner: {type(configurable).__name__} takes SubnetConfigs (or None, to time it "
                             f"as it is), got {config!r}; width ratios apply to a bare SlimConv2d")
        configurable.set_config(config)
        return configurable, self.inputs, configurable.get_config().to_dict()

    def _conv_at(self, conv: SlimConv2d, ratio) -> tuple[nn.Module, object, dict]:
        """A bare SlimConv2d at ``ratio`` of its output and of each input block. Its input is
        the prefix of each block, copied out before timing as the narrow layer before it
        would have written it."""
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f"LatencyRunner: a SlimConv2d's configs are width ratios in (0, 1] (or None), "
                             f"got {ratio!r}")
        if self.input_shape[1] != conv.in_channels:
            raise ValueError(f"LatencyRunner: width ratios slice all {conv.in_channels} input channels of the "
                             f"SlimConv2d({conv.in_channels}->{conv.out_channels}); input_shape has "
                             f"{self.input_shape[1]}")
        in_widths = [width_at(ratio, size) for size in conv.in_segments]
        shuffled = conv.upscale_factor ** 2  # an upsampling conv keeps whole output channels of that many filters
        conv.active_out_channels = width_at(ratio, conv.out_channels // shuffled) * shuffled
        inputs = [self.inputs[:, start:start + width].contiguous(memory_format=self.memory_format)
                  for start, width in zip(conv.segment_starts, in_widths)]
        return (conv, inputs[0] if len(inputs) == 1 else inputs,
                dict(ratio=float(ratio), in_widths=in_widths, out_width=conv.active_out_channels))

    def run(self, configs: Sequence[tuple[str, SubnetConfig | float | None]] | None = None,
            peaks: DevicePeaks | None = None) -> Report:
        """Time each ``(label, config)`` (default: ``default_configs``) and return the Report,
        with ``peaks`` (measured once here when not given) for the roofline; the model's
        widths are restored after."""
        configs = default_configs(self.model) if configs is None else list(configs)  # (an iterator: read once)
        if not configs:
            raise ValueError("LatencyRunner.run: no configs to time")
        for item in configs:  # a bare config would unpack into a label and a config, or fail obscurely
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
                raise ValueError(f"LatencyRunner.run: configs must be (label, config) pairs, got {item!r}")
        if peaks is not None and not isinstance(peaks, DevicePeaks):
            raise ValueError(f"LatencyRunner.run: peaks must be DevicePeaks (or None, to measure them), got "
                             f"{type(peaks).__name__}")
        peaks = peaks or self.measure_peaks()
        name, env = describe_device(self.device)
        report = Report(name, env, str(self.dtype).replace("torch.", ""), self.input_shape, self.backend, peaks,
                        cuda_graph=self.cuda_graph, channels_last=self.memory_format == torch.channels_last,
                        warmup=self.warmup, timer="CUDA events" if self.device.type == "cuda" else "wall clock")
        # a DDSNet's configs are its super-network's; config None times the model as it is. (An
        # AttentionSupernet runs its configs itself, behind its full-width stem and attention.)
        configurable = self.model.supernet if isinstance(self.model, DDSNet) else self.model
        restore = _widths_restorer(configurable)
        try:
            for label, config in configs:
                if config is None:  # as it came, not at the config an earlier row set
                    restore()
                target, inputs, record = self._select(configurable, config)
                groups, macs = self._cost(target, inputs)
                if macs <= 0:
                    raise ValueError(f"LatencyRunner: {type(self.model).__name__} runs no convolution to count at "
                                     f"{label!r} (0 MACs/pixel): its speedup has no MAC ratio to compare with")
                floor, bound = peaks.floor_ms(*self._traffic(groups))
                timing = self.time_fn(lambda: target(inputs), self.cuda_graph)
                report.results.append(ConfigResult(label, record, macs, timing, floor_ms=floor, floor_bound=bound))
        finally:
            restore()
        # a DDSNet's dynamic row mixes configs: the speedups are over the largest config alone
        # (of rows as costly, the last: the default configs end with "largest", which a uniform one may tie)
        largest = max(reversed(report.configured()), key=lambda r: r.macs_per_pixel)
        report.reference = largest.label
        for result in report.results:
            result.theoretical_speedup = largest.macs_per_pixel / result.macs_per_pixel
            result.real_speedup = largest.timing.median_ms / result.timing.median_ms
        return report


def default_configs(model: nn.Module) -> list[tuple[str, SubnetConfig | float | None]]:
    """A DDSNet: its dynamic mode, then each routed config alone. A slimmable net: its routing
    space when it has one, else smallest, uniform 0.25/0.5/0.75, largest. A SlimConv2d: width
    ratios 0.25 to 1. A static export, or any other module: as it is."""
    if isinstance(model, DDSNet):
        mode = "dynamic" if model.budget_index is None else f"budget (route {model.budget_index})"
        return [(mode, None)] + [(f"route {i}", e.config) for i, e in enumerate(model.routing_space)]
    if isinstance(model, SlimConv2d):
        return [(f"width {ratio:g}", ratio) for ratio in WIDTHS]
    if not hasattr(model, "space") or getattr(model, "is_static", False):  # an export_static copy: widths fixed
        return [("as is", None)]
    routing = getattr(model, "routing_space", None)
    if routing:
        return [(f"route {i}", entry.config) for i, entry in enumerate(routing)]
    space = model.space
    return ([("smallest", space.smallest())] + [(f"uniform {r:g}", space.uniform(r)) for r in (0.25, 0.5, 0.75)]
            + [("largest", space.largest())])


def _widths_restorer(module: nn.Module) -> Callable[[], None]:
    """A call that puts the module's widths back as they are now."""
    if isinstance(module, SlimConv2d):
        previous = module.active_out_channels
        return lambda: setattr(module, "active_out_channels", previous)
    masked = getattr(module, "masked_widths", None)
    if masked is not None:  # (set_config would end the masks)
        return lambda: module.set_masked_widths(masked)
    if hasattr(module, "get_config") and not getattr(module, "is_static", False):  # static: set_config raises
        config = module.get_config()
        return lambda: module.set_config(config)
    return lambda: None


def _resolved(backend: str, device: torch.device) -> str:
    # 'auto' layers (convs and the gate) take the Triton kernels on CUDA tensors, else the
    # reference; 'triton' ones fall back to it where the kernels cannot run on the device
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"LatencyRunner: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    kernels = _kernels_module()
    if backend == "torch" or isinstance(kernels, str):  # (a string: why Triton cannot be imported)
        return "torch"
    if device.type == "cuda":
        return "triton"
    return "triton" if backend == "triton" and device.type == "cpu" and kernels.INTERPRET else "torch"


def backend_of(model: nn.Module, device: torch.device) -> str:
    """The backends ``model``'s layers run on ``device``, 'auto' resolved (settings the kernels
    do not cover fall back to the reference, with a warning under 'triton' and a debug log
    under 'auto', which this does not see)."""
    backends = {_resolved(m.backend, device) for m in model.modules() if isinstance(m, (SlimConv2d, DynamicGate))}
    return ",".join(sorted(backends)) or "torch"
