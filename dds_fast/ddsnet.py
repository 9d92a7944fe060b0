"""DDSNet: a slimmable super-network, a dynamic gate behind its stem, and a routing space.

Dynamic mode: the stem runs at full width, the gate reads it and picks a config index per
image, and each image runs the body of its chosen sub-network on the prefix of the stem's
output (which equals the narrow stem's output: filter j of a conv depends on filter j only).
Static mode (``set_budget``): every image runs the best config within a MACs budget (alone
when the gate's attention is off; behind the full-width stem and the gate's attention scale
when it is on, since the body was trained on scaled features).

Two paths give the same result. On CUDA with the Triton backend (and no gradient), every
layer runs once for the whole batch, reading each image's widths from a device table indexed
by the gate's choice: no host sync, so the forward can be captured in one CUDA graph. Else
the batch is grouped by chosen config (one host sync per forward). With ``route_branches`` on,
a forward captured in a CUDA graph routes through conditional graph nodes instead: one branch
per route, taken when every image chose that route (its static launches alone: no per-image
tiles, no max-width buffers), and the per-image body for a batch that mixes routes
(``graph_if``: torch's conditional nodes, or where torch has none, as in torch 2.11, the CUDA
driver's through cuda-python).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Sequence

import torch
from torch import nn

from .config import RoutingEntry, checked_int, checked_routing_space, exact_int
from .cost import _at_config, trace_convs
from .gate import DynamicGate, GateOutput
from .graph_if import (capturing_graph, conditional_graph_nodes, conditional_nodes_unavailable_reason, driver_if_nodes,
                       torch_if_nodes)
from .nets import ARCHITECTURES, SlimNet, module_tree, register_architecture, tree_changed
from .slim_conv import PackedBuffers, SlimConv2d, _kernels_module


PER_IMAGE_TILES = ("widest", "narrowest")
_BRANCHES_WARNED: set[str] = set()  # why route_branches could not hold: said once each
WARMED_BRANCH_KEYS = 64  # input signatures whose route branches a DDSNet remembers warming, the latest


def _padded_full_stem_input(supernet: SlimNet, x: torch.Tensor) -> torch.Tensor:
    """``x`` checked and padded for ``supernet``, which is left at its largest config: the
    stem a gate reads runs at full width whatever config the body then runs."""
    supernet.check_input(x)
    supernet.set_config(supernet.space.largest())
    return supernet.pad(x)


def _full_width_stem(supernet: SlimNet):
    """``supernet`` at its largest config for the stem a gate reads, its config restored after
    (an error caught must not leave the next training step at the largest config); an
    ``export_static`` copy's stem was exported at full width, and stays as it is."""
    return contextlib.nullcontext() if supernet.is_static else _at_config(supernet, supernet.space.largest())


@torch.no_grad()
def _tiled_stem_means(supernet: SlimNet, x: torch.Tensor, block: int) -> torch.Tensor:
    """The fp32 ``[N, C]`` channel means of the full-width stem's output over the padded ``x``
    (the gate's squeeze), the stem run on ``block`` x ``block`` pixels at a time with its
    context, so that memory stays bounded for a large image."""
    block = checked_int(block, "block", "stem_means")
    supernet.check_input(x)
    # the full-width stem, and the network left as it was: under set_masked_widths (which
    # set_config would end) the stem already runs at full width, behind its output mask
    stem = supernet.stem_conv
    masked = supernet.masked
    if masked:
        mask, stem.output_mask = stem.output_mask, None
    try:
        with contextlib.nullcontext() if masked else _full_width_stem(supernet):
            padded = supernet.pad(x)
            radius = stem.kernel_size[0] // 2
            h, w = padded.shape[-2:]
            # (circular padding wraps to the image's far side, which a tile does not hold)
            local = stem.stride == (1, 1) and stem.dilation == (1, 1) and stem.padding in ("same", (radius, radius)) \
                and stem.kernel_size[0] == stem.kernel_size[1] and stem.padding_mode != "circular"
            if not local:  # an output pixel is not its input pixel with `radius` of context: no tiles
                block = max(h, w)
            total = torch.zeros(len(x), supernet.stem_channels, dtype=torch.float64, device=x.device)
            pixels = 0  # of the stem's output, which a strided stem makes fewer than the input's
            for top in range(0, h, block):
                for left in range(0, w, block):
                    y0, x0 = max(0, top - radius), max(0, left - radius)
                    out = supernet.stem(padded[..., y0:min(h, top + block + radius), x0:min(w, left + block + radius)])
                    core = out[..., top - y0:top - y0 + block, left - x0:left - x0 + block]
                    # an fp32 sum per block (a float64 one ran 8x slower on a CPU), then added in float64
                    total += core.sum(dim=(2, 3), dtype=torch.promote_types(core.dtype, torch.float32))
                    pixels += core.shape[-2] * core.shape[-1]
    finally:
        if masked:
            stem.output_mask = mask
    return (total / pixels).float()


def _check_supernet_and_gate(owner: str, supernet, gate) -> None:
    if not isinstance(supernet, SlimNet):
        raise ValueError(f"{owner}: supernet must be a SlimNet, got {type(supernet).__name__}")
    if not isinstance(gate, DynamicGate):
        raise ValueError(f"{owner}: gate must be a DynamicGate, got {type(gate).__name__}")
    # the body of a config reads a prefix of the full-width stem's output, which is the narrow
    # stem's output only when the stem is one conv whose filters its group's width takes
    if type(supernet).stem is not SlimNet.stem:
        raise ValueError(f"{owner}: {type(supernet).__name__} overrides stem; a gate reads the output of the stem "
                         f"conv alone (stem_conv), whose prefix at a config's width is what the body runs on")
    if getattr(supernet.stem_conv, "upscale_factor", 1) != 1:
        raise ValueError(f"{owner}: the stem conv of {type(supernet).__name__} shuffles pixels (upscale_factor); "
                         f"a gate reads a stem with one output channel per filter")
    supernet.stem_group  # (raises where the stem's width is no group's)
    if gate.channels != supernet.stem_channels:
        raise ValueError(f"{owner}: the gate reads {gate.channels} channels but the network's stem has "
                         f"{supernet.stem_channels}")


def _check_attention_on(gate: DynamicGate) -> None:
    # a body behind an attention head that is off would be the super-network alone, not the
    # DDSNet's route this class stands for (which export_static then points to)
    if not gate.attention:
        raise ValueError("AttentionSupernet: its gate's attention head is off (gate.attention=False); with it off "
                         "a config runs on the super-network alone: use the supernet itself")


def _largest_and_stem_filter_macs(supernet: SlimNet) -> tuple[float, float]:
    """MACs per input pixel of ``supernet``'s largest config, and of one filter of its stem (a
    strided stem runs on fewer pixels than the input has)."""
    calls, pixels = trace_convs(supernet, supernet.space.largest())
    stem = next((call for call in calls if call.module is supernet.stem_conv), None)
    if stem is None:
        raise ValueError(f"{type(supernet).__name__}: its forward never ran the stem conv (stem_conv)")
    return sum(call.macs for call in calls) / pixels, stem.macs / stem.out_width / pixels


def _forward_hooks_on(modules: Sequence[nn.Module]) -> bool:
    """Whether a forward hook or pre-hook would see an input or output of ``modules``."""
    hooked = torch.nn.modules.module
    return bool(hooked._global_forward_hooks or hooked._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _supernet_and_gate_args(supernet: SlimNet, gate: DynamicGate) -> dict:
    """The checkpoint arguments of a super-network behind a gate (``_build_supernet`` and
    ``DynamicGate(**gate)`` read them back)."""
    return {"supernet": {"arch": type(supernet).__name__, "args": supernet.arch_args}, "gate": gate.arch_args}


def _build_supernet(owner: str, spec: dict) -> SlimNet:
    net_cls = ARCHITECTURES.get(spec["arch"])
    if net_cls is None or not issubclass(net_cls, SlimNet):
        raise ValueError(f"{owner}: unknown super-network architecture {spec['arch']!r} (a class of your own: import "
                         f"the module that registers it with dds_fast.register_architecture first, on the command "
                         f"line with dds-fast --import MODULE)")
    return net_cls(**spec["args"])


@register_architecture
class AttentionSupernet(nn.Module):
    """A super-network behind a DynamicGate's attention head, as stage 1 trains the two
    together (the attention head is on while the super-network trains, the paper's Section
    III-C): every config runs the full-width stem, the gate scales its features by
    ``1 + tanh(W2 R + b2)``, and the body runs the config on the scaled features' prefix, as
    a DDSNet with attention on runs an image routed to that config. It takes configs, keeps a
    routing space and saves like a SlimNet, so the sandwich rule, progressive slimming and
    the refine stage train and evaluate either; the gate's prediction head stays untrained
    (stage 3's). The gate's attention must stay on: with it off, a config is the super-network
    alone, and a forward refuses it."""

    def __init__(self, supernet: SlimNet, gate: DynamicGate):
        super().__init__()
        _check_supernet_and_gate("AttentionSupernet", supernet, gate)
        _check_attention_on(gate)
        self.supernet, self.gate = supernet, gate
        self._stem_group = supernet.stem_group  # kept: a static export's super-network no longer says

    def __setattr__(self, name, value):
        # a new part is checked against the other, as the constructor checks them (what is
        # derived from the super-network is read from it, so nothing goes stale)
        if name in ("supernet", "gate") and {"supernet", "gate"} <= self._modules.keys():
            supernet, gate = (value, self.gate) if name == "supernet" else (self.supernet, value)
            _check_supernet_and_gate("AttentionSupernet", supernet, gate)
            _check_attention_on(gate)
            super().__setattr__(name, value)
            self._stem_group = supernet.stem_group
            return
        super().__setattr__(name, value)

    @property
    def space(self):
        return self.supernet.space

    @property
    def in_channels(self) -> int:
        return self.supernet.in_channels

    @property
    def size_multiple(self) -> int:
        return self.supernet.size_multiple

    @property
    def stem_channels(self) -> int:
        return self.supernet.stem_channels

    @property
    def is_static(self) -> bool:
        """Whether this is an ``export_static`` copy, whose widths are fixed."""
        return self.supernet.is_static

    @property
    def routing_space(self):
        return self.supernet.routing_space

    @routing_space.setter
    def routing_space(self, entries):
        self.supernet.routing_space = entries

    def set_config(self, config) -> None:
        self.supernet.set_config(config)

    def get_config(self):
        return self.supernet.get_config()

    def binding_widths(self, config) -> list[int]:
        return self.supernet.binding_widths(config)

    def set_masked_widths(self, widths: torch.Tensor) -> None:
        """As ``SlimNet.set_masked_widths``; the stem still runs unmasked, and its mask applies
        to the attended features the body reads."""
        self.supernet.set_masked_widths(widths)

    @property
    def masked(self) -> bool:
        return self.supernet.masked

    @property
    def masked_widths(self) -> torch.Tensor | None:
        return self.supernet.masked_widths

    @property
    def receptive_radius(self) -> int:
        return self.supernet.receptive_radius

    @property
    def arch_args(self) -> dict:
        return _supernet_and_gate_args(self.supernet, self.gate)

    @classmethod
    def from_arch_args(cls, supernet: dict, gate: dict) -> "AttentionSupernet":
        return cls(_build_supernet("AttentionSupernet", supernet), DynamicGate(**gate))

    def stem_means(self, x: torch.Tensor, block: int = 512) -> torch.Tensor:
        """What the gate squeezes from ``x`` (``DDSNet.stem_means``), for ``forward(..., stem_means=)``."""
        return _tiled_stem_means(self.supernet, x, block)

    @property
    def uses_stem_means(self) -> bool:
        """Whether ``forward`` reads the gate's squeeze (``DDSNet.uses_stem_means``): always."""
        return True

    def forward(self, x: torch.Tensor, stem_means: torch.Tensor | None = None) -> torch.Tensor:
        """``stem_means``: the gate's squeeze to use instead of ``x``'s own (``stem_means``)."""
        _check_attention_on(self.gate)  # (switched off since it was built)
        if self.supernet.masked:
            return self._masked_forward(x, stem_means)
        config = self.supernet.get_config()
        self.supernet.check_input(x)
        if x.shape[0] == 0:  # no image for the gate's attention (which refuses an empty input)
            return x.new_empty((0, self.supernet.out_channels, *x.shape[2:]))
        padded = self.supernet.pad(x)
        with _full_width_stem(self.supernet):
            features, _ = self.gate.attend(self.supernet.stem(padded), stem_means)
        out = self.supernet.body(features[:, : config[self._stem_group]], padded)
        return out[..., : x.shape[-2], : x.shape[-1]]

    def _masked_forward(self, x: torch.Tensor, stem_means: torch.Tensor | None) -> torch.Tensor:
        """``forward`` under ``set_masked_widths``: the attention reads the whole stem, and the
        stem's mask then cuts the attended features to the config's width."""
        supernet = self.supernet
        supernet.check_input(x)
        if x.shape[0] == 0:
            return x.new_empty((0, supernet.out_channels, *x.shape[2:]))
        padded = supernet.pad(x)
        stem = supernet.stem_conv
        mask, stem.output_mask = stem.output_mask, None
        try:
            features, _ = self.gate.attend(supernet.stem(padded), stem_means)
        finally:
            stem.output_mask = mask
        out = supernet.body(torch.where(mask, features, 0), padded)  # (inf or NaN past the width: zero too)
        return out[..., : x.shape[-2], : x.shape[-1]]


@register_architecture
class DDSNet(nn.Module):
    """``supernet`` (a SlimNet), ``gate`` (a DynamicGate over the stem's full width with one
    choice per routing entry) and ``routing_space`` (RoutingEntries, index = gate choice).

    The DDSNet drives its super-network's config: a forward or ``route`` leaves it at
    whichever config ran last (putting it back would cost each call another ``set_config``,
    tens of microseconds of host time on a forward that is host-bound at batch 1). Set the
    config of ``supernet`` before using it on its own (``export_static``, MACs). For the same
    reason two threads must not run one DDSNet at once: a lock, or a model each.

    Forward hooks on the body's layers work on both paths; on the per-image path a layer's
    output is one max-width buffer for the batch, in which each image's channels past its
    route's width hold whatever was there (and the buffers are not packed while any hook is
    set, which costs memory traffic). Assigning ``gate`` or ``supernet`` checks the new part
    as the constructor does."""

    def __init__(self, supernet: SlimNet, gate: DynamicGate, routing_space: Sequence[RoutingEntry]):
        super().__init__()
        _check_supernet_and_gate("DDSNet", supernet, gate)
        self.supernet = supernet
        self.gate = gate
        self.in_channels = supernet.in_channels
        self.size_multiple = supernet.size_multiple
        # None: per-image widths on the Triton kernels when the input is on CUDA, no grad is
        # needed and no dispatch mode is on (FlopCounterMode would count each layer's maximum
        # widths: it sees the buffers' shapes); True/False forces the choice (True runs under
        # the interpreter on CPU)
        self.per_image: bool | None = None
        # what the per-image launches size their tiles for: each layer's widest route (a
        # narrow image then wastes most of each tile) or its narrowest (narrow images run as
        # a static launch would, wide ones on more, smaller tiles); the output is the same up
        # to rounding
        self.per_image_tiles = "widest"
        # per-image layers store their outputs packed (each image at its own width's pitch:
        # a narrow image moves the bytes of a narrow buffer, not the max-width one's) where the
        # network allows it (SlimNet.packs_per_image_buffers) and the call runs eagerly
        self.packed_buffers = True
        # a forward captured in a CUDA graph routes through conditional nodes, one branch per
        # route (module docstring; torch's own nodes, or the driver's where torch has none:
        # graph_if); where neither can (``conditional_graph_nodes``), the graph holds the
        # per-image body alone. Off until a GPU run says it wins (NOTES v19).
        self.route_branches = False
        self._stem_group = supernet.stem_group
        self.supernet_macs_per_pixel, self._stem_filter_macs = _largest_and_stem_filter_macs(supernet)
        self.routing_space = routing_space

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_stem_filter_macs" not in state:  # a whole-module pickle of an earlier version
            self._stem_filter_macs = _largest_and_stem_filter_macs(self.supernet)[1]
        # (earlier trees held no names)
        if "_body_modules" not in state or len(state.get("_supernet_tree", ((),))[0]) != 3:
            self.routing_space, budget = self._routing_space, self._budget_index
            self._budget_index = budget

    def __setattr__(self, name, value):
        if name in ("supernet", "gate") and "_routing_space" in self.__dict__:
            self._replace_part(name, value)
        else:
            super().__setattr__(name, value)

    def _replace_part(self, name: str, part: nn.Module) -> None:
        """A new super-network or gate, checked as the constructor checks them against the
        other and the routing space; what is derived from the super-network is rebuilt."""
        supernet, gate = (part, self.gate) if name == "supernet" else (self.supernet, part)
        _check_supernet_and_gate("DDSNet", supernet, gate)
        if gate.num_choices != len(self._routing_space):
            raise ValueError(f"DDSNet: the gate chooses among {gate.num_choices} sub-networks but the routing "
                             f"space has {len(self._routing_space)}")
        checked_routing_space("DDSNet", supernet.space, self._routing_space)
        # what can fail first (a forward): a refused part leaves the DDSNet as it was
        macs = _largest_and_stem_filter_macs(supernet) if name == "supernet" else None
        nn.Module.__setattr__(self, name, part)
        if name == "supernet":
            budget = self._budget_index
            self.in_channels, self.size_multiple = supernet.in_channels, supernet.size_multiple
            self._stem_group = supernet.stem_group
            self.supernet_macs_per_pixel, self._stem_filter_macs = macs
            self.routing_space = self._routing_space  # the width tables name the old layers
            self._budget_index = budget

    @property
    def routing_space(self) -> tuple[RoutingEntry, ...]:
        """The candidate sub-networks, in the order of the gate's choices. Setting it checks
        the entries against the gate and the super-network; what is derived from them
        (``dynamic_macs_per_pixel``, the per-image width tables) is rebuilt, and a budget, an
        index into the old space, is dropped: the model returns to dynamic mode. CUDA graphs
        captured before keep reading the old tables (kept alive for them): capture them again
        to route by the new space."""
        return self._routing_space

    @routing_space.setter
    def routing_space(self, entries: Sequence[RoutingEntry]) -> None:
        entries = checked_routing_space("DDSNet", self.supernet.space, entries)
        if not entries:
            raise ValueError("DDSNet: the routing space is empty")
        if self.gate.num_choices != len(entries):
            raise ValueError(f"DDSNet: the gate chooses among {self.gate.num_choices} sub-networks but the routing "
                             f"space has {len(entries)}")
        self._routing_space = entries
        # the stem runs at full width in dynamic mode, whatever the config: count that
        full = self.supernet.stem_channels
        self.dynamic_macs_per_pixel = [e.macs_per_pixel + self._stem_filter_macs * (full - e.config[self._stem_group])
                                       for e in self._routing_space]
        # per device; a CUDA graph captured before holds the old ones' addresses: never freed (the
        # table tensors alone, not the layers they name, which may be an old super-network's)
        self._retired_tables = [*getattr(self, "_retired_tables", []),
                                *(table for table, _ in getattr(self, "_tables", {}).values() if table.is_cuda)]
        self._tables: dict[torch.device, tuple[torch.Tensor, list]] = {}
        self._per_image_trace = None  # (_per_image_rows)
        # what a per-image forward asks for hooks (the packing body calls SlimConv2d layers alone)
        self._body_modules = tuple(m for m in self.supernet.modules() if isinstance(m, SlimConv2d))
        self._supernet_tree = module_tree(self.supernet)
        self._warmed_branches: dict[tuple, tuple[torch.dtype, torch.memory_format, tuple]] = {}
        self._budget_index: int | None = None

    # -- checkpoints --------------------------------------------------------------------
    @property
    def arch_args(self) -> dict:
        # static mode is how the model runs, so a checkpoint keeps it (and only then names it:
        # a dynamic model's file stays readable by versions before it)
        budget = {} if self._budget_index is None else {"budget_index": self._budget_index}
        return {**_supernet_and_gate_args(self.supernet, self.gate), "attention": self.gate.attention,
                "routing_space": [entry.to_dict() for entry in self.routing_space], **budget}

    @classmethod
    def from_arch_args(cls, supernet: dict, gate: dict, attention: bool, routing_space: list,
                       budget_index: int | None = None) -> "DDSNet":
        dynamic_gate = DynamicGate(**gate)
        dynamic_gate.attention = attention  # (checked there: a truthy string such as "false" would turn it on)
        model = cls(_build_supernet("DDSNet", supernet), dynamic_gate, [RoutingEntry.from_dict(e) for e in routing_space])
        if budget_index is not None:
            index = checked_int(budget_index, "budget_index", "DDSNet", low=0)
            if index >= len(model.routing_space):
                raise ValueError(f"DDSNet: budget_index {index} is past the {len(model.routing_space)} routes")
            model._budget_index = index
        return model

    @property
    def receptive_radius(self) -> int:
        return self.supernet.receptive_radius

    # -- routing ------------------------------------------------------------------------
    def static_macs_per_pixel(self, index: int) -> float:
        """MACs/pixel of static mode at routing index ``index``: the config alone, or, with
        the gate's attention on, the config behind the full-width stem the gate reads."""
        routes = len(self.routing_space)
        position = exact_int(index)  # numpy and tensor integers too; negative ones count from the end
        if isinstance(position, bool) or not isinstance(position, int) or not -routes <= position < routes:
            raise ValueError(f"DDSNet.static_macs_per_pixel: index must be a routing index from 0 to {routes - 1}, "
                             f"got {index!r}")
        index = position
        return self.dynamic_macs_per_pixel[index] if self.gate.attention else self.routing_space[index].macs_per_pixel

    def extra_repr(self) -> str:
        macs = [e.macs_per_pixel for e in self._routing_space]
        mode = "dynamic" if self._budget_index is None else f"budget: route {self._budget_index}"
        return (f"{len(macs)} routes of {min(macs):,.0f} to {max(macs):,.0f} MACs/pixel, {mode}, "
                f"per_image={self.per_image}")

    def set_budget(self, macs_per_pixel: float | None) -> RoutingEntry | None:
        """Static mode: every image runs the best config whose cost in static mode
        (``static_macs_per_pixel``) is within ``macs_per_pixel`` (the one with the best
        validation PSNR, else the dearest). ``None`` returns to dynamic mode. The costs depend
        on the gate's attention (its full-width stem): set the budget again after changing it."""
        if macs_per_pixel is None:
            self._budget_index = None
            return None
        if isinstance(macs_per_pixel, torch.Tensor) and macs_per_pixel.numel() == 1 \
                and macs_per_pixel.dtype != torch.bool and not macs_per_pixel.is_complex():
            macs_per_pixel = macs_per_pixel.item()  # a budget computed on tensors (expected_macs)
        if isinstance(macs_per_pixel, bool) or not isinstance(macs_per_pixel, numbers.Real) \
                or macs_per_pixel != macs_per_pixel:  # (NaN)
            raise ValueError(f"DDSNet.set_budget: the budget must be a number of MACs/pixel or None, got "
                             f"{macs_per_pixel!r}")
        try:
            macs_per_pixel = float(macs_per_pixel)
        except OverflowError:  # an int past a float's range
            macs_per_pixel = math.inf if macs_per_pixel > 0 else -math.inf
        costs = [self.static_macs_per_pixel(i) for i in range(len(self.routing_space))]
        within = [i for i, cost in enumerate(costs) if cost <= macs_per_pixel]
        if not within:
            attention = " (with the full-width stem the gate's attention reads)" if self.gate.attention else ""
            raise ValueError(f"DDSNet.set_budget: no config fits {macs_per_pixel:,.10g} MACs/pixel; the cheapest "
                             f"costs {min(costs):,.10g}{attention}")
        self._budget_index = max(within, key=lambda i: (  # (dearest: by the cost it was picked by)
            float("-inf") if self.routing_space[i].psnr is None else self.routing_space[i].psnr, costs[i]))
        return self.routing_space[self._budget_index]

    @property
    def budget_index(self) -> int | None:
        """The routing index every image runs in static mode (``set_budget``); None in dynamic mode."""
        return self._budget_index

    def stem_means(self, x: torch.Tensor, block: int = 512) -> torch.Tensor:
        """The fp32 ``[N, C]`` channel means of the full-width stem's output over ``x`` padded
        to the network's ``size_multiple`` (as ``forward`` reads it), the squeeze the gate
        reads, computed ``block`` pixels square at a time. A tile of a large image given them
        (``forward(tile, stem_means=...)``) is routed and scaled as the whole image is, so
        tiles leave no seams (``evaluate.denoise``)."""
        return _tiled_stem_means(self.supernet, x, block)

    @property
    def uses_stem_means(self) -> bool:
        """Whether ``forward`` reads the gate's squeeze: in dynamic mode, and in budget mode
        with the attention head on; not in budget mode without it (the config alone runs)."""
        return self._budget_index is None or self.gate.attention

    def gate_forward(self, x: torch.Tensor, stem_means: torch.Tensor | None = None) -> tuple[torch.Tensor, GateOutput]:
        """The padded input's full-width stem through the gate: (padded input, gate output).
        On the kernels, the stem conv's epilogue also sums its output's channels, which the
        fused gate reads instead of squeezing the stem output again (unless ``stem_means``
        are given)."""
        padded = _padded_full_stem_input(self.supernet, x)
        if stem_means is not None:
            return padded, self.gate(self.supernet.stem(padded), means=stem_means)
        stem = self.supernet.stem_conv
        stem.emit_channel_sums = True
        try:
            features = self.supernet.stem(padded)
            # the sums of what the gate reads, or none: a hook or a stem that does more than the
            # conv hands on another tensor, and a hook on the stem may change its output in place,
            # or one on the gate hand the gate another tensor
            sums = stem.channel_sums if stem.channel_sums_of is features \
                and not _forward_hooks_on((stem, self.gate)) else None
        finally:
            stem.emit_channel_sums = False
            stem.channel_sums = stem.channel_sums_of = None
        return padded, self.gate(features, channel_sums=sums)

    @torch.no_grad()
    def route(self, x: torch.Tensor, stem_means: torch.Tensor | None = None) -> list[RoutingEntry]:
        """The routing entry (config and MACs/pixel) each image of ``x`` would run (the
        entry's own MACs; ``routed_macs`` adds the full-width stem the gate reads). Call it in
        eval mode: in train mode the gate's BatchNorm uses, and updates, batch statistics.
        ``stem_means`` (``stem_means(x)``, for a large image) route without running the stem
        over the whole of ``x`` at once."""
        if self._budget_index is not None:
            self.supernet.check_input(x)
            return [self.routing_space[self._budget_index]] * len(x)
        if self._empty_batch(x):
            return []
        if stem_means is None:
            choice = self.gate_forward(x)[1].choice
        else:
            self.supernet.check_input(x)
            if not isinstance(stem_means, torch.Tensor) or stem_means.shape != (len(x), self.gate.channels) \
                    or not stem_means.is_floating_point():
                got = (f"{stem_means.dtype} {tuple(stem_means.shape)}" if isinstance(stem_means, torch.Tensor)
                       else type(stem_means).__name__)
                raise ValueError(f"DDSNet: stem_means must be floating-point [{len(x)}, {self.gate.channels}], one row "
                                 f"per image, got {got}")
            choice = self.gate(stem_means[:, :, None, None], means=stem_means).choice
        return [self.routing_space[i] for i in choice.tolist()]

    def _empty_batch(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a valid input that holds no image."""
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == 0:  # (len() costs a microsecond)
            self.supernet.check_input(x)
            return True
        return False

    def routed_macs(self, x: torch.Tensor, stem_means: torch.Tensor | None = None) -> list[float]:
        """MACs/pixel each image of ``x`` costs in the current mode: the routed config plus,
        where the gate runs (dynamic mode, or static mode with attention on), the full-width
        stem it reads. ``stem_means`` as in ``route``. Per pixel of the input the network runs,
        as the routing space counts them: an image whose sizes are not multiples of
        ``size_multiple`` runs padded up to them and pays for the padding on top (1.6% for a
        321 x 481 photo through the shipped model)."""
        if self._budget_index is not None:
            self.supernet.check_input(x)
            return [self.static_macs_per_pixel(self._budget_index)] * len(x)
        return [self.dynamic_macs_per_pixel[self.routing_space.index(e)] for e in self.route(x, stem_means)]

    def _width_table(self, device: torch.device) -> tuple[torch.Tensor,
                                                          list[tuple[SlimConv2d, slice, tuple[int, int], tuple]]]:
        """An int32 [E, columns] table on ``device`` holding, for each conv of the body, its
        (out width, in widths) under each routing config in a column range; and, per conv, that
        range, the largest numbers its out widths and its in widths are multiples of (so the
        kernel knows which side keeps its vector loads: a 3-channel output, or an upsampling
        conv's out widths of 4 filters per channel, must not cost its inputs theirs) and its
        narrowest (out, in) widths over the routes (what ``per_image_tiles='narrowest'`` sizes
        its tiles for). Built once per device."""
        if device not in self._tables:
            rows, reason = self._per_image_rows()
            if reason is not None:
                raise ValueError(f"DDSNet: the per-image path cannot run this super-network: {reason}")
            layers, start = [], 0
            for conv, per_entry in rows.items():
                narrowest = (min(row[0] for row in per_entry), min(max(row[1:]) for row in per_entry))
                multiples = (math.gcd(*(row[0] for row in per_entry)),
                             math.gcd(*(w for row in per_entry for w in row[1:])))
                layers.append((conv, slice(start, start + len(per_entry[0])), multiples, narrowest))
                start += len(per_entry[0])
            # row e: every conv's widths under config e, side by side
            table = torch.tensor([[w for per_entry in rows.values() for w in per_entry[e]]
                                  for e in range(len(self.routing_space))], dtype=torch.int32, device=device)
            self._tables[device] = (table, layers)
        return self._tables[device]

    def _per_image_rows(self) -> tuple[dict[SlimConv2d, list[tuple[int, ...]]], str | None]:
        """Each body conv's (out width, in widths) under each route, in routing order, and why
        the per-image path cannot run this body (None where it can): it runs the body once for
        every route, on max-width buffers, with one row of widths per layer and image, so each
        route must run the same SlimConv2d layers in the same order, each at one set of widths
        (a layer run twice at the same widths is fine). Traced once per routing space."""
        if self.__dict__.get("_per_image_trace") is None:
            rows: dict[SlimConv2d, list[tuple[int, ...]]] = {}
            names: dict[nn.Module, str] = {}
            first_order, reason = None, None
            for index, entry in enumerate(self.routing_space):
                calls = [call for call in trace_convs(self.supernet, entry.config)[0]
                         if call.module is not self.supernet.stem_conv]
                in_route: dict[nn.Module, tuple[int, ...]] = {}
                for call in calls:
                    widths = (call.out_width, *call.in_widths)
                    name = names.setdefault(call.module, call.name or type(call.module).__name__)
                    if not isinstance(call.module, SlimConv2d):
                        reason = reason or f"its layer {name} is a {type(call.module).__name__}, not a SlimConv2d"
                    elif in_route.setdefault(call.module, widths) != widths:
                        reason = reason or (f"its layer {name} runs more than once in a forward, at widths "
                                            f"{in_route[call.module]} and {widths} (out, in) in one route")
                order = [call.module for call in calls]
                if first_order is None:
                    first_order = order
                elif order != first_order:
                    reason = reason or (f"its body runs other layers, or as many times, in route {index} as in "
                                        f"route 0 ({len(order)} convs against {len(first_order)}, in order: "
                                        f"{[names[m] for m in order]} against {[names[m] for m in first_order]})")
                for module, widths in in_route.items():
                    rows.setdefault(module, []).append(widths)
            self._per_image_trace = (rows, reason)
        return self._per_image_trace

    def _uses_per_image_widths(self, x: torch.Tensor) -> bool:
        if tree_changed(self._supernet_tree, self.supernet):
            # a layer replaced or added since: the width tables and hooks' list name the old ones
            self._replace_part("supernet", self.supernet)
        if self.per_image is not None:
            reason = self._per_image_rows()[1] if self.per_image else None
            if reason is not None:
                raise ValueError(f"DDSNet: per_image=True, but the per-image path cannot run this super-network: "
                                 f"{reason}; set per_image to None or False to group the batch by route")
            return self.per_image
        # a dispatch mode (FlopCounterMode) sees shapes, which per-image buffers give at full width
        if not x.is_cuda or torch.is_grad_enabled() or torch._C._len_torch_dispatch_stack():
            return False
        # every conv must run on the kernels (dtype, layer options), one row of widths each; else group the batch
        return self._per_image_rows()[1] is None and all(
            m.backend != "torch" and m._triton_kernels([x], m.weight)[0] is not None
            for m in self.supernet.modules() if isinstance(m, SlimConv2d))

    def _body_per_image(self, features: torch.Tensor, padded: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Every image through its own config in one launch per layer: each conv reads its
        widths from the device table, indexed by the gate's choice (one gather for all the
        layers, no host sync)."""
        if self.per_image_tiles not in PER_IMAGE_TILES:
            raise ValueError(f"DDSNet: per_image_tiles must be one of {PER_IMAGE_TILES}, got {self.per_image_tiles!r}")
        narrow_tiles = self.per_image_tiles == "narrowest"
        table, layers = self._width_table(padded.device)
        widths = table.index_select(0, choice)
        kernels = _kernels_module()  # (an error message where Triton is missing: the convs then refuse)
        # a forward hook would be handed a packed buffer, whose shape does not describe it
        packing = PackedBuffers() if self.packed_buffers and self.supernet.packs_per_image_buffers \
            and not isinstance(kernels, str) and kernels.packs_per_image_buffers() \
            and not _forward_hooks_on(self._body_modules) else None
        # gate_forward left every layer at full width: the buffers; the widths are per image
        try:
            for conv, columns, multiple, narrowest in layers:
                conv.set_per_image_widths(widths[:, columns], multiple, narrowest if narrow_tiles else None, packing)
            return self.supernet.body(features, padded)
        finally:
            for conv, _, _, _ in layers:
                conv.set_per_image_widths(None)

    def _route_body(self, index: int, features: torch.Tensor, padded: torch.Tensor, rows=None) -> torch.Tensor:
        """Route ``index``'s body, static widths, on the stem features' prefix (of the images ``rows``)."""
        config = self.routing_space[index].config
        self.supernet.set_config(config)
        width = config[self._stem_group]
        if rows is None:
            return self.supernet.body(features[:, :width], padded)
        return self.supernet.body(features[rows, :width], padded[rows])

    def _takes_branches(self, padded: torch.Tensor, per_image: bool) -> bool:
        """Whether a forward captured now would route through conditional graph nodes: a batch
        that mixes routes needs the per-image body, which cannot sync, in its branch."""
        if not (self.route_branches and padded.is_cuda and not torch.is_grad_enabled()
                and (per_image or len(padded) == 1)):
            return False
        if conditional_graph_nodes():
            return True
        reason = conditional_nodes_unavailable_reason()
        if reason not in _BRANCHES_WARNED and not torch.compiler.is_compiling():
            _BRANCHES_WARNED.add(reason)
            warnings.warn(f"DDSNet.route_branches: CUDA graphs here cannot hold conditional nodes ({reason}); a "
                          f"captured forward routes through the per-image body instead", stacklevel=3)
        return False

    def _branch_key(self, features: torch.Tensor, padded: torch.Tensor) -> tuple:
        """What the kernels and plans a branch runs depend on: the inputs, the layers' backends
        and dtypes, autocast."""
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        layers = tuple((m.backend, m.weight.dtype) for m in self.supernet.modules() if isinstance(m, SlimConv2d))
        return padded.device, padded.dtype, tuple(padded.shape), padded.stride(), features.stride(), autocast, layers

    def _warm_branches(self, features: torch.Tensor, padded: torch.Tensor, choice: torch.Tensor) -> None:
        """Every route's body, once per ``_branch_key``, outside any capture: a capture must find
        the branches' kernels compiled (and cuDNN's plans chosen). Records the bodies' output
        dtype, layout and shape, which the captured branches' shared output takes."""
        key = self._branch_key(features, padded)
        if key in self._warmed_branches:
            self._warmed_branches[key] = self._warmed_branches.pop(key)  # the most recent last
            return
        from .kernels.gate import route_flags
        route_flags(choice, len(self.routing_space))
        if padded.is_cuda and not torch_if_nodes():
            driver_if_nodes(padded.device)  # loads its kernel, which a capture cannot
        for index in range(len(self.routing_space)):
            out = self._route_body(index, features, padded)
        layout = torch.channels_last if out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) \
            and not out.is_contiguous() else torch.contiguous_format
        self._warmed_branches[key] = (out.dtype, layout, tuple(out.shape))
        while len(self._warmed_branches) > WARMED_BRANCH_KEYS:  # a server's input sizes vary without end
            del self._warmed_branches[next(iter(self._warmed_branches))]

    def _branch_output(self, features: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """The output every captured branch writes, as its warm-up's bodies returned theirs."""
        warmed = self._warmed_branches.get(self._branch_key(features, padded))
        if warmed is None:
            raise ValueError("DDSNet.route_branches: this input (shape, dtype, layout), the layers' backends or "
                             "autocast changed since the last forward outside the capture; run one forward with "
                             "them outside the capture first, so the branches' kernels are ready")
        dtype, layout, shape = warmed
        return torch.empty(shape, dtype=dtype, device=padded.device, memory_format=layout)

    def _body_branches(self, features: torch.Tensor, padded: torch.Tensor, choice: torch.Tensor, graph,
                       out: torch.Tensor) -> torch.Tensor:
        """The body as conditional nodes of ``graph`` (the CUDA graph being captured), each
        writing ``out``: the per-image body when no route holds the whole batch, and a branch
        per route ``k``, its static body, when every image chose it (``choice`` in range:
        ``forward`` clamps a caller's that a capture cannot check)."""
        from .kernels.gate import route_flags
        routes = len(self.routing_space)
        flags = route_flags(choice, routes)  # their values are read at replay, on the device
        # the per-image body first, while gate_forward's full widths (its buffers) still hold
        branches = [(flags[routes], lambda: self._body_per_image(features, padded, choice))] if len(padded) > 1 else []
        branches += [(flags[index], lambda index=index: self._route_body(index, features, padded))
                     for index in range(routes)]
        # a weight cast that autocast caches in one branch would be read, unwritten, by another
        # branch at a replay that skips the first: each branch casts its own
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            for flag, body in branches:
                graph.begin_capture_to_if_node(flag)
                try:
                    out.copy_(body())
                finally:
                    graph.end_capture_to_conditional_node()
        finally:
            torch.set_autocast_cache_enabled(cache)
        return out

    @staticmethod
    def _choice_values_readable(choice: torch.Tensor) -> bool:
        """Whether reading ``choice``'s values is allowed: it syncs with the device, which a
        CUDA graph capture does not allow."""
        return not (choice.is_cuda and torch.cuda.is_current_stream_capturing())

    def _check_choice(self, choice, batch: int) -> torch.Tensor:
        if not isinstance(choice, torch.Tensor) or choice.shape != (batch,) or choice.dtype not in (
                torch.int32, torch.int64):
            raise ValueError(f"DDSNet: choice must be an int32 or int64 tensor of shape ({batch},), one routing "
                             f"index per image, got {choice!r}")
        if self._choice_values_readable(choice) and len(choice) and (
                int(choice.min()) < 0 or int(choice.max()) >= len(self.routing_space)):
            raise ValueError(f"DDSNet: choice holds {choice.tolist()}; routing indices run from 0 to "
                             f"{len(self.routing_space) - 1}")
        return choice

    def forward(self, x: torch.Tensor, choice: torch.Tensor | None = None,
                stem_means: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x``. ``choice``, an optional tensor of one routing index per image,
        overrides the gate's decisions (for ablations and for timing a given mix of
        sub-networks); the gate still runs, as its attention head may scale the features.
        ``stem_means``: the gate's squeeze to use instead of ``x``'s own (``stem_means``).
        Before capturing a CUDA graph, run one forward on the device outside the capture:
        the first builds the device's width table and, with ``route_branches`` on, runs every
        route's body once per input signature, so the capture finds their kernels ready."""
        if self._budget_index is not None and choice is not None:
            raise ValueError("DDSNet: choice applies to dynamic mode; call set_budget(None) first")
        if self._empty_batch(x):  # no image for the gate to route (which refuses an empty input)
            if choice is not None:
                self._check_choice(choice, 0)
            return x.new_empty((0, self.supernet.out_channels, *x.shape[2:]))
        if self._budget_index is not None:
            if not self.gate.attention:  # static mode: the narrow network alone, no gate
                self.supernet.set_config(self.routing_space[self._budget_index].config)
                return self.supernet(x)
            # the attention head scales the stem's features: the budget's config behind the gate
            if self.training:  # the attention head alone, as stage 1 trains it: the prediction head's
                # BatchNorm would count these batches (and refuse one image)
                padded = _padded_full_stem_input(self.supernet, x)
                features, _ = self.gate.attend(self.supernet.stem(padded), stem_means)
            else:
                padded, gate_out = self.gate_forward(x, stem_means)
                features = gate_out.features
            out = self._route_body(self._budget_index, features, padded)
            return out[..., : x.shape[-2], : x.shape[-1]]
        if choice is not None:  # before the gate runs: a refused call leaves its BatchNorm as it was
            choice = self._check_choice(choice, len(x))
        padded, gate_out = self.gate_forward(x, stem_means)
        in_range = None  # the gate's choices are in range; a caller's are checked unless a capture hides them
        if choice is not None:
            if not self._choice_values_readable(choice):
                # out of range, an index would fault the device in the width table's gather:
                # route 0 runs instead, and the image comes out NaN (checked before the cast
                # to int32, which would wrap an int64 index into range)
                in_range = (choice >= 0) & (choice < len(self.routing_space))
                choice = torch.where(in_range, choice, 0)
            choice = choice.to(gate_out.choice)
        else:
            choice = gate_out.choice
        features = gate_out.features
        per_image = self._uses_per_image_widths(padded)
        branches = self._takes_branches(padded, per_image)
        capturing = branches and torch.cuda.is_current_stream_capturing()
        if capturing:
            out = self._body_branches(features, padded, choice, capturing_graph(padded.device),
                                      self._branch_output(features, padded))
        elif per_image:
            out = self._body_per_image(features, padded, choice)
        else:
            out = None
            for index in torch.unique(choice).tolist():
                rows = (choice == index).nonzero().squeeze(1)
                part = self._route_body(index, features, padded, rows)
                if out is None:
                    # in the parts' layout (channels_last on a CPU): no transposing copy per group
                    out = torch.empty((len(x), *part.shape[1:]), dtype=part.dtype, device=part.device,
                                      memory_format=torch.channels_last if part.is_contiguous(
                                          memory_format=torch.channels_last) else torch.contiguous_format)
                out[rows] = part
        if branches and not capturing:
            self._warm_branches(features, padded, choice)
        if in_range is not None:
            out = torch.where(in_range[:, None, None, None], out, float("nan"))
        return out[..., : x.shape[-2], : x.shape[-1]]

    def expected_macs(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-image expected MACs/pixel under the gate's softmax ``probs`` [N, E] (the
        complexity loss's Psi), counting the full-width stem of dynamic mode."""
        if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[1] != len(self.routing_space):
            got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ValueError(f"DDSNet.expected_macs: probs must be [N, {len(self.routing_space)}], one probability "
                             f"per routing entry, got {got}")
        # at least fp32: a large network's MACs/pixel overflow fp16 (65504)
        dtype = torch.promote_types(probs.dtype, torch.float32)
        return probs.to(dtype) @ torch.tensor(self.dynamic_macs_per_pixel, device=probs.device, dtype=dtype)
