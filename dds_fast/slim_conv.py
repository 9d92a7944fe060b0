"""SlimConv2d: an ``nn.Conv2d`` whose active width can shrink to a prefix of its filters.

The output at active widths ``(o, i)`` equals
``F.conv2d(x, weight[:o, :i], bias[:o], stride, padding, dilation)``: a narrow layer uses
the first ``o`` filters and the first ``i`` input channels of the one shared weight.
"""
from __future__ import annotations

import functools
import itertools
import logging
import re
import warnings
import weakref
from typing import Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import nn

from .config import checked_int, checked_real, exact_int
from .kernels._launch import cached_call

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
_WARNED: set[tuple[str, str]] = set()  # (module kind, fallback reason without its numbers) already warned about
ACTIVATIONS = (None, "relu", "leaky_relu")
_SETTINGS = frozenset({"backend", "in_segments", "activation", "negative_slope", "upscale_factor"})
_GEOMETRY = frozenset({"kernel_size", "stride", "padding", "dilation"})


def epilogue_repr(activation: str | None, negative_slope: float) -> list[str]:
    """The repr fields of a conv's fused activation (none without one; the slope for LeakyReLU)."""
    if activation is None:
        return []
    return [f"activation={activation!r}"] + ([f"negative_slope={negative_slope:g}"] if activation == "leaky_relu" else [])


class PackedBuffers:
    """The packed per-image outputs of one dynamic forward (``kernels.slim_conv2d``'s
    ``packed_output``): each image's pixels at its own width's pitch, which a tensor's strides
    cannot say. SlimConv2d layers that share one store their per-image outputs packed and read
    the tensors it holds as packed inputs; the forward that sets it up must pass those tensors
    to nothing else."""

    def __init__(self):
        self._held: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        self._held[id(tensor)] = weakref.ref(tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        ref = self._held.get(id(tensor))  # the reference tells a recycled id apart
        return ref is not None and ref() is tensor


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.pixel_shuffle`` that keeps a channels_last input channels_last (the kernels' loads are
    coalesced along channels only) in one copy. On CUDA, ``F.pixel_shuffle`` returns such an
    input's result in NCHW, and converting it back took a second copy of a tensor as large."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return F.pixel_shuffle(x, factor)
    n, c, h, w = x.shape
    if c % (factor * factor):
        raise ValueError(f"pixel_shuffle: {c} channels are not a multiple of {factor}**2")
    # channels_last memory is [N, H, W, C] with C = (out channel, row offset, column offset)
    blocks = x.permute(0, 2, 3, 1).reshape(n, h, w, c // factor ** 2, factor, factor)
    # the copy into [N, H, row offset, W, column offset, C] order is the output's channels_last memory (a
    # reshape would skip it where it can view, as at 1x1, and return NCHW; -1 is ambiguous in an empty batch)
    out = blocks.permute(0, 1, 4, 2, 5, 3).contiguous()
    return out.view(n, h * factor, w * factor, c // factor ** 2).permute(0, 3, 1, 2)


def apply_epilogue(y: torch.Tensor, residual: torch.Tensor | None, activation: str | None,
                   negative_slope: float, upscale_factor: int = 1) -> torch.Tensor:
    """``pixel_shuffle(act(y + residual), upscale_factor)``: the order the fused kernels use."""
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = F.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, negative_slope)
    return y if upscale_factor == 1 else pixel_shuffle(y, upscale_factor)


class SlimConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` (same constructor, same parameters and state_dict keys) that
    runs at a narrower width.

    - Active input channels are ``x.shape[1]`` (at most ``in_channels``).
    - Active filters are ``active_out_channels`` (an int, or ``None`` for all): the output's
      channels, or with ``upscale_factor`` r that many over r^2.
    - ``in_segments``: the weight's input channels are blocks of these maximum sizes, and
      the input is a list with one tensor per block, each the active prefix of its block
      (a U-Net decoder conv over ``cat([up, skip])`` with both slimmed independently).
    - ``activation`` (None, 'relu' or 'leaky_relu' with ``negative_slope``) and a
      ``residual`` argument of ``forward`` form the epilogue ``act(conv + bias + residual)``,
      which the Triton backend fuses into the convolution.
    - ``upscale_factor`` r > 1: the output is ``F.pixel_shuffle(act(conv + bias), r)``, an
      upsampling conv (the Triton backend shuffles in its store, with no copy after it);
      widths are then multiples of r^2, and there is no residual.
    - ``backend``: 'torch' (reference, runs anywhere), 'triton' (the fused kernels, under
      ``TRITON_INTERPRET=1`` on CPU) or 'auto' (Triton on CUDA tensors, reference on CPU).

    ``groups > 1`` is not slimmable and is rejected; non-zero ``padding_mode`` works on the
    reference path.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 backend: str = "auto", in_segments: Sequence[int] | None = None,
                 activation: str | None = None, negative_slope: float = 0.01, upscale_factor: int = 1):
        in_channels = checked_int(in_channels, "in_channels", "SlimConv2d")
        out_channels = checked_int(out_channels, "out_channels", "SlimConv2d")
        if groups != 1:
            raise ValueError(f"SlimConv2d({in_channels}->{out_channels}): groups={groups} cannot be slimmed "
                             "by channel prefix; keep it an nn.Conv2d")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.backend = backend
        self.in_segments = (in_channels,) if in_segments is None else in_segments
        self.activation = activation
        self.negative_slope = negative_slope
        self.upscale_factor = upscale_factor
        self.layer_name: str | None = None
        self._active_out: int | None = None
        # int32 [N, 1 + inputs] on the device: each image's (out width, in widths), read by the
        # kernel; inputs are then max-width buffers and channels past an image's width unwritten
        self.per_image_widths: torch.Tensor | None = None
        # what the setter of per_image_widths promises the entries are multiples of: an int, or
        # a pair (out, in) (see slim_conv2d's widths_multiple)
        self.per_image_widths_multiple = 1
        # optional (out, in) widths to size the per-image launch's tiles for (see slim_conv2d's
        # tile_widths); None: the layer's maximum widths
        self.per_image_tile_widths: tuple[int, int] | None = None
        # with per-image widths, a store shared by the layers of one dynamic forward: this
        # layer's output is stored packed (see PackedBuffers) and inputs it holds read packed
        self.per_image_packing: PackedBuffers | None = None
        # When set, a forward on the kernels' inference path also leaves the output's fp32
        # channel sums over blocks of pixels, [N, T, out], in channel_sums (else None there):
        # the squeeze of a gate behind this layer, with no second pass over the output.
        self.emit_channel_sums = False
        self.channel_sums: torch.Tensor | None = None
        self.channel_sums_of: torch.Tensor | None = None  # the output they sum (a hook may replace it)
        # A bool [1, C, 1, 1] on the output's device (C: the output's channels, after any pixel
        # shuffle): the channels it leaves out come out zero (NaN and inf too). A
        # SlimNet's set_masked_widths runs a config this way at full width, so that no shape
        # depends on the config (one CUDA graph of a training step serves every config).
        # (a plain attribute, which _apply moves as a buffer: a buffer's read costs each forward
        # a microsecond of host time; not in the state: a training-time setting, not a weight)
        self.output_mask: torch.Tensor | None = None

    def __setattr__(self, name, value):
        # settings assigned after construction are checked as the constructor checks them
        # (an unknown activation was ignored, silently; segments that did not sum to
        # in_channels read the wrong weight blocks)
        if name in _SETTINGS:
            value = self._checked_setting(name, value)
        elif name in _GEOMETRY and not isinstance(value, str):
            # pairs of plain ints: nn.Conv2d keeps numpy or tensor integers as given, and an int
            # assigned after construction as it is, where the kernels (and their launch keys)
            # take plain ints and this layer reads pairs
            value = tuple(exact_int(v) for v in value) if isinstance(value, (tuple, list)) \
                else (exact_int(value),) * 2
        if name in ("stride", "padding"):  # as nn.Conv2d's constructor refuses it (the kernels would run it)
            stride = value if name == "stride" else self.__dict__.get("stride", (1, 1))
            padding = value if name == "padding" else self.__dict__.get("padding", 0)
            if padding == "same" and tuple(stride) != (1, 1):
                raise ValueError(f"{self._label()}: padding='same' is not supported for strided convolutions "
                                 f"(stride {tuple(stride)})")
        super().__setattr__(name, value)
        if name == "in_segments":  # where each input block starts among the weight's input channels
            super().__setattr__("segment_starts", tuple(itertools.accumulate(value[:-1], initial=0)))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "segment_starts" not in state:  # a whole-module pickle of an earlier version
            self.in_segments = self.in_segments

    def _checked_setting(self, name: str, value):
        if name == "backend" and value not in BACKENDS:
            raise ValueError(f"{self._label()}: backend must be one of {BACKENDS}, got {value!r}")
        if name == "activation" and value not in ACTIVATIONS:
            raise ValueError(f"{self._label()}: activation must be one of {ACTIVATIONS}, got {value!r}")
        if name == "negative_slope":
            return checked_real(value, "negative_slope", self._label())
        if name == "upscale_factor":
            value = exact_int(value)  # numpy and tensor integers, as the widths take them
            active = getattr(self, "_active_out", None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 \
                    or self.out_channels % value ** 2 or (active or 0) % value ** 2:
                raise ValueError(f"{self._label()}: upscale_factor must be an int >= 1 whose square divides "
                                 f"out_channels (and active_out_channels), got {value!r}")
        if name == "in_segments":
            try:
                segments = tuple(value)
            except TypeError:
                raise ValueError(f"{self._label()}: in_segments must be a sequence of ints, got {value!r}") from None
            value = tuple(checked_int(s, "each of in_segments", self._label()) for s in segments)
            if sum(value) != self.in_channels:
                raise ValueError(f"{self._label()}: in_segments {list(value)} must be positive and sum to "
                                 f"in_channels={self.in_channels}")
        return value

    # -- widths -------------------------------------------------------------------------
    @property
    def active_out_channels(self) -> int | None:
        return self._active_out

    @active_out_channels.setter
    def active_out_channels(self, value: int | None):
        if value is not None:
            value = exact_int(value)  # numpy and tensor integers, as configs take them
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.out_channels \
                    or value % self.upscale_factor ** 2:
                multiple = f" and a multiple of {self.upscale_factor ** 2}" if self.upscale_factor > 1 else ""
                raise ValueError(f"{self._label()}: active_out_channels must be an int in [1, "
                                 f"{self.out_channels}]{multiple}, or None, got {value!r}")
        vars(self)["_active_out"] = value  # (a plain attribute: nn.Module's __setattr__ costs host time)

    def set_per_image_widths(self, widths: torch.Tensor | None, multiple: int | tuple[int, int] = 1,
                             tile_widths: tuple[int, int] | None = None, packing: PackedBuffers | None = None):
        """Set (or, with ``None``, clear) ``per_image_widths`` with the settings that go with it:
        ``per_image_widths_multiple``, ``per_image_tile_widths`` and ``per_image_packing``."""
        # one update of the instance dict (plain attributes all four): four nn.Module attribute
        # writes cost a dynamic forward 8 us of host time per layer, twice
        vars(self).update(per_image_widths=widths, per_image_widths_multiple=multiple,
                          per_image_tile_widths=tile_widths, per_image_packing=packing)

    def _label(self) -> str:
        name = getattr(self, "layer_name", None) or "SlimConv2d"
        return f"{name}({self.in_channels}->{self.out_channels})"

    # -- forward ------------------------------------------------------------------------
    def _check_inputs(self, x) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            inputs = [x]
        elif isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
            inputs = list(x)
        else:
            raise ValueError(f"{self._label()}: input must be a tensor or a list of tensors, got {type(x).__name__}")
        if len(inputs) != len(self.in_segments):
            raise ValueError(f"{self._label()}: expects {len(self.in_segments)} input tensor(s) (in_segments="
                             f"{list(self.in_segments)}), got {len(inputs)}")
        for k, (t, limit) in enumerate(zip(inputs, self.in_segments)):
            where = f"input {k}" if len(inputs) > 1 else "input"
            if t.layout != torch.strided:  # (as nn.Conv2d, which fails on them deep in ATen)
                raise ValueError(f"{self._label()}: {where} is a {t.layout} tensor; convolutions take dense tensors")
            if t.dim() != 4:
                unbatched = " (or one unbatched 3-D image)" if len(inputs) == 1 else ""
                raise ValueError(f"{self._label()}: {where} must be 4-D [N, C, H, W]{unbatched}, got shape "
                                 f"{tuple(t.shape)}")
            if not 1 <= t.shape[1] <= limit:
                raise ValueError(f"{self._label()}: {where} has {t.shape[1]} channels, must be in [1, {limit}]")
        first = inputs[0]
        for t in inputs[1:]:
            if (t.shape[0], t.shape[2], t.shape[3]) != (first.shape[0], first.shape[2], first.shape[3]):
                raise ValueError(f"{self._label()}: concatenated inputs disagree in batch or size: "
                                 f"{[tuple(t.shape) for t in inputs]}")
        # as nn.Conv2d refuses them (the kernels would return an empty output)
        height, width = first.shape[2:]
        if height == 0 or width == 0 or min(self.output_size(height, width)) < 1:
            raise InputTooSmall(f"{self._label()}: an input of {height}x{width} pixels gives no output pixels "
                                f"(kernel {tuple(self.kernel_size)}, padding {self.padding}, dilation "
                                f"{tuple(self.dilation)})")
        return inputs

    def _check_residual(self, residual: torch.Tensor, expected: tuple[int, ...]):
        if residual.layout != torch.strided:
            raise ValueError(f"{self._label()}: residual is a {residual.layout} tensor; convolutions take dense tensors")
        if tuple(residual.shape) != expected:
            raise ValueError(f"{self._label()}: residual has shape {tuple(residual.shape)}, "
                             f"the output has {expected}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.padding == "same":
            return height, width
        padding = (0, 0) if self.padding == "valid" else self.padding

        def one(size, k, s, p, d):
            return (size + 2 * p - d * (k - 1) - 1) // s + 1
        return (one(height, self.kernel_size[0], self.stride[0], padding[0], self.dilation[0]),
                one(width, self.kernel_size[1], self.stride[1], padding[1], self.dilation[1]))

    def active_weight(self, in_widths: Sequence[int], out_width: int, weight: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The weight of the active slice (a view for one input; the matching blocks joined
        for a concatenated input), of ``weight`` when given (``self.weight`` as read once: a
        parametrization such as spectral_norm runs, and may update, on every read)."""
        if len(in_widths) != len(self.in_segments):
            raise ValueError(f"{self._label()}: active_weight takes one input width per input block "
                             f"({len(self.in_segments)}), got {list(in_widths)}")
        # (a width past its block would read the next block's channels)
        bounds = [(f"input width {k}", width, limit)
                  for k, (width, limit) in enumerate(zip(in_widths, self.in_segments))]
        checked = []
        for name, width, limit in bounds + [("out_width", out_width, self.out_channels)]:
            checked.append(checked_int(width, name, f"{self._label()}: active_weight"))
            if checked[-1] > limit:
                raise ValueError(f"{self._label()}: active_weight: {name} must be at most {limit}, got {width!r}")
        return self._active_slice(checked[:-1], checked[-1], weight)

    def _active_slice(self, in_widths: list[int], out_width: int, weight: torch.Tensor | None) -> torch.Tensor:
        """``active_weight`` of widths already checked (a forward's, from its inputs)."""
        weight = self.weight if weight is None else weight
        if len(in_widths) == 1 and in_widths[0] == self.in_channels and out_width == self.out_channels:
            return weight
        blocks = [weight[:out_width, start:start + width]
                  for start, width in zip(self.segment_starts, in_widths)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)

    def forward(self, input, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``input``: a tensor [N, C, H, W] (or, as nn.Conv2d takes it, one unbatched image [C,
        H, W], with an unbatched ``residual``), or a list of [N, C, H, W] tensors, one per
        ``in_segments`` block."""
        weight, bias = _parameter(self, "weight"), _parameter(self, "bias")
        repeat_key = self._repeat_key(input, weight, bias, residual)
        keeps_layout = None if repeat_key is None else _CHECKED_CALLS.get(repeat_key)
        if keeps_layout is not None:  # this call's checks passed before: the kernels' launch again
            widths = self.per_image_widths
            y = repeat_key[0].repeat_call(repeat_key[1], [input] if type(input) is torch.Tensor else input,
                                          weight, bias, residual, widths)
            if y is not None:
                if widths is not None and self.per_image_packing is not None:
                    self.per_image_packing.add(y)
                return y if keeps_layout else y.contiguous()
        traced = _fx_proxy(input, residual)
        if traced is not None:  # torch.fx traces through modules outside torch.nn: a leaf, as nn.Conv2d is
            return self._fx_leaf(traced, input, residual)
        if isinstance(input, torch.Tensor) and input.dim() == 3 and input.layout == torch.strided:
            if residual is not None and residual.dim() != 3:
                raise ValueError(f"{self._label()}: an unbatched input takes an unbatched residual [C, H, W], got "
                                 f"shape {tuple(residual.shape)}")
            return self.forward(input[None], None if residual is None else residual[None])[0]
        if self.emit_channel_sums:  # (an nn.Module attribute write costs host time: only when asked)
            self.channel_sums = self.channel_sums_of = None
        inputs = self._check_inputs(input)
        out_width = self.out_channels if self._active_out is None else self._active_out
        if residual is not None:
            if self.upscale_factor > 1:
                raise ValueError(f"{self._label()}: a residual with upscale_factor > 1 is not supported")
            n, _, h, w = inputs[0].shape
            self._check_residual(residual, (n, out_width, *self.output_size(h, w)))
        kernels, cast = self._triton_kernels(inputs, weight, bias, residual)
        mask = self.output_mask
        if mask is not None and self.per_image_widths is not None:
            raise ValueError(f"{self._label()}: an output mask and per-image widths cannot be combined")
        if kernels is None:
            if self.per_image_widths is not None:
                raise ValueError(f"{self._label()}: per-image widths need the Triton backend on this input")
            dtype = functools.reduce(torch.promote_types, [t.dtype for t in inputs])  # (as torch.cat's)
            if dtype in (torch.float16, torch.bfloat16) and weight.dtype == torch.float32 \
                    and self._kernels_asked(inputs[0]) and not torch.is_autocast_enabled(inputs[0].device.type):
                # a fallback from the kernels reads fp16/bf16 activations over fp32 weights as they
                # do (the weight cast to the activations' dtype), where torch's conv would refuse
                weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
            y = self._reference(inputs, out_width, residual, weight, bias)
            return y if mask is None else torch.where(mask, y, 0)
        packing = self.per_image_packing if self.per_image_widths is not None else None
        # the kernels write channels_last, the fast layout; a SlimNet feeds its layers that on a GPU.
        # Channels innermost is channels_last, as nn.Conv2d reads it, dense or not: a channel
        # prefix of a channels_last tensor (a DDSNet route's body reads one) is no dense tensor
        x0 = inputs[0]
        nhwc = not x0.is_contiguous() and x0.stride(1) < x0.stride(3)
        # (read before autocast's cast, which keeps the strides and so the packed layout)
        packed_inputs = None if packing is None else [packing.holds(t) for t in inputs]
        if packing is not None and residual is not None and packing.holds(residual):
            raise ValueError(f"{self._label()}: a packed per-image buffer cannot be a residual (the kernels read "
                             "residuals as dense tensors)")
        activation, eager_residual = self.activation, None
        if cast is not None:  # (the fp32 weight is read as it is and cast in the kernel's registers)
            inputs = [t.to(kernels.autocast_dtype(t, cast)) for t in inputs]
        if residual is not None and residual.dtype != inputs[0].dtype:
            # the kernels add a residual of the output's dtype; another is torch's promoting add, as
            # the reference path adds it (autocast casts a conv's inputs, not an add's: a bf16 conv
            # plus an fp32 image is an fp32 sum), so the epilogue runs after the kernel
            eager_residual, residual, activation = residual, None, None
        packed = {} if packing is None else dict(packed_inputs=packed_inputs, packed_output=eager_residual is None)
        # (the kernels sum what they store: not a pixel shuffle's, nor an epilogue's added after them)
        sums_wanted = self.emit_channel_sums and self.per_image_widths is None and eager_residual is None \
            and self.upscale_factor == 1
        # (unsupported_reason let only padding k//2 through, 'same' and 'valid' included)
        y = kernels.slim_conv2d(inputs, weight, bias, segment_starts=self.segment_starts,
                                out_channels=out_width, stride=self.stride[0], padding=self.kernel_size[0] // 2,
                                activation=activation, negative_slope=self.negative_slope, residual=residual,
                                widths=self.per_image_widths, widths_multiple=self.per_image_widths_multiple,
                                channel_sums=sums_wanted, tile_widths=self.per_image_tile_widths,
                                upscale_factor=self.upscale_factor, **packed)
        if sums_wanted:
            y, sums = y
        elif repeat_key is not None and cast is None and mask is None and eager_residual is None \
                and not self.emit_channel_sums:
            _remember_checked(repeat_key, nhwc or packing is not None)
        if eager_residual is not None:
            y = apply_epilogue(y, eager_residual, self.activation, self.negative_slope)
        elif packing is not None:
            packing.add(y)
        if packing is None and not nhwc:  # as nn.Conv2d: an NCHW input gives an NCHW output (whose .view works)
            y = y.contiguous()
        out = y if mask is None else torch.where(mask, y, 0)
        if sums_wanted and sums is not None:  # (with a gradient there are none: keep no reference to the graph)
            if mask is not None:  # the sums of the output returned, masked channels zero
                sums = torch.where(mask.reshape(1, 1, -1), sums, 0)
            self.channel_sums, self.channel_sums_of = sums, out
        return out

    def _fx_leaf(self, proxy: torch.fx.Proxy, input, residual) -> torch.fx.Proxy:
        """One call_module node for this layer in the graph ``proxy``'s tracer records."""
        tracer = proxy.tracer
        name = tracer.path_of_module(self)
        if not name:  # the traced root itself: its node would call the GraphModule being built
            raise ValueError(f"{self._label()}: torch.fx traces a SlimConv2d as a leaf of the module that holds it; "
                             f"trace that module, not the layer alone")
        return tracer.create_proxy("call_module", name, (input,) if residual is None else (input, residual), {})

    def _repeat_key(self, input, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor | None) -> tuple | None:
        """What the checks and the launch read of this call, as a key of ``_CHECKED_CALLS``, when
        it may repeat one that ran the kernels: eager, with no output mask, channel sums,
        autocast or transform (per-image widths count by their shape, strides, dtype and device,
        and their store's packing of these tensors). None otherwise, and where the kernels are
        not asked for. A repeated call then skips the checks it passed, most of a small layer's
        host time."""
        if self.backend == "torch" or self.output_mask is not None or self.emit_channel_sums \
                or not _plain_eager_state() or (residual is not None and type(residual) is not torch.Tensor):
            return None  # (a residual of a torch.fx trace, say: a Proxy, which forward makes a leaf of)
        x0 = input if type(input) is torch.Tensor else input[0] if type(input) in (list, tuple) and input else None
        if type(x0) is not torch.Tensor or (self.backend == "auto" and not x0.is_cuda):
            return None
        kernels = _kernels_module()
        if isinstance(kernels, str):
            return None
        inputs = [input] if x0 is input else input
        widths = self.per_image_widths
        packing = None if widths is None else self.per_image_packing
        packed = {}
        if packing is not None:
            if residual is not None and packing.holds(residual):
                return None  # (the full call refuses it)
            packed = dict(packed_inputs=[packing.holds(t) for t in inputs], packed_output=True)
        out_width = self.out_channels if self._active_out is None else self._active_out
        launch_key = kernels.inference_key(inputs, weight, bias, residual, widths, self.segment_starts, out_width,
                                           self.stride[0], self.kernel_size[0] // 2, self.activation,
                                           self.negative_slope, self.per_image_widths_multiple, self.upscale_factor,
                                           self.per_image_tile_widths, **packed)
        # (a float or bool setting hashes as an int does: the full call refuses it)
        if launch_key is None or not (kernels.exact_ints(self.stride) and kernels.exact_ints(self.dilation)
                                      and (type(self.padding) is str or kernels.exact_ints(self.padding))
                                      and kernels.exact_ints(self.per_image_widths_multiple)
                                      and (self.per_image_tile_widths is None
                                           or kernels.exact_ints(self.per_image_tile_widths))):
            return None
        # then the layer's settings that the kernels' key leaves out: a layer that falls back,
        # or whose settings changed, must not find another's checks. (Unhashable settings, a
        # list, make a key that _CHECKED_CALLS never holds.)
        key = (kernels, launch_key, self.stride, self.padding, self.dilation, self.groups, self.padding_mode,
               self.backend)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _triton_kernels(self, inputs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                        residual: torch.Tensor | None = None):
        """``(kernel module, autocast's dtype or None)`` when this call runs on Triton, else
        ``(None, None)`` (the reference path). Under autocast the kernels take the activations
        cast as autocast would cast them for a conv (it does not see the custom op), and
        whether they can run is decided on that dtype."""
        if not self._kernels_asked(inputs[0]):
            return None, None
        kernels = cached_call(_kernels_module)
        device_type = inputs[0].device.type
        if isinstance(kernels, str):
            reason = kernels
        elif device_type not in ("cuda", "cpu"):
            reason = (f"tensors on {device_type} (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1 set "
                      f"before importing dds_fast)")
        else:
            reason = transform_reason(*inputs, weight, bias, residual)
            if reason is None:
                cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
                reason = kernels.unsupported_reason(inputs, weight, self.stride, self.padding, self.dilation,
                                                    self.groups, self.padding_mode, self.activation,
                                                    self.negative_slope, input_dtype=cast)
                if reason is None:
                    return kernels, cast
        note_fallback(self, self._label(), reason)
        return None, None

    def _kernels_asked(self, x: torch.Tensor) -> bool:
        """Whether the backend asks for the kernels on ``x`` (they may still not serve the call)."""
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def _reference(self, inputs: list[torch.Tensor], out_width: int, residual: torch.Tensor | None,
                   weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = self._active_slice([t.shape[1] for t in inputs], out_width, weight)
        bias = None if bias is None else bias[:out_width]
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        return apply_epilogue(self._conv_forward(x, weight, bias), residual, self.activation, self.negative_slope,
                              self.upscale_factor)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.output_mask is not None:  # moved with the module, as a buffer would be; bool whatever .type() asks
            self.output_mask = fn(self.output_mask).bool()
        return self

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"backend={self.backend!r}"]
        if len(self.in_segments) > 1:
            parts.append(f"in_segments={list(self.in_segments)}")
        parts += epilogue_repr(self.activation, self.negative_slope)
        if self.upscale_factor > 1:
            parts.append(f"upscale_factor={self.upscale_factor}")
        if self._active_out is not None:
            parts.append(f"active_out_channels={self._active_out}")
        if self.output_mask is not None:
            parts.append(f"masked_out_channels={int(self.output_mask.sum())}")
        return ", ".join(parts)


class InputTooSmall(ValueError):
    """A SlimConv2d's input with no output pixels (as nn.Conv2d, which raises a RuntimeError)."""


def _fx_proxy(input, residual) -> torch.fx.Proxy | None:
    """The torch.fx Proxy among a call's arguments, when a symbolic trace makes it."""
    for value in ([*input] if type(input) in (list, tuple) else [input]) + [residual]:
        if isinstance(value, torch.fx.Proxy):
            return value
    return None


def _parameter(module: nn.Module, name: str):
    """``getattr(module, name)``, a registered Parameter read straight from ``_parameters``
    (nn.Module's ``__getattr__`` costs each read a microsecond of host time); a parametrized or
    hooked weight, no longer registered under its name, is read as the attribute it became."""
    value = module._parameters.get(name)
    return getattr(module, name) if value is None else value


# repeat keys of calls that ran the kernels -> whether their output keeps the kernels' layout
# (channels_last, or a packed per-image buffer) or is copied to NCHW, as its input was
_CHECKED_CALLS: dict[tuple, bool] = {}


def _remember_checked(key: tuple, keeps_layout: bool, limit: int = 1024) -> None:
    if len(_CHECKED_CALLS) >= limit:
        _CHECKED_CALLS.clear()
    _CHECKED_CALLS[key] = keeps_layout


def _plain_eager_state() -> bool:
    """No torch.compile trace, torch.func transform, forward-mode AD, jit trace or autocast
    (of any device) now: the state in which a repeated call may skip its checks (tensors
    wrapped by a transform exist only inside one; a dispatch mode sends the kernels' repeat to
    the full call)."""
    return not (torch.compiler.is_compiling() or dual_level_open() or torch._C._is_tracing()
                or torch._C._functorch.peek_interpreter_stack() is not None or torch._C._is_any_autocast_enabled())


FUNC_TRANSFORM = "a torch.func transform (vmap, grad, jvp): the kernels read raw pointers"
FORWARD_AD = "forward-mode AD (dual tensors): the kernels have no jvp"
JIT_TRACE = "torch.jit.trace (it would record the kernels' launch with the traced sizes as tensors)"


def dual_level_open() -> bool:
    """Whether forward-mode AD may have given tensors tangents (a dual level is open)."""
    return _forward_ad._current_level >= 0


def has_tangent(*tensors: torch.Tensor | None) -> bool:
    """Whether forward-mode AD gives any of ``tensors`` (None: absent) a tangent."""
    return dual_level_open() and any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
                                     for t in tensors)


def transform_reason(*tensors: torch.Tensor | None) -> str | None:
    """Why the kernels, which read raw pointers and have no jvp, cannot serve a call on
    ``tensors`` (None: absent) here, or None: a torch.func transform, forward-mode AD, or
    ``torch.jit.trace``, which would record the launch with the traced sizes as tensors."""
    if func_transformed(*tensors):
        return FUNC_TRANSFORM
    if has_tangent(*tensors):
        return FORWARD_AD
    if torch.jit.is_tracing():
        return JIT_TRACE
    return None


def func_transformed(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` (None: absent) is wrapped by a torch.func transform, whose
    storage the kernels cannot read (never while torch.compile traces: its tensors are fake,
    and it cannot trace this check)."""
    return not torch.compiler.is_compiling() and any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def note_fallback(module: nn.Module, label: str, reason: str) -> None:
    """``module``'s call takes the reference path for ``reason``: a warning, once per kind of
    module and reason (its numbers aside: a shape's sizes), where ``backend='triton'`` asked
    for the kernels; a debug log otherwise."""
    if torch.compiler.is_compiling():  # warnings and logging would break a fullgraph trace; eager calls report
        return
    key = (type(module).__name__, re.sub(r"\d+", "#", reason))
    if module.backend == "triton" and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{label}: backend='triton' falls back to the PyTorch reference: {reason}", stacklevel=4)
    logger.debug("%s: reference path: %s", label, reason)


@functools.lru_cache(maxsize=None)
def _kernels_module():
    """``dds_fast.kernels.conv2d``, or why it cannot be imported (looked up once: a layer asks
    on every call)."""
    try:
        import triton  # noqa: F401 (first: its failures, not our kernels', leave the reference path)
    except Exception as error:  # no Triton on this platform, or one that fails to start: the reference serves
        return f"Triton is not available ({type(error).__name__}: {error})"
    try:
        from .kernels import conv2d  # (its own errors, other than a Triton too old for it, are bugs: raised)
    except ImportError as error:
        return f"Triton is not available ({type(error).__name__}: {error})"
    return conv2d


# Imported with the package, not at the first kernel call: FlopCounterMode copies the flop
# formulas' registry when it is created, so formulas registered inside one would go uncounted.
_kernels_module()


def name_layers(model: nn.Module) -> nn.Module:
    """Give every SlimConv2d its qualified name, so errors say which layer failed."""
    for name, module in model.named_modules():
        if isinstance(module, SlimConv2d):
            module.layer_name = name or "SlimConv2d"
    return model


def _slim_from(conv: nn.Conv2d, backend: str) -> SlimConv2d:
    # Built on the meta device so no weight is allocated, then the original Parameters are
    # attached: the converted model shares them with the old one.
    slim = SlimConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                      backend=backend)
    slim.weight = conv.weight
    slim.bias = conv.bias
    slim.train(conv.training)
    return slim


def convert_model(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` (in place) by a SlimConv2d sharing its Parameters.

    Outputs at full width are unchanged. Grouped convs (``groups > 1``) cannot be slimmed by
    channel prefix and are left as they are, and so are subclasses of ``nn.Conv2d`` and convs
    with hooks (``torch.nn.utils.weight_norm``, say), whose forward may do more than a
    convolution. A conv reachable by several names becomes one SlimConv2d. Returns ``model``
    (a new module when ``model`` itself is an ``nn.Conv2d``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert_model: model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"convert_model: backend must be one of {BACKENDS}, got {backend!r}")

    def convertible(module: nn.Module) -> bool:
        if type(module) is not nn.Conv2d:
            return False
        if {"forward", "_conv_forward"} & set(vars(module)):  # replaced on the instance: it may do more
            logger.debug("convert_model: leaving conv %s with a forward of its own as nn.Conv2d", module)
            return False
        if module.groups != 1:
            logger.debug("convert_model: leaving grouped conv %s as nn.Conv2d", module)
            return False
        # hooks belong to the old module (weight_norm's pre-hook even rebuilds .weight, which is
        # then no Parameter to share); a copy without them would compute something else
        if (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks):
            logger.debug("convert_model: leaving conv %s with hooks as nn.Conv2d", module)
            return False
        # anything else it holds (parameters, buffers, submodules, state_dict hooks, a weight
        # that is no Parameter) the copy would drop
        if (set(module._parameters) - {"weight", "bias"} or module._buffers or module._modules
                or module._state_dict_hooks or module._state_dict_pre_hooks or module._load_state_dict_pre_hooks
                or module._load_state_dict_post_hooks or not isinstance(module.weight, nn.Parameter)):
            logger.debug("convert_model: leaving conv %s with state of its own as nn.Conv2d", module)
            return False
        return True

    if convertible(model):
        return name_layers(_slim_from(model, backend))
    converted: dict[nn.Module, SlimConv2d] = {}  # a shared conv must stay one module, one width
    for parent in list(model.modules()):
        # _modules, not named_children(): that lists a module held under two names only once
        for child_name, child in list(parent._modules.items()):
            if convertible(child):
                if child not in converted:
                    converted[child] = _slim_from(child, backend)
                setattr(parent, child_name, converted[child])
    return name_layers(model)
