"""DynamicGate: the DDS-Net gate that picks, per noisy image, which sub-network runs.

Eq. 8-10 of DDS-Net (Jiang et al., IEEE TIP 2023), behind the first conv block:

- squeeze ``U = mean_{H,W}(X)`` and ``R = relu(W1 U + b1)``;
- attention head ``X~ = X * (1 + tanh(W2 R + b2))`` (per image and channel);
- prediction head ``P = softmax(W4 relu(BN(W3 R + b3)) + b4)``; ``choice = argmax P``, the
  index of one of the ``num_choices`` candidate sub-networks.

``attention`` is on while the super-network trains (stage 1, through an
``AttentionSupernet``, which trains W1 and W2 with it) and off while the gate trains (stage
3, when ``X~ = X``); a DDSNet whose body was trained behind the scale then runs behind it.

Backends. The fused Triton kernels (``dds_fast.kernels.gate``: the squeeze, unless the
producing conv's epilogue already summed the channels (``channel_sums``, as in a DDSNet);
both heads with the eval BatchNorm applied from its running statistics, softmax and argmax
in one launch; the scale in another when attention is on) are an inference path: they run
when the module is in eval mode and no gradient is
needed (``torch.no_grad``/``inference_mode``, or nothing requires grad). Training and any
call that needs gradients use the reference torch ops with autograd, whatever the backend:
in train mode BatchNorm normalises with batch statistics, which the fused eval path cannot
reproduce, and the gate's cost in training is a few tiny matrix products plus one
elementwise pass over ``X``, next to which hand-written backward kernels would save little
and add a second implementation to keep right. ``backend='auto'`` takes the fused path for
CUDA tensors, ``'triton'`` also on the CPU (under ``TRITON_INTERPRET=1``), ``'torch'`` never.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import checked_int
from .slim_conv import FORWARD_AD, _kernels_module, dual_level_open, has_tangent, note_fallback, transform_reason

__all__ = ["DynamicGate", "GateOutput"]

BACKENDS = ("auto", "torch", "triton")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 and others take the reference path


class GateOutput(NamedTuple):
    """What ``DynamicGate.forward`` returns.

    - ``features``: ``X~`` (``x`` itself when attention is off), dtype and layout of ``x``;
    - ``scale``: ``[N, C]`` per-channel factor ``1 + tanh(W2 R + b2)`` (ones when attention is
      off);
    - ``logits``, ``probs``: ``[N, E]``;
    ``scale``, ``logits`` and ``probs`` are fp32 on every path (fp64 for fp64 parameters on the
    reference path): both paths do the heads' math in at least fp32;
    - ``choice``: ``[N]`` int32 (on every path), the argmax of the logits, on the device of ``x``.
    An image holding a NaN gets NaN logits and probs (and scale, with attention on) and
    choice 0 (torch's argmax takes the first NaN), so a DDSNet's output for it is NaN: a
    corrupt image gets no confident route. Both paths agree on it, and on infinite values.
    """
    features: torch.Tensor
    scale: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    choice: torch.Tensor


class DynamicGate(nn.Module):
    """The DDS-Net dynamic gate over ``channels`` input channels and ``num_choices`` sub-networks.

    ``reduction``: the squeeze width is ``max(1, channels // reduction)``; ``hidden``: width of
    the prediction head's BatchNorm layer, default ``max(16, channels // reduction)``.
    Parameters: ``fc1`` (W1, b1), ``fc2`` (W2, b2), ``fc3`` (W3, b3), ``bn``, ``fc4`` (W4, b4).

    ``attention`` (True or False; True when built) switches the attention head: on, the
    features come out scaled by ``1 + tanh(W2 R + b2)``, which is 1 until W2 and b2 (zero
    when built) have trained; off, they come out as they went in. A DDSNet whose gate has
    attention on runs each route's body on the scaled features: export such a route with
    ``export_static(AttentionSupernet(supernet, gate), config)``.
    """

    def __init__(self, channels: int, num_choices: int, reduction: int = 4, hidden: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        channels = checked_int(channels, "channels", "DynamicGate")
        num_choices = checked_int(num_choices, "num_choices", "DynamicGate", low=2)
        reduction = checked_int(reduction, "reduction", "DynamicGate")
        hidden = None if hidden is None else checked_int(hidden, "hidden", "DynamicGate")
        reduced = max(1, channels // reduction)
        hidden = max(16, channels // reduction) if hidden is None else hidden
        self.channels, self.num_choices, self.reduced, self.hidden = channels, num_choices, reduced, hidden
        self.reduction = reduction
        self.backend = backend
        self.attention = True
        self.fc1 = nn.Linear(channels, reduced)
        self.fc2 = nn.Linear(reduced, channels)
        self.fc3 = nn.Linear(reduced, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc4 = nn.Linear(hidden, num_choices)
        # Zero W2, b2: the scale starts at 1 + tanh(0) = 1, so a gate inserted behind a
        # trained stem leaves the network's output unchanged until the attention learns.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def __setattr__(self, name, value):
        # checked when assigned after construction too (a string attention was truthy)
        if name == "backend" and value not in BACKENDS:
            raise ValueError(f"DynamicGate: backend must be one of {BACKENDS}, got {value!r}")
        if name == "attention" and not isinstance(value, bool):
            raise ValueError(f"DynamicGate: attention must be true or false, got {value!r}")
        super().__setattr__(name, value)

    @property
    def arch_args(self) -> dict:
        """The constructor arguments a checkpoint rebuilds the gate from (``DynamicGate(**arch_args)``)."""
        return {"channels": self.channels, "num_choices": self.num_choices, "reduction": self.reduction,
                "hidden": self.hidden}

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_choices={self.num_choices}, reduced={self.reduced}, "
                f"hidden={self.hidden}, attention={self.attention}, backend={self.backend!r}")

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DynamicGate: input must be a 4-D tensor [N, {self.channels}, H, W], got {shape}")
        if x.layout != torch.strided:
            raise ValueError(f"DynamicGate: input is a {x.layout} tensor; the gate takes dense tensors")
        if x.shape[1] != self.channels:
            raise ValueError(f"DynamicGate: input has {x.shape[1]} channels, the gate was built for {self.channels}")
        if x.numel() == 0:
            raise ValueError(f"DynamicGate: input is empty, shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"DynamicGate: input must be floating point, got {x.dtype}")

    def _fused(self, x: torch.Tensor, means: torch.Tensor | None = None) -> bool:
        # (without running statistics the BatchNorm normalises by the batch's, in eval mode too)
        if self.backend == "torch" or self.training or self.bn.training or self.bn.running_mean is None:
            return False
        if (self.backend == "auto" and not x.is_cuda) or x.dtype not in _FUSED_DTYPES:
            return False
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            # the kernels are no registered op: a trace, fake tensors or FlopCounterMode get the reference ops
            return False
        if x.is_neg():  # a lazily negated view: torch reads its values, the kernels its memory
            return False
        unavailable = _kernels_module()
        if isinstance(unavailable, str):  # no Triton on this platform
            note_fallback(self, "DynamicGate", unavailable)
            return False
        inputs = (x,) if means is None else (x, means)
        # (a torch.func transform over the parameters wraps every one; forward AD may give any a tangent)
        reason = transform_reason(*inputs, self.fc1.weight)
        if reason is None and dual_level_open() and has_tangent(*self.parameters()):
            reason = FORWARD_AD
        if reason is not None:
            note_fallback(self, "DynamicGate", reason)
            return False
        from dds_fast.kernels.gate import MAX_BATCH
        if len(x) > MAX_BATCH:  # beyond the kernels' grid: the reference path, as the convs fall back
            return False
        # the kernels have no backward: anything that needs a gradient takes autograd's path
        return not (torch.is_grad_enabled() and (any(t.requires_grad for t in inputs)
                                                 or any(p.requires_grad for p in self.parameters())))

    def forward(self, x: torch.Tensor, channel_sums: torch.Tensor | None = None,
                means: torch.Tensor | None = None) -> GateOutput:
        """``channel_sums``: optional fp32 ``[N, T, C]`` sums of ``x`` over T blocks of its
        pixels (what ``SlimConv2d.emit_channel_sums`` leaves behind), which the fused path then
        reads instead of squeezing ``x`` itself; the reference path ignores them. ``means``:
        optional ``[N, C]`` channel means that both paths take as the squeeze ``U`` instead
        of ``x``'s own (a tile of a large image given the whole image's, so that every tile
        gets the whole image's choice and scale)."""
        self._check_input(x)
        self._check_means(x, means)
        if not self._fused(x, means):  # (the fused path needs an eval BatchNorm: no check costs it host time)
            if len(x) < 2 and (self.bn.training or self.bn.running_mean is None):  # (torch's message says less)
                if self.bn.training:
                    raise ValueError("DynamicGate: its BatchNorm in training mode needs 2 or more images, got 1; "
                                     "call .eval() on the model for inference")
                raise ValueError("DynamicGate: its BatchNorm keeps no running statistics "
                                 "(track_running_stats=False), so it normalises over the batch, in eval mode too: "
                                 "it needs 2 or more images, got 1")
            return self._forward_reference(x, means)
        if means is not None:
            channel_sums = means.float()[:, None, :]
        elif channel_sums is not None and (not isinstance(channel_sums, torch.Tensor) or channel_sums.dim() != 3
                                           or channel_sums.shape[0] != x.shape[0]
                                           or channel_sums.shape[2] != self.channels
                                           or channel_sums.dtype != torch.float32):
            got = f"{channel_sums.dtype} {tuple(channel_sums.shape)}" if isinstance(channel_sums, torch.Tensor) \
                else type(channel_sums).__name__
            raise ValueError(f"DynamicGate: channel_sums must be fp32 [{x.shape[0]}, T, {self.channels}], got {got}")
        return self._forward_fused(x, channel_sums, 1 if means is not None else x.shape[2] * x.shape[3])

    def _check_means(self, x: torch.Tensor, means: torch.Tensor | None) -> None:
        if means is not None and (not isinstance(means, torch.Tensor) or means.shape != (len(x), self.channels)
                                  or not means.is_floating_point() or means.device != x.device):
            got = f"{means.dtype} {tuple(means.shape)} on {means.device}" if isinstance(means, torch.Tensor) \
                else type(means).__name__
            raise ValueError(f"DynamicGate: means must be a floating-point [{len(x)}, {self.channels}] tensor on "
                             f"{x.device}, got {got}")

    def _head_dtype(self) -> torch.dtype:
        return torch.promote_types(self.fc1.weight.dtype, torch.float32)

    @staticmethod
    def _linear(layer: nn.Linear, r: torch.Tensor) -> torch.Tensor:
        if layer.weight.dtype == r.dtype:  # (a .to() that changes nothing still costs host time)
            return layer(r)
        return F.linear(r, layer.weight.to(r.dtype), layer.bias.to(r.dtype))

    def _batch_norm(self, h: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        held = bn.weight if bn.weight is not None else bn.running_mean  # (neither without affine or statistics)
        if held is None or held.dtype == h.dtype:
            return bn(h)
        # in h's dtype (at least fp32: an fp16 BatchNorm overflows)
        if not bn.training:  # (without running statistics, eval mode normalises by the batch's too)
            def cast(t):
                return None if t is None else t.to(h.dtype)
            return F.batch_norm(h, cast(bn.running_mean), cast(bn.running_var), cast(bn.weight), cast(bn.bias),
                                bn.running_mean is None, 0.0, bn.eps)
        # on copies of the running statistics, which the step's update is then written back from
        tensors = {**dict(bn.named_parameters()), **dict(bn.named_buffers())}
        cast = {name: t.to(h.dtype) if t.is_floating_point() else t for name, t in tensors.items()}
        out = torch.func.functional_call(bn, cast, (h,))
        if bn.track_running_stats:
            with torch.no_grad():
                for name, buffer in bn.named_buffers():
                    if buffer.is_floating_point():
                        buffer.copy_(cast[name])
        return out

    def _squeeze(self, x: torch.Tensor, means: torch.Tensor | None = None) -> torch.Tensor:
        """``R = relu(W1 U + b1)``, the input of both heads, in at least fp32 as the fused
        kernel computes it: in fp16 a BatchNorm of small running variance overflows in the
        prediction head, and the route would depend on which path ran."""
        dtype = self._head_dtype()
        u = x.mean(dim=(2, 3), dtype=dtype) if means is None else means if means.dtype == dtype else means.to(dtype)
        return F.relu(self._linear(self.fc1, u))

    def _excite(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 1 + tanh(z) as the kernel computes it: it keeps a tiny scale tiny, where 1 + tanh rounds to 0
        scale = 2 * torch.sigmoid(2 * self._linear(self.fc2, r))
        features = x * scale[:, :, None, None]
        return features if features.dtype == x.dtype else features.to(x.dtype), scale

    def attend(self, x: torch.Tensor, means: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention head alone, through the reference ops with autograd: ``(X~, scale)``.
        Stage 1 trains it with the super-network, before the prediction head has any use.
        ``means`` as in ``forward``."""
        self._check_input(x)
        self._check_means(x, means)
        with _without_autocast(x.device):
            return self._excite(x, self._squeeze(x, means))

    def _forward_reference(self, x: torch.Tensor, means: torch.Tensor | None) -> GateOutput:
        with _without_autocast(x.device):
            return self._heads_reference(x, means)

    def _heads_reference(self, x: torch.Tensor, means: torch.Tensor | None) -> GateOutput:
        r = self._squeeze(x, means)
        if self.attention:
            features, scale = self._excite(x, r)
        else:
            scale = torch.ones(len(x), self.channels, dtype=r.dtype, device=r.device)
            features = x
        logits = self._linear(self.fc4, F.relu(self._batch_norm(self._linear(self.fc3, r))))
        return GateOutput(features, scale, logits, F.softmax(logits, dim=1), logits.argmax(dim=1).to(torch.int32))

    def _forward_fused(self, x: torch.Tensor, channel_sums: torch.Tensor | None, pixels: int) -> GateOutput:
        """``pixels``: how many pixels ``channel_sums`` sum over (1 for means)."""
        from dds_fast.kernels import gate as kernels  # imports Triton only when it is used

        partials = kernels.squeeze_partials(x) if channel_sums is None else channel_sums
        head = kernels.gate_head(partials, pixels, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                 self.fc2.bias, self.fc3.weight, self.fc3.bias, kernels.BatchNormStats.of(self.bn),
                                 self.fc4.weight, self.fc4.bias, attention=self.attention)
        features = kernels.apply_scale(x, head.scale) if self.attention else x
        return GateOutput(features, *head)


def _without_autocast(device: torch.device):
    """The heads' math stays in fp32 under autocast too, as the fused kernel does it."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
