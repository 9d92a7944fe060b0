"""Module modes shared by the counting and training code."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode inside the block (no BatchNorm statistics updated, no dropout
    drawn), each submodule's own mode given back after, mixed modes included."""
    modes = {m: m.training for module in modules for m in module.modules()}
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training
