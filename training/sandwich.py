"""Stage 1: once-for-all weights with the sandwich rule and In-place Synergy distillation.

Each step runs ``n`` sub-networks on the same batch: the largest, ``n - 2`` random
non-uniform ones and the smallest. Gradients accumulate over all of them before the one
optimizer step. The targets (the paper's Eq. 6 and 7):

- ``synergy`` (In-place Synergy): the largest learns from the ground truth; each random
  one from the detached output of the largest; the smallest from the detached mean of the
  largest's and the random ones' outputs.
- ``inplace`` (in-place distillation): every other sub-network learns from the detached
  largest.
- ``none``: every sub-network learns from the ground truth.

Distillation targets get their own loss, MSE by default. With L1 each student's gradient is
a sign whose size does not shrink as it nears its teacher, so three students outweigh the
one ground-truth term and pull every width towards agreeing on the trivial output (the
noisy input): on AWGN sigma 25 after 600 steps the largest config reached 25.6 dB with L1
students against 28.5 dB without distillation.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dds_fast.config import SubnetConfig, WidthSpace

from .data import to_device
from .graphed import GraphedStep
from .loop import as_floats

DISTILLATIONS = ("synergy", "inplace", "none")
LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def reconstruction_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def training_psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR (dB, peak 1, the output clipped to [0, 1]) of a training batch, as
    a tensor on its device: progress is logged from tensors a step already has, with no
    extra forward and no host sync of its own. Not quantised to 8 bits, unlike the
    validation PSNR, so it reads a little higher."""
    mse = (output.detach().float().clamp(0, 1) - target.float()).square().flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


MIDDLE_DRAWS = 16  # how often a random middle config equal to an end is drawn again, at most
DISTINCT_MIDDLE = "distinct from the ends"  # recorded in a stage's options: earlier versions drew ends too


def sandwich_configs(space: WidthSpace, n: int, generator: torch.Generator) -> list[SubnetConfig]:
    """Largest, ``n - 2`` random configs (each group's width drawn on its own), smallest. A
    random config equal to an end is drawn again, up to ``MIDDLE_DRAWS`` times (in a small
    space it was often one): it repeats that end's loss, and under In-place Synergy the
    smallest is distilled partly against itself. A space of no other config keeps the end."""
    if n < 2:
        raise ValueError(f"the sandwich rule needs n >= 2 sub-networks per step, got {n}")
    ends = (space.largest(), space.smallest())
    middle = []
    for _ in range(n - 2):
        for _ in range(MIDDLE_DRAWS):
            config = space.sample(generator)
            if config not in ends:
                break
        middle.append(config)
    return [ends[0], *middle, ends[1]]


def ends_fixed(largest: SubnetConfig, smallest: SubnetConfig, n: int) -> list[SubnetConfig | None]:
    """``MaskedSandwich``'s ``fixed`` for a sandwich of ``n`` sub-networks whose ends are always
    ``largest`` and ``smallest`` and whose middle varies."""
    return [largest] + [None] * (n - 2) + [smallest]


def routing_sandwich_configs(routing_space, n: int, generator: torch.Generator) -> list[SubnetConfig]:
    """The sandwich over a routing space (entries in ascending MACs): its dearest config,
    ``n - 2`` of the others drawn without replacement (all of them when fewer), its cheapest."""
    if n < 2:
        raise ValueError(f"the sandwich rule needs n >= 2 sub-networks per step, got {n}")
    routing_space = list(routing_space)  # any iterable of entries, a generator included
    if len(routing_space) < 2:
        raise ValueError(f"a routing space needs at least 2 configs, got {len(routing_space)}")
    middle = routing_space[1:-1]
    drawn = torch.randperm(len(middle), generator=generator)[:n - 2].sort().values.tolist()
    return [routing_space[-1].config] + [middle[i].config for i in reversed(drawn)] + [routing_space[0].config]


def sandwich_losses(net, noisy: torch.Tensor, clean: torch.Tensor, count: int, select: Callable[[int], None],
                    distillation: str = "synergy", loss_fn=F.l1_loss, autocast=contextlib.nullcontext,
                    distillation_loss_fn=F.mse_loss) -> dict[str, torch.Tensor]:
    """Forward and backward ``count`` sub-networks, the largest first and the smallest last,
    ``select(index)`` putting the net at the ``index``-th; returns each one's loss and the
    largest's :func:`training_psnr` (``psnr``) as device tensors. ``loss_fn`` compares with
    the ground truth, ``distillation_loss_fn`` with a teacher's output."""
    if distillation not in DISTILLATIONS:
        raise ValueError(f"unknown distillation {distillation!r}; choose one of {DISTILLATIONS}")
    losses: dict[str, torch.Tensor] = {}
    teacher_outputs: list[torch.Tensor] = []
    last = count - 1
    for index in range(count):
        select(index)
        with autocast():
            output = net(noisy)
        criterion = distillation_loss_fn
        if index == 0 or distillation == "none":
            target, criterion = clean, loss_fn
        elif distillation == "synergy" and index == last:
            target = torch.stack(teacher_outputs).mean(0)
        else:
            target = teacher_outputs[0]
        loss = criterion(output.float(), target.float())
        loss.backward()
        # the largest teaches everyone; the random ones also join the smallest's target
        if index == 0 or (distillation == "synergy" and index < last):
            teacher_outputs.append(output.detach())
        name = "largest" if index == 0 else "smallest" if index == last else f"random{index}"
        losses[name] = loss.detach()
    losses["psnr"] = training_psnr(teacher_outputs[0], clean)  # the largest's output, against the ground truth
    return losses


def sandwich_step(net, noisy: torch.Tensor, clean: torch.Tensor, configs: list[SubnetConfig],
                  distillation: str = "synergy", loss_fn=F.l1_loss, autocast=contextlib.nullcontext,
                  distillation_loss_fn=F.mse_loss) -> dict[str, float]:
    """:func:`sandwich_losses` over ``configs`` (largest first, smallest last), each set with
    ``set_config``; returns the losses as floats (the caller takes the optimizer step) and
    leaves the net at the largest config."""
    configs = list(configs)  # any iterable, a generator included: read once
    if not configs:
        raise ValueError("sandwich_step needs at least one config (the largest first)")
    try:
        losses = sandwich_losses(net, noisy, clean, len(configs), lambda index: net.set_config(configs[index]),
                                 distillation, loss_fn, autocast, distillation_loss_fn)
    finally:  # (a step that raised too)
        net.set_config(configs[0])
    return as_floats(losses)  # after every sub-network's kernels are queued


class MaskedSandwich:
    """The sandwich step as a :class:`~training.graphed.GraphedStep`, one CUDA graph for every
    step: a sub-network whose config is the same at every step (``fixed``: the largest and the
    smallest of stage 1, every route of a refine stage that trains them all) runs at its own
    widths, as ``set_config`` runs it; the others run as masked widths (``set_masked_widths``)
    read from a device table that each step fills, at the largest config's cost. Same losses
    and gradients as :func:`sandwich_step` (up to rounding). ``fixed``: one entry per
    sub-network, its config or None where it varies (default: all vary).
    ``__call__(noisy, clean, configs)`` as ``sandwich_step``, but the losses are 0-d device
    tensors (no host sync); a config that differs from its fixed one is a ValueError. Leaves
    the net at the largest config (unmasked)."""

    def __init__(self, net, distillation: str = "synergy", loss_fn=F.l1_loss, autocast=contextlib.nullcontext,
                 distillation_loss_fn=F.mse_loss, warmup: int = 3,
                 fixed: Sequence[SubnetConfig | None] | None = None):
        if distillation not in DISTILLATIONS:
            raise ValueError(f"unknown distillation {distillation!r}; choose one of {DISTILLATIONS}")
        self.net = net
        self.fixed = None if fixed is None else [None if c is None else net.space.validate(c) for c in fixed]
        if self.fixed is not None and len(self.fixed) < 2:
            raise ValueError(f"the sandwich rule needs n >= 2 sub-networks per step, got {len(self.fixed)} fixed "
                             f"entries")

        def select(index, widths):
            config = None if self.fixed is None else self.fixed[index]
            if config is None:
                net.set_masked_widths(widths[index])
            else:
                net.set_config(config)

        def losses(noisy, clean, widths):
            try:
                return sandwich_losses(net, noisy, clean, widths.shape[0], lambda index: select(index, widths),
                                       distillation, loss_fn, autocast, distillation_loss_fn)
            finally:
                net.set_config(net.space.largest())

        self.step = GraphedStep(losses, net.parameters(), warmup)

    def __call__(self, noisy: torch.Tensor, clean: torch.Tensor,
                 configs: list[SubnetConfig]) -> dict[str, torch.Tensor]:
        if self.fixed is not None:
            if len(configs) != len(self.fixed):
                raise ValueError(f"MaskedSandwich: {len(configs)} configs for {len(self.fixed)} sub-networks")
            for index, (config, fixed) in enumerate(zip(configs, self.fixed)):
                if fixed is not None and config != fixed:
                    raise ValueError(f"MaskedSandwich: sub-network {index} runs a fixed config; got another one "
                                     f"({config.to_dict()} for {fixed.to_dict()})")
        widths = torch.tensor([self.net.binding_widths(config) for config in configs], dtype=torch.int32)
        return self.step(noisy, clean, to_device(widths, noisy.device))
