"""The stages of Algorithm 1 wired to data, the loop and checkpoints.

A run directory holds, per stage, its resumable state, its JSON-lines log and its result:
``stage1.safetensors`` (the once-for-all super-network), ``stage2.safetensors`` (the same
weights with the routing space found by progressive slimming), ``refine.safetensors`` (when
``refine_steps`` > 0: those weights trained further on the routing configs), ``dds.safetensors`` (the
DDSNet with its trained gate) and ``inet-<k>.safetensors`` (the individually trained
static baselines at the routing space's MACs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dds_fast
from dds_fast import AttentionSupernet, DDSNet, DynamicGate, SlimConv2d
from dds_fast.slim_conv import BACKENDS
from dds_fast.checkpoint import atomic_write, read_metadata, remove_leftovers, weights_fingerprint
from dds_fast.config import RoutingEntry, json_loads
from dds_fast.nets import constructor_misfit

from .data import (NoisyPatches, PairedPatches, SIDDValidation, as_float, bundled_images, check_pair_headers,
                   load_image_folder, make_validation_set, sidd_medium_pairs, sidd_validation_files, to_channels)
from .gate_stage import GATE_LABELS, gate_step, one_sided_labels
from .graphed import GraphedStep
from .loop import (STEP_SEED_STRIDE, LoopSettings, TrainLoop, cosine_factor, lead_done, rank_and_world, sole_writer,
                   step_generator)
from .noise import make_noise
from .sandwich import (DISTILLATIONS, DISTINCT_MIDDLE, LOSSES, MaskedSandwich, ends_fixed, reconstruction_loss,
                       routing_sandwich_configs, sandwich_configs, sandwich_step, training_psnr)
from .slimming import SLIM_CRITERIA, progressive_slimming, slimmer, thin_routing_space, validation_psnr

LR_SCHEDULES = ("cosine", "constant")
MAX_LR = 1e30
LARGEST_OPTION = 2 ** 31 - 1  # an integer option's bound: counts index tensors and loops

# Options that every stage's training depends on (its data; with clean images, their noise
# and which are held out too), and the trained network's shape; see Run.loop_options
DATA_OPTIONS = ("channels", "epoch_patches", "seed")
CLEAN_DATA_OPTIONS = ("noise", "noise_args", "validation_images")
NETWORK_OPTIONS = ("arch", "base_width", "depth")

# Held out of training by default, so reported numbers are on images the net never saw: two
# of the bundled photos, or the last two files by name of an image folder (see Run).
DEFAULT_VALIDATION_IMAGES = ("chelsea", "coins")
FOLDER_VALIDATION_IMAGES = 2


class OptionError(ValueError):
    """A bad combination of training options, which it names."""

    def __init__(self, message: str, *options: str):
        super().__init__(message)
        self.options = options


@dataclass
class TrainConfig:
    """Every option of a run; ``from_file`` reads a JSON file of these keys."""

    arch: str = "SlimUNet"
    channels: int = 3
    base_width: int = 16
    depth: int = 3
    noise: str = "awgn"
    noise_args: dict = field(default_factory=dict)  # default: the model's own (AWGN: sigma 25)
    images: str | None = None  # a folder of clean images; default: scikit-image's bundled photos
    validation_images: tuple[str, ...] | None = None  # held out of images; default: see Run
    paired_root: str | None = None  # a SIDD-Medium sRGB folder: train on its real noisy/clean pairs
    sidd_validation: str | None = None  # a folder of the SIDD validation blocks (.mat): validate on them
    patch_size: int = 64
    # each synthetic colour crop's channels in one of their 6 orders (ours: the bundled photos
    # hold almost no green, and a model trained without it turns greens olive)
    permute_channels: bool = True
    batch_size: int = 16
    # crops per epoch: the data order's period, and the gate's learning-rate decay step
    # (16384 / gate_batch_size steps: 1024 made the defaults decay 62 times over stage 3)
    epoch_patches: int = 16384
    steps: int = 2000
    lr: float = 2e-4
    lr_schedule: str = "cosine"  # or "constant"; stage 1, refine and the I-Nets (the gate has its own)
    sandwich: int = 4
    distillation: str = "synergy"
    loss: str = "l1"  # against the ground truth
    distillation_loss: str = "mse"  # against a teacher's output (see training/sandwich.py)
    slim_step: int = 16
    slim_criterion: str = "psnr"  # or "psnr_per_mac" (our addition; see training/slimming.py)
    num_choices: int = 4
    validation_crops: int = 4
    validation_patch: int = 128
    # default: as many as each route gets (stage 1's steps and refine's), for a fair comparison
    inet_steps: int | None = None
    refine_steps: int = 0  # sandwich steps on the routing configs after stage 2 (0: the paper's Algorithm 1)
    refine_lr: float = 2e-4
    refine_distillation: str | None = None  # default: the same as stage 1
    gate_steps: int = 1000
    gate_lr: float = 5e-5
    gate_lr_decay: float = 0.9  # per epoch
    gate_batch_size: int = 64
    gate_patch_size: int = 128
    beta: float = 0.2  # dB of PSNR gain that makes an image hard
    # stage 3's labels: "ends" (the paper's: the smallest or the largest route, by the
    # largest's gain over the smallest) or "within" (ours: the smallest route within beta of the largest)
    gate_labels: str = "ends"
    budget: float | None = None  # MACs/pixel; default: the middle of the routing space's range
    # the gate's attention head trained with the super-network (stages 1, 2 and refine run it
    # behind the head, as the paper); stage 3 trains the prediction head with it off
    attention: bool = True
    # weight of the complexity loss against the cross-entropy: with labels nearly all one way,
    # 1 (the paper's plain sum) lets the cross-entropy override the budget
    gate_complexity_weight: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"  # of every SlimConv2d: auto (Triton on CUDA), torch (cuDNN) or triton
    # Stage 1, refine and the I-Nets replay each step's forward and backward as one CUDA graph
    # (training/graphed.py): far fewer host launches; the sandwich's sub-networks whose config
    # varies from step to step run as masked widths, at full width. Off CUDA the same masked
    # steps run eagerly.
    graphs: bool = False
    progress: bool = True

    def __post_init__(self):
        """Types and ranges, checked before any training rather than by the stage that first needs them."""
        hints = typing.get_type_hints(type(self))
        for option in dataclasses.fields(self):  # (from_dict checked them already; a caller of the class not)
            value = getattr(self, option.name)
            if not _accepts(hints[option.name], value):
                raise ValueError(f"{option.name} must be {_describe(hints[option.name])}, got {value!r}")
        least = {"patch_size": 1, "batch_size": 1, "epoch_patches": 1, "steps": 1, "sandwich": 2, "slim_step": 1,
                 "num_choices": 2, "validation_crops": 1, "validation_patch": 1, "refine_steps": 0, "gate_steps": 1,
                 "gate_batch_size": 2, "gate_patch_size": 1, "checkpoint_every": 1, "seed": 0}
        for name, minimum in least.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")
        for name in (option.name for option in dataclasses.fields(self) if option.name != "seed"):
            value = getattr(self, name)
            if type(value) is int and abs(value) > LARGEST_OPTION:
                raise ValueError(f"{name} must be at most {LARGEST_OPTION}, got {value}")
        largest_seed = (2 ** 64 - STEP_SEED_STRIDE) // STEP_SEED_STRIDE  # every step's seed fits torch's 64 bits
        if self.seed > largest_seed:
            raise ValueError(f"seed must be at most {largest_seed}, got {self.seed}")
        # stage 1's and refine's step streams are seed * STEP_SEED_STRIDE + step (step from 0):
        # a later step would be another seed's
        for name in ("steps", "refine_steps"):
            if getattr(self, name) > STEP_SEED_STRIDE:
                raise ValueError(f"{name} must be at most {STEP_SEED_STRIDE:,}, got {getattr(self, name):,}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("images", "paired_root", "sidd_validation"):
            if getattr(self, name) == "":  # (Path("") is the current folder)
                raise ValueError(f"{name} must name a folder, got an empty path (leave it unset for the default)")
        try:  # built now, so that a bad model or argument is blamed on where it came from
            make_noise(self.noise, **self.noise_args)
        except (ValueError, TypeError) as error:
            raise OptionError(str(error), "noise", "noise_args") from None
        if self.inet_steps is not None and self.inet_steps < 1:
            raise ValueError(f"inet_steps must be >= 1 (or null: steps + refine_steps), got {self.inet_steps}")
        for name in ("lr", "refine_lr", "gate_lr") + (("budget",) if self.budget is not None else ()):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("lr", "refine_lr", "gate_lr"):
            # Adam's first step is about 10 x lr, which past fp32's range fails in the optimizer, not as a divergence
            if getattr(self, name) > MAX_LR:
                raise ValueError(f"{name} must be at most {MAX_LR:g} (Adam's steps overflow fp32 beyond), got "
                                 f"{getattr(self, name)}")
        if not 0 < self.gate_lr_decay <= 1:
            raise ValueError(f"gate_lr_decay must be in (0, 1], got {self.gate_lr_decay}")
        if not (math.isfinite(self.gate_complexity_weight) and self.gate_complexity_weight >= 0):
            raise ValueError(f"gate_complexity_weight must be a non-negative number, got {self.gate_complexity_weight}")
        if not math.isfinite(self.beta):
            raise ValueError(f"beta must be a finite number, got {self.beta}")
        if self.sidd_validation is not None and self.validation_images is not None:
            raise OptionError("validation_images and sidd_validation both name what stage 2 validates on (held-out "
                              "images, or the SIDD validation blocks): set one of them",
                              "validation_images", "sidd_validation")
        for name in ("batch_size", "gate_batch_size"):  # stage 3 draws its batches from an epoch too
            if getattr(self, name) > self.epoch_patches:
                raise OptionError(f"{name} {getattr(self, name)} is larger than epoch_patches {self.epoch_patches}: "
                                  f"an epoch holds no batch", name, "epoch_patches")

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        path = Path(path)
        try:
            values = json_loads(path.read_text(encoding="utf-8-sig"))  # (Windows editors may start with a BOM)
        except (OSError, ValueError) as error:  # (ValueError: decoding errors, JSON's and a repeated key)
            raise ValueError(f"cannot read training config {path}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of training options, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides}, source=str(path), flags=overrides)

    @classmethod
    def from_dict(cls, values: dict, source: str = "options", flags: typing.Collection[str] = ()) -> "TrainConfig":
        """A config from ``{option: value}`` (JSON types: a list for a tuple, an integer for a
        float), each value checked against its field's type. An error names where its option
        came from: its flag for the options in ``flags`` (given on the command line), else
        ``source``."""
        def where(option: str) -> str:
            if option in flags:
                return f"--{option.replace('_', '-')}"
            return source if option in values else "the default"

        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of training options, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"{source}: unknown training options {unknown}")
        for name, value in values.items():
            if not _accepts(hints[name], value):
                raise ValueError(f"{where(name)}: {name} must be {_describe(hints[name])}, got {value!r}")
            if _takes_float(hints[name], value) and abs(value) > sys.float_info.max:  # (float() would overflow)
                raise ValueError(f"{where(name)}: {name} must be a number within a float's range, got an integer of "
                                 f"{len(str(abs(value)))} digits")
        try:
            config = cls(**{name: _converted(hints[name], value) for name, value in values.items()})
        except OptionError as error:  # a check of two options: where each came from
            origins = [where(o) for o in error.options]
            prefix = origins[0] if len(set(origins)) == 1 else ", ".join(
                f"{o} from {origin}" for o, origin in zip(error.options, origins))
            raise ValueError(f"{prefix}: {error}") from None
        except ValueError as error:  # (each range check's message starts with its option's name)
            raise ValueError(f"{where(str(error).split(' ', 1)[0])}: {error}") from None
        choices = {"backend": BACKENDS, "lr_schedule": LR_SCHEDULES, "distillation": DISTILLATIONS,
                   "refine_distillation": DISTILLATIONS + (None,), "slim_criterion": SLIM_CRITERIA,
                   "loss": tuple(sorted(LOSSES)), "distillation_loss": tuple(sorted(LOSSES)),
                   "gate_labels": GATE_LABELS}
        for option, allowed in choices.items():
            if getattr(config, option) not in allowed:
                raise ValueError(f"{where(option)}: unknown {option} {getattr(config, option)!r}; choose one of "
                                 f"{tuple(a for a in allowed if a is not None)}")
        return config

    def resolved_device(self) -> torch.device:
        """The training device; a ValueError when this machine lacks it."""
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"unknown device {self.device!r}: {error}") from None
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device {self.device!r}: dds-fast runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "cuda" and device.index is None and torch.distributed.is_initialized():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
        return device


@contextlib.contextmanager
def _seeded(seed: int):
    """Torch's global CPU generator seeded with ``seed`` inside (new layers draw their initial
    weights from it, on the CPU), and the caller's random state as it was after: a stage's
    weights depend on the config's seed alone, and the caller's stream on the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def _same_inputs(recorded, now: dict) -> bool:
    """Whether stage 2's ``recorded`` inputs are ``now``'s; the files of earlier versions
    recorded no digest of the data."""
    return isinstance(recorded, dict) and recorded == {k: v for k, v in now.items() if k != "data" or k in recorded}


def slimming_length(space, step: int) -> int:
    """How many configs progressive slimming of ``space`` by ``step`` channels yields: the
    largest, then one per slimming of one group, until none can shrink; which group goes first
    does not change the count."""
    config, length = space.largest(), 1
    for group in space.groups:
        while (width := slimmer(config, group, step)) is not None:
            config, length = config.replace(**{group.name: width}), length + 1
    return length


def _union_args(hint) -> tuple | None:
    """The members of ``X | Y`` (or ``Optional[X]``), None for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _accepts(hint, value) -> bool:
    """Whether a JSON-like ``value`` fits the field type ``hint``."""
    members = _union_args(hint)
    if members is not None:
        return any(_accepts(member, value) for member in members)
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a list or tuple of X
        return isinstance(value, (list, tuple)) and all(_accepts(typing.get_args(hint)[0], v) for v in value)
    if hint in (int, float) and isinstance(value, bool):  # JSON true is no number
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint) -> str:
    members = _union_args(hint)
    if members is not None:
        return " or ".join(_describe(member) for member in members)
    if typing.get_origin(hint) is tuple:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a JSON object",
            type(None): "null"}[hint]


def _converted(hint, value):
    """``value`` as the field stores it: a tuple for a list, a float for an integer."""
    if isinstance(value, list):
        return tuple(value)
    if _takes_float(hint, value):
        return float(value)
    return value


def _takes_float(hint, value) -> bool:
    """Whether ``value`` is an integer that a float option stores as a float."""
    return isinstance(value, int) and not isinstance(value, bool) and float in (_union_args(hint) or (hint,))


def super_network_of(model):
    """What a stage builds on: ``model``, or a DDSNet's super-network with its routing space
    (behind the gate's attention head where that is on, as stage 1 trained it): a shipped model
    copied into a run folder as an earlier stage's result."""
    if not isinstance(model, DDSNet):
        return model
    body = AttentionSupernet(model.supernet, model.gate) if model.gate.attention else model.supernet
    body.routing_space = model.routing_space
    return body


class Run:
    """One run directory: the data, the network and the stages of a TrainConfig.

    Training data: the real pairs of ``paired_root`` (SIDD-Medium) when set, else the clean
    ``images`` with noise from the noise model. Validation (stage 2, refine): the SIDD blocks
    of ``sidd_validation`` when set, else the noise model on clean images held out of
    training: ``validation_images`` (names; a folder's file names relative to it), by default
    chelsea and coins of the bundled photos, or the last two files by name of a folder (the
    last one of a folder of two; beside real pairs, every one)."""

    def __init__(self, run_dir, config: TrainConfig):
        self.dir = Path(run_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"run dir {self.dir} is a file, not a folder")
        self.config = c = config
        self.device = config.resolved_device()
        if config.graphs and self.device.type != "cuda":
            warnings.warn(f"graphs: there are no CUDA graphs on {self.device.type}; the sandwich's varying "
                          f"sub-networks run as masked widths, eagerly, which costs more than without graphs")
        # (checked here, not in TrainConfig: configs stored by earlier versions must still load)
        if c.images is not None and c.paired_root is not None and c.sidd_validation is not None:
            raise OptionError("images would go unused: paired_root gives the training pairs and sidd_validation the "
                              "validation blocks; drop images", "images")
        if c.validation_images is not None and len(set(c.validation_images)) < len(c.validation_images):
            repeated = sorted({name for name in c.validation_images if c.validation_images.count(name) > 1})
            raise OptionError(f"validation_images names {repeated} more than once", "validation_images")
        self.noise = make_noise(config.noise, **config.noise_args)
        self.loss_fn = reconstruction_loss(config.loss)
        self.distillation_loss_fn = reconstruction_loss(config.distillation_loss)
        # real data is checked now (paths, and what files' headers tell), not after hours of stage 1
        self.pairs = sidd_medium_pairs(c.paired_root) if c.paired_root else None
        self.pair_sizes = check_pair_headers(self.pairs, c.patch_size) if self.pairs else None
        if c.sidd_validation:
            sidd_validation_files(c.sidd_validation, check_blocks=True)
        self.train_images, self.validation_images = ({}, {}) if self.pairs and c.sidd_validation else self._clean_images()
        if not c.sidd_validation:  # stage 2 crops these, after stage 1
            for name, image in self.validation_images.items():
                if min(image.shape[-2:]) < c.validation_patch:
                    raise ValueError(f"validation_patch {c.validation_patch} is larger than the held-out image "
                                     f"{name} of size {tuple(image.shape[-2:])}")
            self.check_noise_on_crops("validation_patch")
        # stage 2 thins the slimming trajectory to num_choices configs, after stage 1
        net = self.new_network()
        configs = slimming_length(net.space, c.slim_step)
        for option in ("patch_size", "validation_patch", "gate_patch_size"):
            size, multiple = getattr(c, option), net.size_multiple
            if size % multiple:  # (a depth-10 U-Net pads 16-pixel crops to 512: 1,024 times the pixels)
                padded = -(-size // multiple) * multiple
                warnings.warn(f"{option} {size} is not a multiple of {multiple}, which this {c.arch} of depth "
                              f"{c.depth} pads its input to: each crop runs at {padded} x {padded} pixels, "
                              f"{padded ** 2 / size ** 2:.3g} times its own")
        if c.num_choices > configs:
            raise ValueError(f"num_choices {c.num_choices} is more than the {configs} configs that progressive "
                             f"slimming by slim_step {c.slim_step} finds in this {c.arch} (base_width {c.base_width}, "
                             f"depth {c.depth}): lower num_choices or slim_step")

    def check_stages(self, stages: typing.Iterable[str]) -> None:
        """What the named stages need that can be checked before any of them runs (``dds-fast
        train`` asks first, so that ``train all`` does not stop at stage 3 hours in): each
        batch splits over the processes, the gate's into shares of two images or more (its
        BatchNorm normalises each process's share), and the training and stage 3's crops fit
        the images."""
        c = self.config
        world = rank_and_world()[1]
        stages = set(stages)
        batches = [("batch_size", c.batch_size, 1)] if stages & {"stage1", "refine", "inets"} else []
        if stages & {"stage1", "refine", "inets"}:  # (before the noise check below, which crops at that size)
            self.check_crops("patch_size")
        if "stage3" in stages:
            batches.append(("gate_batch_size", c.gate_batch_size, 2))
            self.check_crops("gate_patch_size")
            self.check_budget()
        if self.pairs is None:  # (real pairs carry their own noise)
            if stages & {"stage1", "refine", "inets"}:
                self.check_noise_on_crops("patch_size")
            if "stage3" in stages:
                self.check_noise_on_crops("gate_patch_size")
        for name, size, least in batches:
            if size > self.epoch_length:  # (fewer than epoch_patches where the pairs do not divide it)
                raise ValueError(f"{name} {size} is more than an epoch's {self.epoch_length} crops of "
                                 f"{len(self.pairs)} pairs (epoch_patches {c.epoch_patches}): raise epoch_patches")
            if size % world:
                raise ValueError(f"{name} {size} does not split over {world} processes")
            if size // world < least:
                raise ValueError(f"{name} {size} over {world} processes leaves {size // world} image to each; "
                                 f"the gate's BatchNorm needs {least} or more: raise {name}")

    def check_noise_on_crops(self, option: str) -> None:
        """The noise model runs on crops of ``option``'s size (camera noise's Bayer mosaic needs
        2 x 2 pixels): found before the stages, not at the first batch of the stage that crops so."""
        c = self.config
        size = getattr(c, option)
        try:
            self.noise.pair(torch.full((1, c.channels, size, size), 0.5), torch.Generator().manual_seed(0))
        except ValueError as error:
            raise ValueError(f"{option} {size}: the {c.noise!r} noise does not run on crops of that size "
                             f"({error})") from None

    def check_budget(self) -> None:
        """Stage 3's budget lies within the MACs/pixel of the width space's ends as a DDSNet runs
        them (the full-width stem counted): no routing space stage 2 finds could take it else."""
        c = self.config
        if c.budget is None:  # (the middle of the routes' range)
            return
        with _seeded(c.seed):  # (the throwaway gate's weights: the caller's stream stays as it was)
            net = self.new_network()
            ends = [RoutingEntry(config, dds_fast.macs_per_pixel(net, config))
                    for config in (net.space.smallest(), net.space.largest())]
            low, high = DDSNet(net, DynamicGate(net.stem_channels, 2), ends).dynamic_macs_per_pixel
        if not low <= c.budget <= high:
            raise ValueError(f"budget {c.budget:,.0f} MACs/pixel is outside what any routes of this {c.arch} cost, "
                             f"{low:,.0f} to {high:,.0f} (its smallest and largest configs, the full-width stem the "
                             f"gate reads counted)")

    def check_crops(self, option: str) -> None:
        """Crops of ``option``'s size (``patch_size``, or stage 3's ``gate_patch_size``) fit the
        training images: ``train all`` asks before stage 1, so a misfit is not found hours later
        (stages that do not crop at that size do not ask)."""
        size = getattr(self.config, option)
        sizes = ([(name, tuple(image.shape[-2:])) for name, image in self.train_images.items()] if self.pairs is None
                 else [(f"{noisy} (and {clean})", size) for (noisy, clean), size in zip(self.pairs, self.pair_sizes)
                       if size is not None])
        for name, image_size in sizes:
            if min(image_size) < size:
                raise ValueError(f"{option} {size} is larger than the training image {name} of size {image_size}")

    @property
    def epoch_length(self) -> int:
        """The crops of an epoch: ``epoch_patches``, or with real pairs as many crops of each
        as fit in it (at least one)."""
        c = self.config
        return c.epoch_patches if self.pairs is None else len(self.pairs) * self._patches_per_pair

    @property
    def _patches_per_pair(self) -> int:
        return max(1, self.config.epoch_patches // len(self.pairs))

    def _clean_images(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The training and the held-out clean images, keyed by name (a folder's by file path,
        so that errors name the file)."""
        c = self.config
        if c.images is None:
            images, default = bundled_images(channels=c.channels), DEFAULT_VALIDATION_IMAGES
        else:
            images = load_image_folder(c.images, channels=c.channels, keep_8_bit=True)  # sorted by name
            # (beside real pairs the folder's images validate only)
            default = tuple(images)[0 if c.paired_root else max(1, len(images) - FOLDER_VALIDATION_IMAGES):]
        held_out = () if c.sidd_validation else default if c.validation_images is None else c.validation_images
        missing = [name for name in held_out if name not in images]
        if missing:
            raise ValueError(f"validation images {missing} are not among the clean images {list(images)}")
        if not held_out and not c.sidd_validation:
            raise ValueError(f"no clean image is held out for validation among {list(images)}: "
                             f"add images or set sidd_validation")
        if not c.paired_root and set(held_out) == set(images):
            raise ValueError(f"every clean image ({list(images)}) is held out for validation; none is left to train on")
        unused = [name for name in images if name not in held_out]
        if c.paired_root and c.images is not None and unused:
            raise OptionError(f"images {unused} in {c.images} would go unused: beside paired_root's training pairs "
                              f"the folder's images validate only, and validation_images names {list(held_out)}; "
                              f"leave validation_images unset to validate on every one, or move the others out",
                              "images", "validation_images")
        key = (lambda name: str(Path(c.images) / name)) if c.images else str
        return ({key(name): image for name, image in images.items() if name not in held_out},
                {key(name): images[name] for name in held_out})

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """A digest of the data the run trains and validates on: the clean images' names
        (relative to their folder) and pixels, the real pairs' and SIDD blocks' names and file
        sizes. In the stages' options in place of the folders' paths: a folder moved is the
        same data, another folder is not."""
        c = self.config
        digest = hashlib.sha256()
        for images in (self.train_images, self.validation_images):
            for key, image in sorted(images.items()):
                digest.update(os.path.relpath(key, c.images).encode() if c.images else key.encode())
                # the float pixels, as runs hashed them before 8-bit images stayed uint8 (a
                # float32 image's buffer: no copy)
                digest.update(as_float(image).contiguous().numpy())
            digest.update(b"\0")
        files = [path for pair in self.pairs or () for path in pair]
        roots = [c.paired_root] * len(files)
        if c.sidd_validation:
            files += sidd_validation_files(c.sidd_validation)
            roots += [c.sidd_validation] * 2
        for path, root in zip(files, roots):
            digest.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}".encode())
        return digest.hexdigest()

    # -- pieces -------------------------------------------------------------------------
    def new_network(self, attention_choices: int | None = None):
        """A new super-network of the config, its weights drawn from the config's seed; with
        ``attention_choices``, behind a new gate of that many choices (an AttentionSupernet)."""
        c = self.config
        cls = dds_fast.ARCHITECTURES.get(c.arch)
        if cls is None or not issubclass(cls, dds_fast.SlimNet):
            known = sorted(name for name, kind in dds_fast.ARCHITECTURES.items() if issubclass(kind, dds_fast.SlimNet))
            raise ValueError(f"unknown architecture {c.arch!r}; choose one of {known} (a super-network of your own: "
                             f"import the module that registers it first, dds-fast --import MODULE train ...)")
        kwargs = dict(in_channels=c.channels, base_width=c.base_width, depth=c.depth)
        misfit = constructor_misfit(cls, kwargs)
        if misfit is not None:
            raise ValueError(f"arch {c.arch}: training builds it as {c.arch}(in_channels=..., base_width=..., "
                             f"depth=...) from the options channels, base_width and depth, which its constructor "
                             f"does not take ({misfit})")
        with _seeded(c.seed):
            net = cls(**kwargs)
            if attention_choices is not None:
                net = AttentionSupernet(net, DynamicGate(net.stem_channels, attention_choices))
        return self.prepare(net.to(self.device))

    def load(self, name: str, attention_matters: bool = True):
        """A result of an earlier stage of this run (``<stage>.safetensors``), checked against its
        config (its attention setting too, unless ``attention_matters`` is off: the I-Nets read
        only its routing space)."""
        if not (self.dir / name).exists():
            stage = Path(name).stem
            hint = f": run `dds-fast train {stage}` first" if stage in ("stage1", "stage2", "refine") else ""
            raise FileNotFoundError(f"{self.dir / name} does not exist{hint}")
        model = super_network_of(dds_fast.load(self.dir / name, map_location=self.device))
        self.check_earlier_result(name, model, attention_matters)
        return self.prepare(model)

    def check_earlier_result(self, name: str, model, attention_matters: bool = True) -> None:
        """``model``, read from ``name`` in the run folder, was trained for the network this
        config builds, and a routing space in it has ``num_choices`` routes slimmed with this
        config's options: a stage run alone must not build on a result of other options."""
        c = self.config
        path = self.dir / name
        self.check_network(model, str(path))
        # what the network runs, not what its config says: a model copied in records none, or
        # one from before the option (the shipped model's gate runs no attention scale)
        attended = isinstance(model, AttentionSupernet)
        if attention_matters and attended != c.attention:
            raise ValueError(f"{path} holds a network {'behind' if attended else 'without'} the gate's attention "
                             f"head; this run's config has attention {c.attention}: set attention {attended} "
                             f"(--{'' if attended else 'no-'}attention), or run the earlier stages again with it")
        user = read_metadata(path)["user"]
        trained = user.get("train_config") or {}  # (none: a model copied in, not trained by a run)
        shape = NETWORK_OPTIONS + ("channels",)  # (attention: what the network runs, above)
        differ = [o for o in shape if o in trained and trained[o] != getattr(c, o)]
        if differ:
            raise ValueError(f"{path} was trained with " + ", ".join(f"{o} {trained[o]!r}" for o in differ)
                             + "; this run's config has " + ", ".join(f"{o} {getattr(c, o)!r}" for o in differ)
                             + ": run the earlier stages again with it, or use another --run-dir")
        # (the options that shape the routing space, not the validation data it was picked on: a
        # stage 3 or I-Net run with another seed or noise builds on it as it is)
        made_from = user.get("made_from") or {}
        stale = [o for o in ("slim_step", "slim_criterion") if o in made_from and made_from[o] != getattr(c, o)]
        if stale:
            raise ValueError(f"{path}'s routing space was slimmed with " + ", ".join(
                f"{o} {made_from[o]!r}" for o in stale) + ", this run's config has " + ", ".join(
                f"{o} {getattr(c, o)!r}" for o in stale) + ": run `dds-fast train stage2` again")
        routes = getattr(model, "routing_space", None)
        if routes is not None and len(routes) != c.num_choices:
            raise ValueError(f"{path} holds {len(routes)} routing configs, num_choices is {c.num_choices}: run "
                             f"`dds-fast train stage2` again, or set num_choices {len(routes)}")

    def check_network(self, model, where: str) -> None:
        """``model`` (its super-network, behind a gate or in a DDSNet), given to a stage or
        read from ``where``, is of the config's architecture, which the run records with it."""
        net = model.supernet if isinstance(model, (AttentionSupernet, DDSNet)) else model
        if type(net).__name__ != self.config.arch:
            raise ValueError(f"{where} is a {type(net).__name__}, and this run's config has arch {self.config.arch!r}: "
                             f"set arch {type(net).__name__} (--arch)")

    def slimming_inputs(self) -> dict:
        """What stage 2's routing space depends on besides stage 1's weights, as JSON keeps it."""
        c = self.config
        # what validation_batches reads: SIDD blocks, or noise added to held-out clean images
        validation = ({"sidd_validation": True} if c.sidd_validation else
                      {name: getattr(c, name) for name in ("noise", "noise_args", "validation_images",
                                                           "validation_patch", "seed")})
        slimming = {name: getattr(c, name) for name in ("channels", "batch_size", "validation_crops", "slim_step",
                                                         "slim_criterion", "num_choices")}
        return json.loads(json.dumps({**validation, "data": self.data_fingerprint, **slimming}))

    def prepare(self, model):
        """The configured conv backend; on a GPU, channels_last weights (the kernels' aligned
        fast path, and cuDNN's preferred layout for channels_last activations)."""
        for module in model.modules():
            if isinstance(module, SlimConv2d):
                module.backend = self.config.backend
        if self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        return model

    def dataset(self, patch_size: int | None = None) -> NoisyPatches | PairedPatches:
        c = self.config
        patch_size = patch_size or c.patch_size
        if self.pairs is not None:
            # about epoch_patches crops an epoch; the loop reads the items in order, and a
            # batch takes its crops from batch_size pairs (their decoded images are cached:
            # about 100 MB a SIDD-Medium pair), so each image is decoded once an epoch
            return PairedPatches(self.pairs, patch_size, patches_per_pair=self._patches_per_pair,
                                 channels=c.channels, seed=c.seed, interleave=min(c.batch_size, len(self.pairs)))
        return NoisyPatches(self.train_images, self.noise, patch_size=patch_size, length=c.epoch_patches, seed=c.seed,
                            permute_channels=c.permute_channels)

    def validation_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        if c.sidd_validation:
            blocks = SIDDValidation(c.sidd_validation)
            # validation_crops blocks of each image, as the synthetic set takes that many crops of each
            pairs = [tuple(to_channels(x, c.channels) for x in blocks[i]) for i in range(len(blocks))
                     if i % blocks.blocks_per_image < c.validation_crops]
        else:
            if self.pairs is not None:
                warnings.warn(f"training on the real pairs of {c.paired_root} but validating with the {c.noise!r} "
                              f"noise model on clean images: set sidd_validation to validate on real pairs too")
            pairs = make_validation_set(self.validation_images, self.noise, seed=c.seed + 1,
                                        patch_size=c.validation_patch, crops_per_image=c.validation_crops)
        noisy = torch.stack([n for n, _ in pairs]).to(self.device)
        clean = torch.stack([k for _, k in pairs]).to(self.device)
        return [(noisy[i:i + c.batch_size], clean[i:i + c.batch_size]) for i in range(0, len(noisy), c.batch_size)]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sandwich(self, net, distillation: str, fixed):
        """``(noisy, clean, configs) -> losses``: one sandwich step's forwards and backwards;
        with ``graphs``, a CUDA-graph replay in which the sub-networks whose config ``fixed``
        gives run at their widths and the others as masked widths (``MaskedSandwich``)."""
        if self.config.graphs:
            return MaskedSandwich(net, distillation, self.loss_fn, self.autocast, self.distillation_loss_fn,
                                  fixed=fixed)
        return lambda noisy, clean, configs: sandwich_step(net, noisy, clean, configs, distillation, self.loss_fn,
                                                           self.autocast, self.distillation_loss_fn)

    def settings(self, steps: int, batch_size: int | None = None) -> LoopSettings:
        c = self.config
        return LoopSettings(steps=steps, batch_size=batch_size or c.batch_size, checkpoint_every=c.checkpoint_every,
                            progress=c.progress)

    def lr_factor(self, steps: int):
        return cosine_factor(steps) if self.config.lr_schedule == "cosine" else None

    def loop_options(self, *names: str, schedule_steps: int | None = None, **values) -> dict:
        """What a stage's training depends on, for its state file (TrainLoop refuses a resume
        with others): the options ``names`` of the config, the lr schedule of ``schedule_steps``
        steps (where it spans them, the steps), and ``values``. The data's locations are left
        out, its ``data_fingerprint`` in: a folder moved is the same data."""
        c = self.config
        data = DATA_OPTIONS + (CLEAN_DATA_OPTIONS if self.pairs is None else ())
        options = {name: getattr(c, name) for name in data + names}
        # (named only when on: a run of an earlier version, which never permuted, resumes with it off)
        if self.pairs is None and c.permute_channels:
            options["permute_channels"] = True
        options["data"] = self.data_fingerprint
        if schedule_steps is not None:
            options["lr_schedule"] = c.lr_schedule
            if c.lr_schedule == "cosine":
                options["steps"] = schedule_steps
        return {**options, **values}

    def save(self, model, name: str, **metadata) -> Path:
        """Write a result on rank 0; every rank waits for it (a no-op in one process)."""
        path = self.dir / name
        if rank_and_world()[0] == 0:
            remove_leftovers(path)  # of a write a kill stopped: a run is the only writer of its results
            dds_fast.save(model, path, train_config=dataclasses.asdict(self.config), **metadata)
        lead_done()
        return path

    # -- stages -------------------------------------------------------------------------
    def stage1(self):
        """Once-for-all weights: sandwich rule with In-place Synergy (or the ablations), behind
        the gate's attention head when ``attention`` (an AttentionSupernet)."""
        c = self.config
        self.check_stages({"stage1"})
        net = self.new_network(c.num_choices if c.attention else None)
        optimizer = torch.optim.Adam(net.parameters(), lr=c.lr)

        sandwich = self.sandwich(net, c.distillation, ends_fixed(net.space.largest(), net.space.smallest(), c.sandwich))

        def step_fn(step, noisy, clean):
            return sandwich(noisy, clean, sandwich_configs(net.space, c.sandwich, step_generator(c.seed, step)))

        # the gate the body trains behind has num_choices outputs
        gate_shape = ("num_choices",) if c.attention else ()
        options = self.loop_options(*NETWORK_OPTIONS, "attention", *gate_shape, "patch_size", "lr", "sandwich",
                                    "distillation", "loss", "distillation_loss", schedule_steps=c.steps,
                                    middle_draws=DISTINCT_MIDDLE)
        TrainLoop(self.dir, "stage1", net, optimizer, self.dataset(), step_fn, self.settings(c.steps),
                  device=self.device, lr_factor=self.lr_factor(c.steps), options=options).run()
        net.set_config(net.space.largest())
        self.save(net, "stage1.safetensors", stage=1)
        return net

    def stage2(self, net=None):
        """Progressive slimming on the validation crops: the routing space. Runs on rank 0;
        the other ranks wait and load its result. ``net``: the super-network to slim (of the
        config's arch), else stage 1's."""
        c = self.config
        if net is not None:
            self.check_network(net, "the network given to stage 2")
            net = super_network_of(net)
        # what the routing space depends on: a rerun (``train all`` resuming after a kill)
        # reuses it, as slimming on a GPU need not pick the same configs twice and the later
        # stages' state files hold them
        made_from = None
        if net is None:
            stage1 = self.dir / "stage1.safetensors"
            # (dds_fast.load: a truncated or corrupt file is a CheckpointError that names it)
            net = self.load("stage1.safetensors") if stage1.exists() else None
            made_from = {**self.slimming_inputs(),
                         # its tensors, not its bytes: stage 1 rewrites the file on every rerun, and
                         # safetensors orders the metadata differently in each process
                         "stage1": None if net is None else weights_fingerprint(net.state_dict())}
            done = self.dir / "stage2.safetensors"
            if done.exists():
                user = read_metadata(done)["user"]
                if _same_inputs(user.get("made_from"), made_from):
                    if rank_and_world()[0] == 0:
                        self._log_trajectory(user.get("trajectory"))
                    return self.load("stage2.safetensors")
        net = self.load("stage1.safetensors") if net is None else net
        net.eval()
        rank, world = rank_and_world()
        if rank == 0:
            with sole_writer(self.dir, "stage2"), (self.dir / "stage2.log.jsonl").open("w") as log:
                def on_step(entry: RoutingEntry):
                    log.write(json.dumps(entry.to_dict()) + "\n")
                    log.flush()

                trajectory = progressive_slimming(net, self.validation_batches(), step=c.slim_step, on_step=on_step,
                                                  criterion=c.slim_criterion)
                net.routing_space = thin_routing_space(trajectory, c.num_choices)
                remove_leftovers(self.dir / "stage2.safetensors")
                dds_fast.save(net, self.dir / "stage2.safetensors", stage=2, train_config=dataclasses.asdict(c),
                              trajectory=[e.to_dict() for e in trajectory], made_from=made_from)
        if world > 1:
            lead_done()
            net = self.load("stage2.safetensors")
        return net

    def _log_trajectory(self, trajectory) -> None:
        """Stage 2's log as its reused result's search wrote it: a search killed since (another
        one's, with other options) left its own records there."""
        if trajectory is None:  # (results of earlier versions recorded none)
            return
        text = "".join(json.dumps(entry) + "\n" for entry in trajectory)
        log = self.dir / "stage2.log.jsonl"
        if not log.exists() or log.read_text() != text:
            atomic_write(log, lambda tmp: tmp.write_text(text))

    def refine(self, net=None, random_configs: bool = False):
        """Our addition to Algorithm 1, run when ``refine_steps`` > 0: more sandwich steps
        (with ``refine_distillation``, by default stage 1's) whose sub-networks are the routing
        configs themselves. Stage 1 samples configs at random, so the routing configs between
        the largest and the smallest are trained far less than either, and they trail I-Nets
        at their MACs. The routing entries' validation PSNR is measured again after.
        ``random_configs`` draws stage 1's random configs instead: the control of
        ``benchmarks/ablate_refine.py``. ``net``: a super-network with its routing space (of the
        config's arch), else stage 2's."""
        c = self.config
        if c.refine_steps < 1:
            raise ValueError(f"refine_steps is {c.refine_steps}: set it (--refine-steps) to refine the routing configs")
        self.check_stages({"refine"})
        if net is not None:
            self.check_network(net, "the network given to refine")
            net = super_network_of(net)
        given = net is not None
        net = self.load("stage2.safetensors") if net is None else net
        # what stage 2 slimmed with goes on with the routes, for the stages that build on refine's
        made_from = None if given else read_metadata(self.dir / "stage2.safetensors")["user"].get("made_from")
        routing_space = net.routing_space
        if not routing_space:
            raise ValueError("refining needs the routing space of stage 2")
        # in its options: a state file trained from other weights (stage 2's of a stage 1 that
        # trained on) is refused, not resumed, which would keep its older weights
        start_weights = weights_fingerprint(net.state_dict())
        net.train()
        for p in net.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(net.parameters(), lr=c.refine_lr)
        if random_configs:
            fixed = ends_fixed(net.space.largest(), net.space.smallest(), c.sandwich)
        elif len(routing_space) <= c.sandwich:  # every route at every step, in the same order
            fixed = routing_sandwich_configs(routing_space, c.sandwich, torch.Generator())
        else:
            fixed = ends_fixed(routing_space[-1].config, routing_space[0].config, c.sandwich)
        sandwich = self.sandwich(net, c.refine_distillation or c.distillation, fixed)

        def step_fn(step, noisy, clean):
            generator = step_generator(c.seed, step)
            configs = (sandwich_configs(net.space, c.sandwich, generator) if random_configs
                       else routing_sandwich_configs(routing_space, c.sandwich, generator))
            return sandwich(noisy, clean, configs)

        options = self.loop_options("patch_size", "refine_lr", "sandwich", "loss", "distillation_loss",
                                    schedule_steps=c.refine_steps, distillation=c.refine_distillation or c.distillation,
                                    random_configs=random_configs, routes=[e.config.to_dict() for e in routing_space],
                                    start_weights=start_weights, **({"middle_draws": DISTINCT_MIDDLE}
                                                                     if random_configs else {}))
        TrainLoop(self.dir, "refine", net, optimizer, self.dataset(), step_fn, self.settings(c.refine_steps),
                  device=self.device, lr_factor=self.lr_factor(c.refine_steps), options=options).run()
        net.eval()
        batches = self.validation_batches()
        net.routing_space = [RoutingEntry(e.config, e.macs_per_pixel, validation_psnr(net, batches, e.config))
                             for e in routing_space]
        net.set_config(net.space.largest())
        self.save(net, "refine.safetensors", stage="refine", **({"made_from": made_from} if made_from else {}))
        return net

    def stage3(self, supernet=None) -> DDSNet:
        """Gate training on the frozen super-network: online easy/hard labels plus the MACs
        budget. ``supernet``: a super-network with its routing space (of the config's arch),
        else refine's result or stage 2's."""
        c = self.config
        self.check_stages({"stage3"})
        if supernet is not None:
            self.check_network(supernet, "the network given to stage 3")
            supernet = super_network_of(supernet)
        if supernet is None:
            stage = "refine" if c.refine_steps > 0 else "stage2"
            supernet = self.load(f"{stage}.safetensors")
        if not supernet.routing_space:
            raise ValueError("stage 3 needs the routing space of stage 2")
        start_weights = weights_fingerprint(supernet.state_dict())  # in its options, as in refine's
        for p in supernet.parameters():
            p.requires_grad_(False)
        attended = isinstance(supernet, AttentionSupernet)
        scorer = supernet  # the labels score the body as it will run: behind the attention scale if trained so
        with _seeded(c.seed):
            gate = DynamicGate(supernet.stem_channels, len(supernet.routing_space))
        gate = gate.to(self.device)
        if attended:
            # the attention the body was trained behind stays as it was (frozen above): W1 is
            # shared, so the prediction head learns on the squeeze stage 1 trained
            gate.fc1.load_state_dict(supernet.gate.fc1.state_dict())
            gate.fc2.load_state_dict(supernet.gate.fc2.state_dict())
            gate.fc1.requires_grad_(False)
            gate.fc2.requires_grad_(False)
            supernet = supernet.supernet
        gate.attention = False  # off while the gate trains, as in the paper
        model = DDSNet(supernet, gate, supernet.routing_space)
        macs = model.dynamic_macs_per_pixel
        budget = c.budget if c.budget is not None else (min(macs) + max(macs)) / 2
        if not min(macs) <= budget <= max(macs):  # (the complexity loss would pull past every route)
            raise ValueError(f"budget {budget:,.0f} MACs/pixel is outside the routes' range, {min(macs):,.0f} to "
                             f"{max(macs):,.0f} (as routed: with the full-width stem the gate reads)")
        optimizer = torch.optim.Adam([p for p in gate.parameters() if p.requires_grad], lr=c.gate_lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, c.gate_lr_decay)

        def step_fn(step, noisy, clean):
            return gate_step(model, noisy, clean, budget, c.beta, c.gate_complexity_weight, scorer, c.gate_labels)

        # the gate's rate decays per epoch, not over the steps: a finished stage 3 can go on
        options = self.loop_options("gate_patch_size", "gate_lr", "gate_lr_decay", "beta", "gate_complexity_weight",
                                    budget=budget, routes=[e.config.to_dict() for e in model.routing_space],
                                    start_weights=start_weights,
                                    # (the paper's rule is left out: a run of an earlier version resumes)
                                    **({"gate_labels": c.gate_labels} if c.gate_labels != "ends" else {}),
                                    # earlier versions labelled an attended body without its scale
                                    **({"labels_behind_attention": True} if attended else {}))
        TrainLoop(self.dir, "stage3", model, optimizer, self.dataset(c.gate_patch_size), step_fn,
                  self.settings(c.gate_steps, c.gate_batch_size), scheduler=scheduler, device=self.device,
                  options=options).run()
        if rank_and_world()[0] == 0:
            records = [json.loads(line) for line in (self.dir / "stage3.log.jsonl").read_text().splitlines()]
            warning = one_sided_labels(records, c.beta, labels=c.gate_labels)
            if warning:
                warnings.warn(warning)
        model.eval()
        # a body trained behind the attention scale runs behind it (static mode too)
        gate.attention = attended
        self.save(model, "dds.safetensors", stage=3, budget=budget)
        return model

    def inets(self, routing_space=None, indices=None) -> list[Path]:
        """Static baselines: the same architecture trained alone at each routing config (or
        at the configs ``indices`` only, so that separate processes can share the work)."""
        c = self.config
        self.check_stages({"inets"})
        if routing_space is None:
            routing_space = self.load("stage2.safetensors", attention_matters=False).routing_space
            if not routing_space:
                raise ValueError(f"{self.dir / 'stage2.safetensors'} holds no routing space: the I-Nets train at its "
                                 f"configs (run `dds-fast train stage2`)")
        indices = range(len(routing_space)) if indices is None else indices
        unknown = sorted(set(indices) - set(range(len(routing_space))))
        if unknown:
            raise ValueError(f"no routing config {unknown}: the routing space has {len(routing_space)}")
        paths = []
        for index in indices:
            entry = routing_space[index]
            net = self.new_network()
            net.set_config(entry.config)
            optimizer = torch.optim.Adam(net.parameters(), lr=c.lr)

            def losses(noisy, clean, net=net):
                with self.autocast():
                    output = net(noisy)
                loss = self.loss_fn(output.float(), clean)
                loss.backward()
                return {"loss": loss.detach(), "psnr": training_psnr(output, clean)}

            # one config: its shapes are fixed, and the whole step is a graph as it is
            graphed = GraphedStep(losses, net.parameters()) if c.graphs else None

            def step_fn(step, noisy, clean, losses=losses, graphed=graphed):
                return losses(noisy, clean) if graphed is None else graphed(noisy, clean)

            steps = c.inet_steps or c.steps + c.refine_steps
            options = self.loop_options(*NETWORK_OPTIONS, "patch_size", "lr", "loss", schedule_steps=steps,
                                        config=entry.config.to_dict())
            TrainLoop(self.dir, f"inet-{index}", net, optimizer, self.dataset(), step_fn, self.settings(steps),
                      device=self.device, lr_factor=self.lr_factor(steps), options=options).run()
            paths.append(self.save(net, f"inet-{index}.safetensors", stage="inet", macs_per_pixel=entry.macs_per_pixel))
        return paths
