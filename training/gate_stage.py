"""Stage 3: training the dynamic gate on a frozen super-network.

Labels are made online (our reading of the paper's Eq. 11 and 12, after DS-Net's gate
training): an image is *easy* when the largest sub-network of the routing space beats the
smallest by less than ``beta`` dB of PSNR, and is labelled with the smallest config (index
0); otherwise it is *hard* and labelled with the largest (the last index). The loss is
cross-entropy on those one-hot labels plus the complexity loss ``((Psi - C) / T)^2``, where
Psi is the batch's mean expected MACs/pixel under the gate's softmax, C the budget and T
the super-network's MACs/pixel, so the gate spends the budget where the gain is.

With two labels only, the middle routes get their share through the complexity loss alone,
and when the smallest route trails the largest by more than ``beta`` on every image, every
label is *hard* and the gate learns the budget but not which images are easy (stage 3 warns
when over 99% of the labels agree). ``labels="within"`` (our addition) scores every route and
labels an image with the smallest route within ``beta`` dB of the largest: a small network's
smallest route may trail its largest by more than ``beta`` on every image while a middle
route matches it on most (the shipped model's routes 0 and 2 trail its route 3 by a median of
1.1 to 2.5 dB and 0.01 to 0.22 dB over its noise).

The super-network stays frozen and the gate's attention head is off (the prediction head
reads the plain stem features), as in the paper. A body that stage 1 trained behind the
attention scale is scored behind it, as the trained DDSNet will run it: its labels are
the gains of the network that is deployed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dds_fast.ddsnet import DDSNet
from dds_fast.modes import evaluating

from .loop import rank_and_world


def per_image_psnr(output: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The 8-bit PSNR of each image (fp64, on the images' device), as ``dds_fast.metrics.psnr``
    scores it: both quantised to ``round(clip(x, 0, 1) * 255)`` in at least fp32. Computed
    on the device in one pass: per image through scikit-image on the host, the labels of a
    gate step of 64 images cost most of its 108 ms on an H200 (NOTES v11). An exact
    reproduction (+inf) scores as one level off in one sample, the highest finite PSNR at
    this size, so that gains and logs stay finite; a NaN output scores NaN (the loop stops)."""
    def levels(image):
        return torch.round(image.to(torch.promote_types(image.dtype, torch.float32)).clamp(0, 1) * 255)

    error = (levels(output) - levels(clean)).double().square().flatten(1).mean(1)
    ceiling = 10 * math.log10(255 ** 2 * clean[0].numel())
    return (10 * torch.log10(255 ** 2 / error)).clamp(max=ceiling)


GATE_LABELS = ("ends", "within")


def scored_routes(num_choices: int, labels: str) -> list[int]:
    """The routes whose PSNR a label rule reads: the smallest and the largest for the paper's
    ``"ends"``, every route for ``"within"``."""
    if labels not in GATE_LABELS:
        raise ValueError(f"unknown gate labels {labels!r}; choose one of {GATE_LABELS}")
    return [0, num_choices - 1] if labels == "ends" else list(range(num_choices))


def gate_labels(quality: torch.Tensor, routes: list[int], beta: float) -> torch.Tensor:
    """Each image's label: the first of ``routes`` (ascending MACs, the largest last) whose
    PSNR in ``quality`` (``[len(routes), images]``) is less than ``beta`` dB under the
    largest's, else the largest. With the two ends this is the paper's rule: an image is easy
    (the smallest route) when the largest gains less than ``beta`` over the smallest."""
    if quality.shape[0] != len(routes):
        raise ValueError(f"quality holds {quality.shape[0]} routes' PSNRs, routes names {len(routes)}")
    close = (quality[-1] - quality) < beta
    close[-1] = True  # (with beta <= 0 no route is close: the largest)
    first = close.int().argmax(0)  # the first True of each column
    return torch.tensor(routes, device=quality.device)[first]


def gate_step(model: DDSNet, noisy: torch.Tensor, clean: torch.Tensor, budget: float, beta: float = 0.2,
              complexity_weight: float = 1.0, scorer: torch.nn.Module | None = None,
              labels: str = "ends") -> dict[str, float]:
    """One gate-training step's forward and backward (the caller steps the optimizer).
    The routing space must be in ascending MACs (index 0 the smallest). ``labels``: the
    rule of :func:`scored_routes`. ``scorer`` runs the routes the labels read: the body as it
    is deployed (an
    ``AttentionSupernet`` holding ``model.supernet`` when the body was trained behind the
    attention scale); by default ``model.supernet``. Under ``torch.distributed``, Psi is the
    mean over every rank's images."""
    supernet, routes = model.supernet, model.routing_space
    scorer = supernet if scorer is None else scorer
    if [e.macs_per_pixel for e in routes] != sorted(e.macs_per_pixel for e in routes):
        raise ValueError("gate training needs the routing space in ascending MACs/pixel")
    # the frozen body runs as deployed: no BatchNorm statistics updated, no dropout drawn
    scored = scored_routes(len(routes), labels)
    with torch.no_grad(), evaluating(scorer, supernet):
        quality = []
        for index in scored:
            scorer.set_config(routes[index].config)
            quality.append(per_image_psnr(scorer(noisy).float(), clean))
        quality = torch.stack(quality)
        targets = gate_labels(quality, scored, beta)
        padded = supernet.pad(noisy)
        supernet.set_config(supernet.space.largest())
        stem = supernet.stem(padded)
    gate_out = model.gate(stem)
    cross_entropy = F.cross_entropy(gate_out.logits.float(), targets)
    psi = model.expected_macs(gate_out.probs.float()).mean()
    _, world = rank_and_world()
    if world > 1:
        # the complexity loss squares the mean over the whole batch, not each rank's share:
        # take the ranks' mean as the value and keep this rank's gradient, which the loop's
        # average over the ranks turns into the gradient of one process on the whole batch
        total = psi.detach().clone()
        dist.all_reduce(total)
        psi = psi + (total / world - psi.detach())
    complexity = ((psi - budget) / model.supernet_macs_per_pixel) ** 2
    loss = cross_entropy + complexity_weight * complexity
    loss.backward()
    gain = (quality[-1] - quality[0]).mean().to(loss.device, loss.dtype)
    shares = F.one_hot(targets, len(routes)).float().mean(0).to(loss.device, loss.dtype)
    values = torch.cat([torch.stack([loss, cross_entropy, complexity, psi, (targets > 0).float().mean(), gain]),
                        shares])
    names = ["loss", "cross_entropy", "complexity", "expected_macs", "hard_fraction", "psnr_gain"]
    return dict(zip(names + [f"label_share_{r}" for r in range(len(routes))], values.detach().tolist()))


def one_sided_labels(records: list[dict], beta: float, tolerance: float = 0.01, labels: str = "ends") -> str | None:
    """A warning when all but ``tolerance`` of the images of a gate-training log got the same
    label: the gate then learns the budget alone, not which images are easy. None otherwise."""
    if not records:
        return None
    if labels == "within":
        names = sorted((k for k in records[0] if k.startswith("label_share_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        shares = [sum(r[k] for r in records) / len(records) for k in names]
        share = max(shares)
        if share <= 1 - tolerance:
            return None
        route = shares.index(share)
        advice = "raise beta" if route == len(shares) - 1 else "lower beta"
        return (f"stage 3: {share:.1%} of the training images were labelled route {route}, the smallest within "
                f"beta = {beta} dB of the largest, so the gate learnt the budget alone, not which images are easy; "
                f"{advice}")
    hard = sum(r["hard_fraction"] for r in records) / len(records)
    if tolerance <= hard <= 1 - tolerance:
        return None
    gains = sorted(r["psnr_gain"] for r in records if "psnr_gain" in r)  # logs of older versions lack it
    median = (f" (the largest config's PSNR gain over the smallest had a median of {gains[len(gains) // 2]:.2f} dB "
              f"over the batches)") if gains else ""
    side, share = ("hard", hard) if hard > 0.5 else ("easy", 1 - hard)
    return (f"stage 3: {share:.1%} of the training images were labelled {side} with beta = {beta} dB{median}, "
            f"so the gate learnt the budget alone, not which images are easy; set beta near that gain")
