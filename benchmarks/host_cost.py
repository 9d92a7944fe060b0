"""Host time per call of the layer and gate wrappers: where a batch-1 launch's time goes.

    python benchmarks/host_cost.py [OUT.json]

Each call is timed in a tight loop of a tiny shape, so the GPU keeps up and the wall clock per
call is host work. "stubbed" swaps every Triton kernel for a no-op launch: what our Python
costs (checks, launch plan, allocation). On a GPU, "launched" runs the kernels too, and the
difference is what Triton's launcher and the driver add; "launched, JIT" launches through
Triton's JIT on every call (``kernels._launch.CACHE_LAUNCHES`` off), as before the launches
were cached. Without a GPU only the stubbed rows are measured (the interpreter's launches say
nothing about a GPU's). On a GPU it also writes OUT-step-profile.txt: torch.profiler's host-side
table of launched training steps (every op, launch and synchronisation by self CPU time), which
says where a step's host time goes beyond our Python.
"""
import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the wrappers accept CPU tensors only then

from _timing import kernel_table  # noqa: E402
from dds_fast import DynamicGate, SlimConv2d  # noqa: E402
from dds_fast.kernels import _launch  # noqa: E402
from dds_fast.kernels import _rows as rows_kernels  # noqa: E402
from dds_fast.kernels import conv2d as conv_kernels  # noqa: E402
from dds_fast.kernels import gate as gate_kernels  # noqa: E402

KERNELS = [(conv_kernels, name) for name in ("_conv_fwd_kernel", "_bwd_dz_kernel", "_bwd_input_kernel",
                                             "_bwd_weight_kernel", "_reduce_kernel")] + [
    (rows_kernels, "_sum_rows_kernel"), (gate_kernels, "_squeeze_kernel"), (gate_kernels, "_gate_kernel"),
    (gate_kernels, "_scale_kernel")]


class _NoLaunch:
    def __init__(self, kernel):
        self.arg_names = getattr(kernel, "arg_names", [])  # what a cached launch reads of its kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int = 2000, repeats: int = 5) -> float:
    """Best of ``repeats`` loops of ``calls`` calls, in microseconds per call."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        if CUDA:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - began) / calls * 1e6)
    return best


def cases(device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    conv = SlimConv2d(64, 64, 3, padding=1, backend="triton", activation="leaky_relu").to(
        device, dtype, memory_format=torch.channels_last)
    conv.active_out_channels = 16
    x = torch.randn(1, 16, 16, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gate = DynamicGate(48, 4, backend="triton").to(device).eval()
    features = torch.randn(1, 48, 16, 16, device=device, dtype=dtype)
    reference_gate = DynamicGate(48, 4, backend="torch").to(device, dtype).eval()

    def gate_without_attention():
        gate.attention = False
        gate(features)
        gate.attention = True

    def training_step_of(x):
        trained = torch.randn_like(x).requires_grad_()
        probe = torch.randn_like(x)

        def training_step():
            with torch.enable_grad():
                conv.zero_grad(set_to_none=True)
                trained.grad = None
                conv(trained).backward(probe)
        return training_step

    training_step = training_step_of(x)

    def training_step_through_the_op():
        eager_path = conv_kernels._eager_path
        conv_kernels._eager_path = lambda *tensors: None  # as under a dispatch mode
        try:
            training_step()
        finally:
            conv_kernels._eager_path = eager_path

    return {
        "SlimConv2d.forward, width 16 of 64": lambda: conv(x),
        "kernels.slim_conv2d": lambda: conv_kernels.slim_conv2d([x], conv.weight, conv.bias, out_channels=16,
                                                               activation="leaky_relu"),
        "fused gate, attention on": lambda: gate(features),
        "fused gate, attention off": gate_without_attention,
        "eager gate (reference ops), attention on": lambda: reference_gate(features),
        "SlimConv2d training step (forward + backward)": training_step,
        "SlimConv2d training step through the torch.library op": training_step_through_the_op,
        # the bench's layer step (dds-fast bench: 1.27 ms eager on the H100 in v12, cuDNN's 0.59)
        LARGE_STEP: training_step_of(torch.randn(1, 16, 512, 512, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)),
    }


LARGE_STEP = "SlimConv2d training step at 1x16x512x512"


def profile_step(step, out_path: str, steps: int = 50, large_step=None) -> None:
    """torch.profiler's host-side table over ``steps`` launched calls of ``step``, by self CPU
    time, then Python's own profile of as many calls (every Python function, Triton's launcher
    included, by its own time): the first names the ops and launches, the second what the
    host runs between them."""
    table = kernel_table(step, runs=steps, rows=30, sort_by="self_cpu_time_total", warmup=20)
    profile = cProfile.Profile()
    torch.cuda.synchronize()
    profile.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    with open(out_path, "w") as f:
        f.write(f"{torch.cuda.get_device_name()}, SlimConv2d training step (forward + backward), width 16 of "
                f"64, 1x16x16x16 fp16, {steps} steps\n{table}\n\ncProfile of {steps} launched steps (the "
                f"main thread: CUDA backwards run on autograd's device thread, timed below), by own "
                f"time:\n{text.getvalue()}\n\nWall time per step inside our host functions, on any thread "
                f"(nested calls counted in each):\n")
        for name, us in timed_breakdown(step, steps).items():
            f.write(f"{us:10.1f} us  {name}\n")
        if large_step is not None:
            f.write("\nThe same at 1x16x512x512 (the bench's batch-1 layer):\n")
            for name, us in timed_breakdown(large_step, steps).items():
                f.write(f"{us:10.1f} us  {name}\n")


def timed_breakdown(step, steps: int) -> dict[str, float]:
    """Microseconds per ``step`` spent inside each of our host functions of a training step,
    whatever thread calls them (the backward runs on autograd's device thread, which a Python
    profiler of the main thread does not see), and in the whole step."""
    spent = {}
    # (fold_rows as conv2d calls it: by the name it imported)
    targets = [(conv_kernels, name) for name in ("_forward_impl", "_backward_impl", "_grad_input", "_grad_weight_into",
                                                 "_reduce_into", "_launch_forward", "fold_rows")] + [
        (torch, "empty"), (torch, "empty_like")]
    saved = [(module, name, getattr(module, name)) for module, name in targets]
    launch_call = _launch.CachedLaunch.__call__

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - began
        return wrapper

    try:
        for module, name, fn in saved:
            setattr(module, name, timed(f"{module.__name__}.{name}", fn))
        _launch.CachedLaunch.__call__ = timed("CachedLaunch.__call__ (a cached launch)", launch_call)
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        spent["the whole step, synchronised at the end"] = time.perf_counter() - began
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
        _launch.CachedLaunch.__call__ = launch_call
    return {name: seconds / steps * 1e6 for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="host-cost.json",
                        help="the JSON (on a GPU, OUT-step-profile.txt beside it too)")
    run(parser.parse_args(argv).out)


def run(out_path: str) -> None:
    device, dtype = ("cuda", torch.float16) if CUDA else ("cpu", torch.float32)
    if not CUDA:
        torch.set_num_threads(1)  # host work is one thread; two OpenMP threads made zeros_like 7 ms here
    device_name = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    rows = {}

    def measure(mode: str, runs: dict) -> None:
        """Time each case, printing and saving as it goes (a time limit keeps what is done)."""
        rows[mode] = {}
        for name, fn in runs.items():
            rows[mode][name] = per_call_us(fn, calls=300 if "training" in name else 2000)
            print(f"{mode:14s} {name:46s} {rows[mode][name]:8.1f} us/call", flush=True)
            with open(out_path, "w") as f:
                json.dump(dict(device=device_name, torch=torch.__version__, dtype=str(dtype),
                               python=platform.python_version(), us_per_call=rows), f, indent=2)

    with torch.no_grad():
        runs = cases(device, dtype)
        if not CUDA:  # a stubbed step's host work does not depend on the image's size
            del runs[LARGE_STEP]
        launched = {name: fn for name, fn in runs.items() if "eager" not in name}
        if CUDA:
            measure("launched", runs)
            profile_step(runs["SlimConv2d training step (forward + backward)"],
                         out_path.rsplit(".", 1)[0] + "-step-profile.txt", large_step=runs[LARGE_STEP])
            _launch.CACHE_LAUNCHES = False
            try:
                measure("launched, JIT", launched)
            finally:
                _launch.CACHE_LAUNCHES = True
        saved = [(module, name, getattr(module, name)) for module, name in KERNELS]
        try:
            for module, name, kernel in saved:
                setattr(module, name, _NoLaunch(kernel))
            conv_kernels.clear_plans()  # cached plans hold the kernel they launch
            measure("stubbed", launched)
        finally:
            for module, name, kernel in saved:
                setattr(module, name, kernel)
            conv_kernels.clear_plans()


if __name__ == "__main__":
    main()
