"""Synthetic noise models for training and evaluating denoisers.

Every model takes a clean float tensor in [0, 1] shaped [C, H, W] or [N, C, H, W] and
returns a noisy tensor of the same shape. Random draws come from an explicit
``torch.Generator`` so that a seed reproduces the noise exactly; per-image parameters
(sigma, gains, noise levels) are drawn independently for each image of a batch.

Models (``make_noise(name, **kw)`` builds them by name):

* ``"awgn"`` — :class:`GaussianNoise`: additive white Gaussian noise, sigma in 0-255 units,
  fixed (``sigma=25``) or blind (``sigma=(0, 55)``, uniform per image).
* ``"poisson_gaussian"`` — :class:`PoissonGaussianNoise`: heteroscedastic Gaussian in sRGB
  with variance ``a * x + b``.
* ``"camera"`` — :class:`CameraNoise`: the unprocessing pipeline of Brooks et al.,
  "Unprocessing Images for Learned Raw Denoising" (CVPR 2019): sRGB is taken back to a
  Bayer raw image, shot + read noise is added there, and the image is processed back to
  sRGB, so the noise is signal-dependent and (through demosaicking) spatially correlated.
* ``"mix"`` — :class:`MixedNoise`: one of several models per image.
* ``"gray"`` — :class:`GrayNoise`: a colour image made gray before another model's noise, so
  that the noise is the same in every channel, as in a gray photo read as colour.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "NoiseModel",
    "GaussianNoise",
    "PoissonGaussianNoise",
    "MixedNoise",
    "GrayNoise",
    "luma",
    "CameraNoise",
    "CameraParams",
    "NOISE_MODELS",
    "make_noise",
    "sample_camera_params",
    "unprocess",
    "process",
    "mosaic",
    "demosaic",
]


# ----------------------------------------------------------------------------- helpers


def _as_batch(clean: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Validate an image tensor and view it as [N, C, H, W]; also say whether it had no batch dim."""
    if not isinstance(clean, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(clean).__name__}")
    if not clean.is_floating_point():
        raise ValueError(f"expected a floating-point image in [0, 1], got dtype {clean.dtype}")
    if clean.dim() == 3:
        return clean.unsqueeze(0), True
    if clean.dim() == 4:
        return clean, False
    raise ValueError(f"expected an image shaped [C, H, W] or [N, C, H, W], got {tuple(clean.shape)}")


def _device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    # Draws happen on the generator's device (a CPU generator can drive CUDA images).
    return generator.device if generator is not None else like.device


# Draws are made in fp32 whatever the image's dtype, so that a seed gives the same noise to
# an fp64 (or half) image as to an fp32 one: torch's fp64 stream is another.
def _rand(shape, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=_device(generator, like), dtype=torch.float32).to(
        like.device, like.dtype)


def _randn(shape, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_device(generator, like), dtype=torch.float32).to(
        like.device, like.dtype)


def _uniform(n: int, lo: float, hi: float, generator, like: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * _rand((n,), generator, like)


def _sample(n: int, bounds: tuple[float, float], generator, like: torch.Tensor, log: bool = False) -> torch.Tensor:
    """n per-image values from ``bounds``: the fixed value if lo == hi, else uniform (log-uniform if ``log``)."""
    lo, hi = bounds
    if lo == hi:
        return torch.full((n,), lo, dtype=like.dtype, device=like.device)
    if log:
        return torch.exp(_uniform(n, math.log(lo), math.log(hi), generator, like))
    return _uniform(n, lo, hi, generator, like)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _is_number(value) -> bool:
    # JSON true is no number, and float() would read a string such as "25"
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _range(value, name: str, *, allow_zero: bool = True) -> tuple[float, float]:
    """Normalise a fixed value or a (lo, hi) pair to a validated (lo, hi) pair."""
    if _is_number(value):
        lo = hi = float(value)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value):
        lo, hi = (float(v) for v in value)
    else:
        raise ValueError(f"{name} must be a number or a (lo, hi) pair of numbers, got {value!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must satisfy lo <= hi with finite values, got ({lo}, {hi})")
    if max(abs(lo), abs(hi)) > _FLOAT32_MAX:  # (drawn as float32: torch refuses such a fill with a RuntimeError)
        raise ValueError(f"{name} must be at most {_FLOAT32_MAX:.4g} (float32), got ({lo}, {hi})")
    if lo < 0 or (not allow_zero and lo == 0):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got ({lo}, {hi})")
    return lo, hi


class NoiseModel:
    """Common interface: ``model(clean, generator) -> noisy`` with the shape of ``clean``.

    ``generator=None`` draws from torch's global RNG (reproducible only via ``torch.manual_seed``).
    Draws are made on the generator's device, so a CPU generator gives the same noise for
    CPU and CUDA images.
    """

    name = "base"

    def __call__(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.pair(clean, generator)[0]

    def pair(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy, target)``: the target is ``clean`` itself unless the model changes the
        noise-free image too (the camera pipeline's target is ``clean`` through the same ISP)."""
        batch, squeeze = _as_batch(clean)
        noisy, target = self._pair(batch, generator)
        return (noisy.squeeze(0), target.squeeze(0)) if squeeze else (noisy, target)

    def _pair(self, clean: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._apply(clean, generator), clean

    def _apply(self, clean: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------- AWGN


class GaussianNoise(NoiseModel):
    """Additive white Gaussian noise.

    ``sigma`` is in 0-255 units (``sigma=25`` adds N(0, (25/255)^2)); a ``(lo, hi)`` pair draws
    sigma uniformly per image for blind denoising. ``clip`` clamps the result to [0, 1]; it is
    off by default because the standard synthetic benchmarks (e.g. CBSD68 at sigma 25) are
    not clipped, and clipping biases the noise at dark and bright pixels.
    """

    name = "awgn"

    def __init__(self, sigma=25.0, clip: bool = False):
        self.sigma = _range(sigma, "sigma")
        self.clip = _flag(clip, "clip")

    def _apply(self, clean, generator):
        n = clean.shape[0]
        sigma = _sample(n, self.sigma, generator, clean) / 255.0
        noisy = clean + sigma.view(n, 1, 1, 1) * _randn(clean.shape, generator, clean)
        return noisy.clamp(0, 1) if self.clip else noisy

    def __repr__(self):
        return f"GaussianNoise(sigma={self.sigma}, clip={self.clip})"


# ----------------------------------------------------------------------------- Poisson-Gaussian


class PoissonGaussianNoise(NoiseModel):
    """Heteroscedastic Gaussian noise in sRGB: ``noisy = x + sqrt(a*x + b) * N(0, 1)``.

    This is the usual Gaussian approximation of Poisson (shot, ``a``) plus Gaussian (read,
    ``b``) noise, applied directly to the [0, 1] sRGB values. ``a`` and ``b`` are each a fixed
    value or a ``(lo, hi)`` range sampled log-uniformly per image (the plausible values span
    orders of magnitude, so a uniform draw would almost never give low noise). With the
    defaults the noise std at x = 1 ranges from about 2.6/255 to 27/255 (0.3/255 to 8/255 at x = 0).
    """

    name = "poisson_gaussian"

    def __init__(self, a=(1e-4, 1e-2), b=(1e-6, 1e-3), clip: bool = False):
        self.a = _range(a, "a")
        self.b = _range(b, "b")
        for name, (lo, hi) in (("a", self.a), ("b", self.b)):
            if lo != hi and lo == 0:
                raise ValueError(f"{name} range is sampled log-uniformly, so its lower bound must be > 0, got ({lo}, {hi})")
        self.clip = _flag(clip, "clip")

    def _apply(self, clean, generator):
        n = clean.shape[0]
        a = _sample(n, self.a, generator, clean, log=True).view(n, 1, 1, 1)
        b = _sample(n, self.b, generator, clean, log=True).view(n, 1, 1, 1)
        std = torch.sqrt(a * clean.clamp(0, 1) + b)
        noisy = clean + std * _randn(clean.shape, generator, clean)
        return noisy.clamp(0, 1) if self.clip else noisy

    def __repr__(self):
        return f"PoissonGaussianNoise(a={self.a}, b={self.b}, clip={self.clip})"


# ----------------------------------------------------------------------------- camera pipeline

# XYZ -> camera matrices of the four cameras used by Brooks et al. (calibration data).
_XYZ2CAMS = torch.tensor(
    [
        [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
        [[0.4913, -0.0541, -0.0202], [-0.6130, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
        [[0.8380, -0.2630, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
        [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.0970, 0.1581, 0.5181]],
    ],
    dtype=torch.float64,
)
# Linear sRGB (D65) -> XYZ.
_RGB2XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_GAMMA = 2.2
_EPS = 1e-8  # keeps pow() away from 0, where its gradient is infinite
# Constants on the devices and dtypes that use them: a copy from the host's pageable memory
# at each batch would wait for all the work queued on a GPU (a replayed training step).
_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def _constant(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a host constant) on ``like``'s device in ``like``'s dtype, copied once."""
    key = (name, like.device, like.dtype)
    if key not in _ON_DEVICE:
        # a normal tensor even when first asked for under inference_mode: an inference tensor
        # could not be saved for a later backward (demosaic's kernels, by conv2d)
        with torch.inference_mode(False):
            _ON_DEVICE[key] = value.to(like.device, like.dtype)
    return _ON_DEVICE[key]


@dataclass
class CameraParams:
    """Per-image camera parameters drawn by :func:`sample_camera_params` (N = batch size).

    For 1-channel images the colour matrices are the 1x1 identity and the white-balance
    gains are 1: a monochrome sensor has no colour filter array to mosaic or balance.
    """

    rgb2cam: torch.Tensor  # [N, C, C]
    cam2rgb: torch.Tensor  # [N, C, C]
    rgb_gain: torch.Tensor  # [N] overall brightness gain
    red_gain: torch.Tensor  # [N]
    blue_gain: torch.Tensor  # [N]

    @property
    def channels(self) -> int:
        return self.cam2rgb.shape[-1]

    def gains(self) -> torch.Tensor:
        """Per-channel gains applied when processing raw -> sRGB, [N, C]."""
        if self.channels == 1:
            return self.rgb_gain[:, None]
        ones = torch.ones_like(self.rgb_gain)
        return torch.stack([self.red_gain, ones, self.blue_gain], dim=1) * self.rgb_gain[:, None]


def sample_camera_params(n: int, channels: int, generator: torch.Generator | None = None, *, like: torch.Tensor) -> CameraParams:
    """Draw random colour matrices and gains for ``n`` images (dtype/device of ``like``)."""
    if channels not in (1, 3):
        raise ValueError(f"the camera pipeline needs 1 or 3 channels, got {channels}")
    # Brightness: 1 / N(0.8, 0.1), so images get darker by ~0.8 on unprocessing. The clamp only
    # guards the (~1e-15 likely) non-positive draw.
    rgb_gain = 1.0 / (0.8 + 0.1 * _randn((n,), generator, like)).clamp_min(0.1)
    if channels == 1:
        eye = torch.ones(n, 1, 1, dtype=like.dtype, device=like.device)
        ones = torch.ones(n, dtype=like.dtype, device=like.device)
        return CameraParams(eye, eye.clone(), rgb_gain, ones, ones.clone())
    red_gain = _uniform(n, 1.9, 2.4, generator, like)
    blue_gain = _uniform(n, 1.5, 1.9, generator, like)
    # A random convex combination of the four XYZ->camera matrices gives a plausible camera
    # that is none of the four; rows are normalised so that white stays white (sum 1).
    # in float64 where the draws are (no round trip through the host, which would wait for a
    # GPU's queued work); inv_ex: inv's check of the result is a device sync too
    # (drawn in at least fp32: 1e8 overflows fp16)
    wide = torch.empty((), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    weights = _uniform(4 * n, 1e-8, 1e8, generator, wide).double().view(n, 4, 1, 1)
    xyz2cam = (weights * _constant("xyz2cams", _XYZ2CAMS, weights)).sum(1) / weights.sum(1)
    rgb2cam = xyz2cam @ _constant("rgb2xyz", _RGB2XYZ, weights)
    rgb2cam = rgb2cam / rgb2cam.sum(-1, keepdim=True)
    cam2rgb = torch.linalg.inv_ex(rgb2cam).inverse
    cast = dict(dtype=like.dtype, device=like.device)
    return CameraParams(rgb2cam.to(**cast), cam2rgb.to(**cast), rgb_gain, red_gain, blue_gain)


def _apply_ccm(images: torch.Tensor, ccm: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nij,njhw->nihw", ccm, images)


def _inverse_smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return 0.5 - torch.sin(torch.asin(1.0 - 2.0 * x) / 3.0)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    return 3.0 * x**2 - 2.0 * x**3


def _bayer_masks(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """RGGB colour-filter masks, [3, H, W]: R at (even, even), B at (odd, odd), G elsewhere."""
    y = torch.arange(h, device=like.device)[:, None] % 2
    x = torch.arange(w, device=like.device)[None, :] % 2
    red = (y == 0) & (x == 0)
    blue = (y == 1) & (x == 1)
    return torch.stack([red, ~(red | blue), blue]).to(like.dtype)


def mosaic(images: torch.Tensor) -> torch.Tensor:
    """Sample [N, 3, H, W] linear images through an RGGB Bayer filter -> [N, 1, H, W]."""
    masks = _bayer_masks(images.shape[-2], images.shape[-1], images)
    return (images * masks).sum(1, keepdim=True)


_BILINEAR_RB = [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
_BILINEAR_G = [[0.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 0.0]]
_DEMOSAIC_KERNELS = torch.tensor([_BILINEAR_RB, _BILINEAR_G, _BILINEAR_RB]).unsqueeze(1)


def demosaic(raw: torch.Tensor) -> torch.Tensor:
    """Bilinear demosaicking of an RGGB mosaic [N, 1, H, W] -> [N, 3, H, W].

    Written as normalised convolution (sum of known neighbours / their weights) so borders
    average only the samples that exist; inside the image it is classic bilinear
    interpolation, and measured samples are kept exactly.
    """
    n, _, h, w = raw.shape
    masks = _bayer_masks(h, w, raw).unsqueeze(0)  # [1, 3, H, W]
    kernels = _constant("demosaic", _DEMOSAIC_KERNELS, raw)  # [3, 1, 3, 3], depthwise
    values = F.conv2d(raw * masks, kernels, padding=1, groups=3)
    weights = F.conv2d(masks.expand(1, 3, h, w), kernels, padding=1, groups=3)
    return values / weights


def unprocess(srgb: torch.Tensor, params: CameraParams) -> torch.Tensor:
    """sRGB [N, C, H, W] in [0, 1] -> linear raw [N, 1, H, W] (RGGB mosaic when C == 3).

    Steps (each the inverse of one in :func:`process`): inverse smoothstep tone curve,
    inverse gamma 2.2, sRGB -> camera colour matrix, inverse white-balance and brightness
    gains (highlight-preserving, as in the paper: near-white pixels keep gain ~1 so they are
    not pushed below saturation), clip, mosaic. For C == 1 the colour matrix, white balance
    and mosaic are identities.
    """
    linear = torch.clamp_min(_inverse_smoothstep(srgb), _EPS) ** _GAMMA
    cam = _apply_ccm(linear, params.rgb2cam)
    inv_gains = (1.0 / params.gains())[:, :, None, None]
    # Highlight-preserving inverse gains: blend towards 1 as the grey level goes from 0.9 to 1,
    # so saturated highlights stay saturated instead of turning a dim tint.
    grey = cam.mean(1, keepdim=True)
    blend = (torch.clamp_min(grey - 0.9, 0.0) / 0.1) ** 2
    safe = torch.maximum(blend + (1.0 - blend) * inv_gains, inv_gains)
    raw = (cam * safe).clamp(0, 1)
    return mosaic(raw) if params.channels == 3 else raw


def process(raw: torch.Tensor, params: CameraParams) -> torch.Tensor:
    """Linear raw [N, 1, H, W] -> sRGB [N, C, H, W] in [0, 1]: gains, demosaic, colour matrix, gamma, tone curve.

    Unlike the paper's reference ``process`` (red and blue gains only, no tone curve), this
    inverts :func:`unprocess` step for step, brightness gain and tone curve included: the
    training pairs then keep the brightness and contrast of the sRGB photos they came from."""
    gains = params.gains()[:, :, None, None]
    if params.channels == 3:
        # White balance on the mosaic (each site gets its own colour's gain), as a camera ISP does.
        masks = _bayer_masks(raw.shape[-2], raw.shape[-1], raw)
        raw = raw * (gains * masks).sum(1, keepdim=True)
        linear = demosaic(raw.clamp(0, 1))
    else:
        linear = (raw * gains).clamp(0, 1)
    rgb = _apply_ccm(linear, params.cam2rgb).clamp(0, 1)
    return _smoothstep(torch.clamp_min(rgb, _EPS) ** (1.0 / _GAMMA)).clamp(0, 1)


class CameraNoise(NoiseModel):
    """Realistic camera noise after Brooks et al. (CVPR 2019).

    Per image: random camera (:func:`sample_camera_params`), :func:`unprocess` to a raw
    mosaic, add shot + read noise ``raw + sqrt(shot * raw + read) * N(0, 1)``, then
    :func:`process` back to sRGB. ``shot`` (the shot-noise gain) is drawn log-uniformly
    from ``shot_noise`` (the paper's [1e-4, 0.012] by default) and the read-noise variance
    from the paper's fit ``log(read) = 2.18 * log(shot) + 1.2 + N(0, 0.26)``.

    The output is clipped to [0, 1] (the ISP clips). The training target (:meth:`pair`) is
    the noise-free raw through the same ISP, as in the paper: demosaicking and the clips
    change the image too, and a denoiser should not learn to undo them. With 3 channels the noise is spatially
    correlated by demosaicking and its colour mixed by the colour matrix. With 1 channel
    (a monochrome sensor) there is no mosaic, white balance or colour matrix: the noise is
    still signal-dependent (shot + read in linear space, then gamma and tone curve) but
    spatially white.
    """

    name = "camera"

    def __init__(self, shot_noise=(1e-4, 0.012)):
        self.shot_noise = _range(shot_noise, "shot_noise", allow_zero=False)

    def _pair(self, clean, generator):
        n, c = clean.shape[:2]
        if c == 3 and min(clean.shape[-2:]) < 2:  # a 1-pixel row or column has no blue sites to demosaic
            raise ValueError(f"CameraNoise: RGB images need at least 2 x 2 pixels for the Bayer mosaic, got "
                             f"{tuple(clean.shape[-2:])}")
        work = torch.promote_types(clean.dtype, torch.float32)
        if clean.dtype != work:
            # fp16 flushes most read-noise variances (down to 3e-9) to zero: 16-bit images go
            # through the pipeline in fp32, on the draws an fp32 image gets
            noisy, target = self._pair(clean.to(work), generator)
            return noisy.to(clean.dtype), target.to(clean.dtype)
        params = sample_camera_params(n, c, generator, like=clean)
        raw = unprocess(clean, params)
        shot = _sample(n, self.shot_noise, generator, clean, log=True)
        read = torch.exp(2.18 * torch.log(shot) + 1.2 + 0.26 * _randn((n,), generator, clean))
        variance = shot.view(n, 1, 1, 1) * raw + read.view(n, 1, 1, 1)
        noisy_raw = raw + torch.sqrt(variance) * _randn(raw.shape, generator, clean)
        return process(noisy_raw, params), process(raw, params)

    def __repr__(self):
        return f"CameraNoise(shot_noise={self.shot_noise})"


# ----------------------------------------------------------------------------- mixture


class MixedNoise(NoiseModel):
    """Each image gets one of several noise models, drawn with ``weights`` (equal by default).

    ``models`` are noise models or ``{"name": ..., **params}`` dicts, as in a training
    config: ``MixedNoise([{"name": "camera"}, {"name": "awgn", "sigma": [5, 50]}])``.
    """

    name = "mix"

    def __init__(self, models, weights=None):
        models = list(models)
        if not models:
            raise ValueError("a noise mixture needs at least one model")
        self.models = [model if isinstance(model, NoiseModel) else _model_from_dict(model) for model in models]
        # on a GPU a mixture's picks come from its generator's state, which a mixture reached
        # first inside it would share: the same picks again
        if any(_holds_mixture(model) for model in self.models):
            raise ValueError("a noise mixture cannot contain another mixture")
        weights = [1.0] * len(models) if weights is None else weights
        if (not isinstance(weights, (list, tuple)) or len(weights) != len(models)
                or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"mixture weights must be {len(models)} finite non-negative numbers with a positive "
                             f"sum, got {weights!r}")
        self.weights = [float(w) for w in weights]

    def _pair(self, clean, generator):
        if clean.shape[0] == 0:  # (multinomial draws no sample of none)
            return clean.clone(), clean.clone()
        probs = torch.tensor(self.weights, dtype=torch.float64)
        if _device(generator, clean).type == "cpu":
            picks = torch.multinomial(probs, clean.shape[0], replacement=True, generator=generator).tolist()
        else:
            # picks drawn on a GPU and read back would wait for all its queued work (a replayed
            # training step): they come from a host generator seeded from the device one's state
            host = None if generator is None else torch.Generator().manual_seed(_host_seed(generator))
            picks = torch.multinomial(probs, clean.shape[0], replacement=True, generator=host).tolist()
        noisy, target = torch.empty_like(clean), torch.empty_like(clean)
        for index, model in enumerate(self.models):
            rows = torch.tensor([row for row, pick in enumerate(picks) if pick == index], dtype=torch.long)
            if len(rows):
                if clean.device.type != "cpu":  # index_copy_ takes indices on its own device
                    # (on a GPU, from pinned memory: from pageable memory they would wait too)
                    rows = (rows.pin_memory() if clean.is_cuda else rows).to(clean.device, non_blocking=True)
                model_noisy, model_target = model._pair(clean.index_select(0, rows), generator)
                noisy.index_copy_(0, rows, model_noisy)
                target.index_copy_(0, rows, model_target)
        return noisy, target

    def __repr__(self):
        return f"MixedNoise({self.models}, weights={self.weights})"


LUMA = (0.299, 0.587, 0.114)  # BT.601


def luma(images: torch.Tensor) -> torch.Tensor:
    """Colour images [..., 3, H, W] as gray [..., 1, H, W], by BT.601 luma."""
    weights = _constant("luma", torch.tensor(LUMA), images)  # (a copy per call would wait for the GPU)
    return torch.einsum("c,...chw->...hw", weights, images).unsqueeze(-3)


class GrayNoise(NoiseModel):
    """A gray photo read as colour: each colour image is made gray (:func:`luma`) and
    ``model``'s noise drawn on that one plane, so that noisy image and target are the same in
    every channel. A colour model trained on noise drawn per channel keeps most of such
    noise; mixed in (``MixedNoise``), it teaches the model gray images too. 1-channel images
    go to ``model`` as they are. ``model``: a noise model or a ``{"name": ..., **params}`` dict.
    """

    name = "gray"

    def __init__(self, model):
        self.model = model if isinstance(model, NoiseModel) else _model_from_dict(model, inside="a gray noise model")

    def _pair(self, clean, generator):
        if clean.shape[1] == 1:
            return self.model._pair(clean, generator)
        if clean.shape[1] != 3:
            raise ValueError(f"gray noise needs 1 or 3 channels (gray or colour), got {clean.shape[1]}")
        noisy, target = self.model._pair(luma(clean), generator)
        return noisy.expand_as(clean).contiguous(), target.expand_as(clean).contiguous()

    def __repr__(self):
        return f"GrayNoise({self.model})"


def _host_seed(generator: torch.Generator) -> int:
    """A seed for host draws from a device generator's state (a CUDA generator's seed and
    Philox offset, kept on the host: reading them does not sync). Its current state, not its
    initial seed: a generator that has drawn since gets other picks, as a CPU one would; and
    hashed, so that a host generator given the same seed elsewhere draws other numbers."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _model_from_dict(spec, inside: str = "a mixture") -> NoiseModel:
    """The noise model a config's dict names, for one ``inside`` another."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{inside}'s model must be a noise model or a dict with a 'name', got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    return make_noise(spec["name"], **params)


def _holds_mixture(model: NoiseModel) -> bool:
    return isinstance(model, MixedNoise) or (isinstance(model, GrayNoise) and _holds_mixture(model.model))


# ----------------------------------------------------------------------------- factory

NOISE_MODELS: dict[str, type[NoiseModel]] = {
    cls.name: cls for cls in (GaussianNoise, PoissonGaussianNoise, CameraNoise, MixedNoise, GrayNoise)
}


def make_noise(name: str, **kwargs) -> NoiseModel:
    """Build a noise model by name: ``make_noise("awgn", sigma=25)``, ``make_noise("camera")``."""
    try:
        cls = NOISE_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown noise model {name!r}; choose one of {sorted(NOISE_MODELS)}") from None
    try:
        return cls(**kwargs)
    except TypeError as err:  # unexpected keyword: report it as a bad parameter of this model
        raise ValueError(f"bad parameters for noise model {name!r}: {err}") from None
