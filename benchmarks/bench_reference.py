"""Overhead of SlimConv2d's reference path over a plain nn.Conv2d at full width (CPU).

Run: pytest benchmarks/bench_reference.py -n 0 --benchmark-enable
The goal (Foundation issue) is under 5%: the reference path adds only Python checks, and
at full width passes the Parameter itself to the convolution.

Measured as a pair: each round times one call of each layer, in alternating order, on the
same Parameters (``convert_model``) and input. On these (virtual) CPUs a conv's speed drifts
by up to 2x within a minute, so two benchmarks run one after the other compare the drift,
not the layers. ``extra_info`` holds each layer's median and the overhead.
"""
import statistics
import time

import pytest
import torch
from torch import nn

from _timing import device_name
from dds_fast import convert_model

SHAPES = {"32x128x128": (1, 32, 128, 128), "16x256x256": (1, 16, 256, 256)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_full_width_overhead(benchmark, shape):
    torch.manual_seed(0)
    n, c, h, w = SHAPES[shape]
    plain = nn.Conv2d(c, c, 3, padding=1)
    slim = convert_model(plain, backend="torch")  # a SlimConv2d on plain's own Parameters
    x = torch.randn(n, c, h, w)
    times = {"nn.Conv2d": [], "SlimConv2d": []}
    order = [("nn.Conv2d", plain), ("SlimConv2d", slim)]

    def one_round():
        order.reverse()
        for name, layer in order:
            start = time.perf_counter()
            layer(x)
            times[name].append(time.perf_counter() - start)

    with torch.no_grad():
        benchmark.pedantic(one_round, rounds=300, warmup_rounds=20)
        torch.testing.assert_close(slim(x), plain(x), rtol=0, atol=0)
    plain_ms, slim_ms = (statistics.median(times[k][20:] or times[k]) * 1e3 for k in ("nn.Conv2d", "SlimConv2d"))
    benchmark.extra_info.update(device=device_name(), threads=torch.get_num_threads(), dtype="float32",
                                shape=[n, c, h, w], macs=c * c * 9 * h * w, torch=torch.__version__,
                                nn_conv2d_median_ms=plain_ms, slim_conv2d_median_ms=slim_ms,
                                overhead_percent=100 * (slim_ms / plain_ms - 1))
