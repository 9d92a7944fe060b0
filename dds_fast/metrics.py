"""PSNR and SSIM, computed the way DANet and VDNet report them.

Images are first quantised to 8 bits (``round(clip(x, 0, 1) * 255)``), as a saved PNG
would be, then scored with scikit-image on the 0-255 range. SSIM uses a Gaussian window
(sigma 1.5), population covariance and, for colour, ``channel_axis=-1`` (one SSIM over the
three channels, averaged).

Inputs: torch tensors [C, H, W] (single image) or [N, C, H, W] (batch), or numpy arrays
[H, W] / [H, W, C] (single) or [N, H, W, C] (batch). Float values are taken to be in [0, 1]
(NaN is an error: it has no 8-bit value; so are values far outside [0, 1], such as floats on
the 0-255 scale, which the clip would score as a white image); uint8 arrays or tensors are
used as they are. C is 1 or 3.
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["to_uint8", "psnr", "ssim", "batch_psnr", "batch_ssim"]

_SSIM_WINDOW = 11  # the Gaussian window skimage uses for sigma=1.5 (truncate 3.5)
# Float images outside this are on another scale: wide of [0, 1], which noisy inputs overrun
FLOAT_RANGE = (-2.0, 3.0)
# Noisy inputs to a denoiser: unclipped noise of sigma up to about 400 (0-255 units) stays within
NOISY_RANGE = (-10.0, 11.0)


def check_float_scale(label: str, low: float, high: float, bounds: tuple[float, float] = FLOAT_RANGE) -> None:
    """A ValueError naming ``label`` when a float image's values (``low`` to ``high``) are on
    another scale than [0, 1]: outside ``bounds``, which allow for what noise overruns it by."""
    if low < bounds[0] or high > bounds[1]:
        raise ValueError(f"{label}: expected float values in [0, 1] (noise may overrun it), got values "
                         f"from {low:.4g} to {high:.4g} (divide 8-bit values by 255)")


def to_uint8(image) -> np.ndarray:
    """Quantise an image or batch to uint8, channels last ([H, W, C] / [N, H, W, C]; gray keeps C=1)."""
    if isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4):
            raise ValueError(f"expected a tensor shaped [C, H, W] or [N, C, H, W], got {tuple(image.shape)}")
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
            image = image.float()  # numpy has no bfloat16 (or float8): float32 holds their values exactly
        array = image.detach().cpu().movedim(-3, -1).numpy()
    elif isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim not in (3, 4):
            raise ValueError(f"expected an array shaped [H, W], [H, W, C] or [N, H, W, C], got {image.shape}")
    else:
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(image).__name__}")
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {array.shape} (channels last after conversion)")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected float images in [0, 1] or uint8, got dtype {array.dtype}")
    if np.isnan(array).any():  # NaN has no 8-bit value: the cast would score it as black
        raise ValueError(f"image holds NaN values (shape {array.shape}, channels last); it has no 8-bit value")
    if array.size:
        check_float_scale("to_uint8", float(array.min()), float(array.max()))
    # Quantise in the image's own precision (at least float32), as rounding a saved float32
    # output would: float64 can round differently at exact .5 ties.
    array = array.astype(np.promote_types(array.dtype, np.float32), copy=False)
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _pair(output, target, batched: bool) -> tuple[np.ndarray, np.ndarray]:
    out, ref = to_uint8(output), to_uint8(target)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: output {tuple(output.shape)} vs target {tuple(target.shape)}")
    if batched and out.ndim != 4:
        raise ValueError(f"expected a batch ([N, C, H, W] tensor or [N, H, W, C] array), got {tuple(output.shape)}")
    if not batched and out.ndim != 3:
        raise ValueError(f"expected a single image, got {tuple(output.shape)}; use batch_psnr / batch_ssim for batches")
    if out.size == 0:  # numpy's mean of nothing is NaN, not a score
        raise ValueError(f"empty image{'s' if batched else ''}: shape {tuple(output.shape)}")
    return out, ref


def _psnr(out: np.ndarray, ref: np.ndarray) -> float:
    with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, not a warning
        return float(peak_signal_noise_ratio(ref, out, data_range=255))


def _ssim(out: np.ndarray, ref: np.ndarray) -> float:
    if min(out.shape[:2]) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW}, got {out.shape[:2]}")
    colour = out.shape[-1] == 3
    return float(
        structural_similarity(
            ref if colour else ref[..., 0],
            out if colour else out[..., 0],
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=-1 if colour else None,
        )
    )


def psnr(output, target) -> float:
    """PSNR in dB of one image against its reference, on 8-bit quantised values."""
    return _psnr(*_pair(output, target, batched=False))


def ssim(output, target) -> float:
    """SSIM of one image against its reference, on 8-bit quantised values."""
    return _ssim(*_pair(output, target, batched=False))


def batch_psnr(output, target) -> float:
    """Mean per-image PSNR over a batch (the mean of PSNRs, as papers report, not PSNR of the mean MSE)."""
    out, ref = _pair(output, target, batched=True)
    return float(np.mean([_psnr(o, r) for o, r in zip(out, ref)]))


def batch_ssim(output, target) -> float:
    """Mean per-image SSIM over a batch."""
    out, ref = _pair(output, target, batched=True)
    return float(np.mean([_ssim(o, r) for o, r in zip(out, ref)]))
