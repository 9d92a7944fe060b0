"""Shared by the benchmarks: a timer that waits for the GPU, and the device's name."""
import platform
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
    return torch.cuda.get_device_name() if CUDA else f"CPU: {platform.processor() or platform.machine()}"


def describe(benchmark, **info) -> None:
    benchmark.extra_info.update(device=device_name(), torch=torch.__version__, **info)
