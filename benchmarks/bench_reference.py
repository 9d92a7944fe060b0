"""Overhead of SlimConv2d's reference path over a plain nn.Conv2d at full width (CPU).

Run: pytest benchmarks/bench_reference.py --benchmark-enable --benchmark-group-by=param:shape
The goal (Foundation issue) is under 5%: the reference path adds only Python checks, and
at full width passes the Parameter itself to the convolution.
"""
import platform

import pytest
import torch
from torch import nn

from dds_fast import SlimConv2d

SHAPES = {"32x128x128": (1, 32, 128, 128), "16x256x256": (1, 16, 256, 256)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layer", ["nn.Conv2d", "SlimConv2d"])
def test_full_width_overhead(benchmark, layer, shape):
    torch.manual_seed(0)
    n, c, h, w = SHAPES[shape]
    plain = nn.Conv2d(c, c, 3, padding=1)
    conv = plain
    if layer == "SlimConv2d":
        conv = SlimConv2d(c, c, 3, padding=1, backend="torch")
        conv.load_state_dict(plain.state_dict())
    x = torch.randn(n, c, h, w)
    benchmark.extra_info.update(device=f"cpu: {platform.processor() or platform.machine()}",
                                threads=torch.get_num_threads(), dtype="float32", shape=[n, c, h, w],
                                macs=c * c * 9 * h * w, torch=torch.__version__)
    with torch.no_grad():
        out = benchmark(conv, x)
    torch.testing.assert_close(out, plain(x).detach())
