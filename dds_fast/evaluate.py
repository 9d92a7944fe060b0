"""Evaluation: PSNR/SSIM (8-bit, as DANet and VDNet report), MACs/pixel under routing, the
DDS-against-I-Nets table, and tiled denoising of images of any size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .config import checked_int
from .cost import macs_per_pixel
from .ddsnet import DDSNet
from .metrics import NOISY_RANGE, check_float_scale, psnr, ssim


@dataclass
class Evaluation:
    name: str
    psnr: float
    ssim: float
    macs_per_pixel: float
    images: int

    def row(self) -> str:
        return f"| {self.name} | {self.macs_per_pixel:,.0f} | {self.psnr:.2f} | {self.ssim:.4f} | {self.images} |"


TABLE_HEADER = "| model | MACs/pixel | PSNR (dB) | SSIM | images |\n| --- | ---: | ---: | ---: | ---: |"


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        return image.unsqueeze(0)
    if image.dim() == 4 and image.shape[0] == 1:
        return image
    raise ValueError(f"expected one image [C, H, W] or [1, C, H, W], got {tuple(image.shape)}")


@torch.no_grad()
def denoise(model: nn.Module, noisy: torch.Tensor, tile: int = 512, overlap: int | None = None,
            stem_means: torch.Tensor | None = None, progress: bool = False, tiles_per_batch: int = 1) -> torch.Tensor:
    """Denoise one image [C, H, W] (or [1, C, H, W]; either way the result is [C, H, W]) with
    ``model`` as it is (its mode and config); images larger than ``tile`` are cut
    into tiles with ``overlap`` pixels of context on each side, so memory stays bounded.
    The default overlap is the model's ``receptive_radius``, with which the tiles give the
    whole image's output (up to rounding).

    Tiles start on multiples of the model's ``size_multiple`` (its downsampling factor), so
    each sees the pixel grid the whole image would: the overlap is rounded up and the step
    down to that multiple. A model with a gate (a DDSNet, an AttentionSupernet) gives every
    tile the gate's squeeze of the whole image (``stem_means``, computed tile by tile unless
    the caller has them), so that each tile is routed and scaled as the whole image is.
    ``progress``: a progress bar over the tiles on stderr. ``tiles_per_batch``: up to this many
    tiles of one size go through the model as one batch (on a GPU, where a tile's forward is
    mostly host time, fewer forwards; memory grows with it)."""
    tile = checked_int(tile, "tile", "denoise")
    tiles_per_batch = checked_int(tiles_per_batch, "tiles_per_batch", "denoise")
    overlap = None if overlap is None else checked_int(overlap, "overlap", "denoise", low=0)
    x = _as_batch(noisy)
    if 0 in x.shape[-2:]:
        raise ValueError(f"denoise: the image is empty, shape {tuple(noisy.shape)}")
    if stem_means is not None and not (isinstance(stem_means, torch.Tensor) and stem_means.dim() == 2
                                       and len(stem_means) == 1):  # (batched tiles share the row)
        got = tuple(stem_means.shape) if isinstance(stem_means, torch.Tensor) else type(stem_means).__name__
        raise ValueError(f"denoise: stem_means must be the image's one row [1, C], got {got}")
    h, w = x.shape[-2:]
    gate = {} if stem_means is None else {"stem_means": stem_means}
    if h <= tile and w <= tile:
        return model(x, **gate)[0]
    if overlap is None:
        if not hasattr(model, "receptive_radius"):
            raise ValueError(f"denoise: {type(model).__name__} has no receptive_radius to size the tiles' overlap "
                             f"by; pass overlap (--overlap)")
        overlap = model.receptive_radius
    multiple = getattr(model, "size_multiple", 1)
    overlap = -(-overlap // multiple) * multiple
    step = (tile - 2 * overlap) // multiple * multiple
    if step < 1:
        raise ValueError(f"denoise: a tile of {tile} pixels leaves no core after {overlap} pixels of overlap on "
                         f"each side (rounded up to the model's size multiple {multiple}); use a larger tile "
                         f"(--tile) or, at the cost of seams, a smaller overlap (--overlap)")
    if stem_means is None and getattr(model, "uses_stem_means", False):
        gate = {"stem_means": model.stem_means(x, tile)}
    # each tile with its context, clipped to the image (its core is kept); tiles of one size batch
    by_size: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for top in range(0, h, step):
        for left in range(0, w, step):
            y0, x0 = max(0, top - overlap), max(0, left - overlap)
            y1, x1 = min(h, top + step + overlap), min(w, left + step + overlap)
            by_size.setdefault((y1 - y0, x1 - x0), []).append((top, left, y0, x0))
    out = None
    with tqdm(total=sum(map(len, by_size.values())), desc="tiles", unit="tile", disable=not progress,
              leave=False) as bar:
        for (tile_h, tile_w), tiles in by_size.items():
            for first in range(0, len(tiles), tiles_per_batch):
                batch = tiles[first:first + tiles_per_batch]
                crops = [x[..., y0:y0 + tile_h, x0:x0 + tile_w] for _, _, y0, x0 in batch]
                crops = crops[0] if len(crops) == 1 else torch.cat(crops)  # (one tile: a view, no copy)
                shared = {name: means.expand(len(batch), -1) for name, means in gate.items()}
                results = model(crops, **shared)
                if out is None:  # the model's output channels and dtype, not the input's
                    out = results.new_empty((1, results.shape[1], h, w))
                for result, (top, left, y0, x0) in zip(results, batch):
                    core_h, core_w = min(step, h - top), min(step, w - left)
                    out[0, :, top:top + core_h, left:left + core_w] = result[:, top - y0:top - y0 + core_h,
                                                                             left - x0:left - x0 + core_w]
                bar.update(len(batch))
    return out[0]


@torch.no_grad()
def evaluate(model: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], name: str = "model",
             tile: int = 512, overlap: int | None = None) -> Evaluation:
    """Mean PSNR and SSIM over ``(noisy, clean)`` pairs of single images, and the mean
    MACs/pixel: a DDSNet's routed configs (with its full-width stem), else the model's.
    Puts ``model`` in eval mode, and leaves it so; images larger than ``tile`` are denoised
    (and a DDSNet's gate squeezes them) tile by tile, with ``overlap`` pixels of context
    (``denoise``; default: the model's receptive radius)."""
    model.eval()
    scores, macs = [], []
    device = next(model.parameters(), torch.empty(0)).device  # no parameters (a baseline): the CPU
    for number, (noisy, clean) in enumerate(pairs):
        noisy = _as_batch(noisy).to(device)
        if noisy.is_floating_point() and noisy.numel():  # (the output's clamp would hide a noisy 0..255)
            check_float_scale(f"evaluate: pair {number}'s noisy image", float(noisy.min()), float(noisy.max()),
                              NOISY_RANGE)
        clean = _as_batch(clean)
        # checked before the denoise, which may take long, and named by the pair
        if clean.is_floating_point() and clean.numel():
            check_float_scale(f"evaluate: pair {number}'s clean image", float(clean.min()), float(clean.max()))
        if clean.shape[-2:] != noisy.shape[-2:]:  # (channels may differ: a model's output is compared)
            raise ValueError(f"evaluate: pair {number}'s clean image is {tuple(clean.shape[-2:])} pixels, its noisy "
                             f"image {tuple(noisy.shape[-2:])}")
        # a DDSNet's route: from the gate's squeeze of the whole image, tile by tile, shared with the
        # tiles (an image within one tile is routed as a whole, by its own forward)
        routed = isinstance(model, DDSNet) and model.budget_index is None and max(noisy.shape[-2:]) > tile
        means = model.stem_means(noisy, tile) if routed else None
        # clamped as a saved image is (the 8-bit scores clip anyway; a poor model's output may be far outside)
        output = denoise(model, noisy, tile, overlap, stem_means=means).float().cpu().clamp(0, 1)
        scores.append((psnr(output, clean[0]), ssim(output, clean[0])))
        if isinstance(model, DDSNet):
            macs.append(model.routed_macs(noisy, stem_means=means)[0])
        elif len(macs) == 0:
            # a model without in_channels (any module, a baseline) is counted on the first image
            shape = None if hasattr(model, "in_channels") else tuple(noisy.shape[1:])
            macs.append(macs_per_pixel(model, input_shape=shape))
        else:
            macs.append(macs[0])
    if not scores:
        raise ValueError("evaluate: no images")
    return Evaluation(name, sum(s[0] for s in scores) / len(scores), sum(s[1] for s in scores) / len(scores),
                      sum(macs) / len(macs), len(scores))


def inet_name(dds: DDSNet, inet: nn.Module, position: int) -> str:
    """An I-Net's row label: the index of the route whose config it runs, as the paper's
    tables pair them, else its position among the I-Nets given."""
    config = inet.get_config() if hasattr(inet, "get_config") else None
    for index, entry in enumerate(dds.routing_space):
        if entry.config == config:
            return f"I-Net {index}"
    return f"I-Net #{position} (no route's config)"


def comparison_table(dds: DDSNet, inets: Sequence[nn.Module], pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     inet_rows: Sequence[Evaluation] | None = None) -> str:
    """The paper's Table I: for each I-Net, DDS at the best config within the I-Net's MACs
    (static budget mode, the full-width stem counted when the gate's attention is on) against
    the I-Net; then DDS in dynamic mode. ``inet_rows``: the I-Nets' evaluations on ``pairs``
    when the caller has them already (one per I-Net of ``inets``, or with ``inets`` empty alone)."""
    pairs, inets = list(pairs), list(inets)  # (each is read more than once)
    if inet_rows is None:
        inet_rows = [evaluate(inet, pairs, inet_name(dds, inet, position)) for position, inet in enumerate(inets)]
    else:
        inet_rows = list(inet_rows)
    if inets and len(inet_rows) != len(inets):  # (rows alone: I-Nets the caller scored elsewhere)
        raise ValueError(f"comparison_table: {len(inet_rows)} inet_rows for {len(inets)} I-Nets: one row each")
    unmatched = [row.name for row in inet_rows if row.images != len(pairs)]
    if unmatched:  # the DDS rows are scored on pairs: rows of other images would not compare
        raise ValueError(f"comparison_table: inet_rows {unmatched} were scored on other than the {len(pairs)} pairs")
    rows = []
    budget = dds.budget_index
    try:
        for inet_eval in inet_rows:
            label = f"DDS at <= {inet_eval.macs_per_pixel:,.0f}"
            try:
                dds.set_budget(inet_eval.macs_per_pixel)
            except ValueError:  # with attention on, the full-width stem can put every config above the budget
                rows += [f"| {label}: no config fits | | | | |", inet_eval.row()]
                continue
            rows += [evaluate(dds, pairs, label).row(), inet_eval.row()]
        dds.set_budget(None)
        rows.append(evaluate(dds, pairs, "DDS dynamic").row())
    finally:  # the caller's mode, dynamic or its budget, whatever happened
        dds._budget_index = budget
    return "\n".join([TABLE_HEADER] + rows)
