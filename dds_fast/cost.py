"""Cost of a width configuration: multiply-adds per pixel.

The DDS-Net paper's "FLOPs/pixel" are multiply-adds (MACs) per input pixel; so are ours.
``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add, so its total
divided by ``2 * H * W`` equals :func:`macs_per_pixel`. Bias adds, activations and the
residual add are not counted, as in the paper. Only 2-D convolutions (``nn.Conv2d``, which
SlimConv2d is) are counted: in a converted model, other layers with multiply-adds
(``nn.Linear``, ``nn.ConvTranspose2d``) are left out, where FlopCounterMode counts them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .config import SubnetConfig, checked_int
from .modes import evaluating
from .slim_conv import InputTooSmall


@dataclass(frozen=True)
class ConvCall:
    """The shapes of one convolution call in a forward pass."""

    name: str
    module: nn.Conv2d
    in_widths: tuple[int, ...]  # active channels of each input tensor (more than one: concat)
    out_width: int
    out_size: tuple[int, int]
    in_size: tuple[int, int]  # the input's own: not out_size times the stride unless padded to fit
    residual: bool = False  # a residual added in the conv's epilogue (a SlimConv2d's or StaticConv2d's)

    @property
    def macs(self) -> int:
        kh, kw = self.module.kernel_size
        return self.out_width * (sum(self.in_widths) // self.module.groups) * kh * kw * self.out_size[0] * self.out_size[1]


@contextmanager
def _at_config(model: nn.Module, config):
    if config is None:
        yield
        return
    previous = model.get_config()
    model.set_config(config)
    try:
        yield
    finally:
        model.set_config(previous)


def trace_convs(model: nn.Module, config: SubnetConfig | Mapping[str, int] | None = None,
                input_shape: tuple[int, int, int] | None = None) -> tuple[list[ConvCall], int]:
    """Run one small forward pass (eval mode, no grad) and record every conv's active shapes.

    ``input_shape`` is ``(C, H, W)``; by default the network's ``in_channels`` at a size its
    strides divide exactly. Returns the calls and the input's pixel count.
    """
    if config is not None and not hasattr(model, "set_config"):
        raise ValueError(f"{type(model).__name__} has no width configs; pass config=None")
    defaulted = input_shape is None
    if defaulted:
        if not hasattr(model, "in_channels"):
            raise ValueError(f"{type(model).__name__}: pass input_shape=(C, H, W) to count its cost")
        side = 2 * getattr(model, "size_multiple", 1)
        input_shape = (model.in_channels, side, side)
    try:
        sizes = tuple(checked_int(size, "input_shape", "trace_convs") for size in input_shape)
    except (ValueError, TypeError):  # TypeError: not a sequence
        sizes = ()
    if len(sizes) != 3:  # the batch of one is added here
        raise ValueError(f"trace_convs: input_shape must be (C, H, W) of positive sizes, got {input_shape!r}")
    input_shape = sizes
    names = {module: name for name, module in model.named_modules()}
    calls: list[ConvCall] = []

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]  # nn.Conv2d's forward(input), called by keyword too
        # channels at -3: a batch [N, C, H, W], or an unbatched image [C, H, W]
        widths = tuple(t.shape[-3] for t in x) if isinstance(x, (list, tuple)) else (x.shape[-3],)
        r = getattr(module, "upscale_factor", 1)  # an upsampling SlimConv2d: count its filters' own output
        out_width = output.shape[-3] * r * r
        per_image = getattr(module, "per_image_widths", None)
        if per_image is not None:  # max-width buffers (a DDSNet's per-image forward): the image's row has its widths
            out_width, *widths = per_image[0].tolist()
        residual = args[1] if len(args) > 1 else kwargs.get("residual")
        calls.append(ConvCall(names.get(module, ""), module, tuple(widths), out_width,
                              (output.shape[-2] // r, output.shape[-1] // r),
                              tuple((x[0] if isinstance(x, (list, tuple)) else x).shape[-2:]), residual is not None))

    reference = next(model.parameters(), torch.empty(0))  # a model without parameters runs in fp32 on the CPU
    user_hooks = _set_aside_forward_hooks(model)  # counting is not the caller's forward
    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        # a generator of its own: counting must not move the caller's random stream
        generator = torch.Generator(device=reference.device).manual_seed(0)
        # outside any dispatch mode (FlopCounterMode): a count is not the caller's forward
        with _at_config(model, config), torch.no_grad(), evaluating(model), _disable_current_modes():
            model(torch.rand(1, *input_shape, device=reference.device, dtype=reference.dtype, generator=generator))
    except (RuntimeError, InputTooSmall) as error:
        if not defaulted or out_of_memory(error):  # (running out of memory is not a misfit)
            raise
        raise ValueError(f"{type(model).__name__}: the default input {tuple(input_shape)} does not fit it ({error}); "
                         f"pass input_shape=(C, H, W)") from error
    finally:
        for hook in hooks:
            hook.remove()
        for module, name, kept in user_hooks:
            setattr(module, name, kept)
    return calls, input_shape[1] * input_shape[2]


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: torch's CPU allocator raises a RuntimeError,
    CUDA's an OutOfMemoryError (one too)."""
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(error)


# nn.Module's per-module forward hook tables (their handles remove a hook from the table itself)
_FORWARD_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                        "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _set_aside_forward_hooks(model: nn.Module) -> list[tuple[nn.Module, str, dict]]:
    """Empty the forward hook tables of ``model``'s modules; returns what to set back."""
    kept = [(m, name, getattr(m, name)) for m in model.modules() for name in _FORWARD_HOOK_TABLES
            if getattr(m, name, None)]
    for module, name, table in kept:
        setattr(module, name, type(table)())
    return kept


def macs_per_pixel(model: nn.Module, config: SubnetConfig | Mapping[str, int] | None = None,
                   input_shape: tuple[int, int, int] | None = None) -> float:
    """Multiply-adds per input pixel of ``model`` at ``config`` (default: its active config)."""
    calls, pixels = trace_convs(model, config, input_shape)
    return sum(call.macs for call in calls) / pixels
