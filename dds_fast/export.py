"""Export one width configuration as a static network of plain narrow convolutions."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .config import SubnetConfig
from .cost import _at_config, trace_convs
from .ddsnet import DDSNet
from .nets import SlimNet
from .slim_conv import SlimConv2d, apply_epilogue, epilogue_repr


class StaticConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with exactly the narrow shapes of one SlimConv2d slice.

    It keeps the SlimConv2d calling convention (a list input is concatenated, the optional
    residual and activation follow the conv, then an upsampling conv's pixel shuffle) and runs
    the stock PyTorch convolution (cuDNN on a GPU) on its own contiguous weight: the fair
    static baseline.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode,
                 activation, negative_slope, upscale_factor=1, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode,
                         device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope
        self.upscale_factor = upscale_factor

    def extra_repr(self) -> str:
        upscale = [f"upscale_factor={self.upscale_factor}"] if self.upscale_factor > 1 else []
        return ", ".join([super().extra_repr()] + epilogue_repr(self.activation, self.negative_slope) + upscale)

    def forward(self, x, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            x = torch.cat(list(x), 1)
        return apply_epilogue(super().forward(x), residual, self.activation, self.negative_slope, self.upscale_factor)


# a module's hooks, and the flag without which torch runs none of its backward hooks
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


_WEIGHT_HOOKS = (WeightNorm, SpectralNorm)


def _static_from(slim: SlimConv2d, in_widths: tuple[int, ...], out_width: int) -> StaticConv2d:
    # read once: in train mode each read of a parametrized weight (spectral_norm) steps its
    # power iteration, so a second read would leave the layer one step past its copy
    weight = slim.active_weight(in_widths, out_width)
    # (from the parameters it is computed from: a view's flag is off under no_grad)
    weight_requires_grad = any(p.requires_grad for name, p in slim.named_parameters()
                               if name == "weight" or name.startswith("parametrizations.weight."))
    # built on the meta device: no random initial weights (the copy's replace them), so the
    # caller's random stream stays as it was
    static = StaticConv2d(sum(in_widths), out_width, slim.kernel_size, slim.stride, slim.padding, slim.dilation,
                          slim.bias is not None, slim.padding_mode, slim.activation, slim.negative_slope,
                          slim.upscale_factor, device="meta", dtype=weight.dtype).to_empty(device=weight.device)
    with torch.no_grad():
        static.weight.copy_(weight)
        if slim.bias is not None:
            static.bias.copy_(slim.bias[:out_width])
    static.weight.requires_grad_(weight_requires_grad)
    if slim.bias is not None:
        static.bias.requires_grad_(slim.bias.requires_grad)
    # the layer's hooks run on its static copy, as deepcopy keeps every other module's
    for table in _HOOK_TABLES:
        setattr(static, table, copy.copy(getattr(slim, table)))
    static.train(slim.training)
    return static



def export_static(model: nn.Module, config: SubnetConfig | Mapping[str, int] | None = None,
                  input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """A copy of ``model`` in which every SlimConv2d becomes a StaticConv2d with the narrow
    shapes it has at ``config`` (default: the active config) and copied weights.

    The copy computes the same outputs, shares no Parameters with ``model`` and can no
    longer change width. ``input_shape`` is only needed for models without ``in_channels``.
    A DDSNet is refused: export one of its routes from its ``supernet`` (with the gate's
    attention on, from ``AttentionSupernet(model.supernet, model.gate)``, whose body runs on
    the attended features as the DDSNet's does).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export_static: model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        where = f" ({name!r} of the model)" if name else ""
        if isinstance(module, DDSNet):  # its layers run at each image's own route: no one static shape
            route = ("AttentionSupernet(model.supernet, model.gate)" if module.gate.attention else "model.supernet")
            raise ValueError(f"export_static: a DDSNet{where} routes each image to a config of its own; export one "
                             f"route as export_static({route}, model.routing_space[index].config)")
        # masked layers run at full width: set_config says which slice to export
        if isinstance(module, SlimNet) and module.masked:
            raise ValueError(f"export_static: the network{where} runs masked widths (set_masked_widths); call "
                             f"set_config with the config to export first")
        if isinstance(module, SlimConv2d) and module.output_mask is not None:
            raise ValueError(f"export_static: layer{where} has an output_mask, which a static layer cannot hold; "
                             f"clear it (or set_config on its network) first")
        # (their hooks recompute the weight from parameters the static copy does not have)
        if isinstance(module, SlimConv2d) and any(isinstance(hook, _WEIGHT_HOOKS)
                                                  for hook in module._forward_pre_hooks.values()):
            raise ValueError(f"export_static: layer{where} has torch.nn.utils.weight_norm's or spectral_norm's "
                             f"hook; use torch.nn.utils.parametrizations.weight_norm or spectral_norm, which export, "
                             f"or remove_weight_norm / remove_spectral_norm first")
        # (torch.nn.utils.prune's weight_orig and weight_mask, say: the static copy holds a weight and a bias)
        extra = isinstance(module, SlimConv2d) and sorted(set(module._parameters) - {"weight", "bias"}
                                                          | set(module._buffers))
        if extra:
            raise ValueError(f"export_static: layer{where} holds {extra} beside its weight and bias, which its static "
                             f"copy would not have (a pruned layer: torch.nn.utils.prune.remove it first)")
    calls, _ = trace_convs(model, config, input_shape)
    shapes: dict[SlimConv2d, tuple[tuple[int, ...], int]] = {}
    for call in calls:
        if not isinstance(call.module, SlimConv2d):
            continue
        shape = (call.in_widths, call.out_width)
        if shapes.setdefault(call.module, shape) != shape:
            raise ValueError(f"export_static: layer {call.name!r} runs at two widths in one forward "
                             f"({shapes[call.module]} and {shape}); it has no single static shape")

    # every super-network in the model, the model itself or one inside it (an
    # AttentionSupernet's), is frozen at the config it ran in the traced forward
    with _at_config(model, config):
        nets = [net for net in model.modules() if isinstance(net, SlimNet)]
        for net in nets:
            net.check_widths("export_static")
        net_configs = {net: net.get_config() for net in nets}
    memo = {id(module): _static_from(module, *shape) for module, shape in shapes.items()}
    static = copy.deepcopy(model, memo)
    for net, net_config in net_configs.items():
        frozen = memo[id(net)]
        frozen._bindings = []
        frozen._config = net_config
    return static
