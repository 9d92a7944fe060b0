"""Width configurations of slimmable networks: values, not global flags.

A network's channel widths are split into *tied groups*: layers whose outputs meet in a
residual add or a skip concatenation must share a width, so they form one group. A
:class:`SubnetConfig` gives one width per group; a :class:`WidthSpace` lists the groups
with their allowed widths and draws configs from them.
"""
from __future__ import annotations

import json
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch


def json_loads(text: str | bytes):
    """``json.loads``, refusing an object that repeats a key (json keeps the last one silently:
    an option written twice in a config file would lose one of its values unseen)."""
    def unique(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"an object repeats the key(s) {repeated}")
        return dict(pairs)
    return json.loads(text, object_pairs_hook=unique)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``min_value``
    (default ``divisor``) and never more than 10% below ``value``."""
    divisor = checked_int(divisor, "divisor", "make_divisible")
    value = checked_real(value, "value", "make_divisible")
    if value <= 0:
        raise ValueError(f"make_divisible: value must be > 0, got {value}")
    min_value = divisor if min_value is None else checked_int(min_value, "min_value", "make_divisible")
    rounded = int(value + divisor / 2) // divisor * divisor
    if rounded < 0.9 * value:
        rounded += divisor
    return max(min_value, rounded)  # after the 10% step, which would push a min_value off the multiples


def exact_int(value):
    """``value`` as an int if it is an integer (numpy and tensor integers too); anything else
    as it is, for SubnetConfig to reject: ``int()`` would turn 12.7 into 12 and "8" into 8."""
    # bool tensors (and numpy's bools, before numpy 2) index as 0 or 1
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == torch.bool:
        return value
    try:
        return operator.index(value)
    except (TypeError, RuntimeError):  # RuntimeError: a tensor without values (meta)
        return value


def checked_int(value, name: str, owner: str, low: int = 1) -> int:
    """``value`` as an int of at least ``low`` (numpy and tensor integers too), else a
    ValueError that names ``owner``'s argument: a bool, 2.0, 2.5 or "8" are not widths."""
    number = exact_int(value)
    if not isinstance(number, int) or isinstance(number, bool) or number < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return number


def checked_real(value, name: str, owner: str) -> float:
    """``value`` as a finite float, else a ValueError that names ``owner``'s argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _fits_float(value) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


def _fits_float(value: numbers.Real) -> bool:
    """Whether ``value`` converts to a float (an int past 1.8e308 overflows)."""
    try:
        float(value)
    except OverflowError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class SubnetConfig(Mapping):
    """One width per tied channel group, in the network's group order.

    A read-only mapping of group names to widths (``dict(config)``, ``config.items()``),
    hashable, and equal to another config with the same widths whatever their order;
    ``to_json``/``from_json`` round-trip it.
    """

    widths: tuple[tuple[str, int], ...]

    def __post_init__(self):
        if isinstance(self.widths, Mapping):
            raise ValueError("SubnetConfig: widths must be (group, width) pairs; use SubnetConfig.from_dict "
                             "for a mapping")
        try:
            pairs = [tuple(pair) for pair in self.widths]
        except TypeError:
            pairs = None
        if pairs is None or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"SubnetConfig: widths must be (group, width) pairs, got {self.widths!r}")
        # pairs given as lists would leave the config unhashable and unequal to the same widths;
        # numpy and tensor integers (a width searched with numpy) become ints, as from_dict makes them
        object.__setattr__(self, "widths", tuple((name, exact_int(width)) for name, width in pairs))
        names = [name for name, _ in self.widths]
        if not all(isinstance(name, str) for name in names):  # JSON keys are strings: to_json would not round-trip
            raise ValueError(f"SubnetConfig: group names must be strings, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"SubnetConfig: duplicate group names in {names}")
        for name, width in self.widths:
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise ValueError(f"SubnetConfig: width of group {name!r} must be a positive int, got {width!r}")

    @classmethod
    def from_dict(cls, widths: Mapping[str, int]) -> "SubnetConfig":
        """The config of a mapping of group names to widths (in its order)."""
        if not isinstance(widths, Mapping):
            raise ValueError(f"SubnetConfig: widths must be a mapping of group names to ints, got {widths!r}")
        return cls(tuple(widths.items()))  # (the constructor refuses names that are not strings)

    def to_dict(self) -> dict[str, int]:
        """Group names to widths, in the config's order."""
        return dict(self.widths)

    def to_json(self) -> str:
        """``to_dict`` as JSON text (``from_json`` reads it back)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "SubnetConfig":
        return cls.from_dict(json_loads(text))

    def __getitem__(self, name: str) -> int:
        for group, width in self.widths:
            if group == name:
                return width
        raise KeyError(f"SubnetConfig has no group {name!r}; groups: {[g for g, _ in self.widths]}")

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.widths)

    def __eq__(self, other) -> bool:
        if not isinstance(other, SubnetConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(frozenset(self.widths))

    def replace(self, **widths: int) -> "SubnetConfig":
        """A copy with some groups' widths changed."""
        unknown = set(widths) - set(self.to_dict())
        if unknown:
            raise KeyError(f"SubnetConfig has no groups {sorted(unknown)}")
        return SubnetConfig(tuple((g, widths.get(g, w)) for g, w in self.widths))


@dataclass(frozen=True)
class ChannelGroup:
    """A tied group: its name, its maximum width and the widths it may take (ascending)."""

    name: str
    max_width: int
    choices: tuple[int, ...]

    def __post_init__(self):
        owner = f"group {self.name!r}"
        object.__setattr__(self, "max_width", checked_int(self.max_width, "max_width", owner))
        if not isinstance(self.choices, (tuple, list)):
            raise ValueError(f"{owner}: choices must be a tuple of ints, got {self.choices!r}")
        object.__setattr__(self, "choices", tuple(checked_int(c, "each choice", owner) for c in self.choices))
        if not self.choices or list(self.choices) != sorted(set(self.choices)):
            raise ValueError(f"group {self.name!r}: choices must be ascending and unique, got {self.choices}")
        if self.choices[0] < 1 or self.choices[-1] != self.max_width:
            raise ValueError(f"group {self.name!r}: choices must lie in [1, {self.max_width}] and end at the maximum")


def width_choices(base_width: int, width_mult: float = 1.5, min_ratio: float = 0.2, divisor: int = 8) -> tuple[int, ...]:
    """The paper's per-layer widths: ratios ``min_ratio`` to ``width_mult`` of ``base_width``
    in steps of ``divisor`` channels, each end rounded as ``make_divisible`` rounds (never
    below ``divisor``: ``width_choices(5, 1.0)`` is ``(8,)``); the super-network has the largest."""
    owner = "width_choices"
    base_width, divisor = checked_int(base_width, "base_width", owner), checked_int(divisor, "divisor", owner)
    width_mult, min_ratio = checked_real(width_mult, "width_mult", owner), checked_real(min_ratio, "min_ratio", owner)
    if not 0 < min_ratio <= width_mult:
        raise ValueError(f"width ratios need 0 < min_ratio <= width_mult, got {min_ratio} and {width_mult}")
    largest = make_divisible(base_width * width_mult, divisor)
    smallest = min(make_divisible(base_width * min_ratio, divisor), largest)
    # both ends are multiples of divisor, so the range ends exactly at the largest
    return tuple(range(smallest, largest + 1, divisor))


def width_at(ratio: float, channels: int) -> int:
    """The channels a layer of ``channels`` keeps at width ``ratio``: the first ceil(ratio * n),
    at least one. Rounded first: in floats 0.28 * 25 is 7.000000000000001, whose ceil is 8."""
    return max(1, math.ceil(round(ratio * channels, 9)))


class WidthSpace:
    """The ordered tied groups of a network and the configs they allow."""

    def __init__(self, groups: Iterable[ChannelGroup]):
        try:
            self.groups = tuple(groups)
        except TypeError:
            self.groups = None
        if self.groups is None or not all(isinstance(g, ChannelGroup) for g in self.groups):
            raise ValueError(f"WidthSpace: groups must be ChannelGroups, got {groups!r:.200}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"WidthSpace: duplicate group names {names}")
        self._by_name = {g.name: g for g in self.groups}

    def __getitem__(self, name: str) -> ChannelGroup:
        return self._by_name[name]

    def names(self) -> list[str]:
        """The groups' names, in order."""
        return [g.name for g in self.groups]

    def largest(self) -> SubnetConfig:
        """Every group at its largest choice: the super-network."""
        return SubnetConfig(tuple((g.name, g.choices[-1]) for g in self.groups))

    def smallest(self) -> SubnetConfig:
        """Every group at its smallest choice."""
        return SubnetConfig(tuple((g.name, g.choices[0]) for g in self.groups))

    def uniform(self, ratio: float) -> SubnetConfig:
        """Every group at about ``ratio`` of its maximum (rounded up to an allowed width)."""
        if not 0 < checked_real(ratio, "ratio", "uniform") <= 1:
            raise ValueError(f"uniform: ratio must be in (0, 1], got {ratio!r}")
        widths = []
        for g in self.groups:
            target = width_at(ratio, g.max_width)
            widths.append((g.name, next((c for c in g.choices if c >= target), g.choices[-1])))
        return SubnetConfig(tuple(widths))

    def sample(self, generator: torch.Generator | None = None) -> SubnetConfig:
        """A random config: each group's width drawn independently from its choices (so in
        general non-uniform; in a small space it may be an end, or uniform)."""
        widths = []
        for g in self.groups:
            index = int(torch.randint(len(g.choices), (1,), generator=generator))
            widths.append((g.name, g.choices[index]))
        return SubnetConfig(tuple(widths))

    def validate(self, config: SubnetConfig | Mapping[str, int]) -> SubnetConfig:
        """Return ``config`` as a SubnetConfig in group order, or raise ValueError naming what is
        wrong: a group missing or unknown, a width that is no int in [1, the group's largest].
        A width need not be one of the group's ``choices``: a layer runs any width up to its
        filters; the choices are what ``sample``, ``uniform`` and progressive slimming pick from."""
        if not isinstance(config, (SubnetConfig, Mapping)):
            raise ValueError(f"config must be a SubnetConfig or a mapping of group names to widths, got "
                             f"{type(config).__name__} {config!r:.100}")
        widths = config.to_dict() if isinstance(config, SubnetConfig) else dict(config)
        missing = [n for n in self.names() if n not in widths]
        unknown = [n for n in widths if n not in self._by_name]
        if missing or unknown:
            raise ValueError(f"config does not match the network's groups: missing {missing}, unknown {unknown}")
        checked = []
        for g in self.groups:
            width = exact_int(widths[g.name])  # a float tensor has __index__ too, and int() would truncate it
            if isinstance(width, bool) or not isinstance(width, int):
                raise ValueError(f"config: group {g.name!r} width {widths[g.name]!r} is not an integer")
            if not 1 <= width <= g.max_width:
                raise ValueError(f"config: group {g.name!r} width {width} outside [1, {g.max_width}]")
            checked.append((g.name, width))
        return SubnetConfig(tuple(checked))

    def to_dict(self) -> dict:
        return {g.name: {"max_width": g.max_width, "choices": list(g.choices)} for g in self.groups}


@dataclass(frozen=True)
class RoutingEntry:
    """One candidate sub-network of a routing space: its config (a SubnetConfig, or a mapping
    of group names to widths, converted), its MACs/pixel and, when known, its validation PSNR.
    The MACs are taken as given (``macs_per_pixel(net, config)`` counts them; progressive
    slimming fills them in): a DDSNet's budgets and reports read them."""

    config: SubnetConfig
    macs_per_pixel: float
    psnr: float | None = None

    def __post_init__(self):
        # plain floats (numpy's too), never NaN: a NaN sorts nowhere, and set_budget's choice
        # would depend on the entries' order
        def real(value) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and _fits_float(value)

        # a mapping, as set_config takes it: to_dict and save need a SubnetConfig
        if isinstance(self.config, Mapping) and not isinstance(self.config, SubnetConfig):
            object.__setattr__(self, "config", SubnetConfig.from_dict(self.config))
        if not isinstance(self.config, SubnetConfig):
            raise ValueError(f"RoutingEntry: config must be a SubnetConfig or a mapping of group names to widths, "
                             f"got {type(self.config).__name__}")

        if not real(self.macs_per_pixel) or not 0 <= self.macs_per_pixel < math.inf:
            raise ValueError(f"RoutingEntry: macs_per_pixel must be a finite number >= 0, got {self.macs_per_pixel!r}")
        if self.psnr is not None and (not real(self.psnr) or math.isnan(self.psnr)):
            raise ValueError(f"RoutingEntry: psnr must be a number (not NaN) or None, got {self.psnr!r}")
        object.__setattr__(self, "macs_per_pixel", float(self.macs_per_pixel))
        if self.psnr is not None:
            object.__setattr__(self, "psnr", float(self.psnr))

    def to_dict(self) -> dict:
        """JSON values (``from_dict`` reads them back)."""
        return {"config": self.config.to_dict(), "macs_per_pixel": self.macs_per_pixel, "psnr": self.psnr}

    @classmethod
    def from_dict(cls, data: Mapping) -> "RoutingEntry":
        if not isinstance(data, Mapping) or not {"config", "macs_per_pixel"} <= set(data):
            raise ValueError(f"RoutingEntry: needs a mapping with 'config' and 'macs_per_pixel' (and 'psnr'), "
                             f"got {data!r}")
        return cls(SubnetConfig.from_dict(data["config"]), data["macs_per_pixel"], data.get("psnr"))


def checked_routing_space(owner: str, space: WidthSpace, entries) -> tuple[RoutingEntry, ...]:
    """``entries`` as a tuple of RoutingEntry whose configs fit ``space`` (in its group order),
    else a ValueError that names ``owner``."""
    try:
        entries = tuple(entries)
    except TypeError:
        entries = None
    if entries is None or not all(isinstance(e, RoutingEntry) for e in entries):
        raise ValueError(f"{owner}: the routing space must be a sequence of RoutingEntry (a config with its "
                         f"MACs/pixel)")
    checked = []
    for index, entry in enumerate(entries):
        try:
            checked.append(RoutingEntry(space.validate(entry.config), entry.macs_per_pixel, entry.psnr))
        except ValueError as error:
            raise ValueError(f"{owner}: routing_space[{index}] does not fit it: {error}") from None
    return tuple(checked)
