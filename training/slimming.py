"""Stage 2: progressive slimming, a greedy search for the routing space.

From the largest config, each step tries slimming every tied group by one channel step
(``step`` channels: 16 in the paper), evaluates each candidate's PSNR on a validation set
and keeps the one that loses the least (criterion ``psnr``, the paper's). Our addition,
criterion ``psnr_per_mac``, keeps the one that loses the least per MAC it saves: slimming a
wide layer saves more than slimming a narrow one, so the paper's rule can walk the cheap
groups down first for a small loss and a small saving. Every step is recorded; the
trajectory, thinned to a few configs spread over the MACs range, is the routing space the
gate chooses from.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from dds_fast.config import RoutingEntry, SubnetConfig
from dds_fast.cost import macs_per_pixel
from dds_fast.ddsnet import AttentionSupernet
from dds_fast.modes import evaluating

from .gate_stage import per_image_psnr
from .loop import TrainingDiverged


@torch.no_grad()
def validation_psnr(net, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], config: SubnetConfig) -> float:
    """Mean per-image PSNR (8-bit quantised, as reported) of ``config`` over ``batches``
    (``(noisy, clean)`` pairs), in eval mode (its modes given back); leaves ``net`` at ``config``."""
    net.set_config(config)
    total, count = 0.0, 0
    with evaluating(net):
        for noisy, clean in batches:
            output = net(noisy)
            if not torch.isfinite(output).all():  # finite weights can still overflow (stage 1's last step diverging)
                raise TrainingDiverged(f"validation: the network's output at config {config.to_dict()} is not "
                                       f"finite: its weights diverged in training; train them again with a lower "
                                       f"learning rate, in a new run directory or after deleting the stage's "
                                       f"STAGE.state.safetensors and result from this one (a state file resumes "
                                       f"only with the options it was trained with)")
            # clamped as a saved image is (a poor network's output far outside [0, 1] scores, not
            # fails); an exact crop scores finite, not +inf, which would tie every config
            total += float(per_image_psnr(output, clean).sum())
            count += len(noisy)
    if count == 0:
        raise ValueError("validation set is empty")
    return total / count


def slimmer(config: SubnetConfig, group, step: int) -> int | None:
    """The widest allowed width of ``group`` at least ``step`` below its width in ``config``
    (the smallest choice when the step would pass it), or None when it cannot shrink."""
    width = config[group.name]
    lower = [c for c in group.choices if c <= width - step]
    if lower:
        return lower[-1]
    return group.choices[0] if group.choices[0] < width else None


SLIM_CRITERIA = ("psnr", "psnr_per_mac")


def progressive_slimming(net, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], step: int = 16,
                         on_step: Callable[[RoutingEntry], None] | None = None,
                         criterion: str = "psnr") -> list[RoutingEntry]:
    """The greedy trajectory from the largest to the smallest config, as RoutingEntries
    (config, MACs/pixel, validation PSNR), largest first. Restores the net's config.

    ``batches``: the validation set, ``(noisy, clean)`` pairs of image batches in [0, 1];
    ``step``: the channels a group is slimmed by at a time; ``on_step``: called with each
    entry as it is found; ``criterion``: what picks the next step (``SLIM_CRITERIA``)."""
    if step < 1:
        raise ValueError(f"slimming step must be >= 1 channel, got {step}")
    if criterion not in SLIM_CRITERIA:
        raise ValueError(f"unknown slimming criterion {criterion!r}; choose one of {SLIM_CRITERIA}")
    batches = list(batches)
    # a routing entry's MACs are its config's own, also behind an attention head (whose
    # full-width stem a DDSNet adds for dynamic mode)
    costed = net.supernet if isinstance(net, AttentionSupernet) else net
    previous = net.get_config()
    space = net.space
    config = space.largest()
    try:
        trajectory = [RoutingEntry(config, macs_per_pixel(costed, config), validation_psnr(net, batches, config))]
        if on_step:
            on_step(trajectory[-1])
        while True:
            candidates = []
            for group in space.groups:
                width = slimmer(config, group, step)
                if width is not None:
                    candidates.append(config.replace(**{group.name: width}))
            if not candidates:
                break
            scored = [RoutingEntry(c, macs_per_pixel(costed, c), validation_psnr(net, batches, c)) for c in candidates]
            here = trajectory[-1]
            if criterion == "psnr":  # least PSNR lost; among equals, the cheaper one
                best = max(scored, key=lambda e: (e.psnr, -e.macs_per_pixel))
            else:  # least PSNR lost per MAC saved; any gain first, the larger gain times saving the better
                best = min(scored, key=lambda e: (_loss_per_mac(here, e), e.macs_per_pixel))
            config = best.config
            trajectory.append(best)
            if on_step:
                on_step(best)
    finally:
        net.set_config(previous)
    return trajectory


def _loss_per_mac(here: RoutingEntry, slimmer_entry: RoutingEntry) -> float:
    """``psnr_per_mac``'s rank of a step from ``here`` (lower is better). A loss is divided by
    the MACs saved; a gain is multiplied by them, so that it ranks below every loss and a larger
    gain or saving ranks lower (divided, a gain would favour the step that saves least)."""
    loss = here.psnr - slimmer_entry.psnr
    saved = max(here.macs_per_pixel - slimmer_entry.macs_per_pixel, 1e-9)
    return loss / saved if loss > 0 else loss * saved


def thin_routing_space(trajectory: Iterable[RoutingEntry], num_choices: int) -> list[RoutingEntry]:
    """``num_choices`` entries spread evenly over the MACs range (always the cheapest and
    the dearest), in ascending MACs: index 0 is the smallest sub-network."""
    entries = sorted(trajectory, key=lambda e: e.macs_per_pixel)
    if num_choices < 2:
        raise ValueError(f"a routing space needs at least 2 choices, got {num_choices}")
    if len(entries) < num_choices:
        raise ValueError(f"the trajectory has {len(entries)} configs, fewer than the {num_choices} asked for")
    low, high = entries[0].macs_per_pixel, entries[-1].macs_per_pixel
    chosen: list[RoutingEntry] = []
    for k in range(num_choices):
        target = low + (high - low) * k / (num_choices - 1)
        remaining = [e for e in entries if e not in chosen]
        chosen.append(min(remaining, key=lambda e: abs(e.macs_per_pixel - target)))
    return sorted(chosen, key=lambda e: e.macs_per_pixel)
