"""Slimmable super-network denoisers: SlimUNet (DANet/VDNet's U-Net) and SlimDnCNN.

Every network is split into ``stem`` (its first conv block, where the dynamic gate reads
the features) and ``body`` (the rest). The stem is a single conv, so running it at full
width and letting the body read a prefix of its output gives exactly the narrow network:
output channel j of a conv depends only on filter j.
"""
from __future__ import annotations

import copy
import inspect
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import (ChannelGroup, RoutingEntry, SubnetConfig, WidthSpace, checked_int, checked_real,
                     checked_routing_space, width_choices)
from .slim_conv import SlimConv2d, name_layers

ARCHITECTURES: dict[str, type] = {}


def constructor_misfit(cls, args: dict) -> str | None:
    """Why ``cls`` would not be built from the keyword arguments ``args`` (through its
    ``from_arch_args`` where it has one, as ``load`` builds it), or None where it would."""
    try:
        inspect.signature(getattr(cls, "from_arch_args", cls)).bind(**args)
    except TypeError as error:
        return str(error)
    return None


def register_architecture(cls):
    """Make ``cls`` loadable from a checkpoint by its class name, which no other class may
    hold already: every checkpoint of that name would then build the newcomer."""
    taken = ARCHITECTURES.get(cls.__name__)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_architecture: the name {cls.__name__} is taken by {taken.__module__}."
                         f"{taken.__qualname__}; give {cls.__module__}.{cls.__qualname__} another name")
    ARCHITECTURES[cls.__name__] = cls  # (the same class again: a module reloaded)
    return cls


def module_tree(net: nn.Module, named: Sequence[tuple[str, nn.Module]] | None = None
                ) -> tuple[tuple[str, nn.Module | None, tuple[nn.Module, ...]], ...]:
    """Each module of ``net`` (or of ``named``, some of its ``named_modules()``) with its name
    and children, to tell by ``tree_changed`` whether a layer was replaced or added since.
    ``net`` itself is None there: a net holding its own snapshot would be a reference cycle,
    freed only by the garbage collector."""
    named = net.named_modules() if named is None else named
    return tuple((name, m if name else None, tuple(m._modules.values())) for name, m in named)


def tree_changed(tree: tuple[tuple[str, nn.Module | None, tuple[nn.Module, ...]], ...], net: nn.Module) -> bool:
    """Whether ``net``'s modules differ from its ``module_tree`` snapshot ``tree``."""
    return any(tuple((m or net)._modules.values()) != children for _, m, children in tree)


class SlimNet(nn.Module):
    """Base of the slimmable denoisers: width configs, input checks, padding to the size the
    network needs and the stem/body split.

    A subclass (the README's "Your own super-network") calls ``super().__init__(in_channels,
    out_channels, arch_args)``, declares its tied groups with ``_group``, ties each SlimConv2d
    to one with ``_bind``, ends ``__init__`` with ``_finish()``, and defines ``stem_conv``
    (its first conv, bound to a group), ``body`` and ``receptive_radius``, and
    ``size_multiple`` where it downsamples. ``stem`` runs ``stem_conv``; a DDSNet refuses a
    net that overrides it.
    """

    size_multiple = 1
    # Whether DDSNet's per-image forward may store the body's intermediate outputs packed
    # (slim_conv.PackedBuffers): true of a body that passes them to its SlimConv2d layers only,
    # never as a residual, and ends in a layer of fixed width (whose packed output is a dense
    # one). A subclass that overrides ``body`` must declare it again (see __init_subclass__).
    packs_per_image_buffers = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a new body may pass an intermediate to a torch op, which would read a packed one wrong
        if "body" in cls.__dict__ and "packs_per_image_buffers" not in cls.__dict__:
            cls.packs_per_image_buffers = False

    def __init__(self, in_channels: int, out_channels: int, arch_args: dict):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self._arch_args = copy.deepcopy(dict(arch_args))
        self._groups: dict[str, ChannelGroup] = {}
        self._bindings: list[tuple[SlimConv2d, str, int]] = []
        self._config: SubnetConfig | None = None
        self._masked = False

    def _group(self, name: str, base_width: int) -> int:
        """Declare the tied group ``name``: its widths are ``base_width`` times ``min_ratio`` to
        ``width_mult`` (from ``arch_args``) in steps of ``divisor``. Returns its largest width,
        the channels its layers are built with (``base_width * width_mult``, rounded to a
        multiple of ``divisor``)."""
        a = self._arch_args
        missing = [key for key in ("width_mult", "min_ratio", "divisor") if key not in a]
        if missing:
            raise ValueError(f"{type(self).__name__}: arch_args must hold width_mult, min_ratio and divisor (the "
                             f"group widths' range), missing {missing}")
        if name in self._groups:
            raise ValueError(f"{type(self).__name__}: group {name!r} is declared twice")
        choices = width_choices(base_width, a["width_mult"], a["min_ratio"], a["divisor"])
        self._groups[name] = ChannelGroup(name, choices[-1], choices)
        return choices[-1]

    def _bind(self, conv: SlimConv2d, group: str, multiplier: int = 1) -> SlimConv2d:
        """Tie ``conv``'s active filters to ``group``'s width times ``multiplier`` (4 for an
        ``upscale_factor=2`` conv, whose filters are four per output channel); returns ``conv``.
        Its filters must be the group's largest width times ``multiplier``."""
        if group not in self._groups:
            raise ValueError(f"{type(self).__name__}: _bind to group {group!r}, which no _group declared (declared: "
                             f"{list(self._groups)})")
        bound = [name for layer, name, _ in self._bindings if layer is conv]
        if bound:  # (its filters would follow one group's width, the other's ignored)
            raise ValueError(f"{type(self).__name__}: _bind of {conv!r:.80} to group {group!r}: it is bound to group "
                             f"{bound[0]!r} already")
        self._check_bindable(conv, group, multiplier, f"_bind of {conv!r:.80} to group {group!r}")
        self._bindings.append((conv, group, multiplier))
        return conv

    def _check_bindable(self, conv, group: str, multiplier: int, what: str) -> None:
        full = self._groups[group].max_width * multiplier
        if not isinstance(conv, SlimConv2d) or conv.out_channels != full:
            raise ValueError(f"{type(self).__name__}: {what} needs a SlimConv2d of {full} filters (the group's "
                             f"largest width {self._groups[group].max_width} times multiplier {multiplier})")

    def _bound_snapshot(self) -> tuple[tuple, tuple[tuple[SlimConv2d, str], ...]]:
        """What ``_bound`` compares on each call (a few us): the modules on the way to each bound
        layer (a replacement changes one of their children), and each bound layer's name."""
        named = list(self.named_modules())
        names = {id(m): name for name, m in named}
        bound_names = tuple((conv, names[id(conv)]) for conv, _, _ in self._bindings if id(conv) in names)
        ways = {name.rsplit(".", depth)[0] for _, name in bound_names for depth in range(1, name.count(".") + 1)}
        return module_tree(self, [(name, m) for name, m in named if name in ways | {""}]), bound_names

    def _bound(self) -> list[tuple[SlimConv2d, str, int]]:
        """The bound layers, each ``(conv, group, multiplier)``. A bound layer no longer in the net,
        replaced (``net.layers[1] = SlimConv2d(...)``), is followed by the layer now at its name,
        set to the width it should run; one moved or wrapped keeps its binding."""
        tree, bound_names = self.__dict__.get("_bound_tree", (None, ()))
        if not self._bindings or (tree is not None and not tree_changed(tree, self)):
            return self._bindings
        if tree is not None:
            names = {id(conv): name for conv, name in bound_names}
            present = {id(m) for m in self.modules()}
            groups = {id(conv): group for conv, group, _ in self._bindings if id(conv) in present}
            rebound = []
            for conv, group, multiplier in self._bindings:
                if id(conv) in present:  # (moved, or wrapped: still this net's layer)
                    rebound.append((conv, group, multiplier))
                    continue
                name = names[id(conv)]
                try:
                    new = self.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"{type(self).__name__}: layer {name!r}, bound to width group {group!r}, was "
                                     f"removed; put a SlimConv2d in its place") from None
                if id(new) in groups:  # (it would run one group's width, the other's ignored)
                    raise ValueError(f"{type(self).__name__}: layer {name!r}, bound to width group {group!r}, left "
                                     f"the net, and the layer now at its name is bound to group {groups[id(new)]!r}; "
                                     f"give each group's place a layer of its own")
                self._check_bindable(new, group, multiplier, f"layer {name!r}, bound to width group {group!r}, "
                                                             f"was replaced by {new!r:.80}; its replacement")
                groups[id(new)] = group
                rebound.append((new, group, multiplier))
            self._bindings = rebound
            name_layers(self)
        self._bound_tree = self._bound_snapshot()
        if tree is not None and self._config is not None:  # the new layers run the widths the net runs
            if self._masked:
                self.set_masked_widths(self._masked_widths)
            else:
                self.set_config(self._config)
        return self._bindings

    def __getattr__(self, name: str):
        if name == "space" and "_groups" in self.__dict__:  # (asked only when no attribute holds it)
            raise AttributeError(f"{type(self).__name__} has no width space yet: end __init__ with self._finish()")
        return super().__getattr__(name)

    def _finish(self):
        """End of a subclass's ``__init__``: the width space of its groups, its layers named,
        and the largest config set."""
        self.space = WidthSpace(self._groups.values())
        name_layers(self)
        self._bound_tree = self._bound_snapshot()
        self.set_config(self.space.largest())

    # -- configs ------------------------------------------------------------------------
    def set_config(self, config: SubnetConfig | Mapping[str, int]) -> None:
        """Run at ``config`` (checked by ``space.validate``): each bound layer's active filters
        become its group's width times its multiplier; ends ``set_masked_widths``."""
        if self.is_static:
            raise ValueError(f"{type(self).__name__} was exported as a static network; its widths are fixed")
        config = self.space.validate(config)
        bindings = self._bound()
        for conv, group, multiplier in bindings:
            width = config[group] * multiplier
            if conv._active_out != width:  # (a module attribute write costs host time; a DDSNet sets one per forward)
                conv.active_out_channels = width
        if self._masked:  # (each module attribute write costs host time in the eager sandwich)
            for conv, _, _ in bindings:
                conv.output_mask = None
            self._masked = False
        self._config = config

    def check_widths(self, caller: str) -> None:
        """Refuse, naming the layer, a bound layer whose filters differ from those the config
        sets (``active_out_channels`` set on it directly): the network then runs no config,
        and a checkpoint or an export of it would record one."""
        if self.is_static or self._masked:  # (masked: save and export refuse it by name)
            return
        for conv, group, multiplier in self._bound():
            filters, runs = self._config[group] * multiplier, conv.active_out_channels or conv.out_channels  # (None: all)
            if runs != filters:
                raise ValueError(f"{caller}: {type(self).__name__}'s {conv.layer_name} runs "
                                 f"{runs} filters, but its config sets group {group!r} to "
                                 f"{self._config[group]} ({filters} filters); set widths through set_config")

    def get_config(self) -> SubnetConfig:
        """The config the network runs (the largest after ``_finish``; an export's own)."""
        return self._config

    def extra_repr(self) -> str:
        if self._masked:
            return "masked widths (set_masked_widths: each layer's masked_out_channels)"
        widths = ", ".join(f"{group}={width}" for group, width in self._config.items())
        return f"{'static' if self.is_static else 'config'}: {widths}"

    def binding_widths(self, config: SubnetConfig | Mapping[str, int]) -> list[int]:
        """Each slimmable layer's output channels under ``config``, as its output counts them
        (after any pixel shuffle): a row of the widths that ``set_masked_widths`` takes."""
        if self.is_static:
            raise ValueError(f"{type(self).__name__} was exported as a static network; its widths are fixed")
        config = self.space.validate(config)
        return [config[group] * multiplier // conv.upscale_factor ** 2 for conv, group, multiplier in self._bound()]

    def __setstate__(self, state: dict) -> None:
        # a whole-module pickle of an earlier version held these as plain attributes
        for old in ("arch_args", "routing_space"):
            if old in state:
                value = state.pop(old)
                state["_" + old] = tuple(value) if old == "routing_space" and value is not None else value
        super().__setstate__(state)

    @property
    def routing_space(self) -> tuple[RoutingEntry, ...] | None:
        """The routing space progressive slimming found, or a checkpoint held; None if none.
        Set it to a sequence of RoutingEntry whose configs fit the network (checked)."""
        return self.__dict__.get("_routing_space")

    @routing_space.setter
    def routing_space(self, entries) -> None:
        self._routing_space = None if entries is None else checked_routing_space(type(self).__name__, self.space,
                                                                                  entries)

    @property
    def arch_args(self) -> dict:
        """The constructor's arguments, as a checkpoint rebuilds the network from them (a copy)."""
        return copy.deepcopy(self._arch_args)

    @property
    def masked(self) -> bool:
        """Whether ``set_masked_widths`` holds masks (until the next ``set_config``). Saving,
        exporting and MAC counting see the largest config meanwhile: ``save`` and
        ``export_static`` refuse a masked net, and counting at a config ends the masks."""
        return self._masked

    @property
    def masked_widths(self) -> torch.Tensor | None:
        """The widths ``set_masked_widths`` was given, while it holds them; else None."""
        return getattr(self, "_masked_widths", None) if self._masked else None  # (pickles before it: None)

    def set_masked_widths(self, widths: torch.Tensor) -> None:
        """Run the config whose ``binding_widths`` are ``widths`` (an integer tensor on the
        parameters' device, one entry per slimmable layer) at full width: every layer computes
        all its channels and zeroes those at or past its width. Since the inputs' extra
        channels are then zeros, each output channel, the loss and every gradient (zero outside
        the active slices) are those of ``set_config`` of that config, up to rounding; but no
        shape depends on the widths, which are read on the device, so one CUDA graph of a
        training step serves every config (at the largest config's cost). The widths are
        checked, range and tied groups, on CPU only (elsewhere that would cost a device sync).
        ``set_config`` ends it."""
        if self.is_static:
            raise ValueError(f"{type(self).__name__} was exported as a static network; its widths are fixed")
        bindings = self._bound()
        count = len(bindings)
        if not isinstance(widths, torch.Tensor) or widths.shape != (count,) or widths.is_floating_point() \
                or widths.is_complex() or widths.dtype == torch.bool:
            shape = f"{widths.dtype} {tuple(widths.shape)}" if isinstance(widths, torch.Tensor) else type(widths).__name__
            raise ValueError(f"{type(self).__name__}.set_masked_widths: widths must be an integer tensor of shape "
                             f"({count},), one per slimmable layer (binding_widths), got {shape}")
        device = self.stem_conv.weight.device
        if widths.device != device:
            raise ValueError(f"{type(self).__name__}.set_masked_widths: widths are on {widths.device}, the network "
                             f"on {device}")
        outputs = [conv.out_channels // conv.upscale_factor ** 2 for conv, _, _ in bindings]
        if widths.device.type == "cpu":
            group_widths: dict[str, tuple[int, str]] = {}
            for (conv, group, multiplier), width, limit in zip(bindings, widths.tolist(), outputs):
                if not 1 <= width <= limit:
                    raise ValueError(f"{type(self).__name__}.set_masked_widths: {conv.layer_name} has width {width}, "
                                     f"not in [1, {limit}]")
                # layers tied in a group run one width: other rows are no config's
                filters = width * conv.upscale_factor ** 2
                if filters % multiplier:
                    raise ValueError(f"{type(self).__name__}.set_masked_widths: {conv.layer_name} has width {width}, "
                                     f"which is no width of group {group!r} (its filters are {multiplier} per channel "
                                     f"of the group)")
                first_width, first = group_widths.setdefault(group, (filters // multiplier, conv.layer_name))
                if filters // multiplier != first_width:
                    raise ValueError(f"{type(self).__name__}.set_masked_widths: {conv.layer_name} and {first} are "
                                     f"tied in group {group!r}, but their widths set it to {filters // multiplier} and "
                                     f"{first_width}: no config's widths (binding_widths gives a config's)")
        self.set_config(self.space.largest())
        keep = torch.arange(max(outputs), device=device) < widths[:, None]
        self._masked = True  # first: set_config then clears the masks of an interrupted loop too
        self._masked_widths = widths
        for row, ((conv, _, _), channels) in enumerate(zip(bindings, outputs)):
            conv.output_mask = keep[row, :channels].view(1, channels, 1, 1)

    @property
    def is_static(self) -> bool:
        """Whether this is an ``export_static`` copy, whose widths are fixed."""
        return not self._bindings

    @property
    def stem_channels(self) -> int:
        """Channels of the stem's output at full width: what a gate behind the stem reads."""
        return self.stem_conv.out_channels

    @property
    def stem_group(self) -> str:
        """The tied group that sets the stem conv's width: the prefix of the full-width stem's
        output that the body reads at a config (a DDSNet's dynamic mode)."""
        if self.is_static:
            raise ValueError(f"{type(self).__name__} was exported as a static network; its widths are fixed")
        for conv, group, multiplier in self._bound():
            if conv is self.stem_conv:
                if multiplier != 1:
                    raise ValueError(f"{type(self).__name__}: the stem conv is bound to group {group!r} with "
                                     f"multiplier {multiplier}; a gate reads its channels one per group width")
                return group
        raise ValueError(f"{type(self).__name__}: the stem conv is bound to no width group; _bind it to one")

    # -- forward ------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: input must be a 4-D tensor [N, C, H, W], got {shape}")
        if x.layout != torch.strided:
            raise ValueError(f"{type(self).__name__}: input is a {x.layout} tensor; the network takes dense tensors")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[1]} channels, the network takes "
                             f"{self.in_channels}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{type(self).__name__}: empty image of size {tuple(x.shape[2:])}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: input dtype {x.dtype} is not floating point; the network "
                             f"takes float images in [0, 1] (e.g. x.float() / 255 for uint8)")
        weight = self.stem_conv.weight
        # autocast casts fp32, fp16 and bf16 to one dtype, never fp64
        autocast = torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype)
        if x.dtype != weight.dtype and not autocast and not (
                isinstance(self.stem_conv, SlimConv2d) and self.stem_conv._triton_kernels([x], weight)[0] is not None):
            # only the Triton kernels (or autocast) read fp16/bf16 inputs over fp32 weights
            raise ValueError(f"{type(self).__name__}: input dtype {x.dtype} differs from the network's "
                             f"{weight.dtype}; convert the input (x.to({weight.dtype})) or the network")

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom and right to a multiple of ``size_multiple`` (reflect where the image is
        large enough, replicate otherwise). Channels_last on the CPU and on a GPU with the
        kernels: their fast layout (torch's CPU convolutions ran a 512x512 inference 1.7x-3.3x
        faster in it), which every layer then keeps (a layer given NCHW returns NCHW, a copy)."""
        m = self.size_multiple
        h, w = x.shape[-2:]
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        if self._runs_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _runs_channels_last(self, x: torch.Tensor) -> bool:
        return x.dim() == 4 and (x.device.type == "cpu" or (
            x.is_cuda and getattr(self.stem_conv, "backend", "torch") != "torch"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self._bound()
        padded = self.pad(x)
        out = self.body(self.stem(padded), padded)
        return out[..., : x.shape[-2], : x.shape[-1]]

    @property
    def stem_conv(self) -> SlimConv2d:
        """The first conv, whose output the gate reads."""
        raise NotImplementedError(f"{type(self).__name__} must define the stem_conv property (its first conv)")

    @property
    def receptive_radius(self) -> int:
        """How many input pixels away, at most, an input pixel can change an output pixel:
        the context a tile needs on each side to match the whole image, for a tile that
        starts on a multiple of ``size_multiple`` (``evaluate.denoise`` aligns its tiles)."""
        raise NotImplementedError(f"{type(self).__name__} must define the receptive_radius property")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``stem_conv`` on the padded input (not to be overridden: see the class docstring)."""
        out = self.stem_conv(x)
        if x.shape[1] == 1 and self._runs_channels_last(x) and out.dim() == 4:
            # a 1-channel image is NCHW and channels_last at once, and a conv answers it in NCHW
            # (as nn.Conv2d does): the body runs in the layout pad gives a wider image
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def body(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rest of the network: ``features`` from the stem, ``x`` the padded input."""
        raise NotImplementedError(f"{type(self).__name__} must define body(features, x)")


def _widen(lo: int, hi: int, scale: int, conv: nn.Conv2d) -> tuple[int, int, int]:
    """The input offsets ``[lo, hi]`` an output pixel reads, after ``conv`` runs on features
    ``scale`` input pixels apart, and the scale of its output."""
    reach = conv.kernel_size[0] // 2 * scale
    return lo - reach, hi + reach, scale * conv.stride[0]


def _checked_args(owner: str, in_channels, out_channels, base_width, depth, width_mult, min_ratio, divisor):
    """A super-network's size arguments as ints and finite floats, or a ValueError naming the
    one that is not (``out_channels`` None: ``in_channels``)."""
    in_channels = checked_int(in_channels, "in_channels", owner)
    out_channels = in_channels if out_channels is None else checked_int(out_channels, "out_channels", owner)
    return (in_channels, out_channels, checked_int(base_width, "base_width", owner),
            checked_int(depth, "depth", owner, low=2), checked_real(width_mult, "width_mult", owner),
            checked_real(min_ratio, "min_ratio", owner), checked_int(divisor, "divisor", owner))


def _conv(cin, cout, k=3, stride=1, activation="leaky_relu", slope=0.2, in_segments=None, upscale_factor=1):
    return SlimConv2d(cin, cout, k, stride=stride, padding=k // 2, activation=activation,
                      negative_slope=slope, in_segments=in_segments, upscale_factor=upscale_factor)


@register_architecture
class SlimUNet(SlimNet):
    """The U-Net denoiser of DANet and VDNet, slimmable per layer.

    Each level has two 3x3 convs with LeakyReLU; going down, the first conv of a level has
    stride 2; going up, a 1x1 conv to 4x the channels plus pixel shuffle (the 2x2 transposed
    conv written with Conv2d only), then the skip is concatenated; a global residual adds
    the input to the last conv's output (when ``out_channels == in_channels``). Level ``l``
    has base width ``base_width * 2**l``; each group's widths range over ``min_ratio`` to
    ``width_mult`` of that in steps of ``divisor`` (the super-network is ``width_mult`` times
    the base).

    Groups: ``enc{l}.mid``, ``enc{l}`` (block output and skip), ``up{l}``, ``dec{l}.mid``,
    ``dec{l}``. The stem is ``enc0``'s first conv (group ``enc0.mid``).
    """

    packs_per_image_buffers = True

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, base_width: int = 32,
                 depth: int = 4, width_mult: float = 1.5, min_ratio: float = 0.2, divisor: int = 8,
                 negative_slope: float = 0.2):
        in_channels, out_channels, base_width, depth, width_mult, min_ratio, divisor = _checked_args(
            "SlimUNet", in_channels, out_channels, base_width, depth, width_mult, min_ratio, divisor)
        negative_slope = checked_real(negative_slope, "negative_slope", "SlimUNet")
        super().__init__(in_channels, out_channels, dict(
            in_channels=in_channels, out_channels=out_channels, base_width=base_width, depth=depth,
            width_mult=width_mult, min_ratio=min_ratio, divisor=divisor, negative_slope=negative_slope))
        self.depth = depth
        self.size_multiple = 2 ** (depth - 1)
        slope = negative_slope

        self.encoders = nn.ModuleList()
        prev = in_channels
        for level in range(depth):
            base = base_width * 2 ** level
            mid, out = self._group(f"enc{level}.mid", base), self._group(f"enc{level}", base)
            stride = 1 if level == 0 else 2
            self.encoders.append(nn.ModuleList([
                self._bind(_conv(prev, mid, stride=stride, slope=slope), f"enc{level}.mid"),
                self._bind(_conv(mid, out, slope=slope), f"enc{level}"),
            ]))
            prev = out

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            base = base_width * 2 ** level
            up = self._group(f"up{level}", base)
            mid, out = self._group(f"dec{level}.mid", base), self._group(f"dec{level}", base)
            skip = self._groups[f"enc{level}"].max_width
            # Pixel shuffle sends conv channels 4c..4c+3 to output channel c, so the first
            # 4u filters produce exactly the first u upsampled channels.
            self.ups.append(self._bind(_conv(prev, 4 * up, k=1, activation=None, upscale_factor=2), f"up{level}",
                                       multiplier=4))
            self.decoders.append(nn.ModuleList([
                self._bind(_conv(up + skip, mid, slope=slope, in_segments=(up, skip)), f"dec{level}.mid"),
                self._bind(_conv(mid, out, slope=slope), f"dec{level}"),
            ]))
            prev = out
        self.last = _conv(prev, out_channels, activation=None)
        self._finish()

    @property
    def stem_conv(self):
        return self.encoders[0][0]

    @property
    def receptive_radius(self) -> int:
        lo = hi = 0
        scale, skips = 1, []
        for level, convs in enumerate(self.encoders):
            if level:
                skips.append((lo, hi))
            for conv in convs:
                lo, hi, scale = _widen(lo, hi, scale, conv)
        for up, convs, (skip_lo, skip_hi) in zip(self.ups, self.decoders, reversed(skips)):
            lo, hi, scale = _widen(lo, hi, scale, up)
            # pixel shuffle: an odd output pixel reads the coarse pixel centred one fine pixel before it
            scale //= 2
            lo, hi = min(lo - scale, skip_lo), max(hi, skip_hi)
            for conv in convs:
                lo, hi, scale = _widen(lo, hi, scale, conv)
        lo, hi, _ = _widen(lo, hi, scale, self.last)
        return max(-lo, hi)

    def body(self, features, x):
        skips = []
        h = self.encoders[0][1](features)
        for level in range(1, self.depth):
            skips.append(h)
            first, second = self.encoders[level]
            h = second(first(h))
        for up, (first, second), skip in zip(self.ups, self.decoders, reversed(skips)):
            h = second(first([up(h), skip]))
        residual = x if self.out_channels == self.in_channels else None
        return self.last(h, residual=residual)


@register_architecture
class SlimDnCNN(SlimNet):
    """DnCNN without batch norm, slimmable per layer: ``depth`` 3x3 convs with ReLU between
    them and a global residual (when ``out_channels == in_channels``). Groups ``layer0`` ..
    ``layer{depth-2}``; the stem is layer 0."""

    packs_per_image_buffers = True

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_width: int = 64,
                 depth: int = 17, width_mult: float = 1.5, min_ratio: float = 0.2, divisor: int = 8):
        in_channels, out_channels, base_width, depth, width_mult, min_ratio, divisor = _checked_args(
            "SlimDnCNN", in_channels, out_channels, base_width, depth, width_mult, min_ratio, divisor)
        super().__init__(in_channels, out_channels, dict(
            in_channels=in_channels, out_channels=out_channels, base_width=base_width, depth=depth,
            width_mult=width_mult, min_ratio=min_ratio, divisor=divisor))
        layers, prev = [], in_channels
        for index in range(depth - 1):
            width = self._group(f"layer{index}", base_width)
            layers.append(self._bind(_conv(prev, width, activation="relu"), f"layer{index}"))
            prev = width
        self.layers = nn.ModuleList(layers)
        self.last = _conv(prev, out_channels, activation=None)
        self._finish()

    @property
    def stem_conv(self):
        return self.layers[0]

    @property
    def receptive_radius(self) -> int:
        return sum(conv.kernel_size[0] // 2 for conv in [*self.layers, self.last])

    def body(self, features, x):
        h = features
        for layer in self.layers[1:]:
            h = layer(h)
        residual = x if self.out_channels == self.in_channels else None
        return self.last(h, residual=residual)
