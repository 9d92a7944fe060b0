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
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dds_fast
from dds_fast import DDSNet, DynamicGate, SlimConv2d
from dds_fast.slim_conv import BACKENDS
from dds_fast.config import RoutingEntry

from .data import NoisyPatches, bundled_images, load_image_folder, make_validation_set
from .gate_stage import gate_step, one_sided_labels
from .loop import LoopSettings, TrainLoop, cosine_factor, rank_and_world, step_generator
from .noise import make_noise
from .sandwich import (DISTILLATIONS, LOSSES, reconstruction_loss, routing_sandwich_configs, sandwich_configs,
                       sandwich_step)
from .slimming import SLIM_CRITERIA, progressive_slimming, thin_routing_space, validation_psnr

LR_SCHEDULES = ("cosine", "constant")

# Held out of training by default, so reported numbers are on images the net never saw.
DEFAULT_VALIDATION_IMAGES = ("chelsea", "coins")


@dataclass
class TrainConfig:
    """Every option of a run; ``from_file`` reads a JSON file of these keys."""

    arch: str = "SlimUNet"
    channels: int = 3
    base_width: int = 16
    depth: int = 3
    noise: str = "awgn"
    noise_args: dict = field(default_factory=lambda: {"sigma": 25.0})
    images: str | None = None  # a folder of clean images; default: scikit-image's bundled photos
    validation_images: tuple[str, ...] = DEFAULT_VALIDATION_IMAGES
    patch_size: int = 64
    batch_size: int = 16
    epoch_patches: int = 1024
    steps: int = 2000
    lr: float = 2e-4
    lr_schedule: str = "cosine"  # or "constant"; stage 1 and the I-Nets (the gate has its own)
    sandwich: int = 4
    distillation: str = "synergy"
    loss: str = "l1"  # against the ground truth
    distillation_loss: str = "mse"  # against a teacher's output (see training/sandwich.py)
    slim_step: int = 16
    slim_criterion: str = "psnr"  # or "psnr_per_mac" (our addition; see training/slimming.py)
    num_choices: int = 4
    validation_crops: int = 4
    validation_patch: int = 128
    inet_steps: int | None = None  # default: the same as stage 1
    refine_steps: int = 0  # sandwich steps on the routing configs after stage 2 (0: the paper's Algorithm 1)
    refine_lr: float = 2e-4
    refine_distillation: str | None = None  # default: the same as stage 1
    gate_steps: int = 1000
    gate_lr: float = 5e-5
    gate_lr_decay: float = 0.9  # per epoch
    gate_batch_size: int = 64
    gate_patch_size: int = 128
    beta: float = 0.2  # dB of PSNR gain that makes an image hard
    budget: float | None = None  # MACs/pixel; default: the middle of the routing space's range
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"  # of every SlimConv2d: auto (Triton on CUDA), torch (cuDNN) or triton
    progress: bool = True

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read training config {path}: {error}") from None
        return cls.from_dict({**values, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, values: dict, source: str = "options") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training options {unknown}")
        config = cls(**values)
        if config.backend not in BACKENDS:
            raise ValueError(f"{source}: unknown backend {config.backend!r}; choose one of {BACKENDS}")
        if config.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{source}: unknown lr_schedule {config.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        for option in ("distillation", "refine_distillation"):
            value = getattr(config, option)
            if value not in DISTILLATIONS and not (option == "refine_distillation" and value is None):
                raise ValueError(f"{source}: unknown {option} {value!r}; choose one of {DISTILLATIONS}")
        if config.slim_criterion not in SLIM_CRITERIA:
            raise ValueError(f"{source}: unknown slim_criterion {config.slim_criterion!r}; choose one of {SLIM_CRITERIA}")
        for option in ("loss", "distillation_loss"):
            if getattr(config, option) not in LOSSES:
                raise ValueError(f"{source}: unknown {option} {getattr(config, option)!r}; choose one of {sorted(LOSSES)}")
        if isinstance(config.validation_images, list):
            config.validation_images = tuple(config.validation_images)
        return config

    def resolved_device(self) -> torch.device:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device)
        if device.type == "cuda" and device.index is None and torch.distributed.is_initialized():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
        return device


class Run:
    """One run directory: the data, the network and the stages of a TrainConfig."""

    def __init__(self, run_dir, config: TrainConfig):
        self.dir = Path(run_dir)
        self.config = config
        self.device = config.resolved_device()
        self.noise = make_noise(config.noise, **config.noise_args)
        self.loss_fn = reconstruction_loss(config.loss)
        self.distillation_loss_fn = reconstruction_loss(config.distillation_loss)
        if config.images is None:
            images = bundled_images(channels=config.channels)
        else:
            images = load_image_folder(config.images, channels=config.channels)
        held_out = [name for name in config.validation_images if name in images]
        if not held_out:
            raise ValueError(f"none of the validation images {list(config.validation_images)} is among the "
                             f"{len(images)} clean images")
        self.train_images = [image for name, image in images.items() if name not in held_out]
        self.validation_images = [images[name] for name in held_out]
        if not self.train_images:
            raise ValueError("every clean image is held out for validation; none is left to train on")

    # -- pieces -------------------------------------------------------------------------
    def new_network(self):
        c = self.config
        cls = dds_fast.ARCHITECTURES.get(c.arch)
        if cls is None or not issubclass(cls, dds_fast.SlimNet):
            raise ValueError(f"unknown architecture {c.arch!r}; choose SlimUNet or SlimDnCNN")
        kwargs = dict(in_channels=c.channels, base_width=c.base_width, depth=c.depth)
        torch.manual_seed(c.seed)
        return self.prepare(cls(**kwargs).to(self.device))

    def load(self, name: str):
        return self.prepare(dds_fast.load(self.dir / name, map_location=self.device))

    def prepare(self, model):
        """The configured conv backend; on a GPU, channels_last weights (the kernels' aligned
        fast path, and cuDNN's preferred layout for channels_last activations)."""
        for module in model.modules():
            if isinstance(module, SlimConv2d):
                module.backend = self.config.backend
        if self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        return model

    def dataset(self, patch_size: int | None = None) -> NoisyPatches:
        c = self.config
        return NoisyPatches(self.train_images, self.noise, patch_size=patch_size or c.patch_size,
                            length=c.epoch_patches, seed=c.seed)

    def validation_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        pairs = make_validation_set(self.validation_images, self.noise, seed=c.seed + 1,
                                    patch_size=c.validation_patch, crops_per_image=c.validation_crops)
        noisy = torch.stack([n for n, _ in pairs]).to(self.device)
        clean = torch.stack([k for _, k in pairs]).to(self.device)
        return [(noisy[i:i + c.batch_size], clean[i:i + c.batch_size]) for i in range(0, len(noisy), c.batch_size)]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def settings(self, steps: int, batch_size: int | None = None) -> LoopSettings:
        c = self.config
        return LoopSettings(steps=steps, batch_size=batch_size or c.batch_size, checkpoint_every=c.checkpoint_every,
                            seed=c.seed, progress=c.progress)

    def lr_factor(self, steps: int):
        return cosine_factor(steps) if self.config.lr_schedule == "cosine" else None

    def save(self, model, name: str, **metadata) -> Path:
        """Write a result on rank 0; every rank waits for it (a no-op in one process)."""
        rank, world = rank_and_world()
        path = self.dir / name
        if rank == 0:
            dds_fast.save(model, path, train_config=dataclasses.asdict(self.config), **metadata)
        if world > 1:
            torch.distributed.barrier()
        return path

    # -- stages -------------------------------------------------------------------------
    def stage1(self):
        """Once-for-all weights: sandwich rule with In-place Synergy (or the ablations)."""
        c = self.config
        net = self.new_network()
        optimizer = torch.optim.Adam(net.parameters(), lr=c.lr)

        def step_fn(step, noisy, clean):
            configs = sandwich_configs(net.space, c.sandwich, step_generator(c.seed, step))
            return sandwich_step(net, noisy, clean, configs, c.distillation, self.loss_fn, self.autocast,
                                 self.distillation_loss_fn)

        TrainLoop(self.dir, "stage1", net, optimizer, self.dataset(), step_fn, self.settings(c.steps),
                  device=self.device, lr_factor=self.lr_factor(c.steps)).run()
        net.set_config(net.space.largest())
        self.save(net, "stage1.safetensors", stage=1)
        return net

    def stage2(self, net=None):
        """Progressive slimming on the validation crops: the routing space. Runs on rank 0;
        the other ranks wait and load its result."""
        c = self.config
        net = self.load("stage1.safetensors") if net is None else net
        net.eval()
        rank, world = rank_and_world()
        if rank == 0:
            with (self.dir / "stage2.log.jsonl").open("w") as log:
                def on_step(entry: RoutingEntry):
                    log.write(json.dumps(entry.to_dict()) + "\n")
                    log.flush()

                trajectory = progressive_slimming(net, self.validation_batches(), step=c.slim_step, on_step=on_step,
                                                  criterion=c.slim_criterion)
            net.routing_space = thin_routing_space(trajectory, c.num_choices)
            dds_fast.save(net, self.dir / "stage2.safetensors", stage=2, train_config=dataclasses.asdict(c),
                          trajectory=[e.to_dict() for e in trajectory])
        if world > 1:
            torch.distributed.barrier()
            net = self.load("stage2.safetensors")
        return net

    def refine(self, net=None, random_configs: bool = False):
        """Our addition to Algorithm 1, run when ``refine_steps`` > 0: more sandwich steps
        (with ``refine_distillation``, by default stage 1's) whose sub-networks are the routing
        configs themselves. Stage 1 samples configs at random, so the routing configs between
        the largest and the smallest are trained far less than either, and they trail I-Nets
        at their MACs. The routing entries' validation PSNR is measured again after.
        ``random_configs`` draws stage 1's random configs instead: the control of
        ``benchmarks/ablate_refine.py``."""
        c = self.config
        if c.refine_steps < 1:
            raise ValueError(f"refine_steps is {c.refine_steps}: set it (--refine-steps) to refine the routing configs")
        net = self.load("stage2.safetensors") if net is None else net
        routing_space = net.routing_space
        if not routing_space:
            raise ValueError("refining needs the routing space of stage 2")
        net.train()
        for p in net.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(net.parameters(), lr=c.refine_lr)

        def step_fn(step, noisy, clean):
            generator = step_generator(c.seed, step)
            configs = (sandwich_configs(net.space, c.sandwich, generator) if random_configs
                       else routing_sandwich_configs(routing_space, c.sandwich, generator))
            return sandwich_step(net, noisy, clean, configs, c.refine_distillation or c.distillation, self.loss_fn,
                                 self.autocast, self.distillation_loss_fn)

        TrainLoop(self.dir, "refine", net, optimizer, self.dataset(), step_fn, self.settings(c.refine_steps),
                  device=self.device, lr_factor=self.lr_factor(c.refine_steps)).run()
        net.eval()
        batches = self.validation_batches()
        net.routing_space = [RoutingEntry(e.config, e.macs_per_pixel, validation_psnr(net, batches, e.config))
                             for e in routing_space]
        net.set_config(net.space.largest())
        self.save(net, "refine.safetensors", stage="refine")
        return net

    def stage3(self, supernet=None) -> DDSNet:
        """Gate training on the frozen super-network: online easy/hard labels plus the MACs budget."""
        c = self.config
        if supernet is None:
            stage = "refine" if c.refine_steps > 0 else "stage2"
            name = f"{stage}.safetensors"
            if not (self.dir / name).exists():
                raise ValueError(f"stage 3 starts from {self.dir / name}, which does not exist: "
                                 f"run `dds-fast train {stage}` first")
            supernet = self.load(name)
        if not supernet.routing_space:
            raise ValueError("stage 3 needs the routing space of stage 2")
        for p in supernet.parameters():
            p.requires_grad_(False)
        torch.manual_seed(c.seed)
        gate = DynamicGate(supernet.stem_channels, len(supernet.routing_space)).to(self.device)
        gate.attention = False
        model = DDSNet(supernet, gate, supernet.routing_space)
        macs = model.dynamic_macs_per_pixel
        budget = c.budget if c.budget is not None else (min(macs) + max(macs)) / 2
        optimizer = torch.optim.Adam(gate.parameters(), lr=c.gate_lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, c.gate_lr_decay)

        def step_fn(step, noisy, clean):
            return gate_step(model, noisy, clean, budget, c.beta)

        TrainLoop(self.dir, "stage3", model, optimizer, self.dataset(c.gate_patch_size), step_fn,
                  self.settings(c.gate_steps, c.gate_batch_size), scheduler=scheduler, device=self.device).run()
        if rank_and_world()[0] == 0:
            records = [json.loads(line) for line in (self.dir / "stage3.log.jsonl").read_text().splitlines()]
            warning = one_sided_labels(records, c.beta)
            if warning:
                warnings.warn(warning)
        model.eval()
        self.save(model, "dds.safetensors", stage=3, budget=budget)
        return model

    def inets(self, routing_space=None, indices=None) -> list[Path]:
        """Static baselines: the same architecture trained alone at each routing config (or
        at the configs ``indices`` only, so that separate processes can share the work)."""
        c = self.config
        if routing_space is None:
            routing_space = dds_fast.load(self.dir / "stage2.safetensors").routing_space
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

            def step_fn(step, noisy, clean, net=net):
                with self.autocast():
                    loss = self.loss_fn(net(noisy).float(), clean)
                loss.backward()
                return {"loss": loss.item()}

            steps = c.inet_steps or c.steps
            TrainLoop(self.dir, f"inet-{index}", net, optimizer, self.dataset(), step_fn, self.settings(steps),
                      device=self.device, lr_factor=self.lr_factor(steps)).run()
            paths.append(self.save(net, f"inet-{index}.safetensors", stage="inet", macs_per_pixel=entry.macs_per_pixel))
        return paths
