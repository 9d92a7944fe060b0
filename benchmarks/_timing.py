"""Shared by the benchmarks: a timer that waits for the GPU, and the device's name."""
import time

import torch

CUDA = torch.cuda.is_available()


def synchronized_timer() -> float:
    """pytest-benchmark's default timer does not wait for the GPU: this one does."""
    torch.cuda.synchronize()
    return time.perf_counter()


TIMER = synchronized_timer if CUDA else time.perf_counter
DEVICE = torch.device("cuda" if CUDA else "cpu")


def device_name() -> str:
    from dds_fast.runner import describe_device

    return describe_device(DEVICE)[0]


def describe(benchmark, **info) -> None:
    benchmark.extra_info.update(device=device_name(), torch=torch.__version__, **info)


def median_ms(fn) -> float:
    """``fn``'s median time in ms: ``triton.testing.do_bench`` (CUDA events, 25 ms of warm-up,
    100 ms of repeats) on a GPU; without one, the median of five wall-clock calls, which checks
    a script rather than timing anything."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(5):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[2] * 1e3


def kernel_table(fn, runs: int = 5, rows: int = 20, sort_by: str = "cuda_time_total", warmup: int = 3) -> str:
    """torch.profiler's table over ``runs`` calls of ``fn`` (by default GPU time per kernel),
    largest first, after ``warmup`` calls outside the profile (compilation, warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)


def network_arguments(doc: str, out: str, configs: list[str], extend=None):
    """The command line of the scripts that time or profile SlimUNet configs: OUT, --config
    (repeatable), --batch and --size, and whatever ``extend(parser)`` adds."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extend is not None:
        extend(parser)
    parser.add_argument("out", nargs="?", default=out)
    default = f"; default {' and '.join(configs)}" if configs else ""
    parser.add_argument("--config", action="append", help="a label of dds_fast.runner.default_configs "
                        f"(repeat for several{default})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    args.config = args.config or configs
    return args


def chosen_configs(labels: list[str], net) -> dict:
    """The net's configs (``dds_fast.runner.default_configs``) of ``labels``; exits naming any unknown."""
    from dds_fast.runner import default_configs

    configs = dict(default_configs(net))
    unknown = [label for label in labels if label not in configs]
    if unknown:
        raise SystemExit(f"--config must be among {sorted(configs)}, got {unknown}")
    return {label: configs[label] for label in labels}


def add_report(path: str, reports: list[str], report: str) -> None:
    """Append ``report`` to ``reports``, print it, and write them all to ``path``: a run stopped
    at its time limit keeps the reports made before."""
    reports.append(report)
    print(report, end="\n\n", flush=True)
    with open(path, "w") as f:
        f.write("\n\n".join(reports))
