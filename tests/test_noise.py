"""Noise models: statistics, reproducibility, the camera pipeline's round trip and correlation."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dds_fast.training.data import bundled_images
from dds_fast.training.noise import (
    CameraNoise,
    CameraParams,
    GaussianNoise,
    GrayNoise,
    MixedNoise,
    PoissonGaussianNoise,
    demosaic,
    make_noise,
    mosaic,
    process,
    sample_camera_params,
    unprocess,
)
from dds_fast.training.noise import luma

ALL_MODELS = [GaussianNoise(25), GaussianNoise((0, 55)), PoissonGaussianNoise(), CameraNoise(),
              MixedNoise([CameraNoise(), {"name": "awgn", "sigma": [5, 50]}]),
              MixedNoise([GaussianNoise(25), GrayNoise({"name": "camera"})])]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bands(levels, channels=3, height=64, width=192):
    """Horizontal bands of constant intensity, one per level, stacked vertically."""
    return torch.cat([torch.full((channels, height, width), float(v)) for v in levels], dim=1)


def band_std(residual, n_levels, height=64, margin=4):
    """Noise std inside each band, away from band edges (demosaicking mixes neighbouring bands)."""
    return torch.stack(
        [residual[..., k * height + margin : (k + 1) * height - margin, margin:-margin].std() for k in range(n_levels)]
    )


# ----------------------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("model", ALL_MODELS, ids=repr)
@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 3, 16, 16), (1, 9, 10), (2, 1, 12, 7)])
def test_shape_and_dtype_preserved(model, shape):
    clean = torch.rand(shape)
    noisy = model(clean, gen())
    assert noisy.shape == clean.shape and noisy.dtype == clean.dtype
    assert torch.isfinite(noisy).all()
    assert not torch.equal(noisy, clean)


@pytest.mark.parametrize("model", ALL_MODELS, ids=repr)
def test_an_empty_batch_gives_an_empty_pair(model):
    clean = torch.rand(0, 3, 8, 8)
    noisy, target = model.pair(clean, gen())
    assert noisy.shape == target.shape == clean.shape


def test_gray_noise_needs_one_or_three_channels():
    with pytest.raises(ValueError, match="gray noise needs 1 or 3 channels.*got 4"):
        GrayNoise(GaussianNoise(25))(torch.rand(1, 4, 8, 8), gen())


@pytest.mark.parametrize("model", ALL_MODELS, ids=repr)
def test_same_seed_same_noise_other_seed_other_noise(model):
    clean = torch.rand(2, 3, 32, 32, generator=gen(9))
    first, again, other = model(clean, gen(1)), model(clean, gen(1)), model(clean, gen(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("model", ALL_MODELS, ids=repr)
def test_a_seed_gives_an_fp64_image_the_noise_it_gives_an_fp32_one(model):
    """The same noise, levels and camera settings up to rounding: an fp64 evaluation with the
    project's seeds scores on the noise of its fp32 tables."""
    clean = torch.rand(2, 3, 32, 32, generator=gen(9))
    single, double = model(clean, gen(1)), model(clean.double(), gen(1))
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=0, atol=2e-4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # nor does torch's default dtype change the draws
    try:
        assert torch.equal(model(clean, gen(1)), single)
    finally:
        torch.set_default_dtype(default)


def test_generator_none_uses_global_rng():
    clean = torch.rand(3, 8, 8)
    torch.manual_seed(5)
    first = GaussianNoise(25)(clean)
    torch.manual_seed(5)
    assert torch.equal(first, GaussianNoise(25)(clean))


def test_factory_builds_each_model():
    assert isinstance(make_noise("awgn", sigma=15), GaussianNoise)
    assert isinstance(make_noise("poisson_gaussian", a=1e-3, b=1e-5), PoissonGaussianNoise)
    assert isinstance(make_noise("camera"), CameraNoise)
    mix = make_noise("mix", models=[{"name": "camera"}, {"name": "awgn", "sigma": 25}], weights=[1, 3])
    assert isinstance(mix, MixedNoise) and isinstance(mix.models[1], GaussianNoise) and mix.weights == [1.0, 3.0]


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("speckle", {}, "unknown noise model 'speckle'"),
        ("awgn", {"sigma": -1}, "non-negative"),
        ("awgn", {"sigma": (30, 10)}, "lo <= hi"),
        # drawn as float32, where torch's fill raised a RuntimeError deep in the first step
        ("awgn", {"sigma": 1e39}, r"sigma must be at most 3.403e\+38 \(float32\), got \(1e\+39, 1e\+39\)"),
        ("poisson_gaussian", {"a": [1e-3, 1e39]}, r"a must be at most 3.403e\+38"),
        ("camera", {"shot_noise": 1e39}, r"shot_noise must be at most 3.403e\+38"),
        ("awgn", {"sigma": "loud"}, "number or a"),
        # a string is no range: float() would read "25" character by character as (2, 5)
        ("awgn", {"sigma": "25"}, r"sigma must be a number or a \(lo, hi\) pair of numbers, got '25'"),
        ("awgn", {"sigma": ["5", "50"]}, "sigma must be a number or a"),
        ("awgn", {"sigma": [5, 25, 50]}, "sigma must be a number or a"),
        ("awgn", {"sigma": 25, "clip": "no"}, "clip must be true or false, got 'no'"),
        ("poisson_gaussian", {"a": "13"}, "a must be a number or a"),
        ("poisson_gaussian", {"clip": 1}, "clip must be true or false, got 1"),
        ("camera", {"shot_noise": "12"}, "shot_noise must be a number or a"),
        ("awgn", {"sgima": 25}, "bad parameters for noise model 'awgn'"),
        ("poisson_gaussian", {"a": (0, 1e-2)}, "log-uniformly"),
        ("camera", {"shot_noise": 0}, "positive"),
        ("mix", {"models": []}, "at least one model"),
        ("mix", {"models": [{"sigma": 25}]}, "dict with a 'name'"),
        ("mix", {"models": [{"name": "mix", "models": [{"name": "camera"}]}]}, "cannot contain another mixture"),
        # on a GPU the inner mixture would repeat the outer one's picks
        ("mix", {"models": [{"name": "gray", "model": {"name": "mix", "models": [{"name": "camera"}]}}]},
         "cannot contain another mixture"),
        ("mix", {"models": [{"name": "awgn"}], "weights": [1, 2]}, "1 finite non-negative"),
        ("mix", {"models": [{"name": "awgn"}, {"name": "camera"}], "weights": [0, 0]}, "positive sum"),
        ("mix", {"models": [{"name": "awgn"}, {"name": "camera"}], "weights": "12"}, "finite non-negative numbers"),
        ("mix", {"models": [{"name": "awgn"}, {"name": "camera"}], "weights": ["1", "2"]}, "finite non-negative"),
        ("mix", {"models": [{"name": "awgn", "sgima": 3}]}, "bad parameters for noise model 'awgn'"),
        ("gray", {"model": {"sigma": 25}}, "a gray noise model's model must be a noise model or a dict with a 'name'"),
        ("gray", {}, "bad parameters for noise model 'gray'"),
    ],
)
def test_factory_rejects_bad_input(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_noise(name, **kwargs)


@pytest.mark.parametrize("bad", [torch.zeros(8, 8), torch.zeros(1, 1, 1, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8)])
def test_models_reject_bad_tensors(bad):
    with pytest.raises(ValueError):
        GaussianNoise(25)(bad, gen())


def test_camera_needs_two_pixels_each_way_for_the_mosaic():
    for size in ((1, 8), (8, 1)):
        with pytest.raises(ValueError, match="at least 2 x 2 pixels for the Bayer mosaic"):
            CameraNoise()(torch.rand(3, *size), gen())
    assert CameraNoise()(torch.rand(1, 1, 8), gen()).isfinite().all()  # monochrome: no mosaic


def test_camera_read_noise_survives_fp16_images():
    """The read-noise variances (down to 3e-9) underflow fp16: 16-bit images take the fp32 path,
    its draws included (torch 2.11's fp16 and fp32 draws from one generator differ)."""
    clean = torch.zeros(64, 3, 8, 8)  # black: read noise alone
    noisy32 = CameraNoise()(clean, gen(3))
    for dtype in (torch.float16, torch.bfloat16):
        noisy16 = CameraNoise()(clean.to(dtype), gen(3))
        assert noisy16.dtype == dtype
        # the fp32 result rounded to 16 bits (7.5e-3 off with the noise computed in fp16)
        torch.testing.assert_close(noisy16.float(), noisy32.to(dtype).float(), rtol=0, atol=0)
    assert noisy32.std() > 0.01


def test_camera_needs_one_or_three_channels():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        CameraNoise()(torch.rand(2, 8, 8), gen())


# ----------------------------------------------------------------------------- AWGN


def test_awgn_std_matches_sigma_and_ignores_intensity():
    levels = [0.2, 0.5, 0.8]
    clean = bands(levels, height=128, width=256)
    stds = band_std(GaussianNoise(25)(clean, gen()) - clean, len(levels), height=128) * 255
    # ~98k samples per band: the std estimate is within ~0.5% (1 s.e.), 3% is > 6 s.e.
    assert torch.allclose(stds, torch.full_like(stds, 25.0), rtol=0.03)
    noise = GaussianNoise(25)(clean, gen()) - clean
    assert abs(noise.mean().item()) < 1e-3  # zero-mean, no clipping bias


def test_blind_awgn_draws_sigma_per_image_within_range():
    clean = torch.full((16, 1, 64, 64), 0.5)
    residual = GaussianNoise((5, 50))(clean, gen()) - clean
    stds = residual.flatten(1).std(1) * 255
    assert (stds > 5 * 0.9).all() and (stds < 50 * 1.1).all()
    assert stds.std() > 5  # the 16 images really got different sigmas


def test_clip_option_keeps_range():
    clean = torch.rand(3, 32, 32)
    noisy = GaussianNoise(50, clip=True)(clean, gen())
    assert noisy.min() >= 0 and noisy.max() <= 1


# ----------------------------------------------------------------------------- Poisson-Gaussian


def test_poisson_gaussian_variance_is_affine_in_intensity():
    a, b = 4e-3, 1e-4
    levels = [0.1, 0.4, 0.7, 0.95]
    clean = bands(levels, height=128, width=256)
    var = band_std(PoissonGaussianNoise(a=a, b=b)(clean, gen()) - clean, len(levels), height=128) ** 2
    expected = torch.tensor([a * v + b for v in levels])
    assert torch.allclose(var, expected, rtol=0.05)  # variance estimate s.e. ~0.5% per band
    assert (var.diff() > 0).all()


def test_poisson_gaussian_sampled_parameters_stay_in_range():
    clean = torch.full((32, 1, 32, 32), 1.0)
    var = (PoissonGaussianNoise(a=(1e-4, 1e-2), b=(1e-6, 1e-3))(clean, gen()) - clean).flatten(1).var(1)
    lo, hi = 1e-4 + 1e-6, 1e-2 + 1e-3
    assert (var > 0.8 * lo).all() and (var < 1.2 * hi).all()


# ----------------------------------------------------------------------------- camera pipeline


@pytest.mark.parametrize("channels", [3, 1])
def test_camera_noise_grows_with_intensity(channels):
    # In sRGB the std rises from shadows to mid-tones; beyond ~0.6 the smoothstep tone curve
    # (slope -> 0 at 1) compresses it again, so only levels up to 0.5 are compared.
    levels = [0.05, 0.15, 0.3, 0.5]
    clean = bands(levels, channels=channels).expand(4, -1, -1, -1).contiguous()
    residual = CameraNoise(shot_noise=4e-3)(clean, gen()) - clean
    stds = torch.stack([band_std(r, len(levels)) for r in residual])  # [image, level]
    assert (stds.diff(dim=1) > 0).all(), stds * 255
    assert (stds[:, -1] > 1.3 * stds[:, 0]).all()


def test_camera_noise_levels_span_paper_range():
    clean = torch.full((64, 3, 32, 32), 0.4)
    stds = (CameraNoise()(clean, gen()) - clean).flatten(1).std(1) * 255
    # At grey 0.4 the ends of the shot-noise range give std ~3/255 and ~38/255; the log-uniform
    # draw over two decades must reach near both ends in 64 images.
    assert stds.min() < 6 and stds.max() > 25


@pytest.fixture
def raw_domain_camera(monkeypatch):
    """CameraNoise with its ISP made the identity: the output is the noisy raw image, so the
    noise drawn there can be measured per image."""
    import dds_fast.training.noise as noise
    monkeypatch.setattr(noise, "unprocess", lambda image, params: image)
    monkeypatch.setattr(noise, "process", lambda raw, params: raw)


def test_camera_read_noise_follows_the_papers_fit(raw_domain_camera):
    # On black, the raw noise variance is the read variance alone: log(read) - 2.18 log(shot)
    # - 1.2 is the fit's residual, N(0, 0.26) (Brooks et al. 2019).
    shot = 1e-3
    noisy = CameraNoise(shot_noise=shot)(torch.zeros(2000, 1, 64, 64, dtype=torch.float64), gen(3))
    residual = noisy.flatten(1).var(1).log() - 2.18 * math.log(shot) - 1.2
    assert abs(residual.mean()) < 0.03, residual.mean()
    assert 0.24 < residual.std() < 0.29, residual.std()


def test_camera_read_noise_follows_each_images_own_shot_noise(raw_domain_camera):
    # Shot levels drawn over the range, the same draws on black (variance: read) and on raw 0.5
    # (0.5 shot + read): each image's read level must fit its own shot level, not another's.
    black, grey = (CameraNoise()(torch.full((1000, 1, 64, 64), level, dtype=torch.float64), gen(5))
                   for level in (0.0, 0.5))
    read = black.flatten(1).var(1)
    shot = 2 * ((grey - 0.5).flatten(1).var(1) - read)
    assert shot.log().max() - shot.log().min() > 4  # the range, log(0.012 / 1e-4) = 4.8
    residual = read.log() - 2.18 * shot.log() - 1.2
    assert abs(residual.mean()) < 0.05, residual.mean()
    assert 0.23 < residual.std() < 0.31, residual.std()


def test_camera_shot_noise_is_drawn_log_uniformly(raw_domain_camera):
    # On white (raw 1) the variance is shot + read, read at most 2% of shot in the paper's range:
    # the quartiles of log(variance) are those of a log-uniform shot over [1e-4, 0.012].
    noisy = CameraNoise()(torch.ones(4000, 1, 32, 32, dtype=torch.float64), gen(4))
    log_variance = (noisy - 1).flatten(1).var(1).log()
    lo, hi = math.log(1e-4), math.log(0.012)
    expected = torch.tensor([lo + q * (hi - lo) for q in (0.25, 0.5, 0.75)], dtype=torch.float64)
    measured = torch.quantile(log_variance, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert torch.allclose(measured, expected, atol=0.12), (measured, expected)


def test_camera_noise_is_spatially_correlated_awgn_is_not():
    flat = torch.full((3, 128, 128), 0.4)

    def neighbour_correlation(model):
        r = model(flat, gen()) - flat
        pairs = torch.stack([r[..., :, :-1].flatten(), r[..., :, 1:].flatten()])
        return torch.corrcoef(pairs)[0, 1].item()

    # Bilinear demosaicking builds 3 of 4 values per colour from shared neighbours.
    assert neighbour_correlation(CameraNoise(shot_noise=4e-3)) > 0.3
    # 49k pairs: the correlation of independent noise has s.e. ~0.005.
    assert abs(neighbour_correlation(GaussianNoise(25))) < 0.03
    assert abs(neighbour_correlation(PoissonGaussianNoise())) < 0.03


def neutral_gray_camera(rgb_gain=1.0):
    """One channel, no colour matrix, no white balance; the given brightness gain."""
    eye, one = torch.ones(1, 1, 1), torch.ones(1)
    return CameraParams(eye, eye.clone(), torch.tensor([rgb_gain]), one, one.clone())


def test_awgn_is_sigma_over_255_times_the_generators_normal_draws():
    # exact, where the std test's tolerance cannot tell 255 from 256
    clean = torch.full((1, 3, 8, 8), 0.5)
    noise = GaussianNoise(25)(clean, gen(7)) - clean
    torch.testing.assert_close(noise, 25 / 255 * torch.randn(clean.shape, generator=gen(7)), rtol=1e-5, atol=1e-7)


def test_unprocess_inverts_the_tone_curve_then_gamma_2_2():
    # Brooks et al.: the inverse smoothstep, then x ** 2.2 (sRGB 0.5 is smoothstep's fixed point)
    srgb = torch.tensor([0.5, 3 * 0.3 ** 2 - 2 * 0.3 ** 3]).view(1, 1, 1, 2)
    raw = unprocess(srgb, neutral_gray_camera())
    torch.testing.assert_close(raw.flatten(), torch.tensor([0.5 ** 2.2, 0.3 ** 2.2]), rtol=1e-5, atol=1e-7)


def test_unprocess_clips_the_raw_image_at_saturation():
    # a brightness gain under 1 (about 2% of draws of 1 / N(0.8, 0.1)) would lift bright pixels past 1
    raw = unprocess(torch.tensor([0.995, 1.0]).view(1, 1, 1, 2), neutral_gray_camera(rgb_gain=0.8))
    assert torch.equal(raw, torch.ones_like(raw))


def test_mosaic_is_rggb():
    image = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.equal(mosaic(image)[0, 0], torch.tensor([[1.0, 2.0], [2.0, 3.0]]).repeat(2, 2))


def test_process_clips_the_noisy_raw_before_demosaicking():
    # a sample that read noise drove below 0 demosaics as a 0, not darkening its neighbours
    params = sample_camera_params(1, 3, gen(1), like=torch.zeros(1))
    raw = torch.full((1, 1, 8, 8), 0.3)
    negative, zero = raw.clone(), raw.clone()
    negative[..., 4, 4], zero[..., 4, 4] = -0.5, 0.0
    torch.testing.assert_close(process(negative, params), process(zero, params))


def test_mosaic_then_demosaic_is_exact_on_affine_images():
    # Bilinear interpolation reproduces affine signals exactly away from the 1-pixel border.
    h, w = 20, 26
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = torch.stack([0.2 + 0.5 * xx, 0.1 + 0.3 * yy + 0.2 * xx, 0.7 - 0.4 * yy])[None]
    restored = demosaic(mosaic(image))
    assert torch.allclose(restored[..., 1:-1, 1:-1], image[..., 1:-1, 1:-1], atol=1e-6)
    # Measured samples are kept exactly, borders included.
    assert torch.allclose(mosaic(restored), mosaic(image), atol=1e-7)


def test_camera_round_trip_gray_is_identity():
    # One channel: no mosaic, so unprocess/process are exact inverses for values below the
    # highlight range (linear grey > 0.9, sRGB > ~0.95, is deliberately not inverted exactly).
    clean = torch.linspace(0.0, 0.9, 64 * 64).view(1, 1, 64, 64)
    for seed in range(4):
        params = sample_camera_params(1, 1, gen(seed), like=clean)
        assert torch.allclose(process(unprocess(clean, params), params), clean, atol=2e-4)


def smooth_photo():
    # Blurred (sigma 3) and range-compressed into [0.05, 0.85]: no highlights for the
    # highlight-preserving gains to alter and detail far below the Bayer Nyquist limit.
    photo = bundled_images(["chelsea"])["chelsea"].numpy()
    photo = 0.05 + 0.8 * gaussian_filter(photo, (0, 3, 3))
    return torch.from_numpy(photo)[None]


def psnr(a, b):
    return 10 * math.log10(1.0 / ((a - b) ** 2).mean().item())


def test_camera_round_trip_colour_recovers_image():
    # Colour matrix, gains, gamma and tone curve invert exactly; what remains is bilinear
    # demosaicking, exact for locally affine images. On a smooth photo the round trip
    # measures ~59 dB, i.e. below a quarter of one 8-bit level RMS: 50 dB leaves margin.
    clean = smooth_photo()
    for seed in range(4):
        params = sample_camera_params(1, 3, gen(seed), like=clean)
        assert psnr(process(unprocess(clean, params), params), clean) > 50


def test_camera_round_trip_on_detailed_photo_is_limited_by_demosaicking():
    # With full detail the loss is bilinear demosaicking's aliasing at edges: the round trip
    # measures ~31.5 dB on chelsea, against ~34 dB for mosaic+demosaic of the sRGB photo.
    clean = bundled_images(["chelsea"])["chelsea"][None]
    params = sample_camera_params(1, 3, gen(0), like=clean)
    assert psnr(process(unprocess(clean, params), params), clean) > 29


def test_camera_parameters_are_drawn_per_image():
    clean = torch.rand(3, 3, 8, 8)
    params = sample_camera_params(3, 3, gen(), like=clean)
    assert params.cam2rgb.shape == (3, 3, 3)
    assert not torch.allclose(params.cam2rgb[0], params.cam2rgb[1])
    eye = torch.eye(3).expand(3, 3, 3)
    assert torch.allclose(params.rgb2cam @ params.cam2rgb, eye, atol=1e-5)
    assert torch.allclose(params.rgb2cam.sum(-1), torch.ones(3, 3), atol=1e-5)  # white stays white
    assert ((params.red_gain >= 1.9) & (params.red_gain <= 2.4)).all()
    assert ((params.blue_gain >= 1.5) & (params.blue_gain <= 1.9)).all()


def test_camera_output_in_unit_range_and_unbiased_on_flat_image():
    clean = torch.full((8, 3, 48, 48), 0.4)
    noisy = CameraNoise()(clean, gen())
    assert noisy.min() >= 0 and noisy.max() <= 1
    # The tone curve bends the noise a little, but the mean stays near the clean value.
    assert np.allclose(noisy.mean((1, 2, 3)).numpy(), 0.4, atol=0.02)


# ----------------------------------------------------------------------------- mixtures and targets


@pytest.mark.parametrize("inner", [GaussianNoise(25), CameraNoise(),
                                   MixedNoise([GaussianNoise(25), PoissonGaussianNoise()])], ids=repr)
def test_gray_noise_is_the_inner_models_on_the_luma_in_every_channel(inner):
    """A gray photo read as colour: one plane of noise, the same in each channel."""
    clean = torch.rand(4, 3, 16, 16, generator=gen(3))
    noisy, target = make_noise("gray", model=inner).pair(clean, gen(4))
    plain_noisy, plain_target = inner.pair(luma(clean), gen(4))
    assert noisy.shape == clean.shape and torch.equal(noisy, plain_noisy.expand_as(clean))
    assert torch.equal(target, plain_target.expand_as(clean))
    gray = torch.rand(4, 1, 16, 16, generator=gen(3))  # a gray model's images: the inner model's noise
    assert torch.equal(GrayNoise(inner).pair(gray, gen(4))[0], inner.pair(gray, gen(4))[0])


def test_gray_noise_mixed_in_makes_a_share_of_the_batch_gray():
    clean = torch.rand(64, 3, 16, 16, generator=gen(3))
    noisy, target = make_noise("mix", models=[{"name": "awgn", "sigma": 25},
                                              {"name": "gray", "model": {"name": "awgn", "sigma": 25}}],
                               weights=[3, 1]).pair(clean, gen(4))
    same = (noisy == noisy[:, :1]).flatten(1).all(1)
    assert torch.equal(same, (target == target[:, :1]).flatten(1).all(1))
    assert 4 <= int(same.sum()) <= 28  # about a quarter of 64
    assert torch.equal(target[~same], clean[~same])
    assert ((noisy - target)[same].std() * 255 - 25).abs() < 1


def test_luma_is_bt601():
    image = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    expected = 0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]
    torch.testing.assert_close(luma(image), expected[:, None])


def test_mixture_gives_each_image_one_of_its_models():
    clean = torch.rand(64, 1, 32, 32, generator=gen(3))
    mix = MixedNoise([GaussianNoise(5), GaussianNoise(50)], weights=[1, 3])
    noisy, target = mix.pair(clean, gen(4))
    assert torch.equal(target, clean)
    stds = (noisy - clean).std(dim=(1, 2, 3)) * 255
    low, high = stds < 10, stds > 40
    assert bool((low | high).all())
    assert 4 <= int(low.sum()) <= 28  # about a quarter of 64 draws the first model


def test_camera_target_is_the_clean_image_through_the_same_isp():
    clean = bundled_images(["astronaut"])["astronaut"][None, :, :64, :64]
    noisy, target = CameraNoise().pair(clean, gen(5))
    params = sample_camera_params(1, 3, gen(5), like=clean)  # the pair's first draws
    torch.testing.assert_close(target, process(unprocess(clean, params), params))
    assert (target - clean).abs().max() > 0.05  # demosaicking and clipping change the image
    quiet_noisy, quiet_target = CameraNoise(shot_noise=1e-9).pair(clean, gen(5))
    torch.testing.assert_close(quiet_noisy, quiet_target, atol=1e-3, rtol=0)


class _Label(GaussianNoise):
    """A stand-in model: each of its images is ``value``; it moves its generator on as a draw would."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def _apply(self, clean, generator):
        torch.rand(1, generator=getattr(generator, "host", generator))
        return torch.full_like(clean, self.value)


class _DeviceGenerator:
    """Stands in for a CUDA generator (there is none here) where MixedNoise reads one: its device,
    seeds and state, the state moved on by each draw."""

    device = torch.device("cuda")

    def __init__(self, seed):
        self.host = torch.Generator().manual_seed(seed)

    def initial_seed(self):
        return self.host.initial_seed()

    def get_state(self):
        return self.host.get_state()


def test_mixture_on_a_device_generator_picks_anew_as_the_generator_moves_on():
    """A device generator's picks come from a host generator (no sync): seeded from the device
    generator's state, so that a reused generator gives each batch new picks (as a CPU one does)
    and the same state the same picks, unrelated to the draws of a host generator of its seed."""
    mix = MixedNoise([_Label(0.0), _Label(1.0)])
    clean = torch.zeros(64, 1, 2, 2)
    device_generator = _DeviceGenerator(11)
    first, second = (mix(clean, device_generator)[:, 0, 0, 0] for _ in range(2))
    assert not torch.equal(first, second)  # (the same 64 picks again: 2**-64)
    assert torch.equal(mix(clean, _DeviceGenerator(11))[:, 0, 0, 0], first)
    host_picks = torch.multinomial(torch.tensor(mix.weights, dtype=torch.float64), 64, replacement=True,
                                   generator=gen(11)).float()
    assert not torch.equal(first, host_picks)
    cpu_generator = gen(11)  # a CPU generator's picks, as before: its own first draws
    cpu_first, cpu_second = (mix(clean, cpu_generator)[:, 0, 0, 0] for _ in range(2))
    assert torch.equal(cpu_first, host_picks) and not torch.equal(cpu_first, cpu_second)


def test_constants_first_copied_under_inference_mode_still_train(monkeypatch):
    """The camera pipeline's constants are copied to a dtype and device once; a copy made under
    inference_mode must not be an inference tensor, which a later backward could not save."""
    from dds_fast.training import noise

    monkeypatch.setattr(noise, "_ON_DEVICE", {})
    raw = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=gen(12))
    with torch.inference_mode():
        expected = demosaic(raw)
    leaf = raw.clone().requires_grad_()
    out = demosaic(leaf)
    out.sum().backward()
    assert torch.equal(out.detach(), expected) and leaf.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mixture_with_one_generator_picks_anew_each_call():
    mix = MixedNoise([GaussianNoise(0), GaussianNoise(50)])
    clean = torch.rand(64, 1, 8, 8, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    first, second = ((mix(clean, generator) != clean).flatten(1).any(1) for _ in range(2))
    assert not torch.equal(first, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,kwargs", [
    ("awgn", {"sigma": 25}), ("awgn", {"sigma": [5, 50]}), ("poisson_gaussian", {}), ("camera", {}),
    ("mix", {"models": [{"name": "camera"}, {"name": "awgn", "sigma": [5, 50]}, {"name": "poisson_gaussian"}]}),
    ("gray", {"model": {"name": "camera"}})])
@pytest.mark.parametrize("channels", [1, 3])
def test_gpu_batches_queue_without_host_syncs(name, kwargs, channels):
    """Every model's batch on a GPU (the camera pipeline included, which the graphed step's test
    may not pick) queues its work without a host synchronisation (sync debug mode raises on one),
    once the constants are on the device."""
    from dds_fast.training.data import NoisyPatches

    images = list(bundled_images(["astronaut", "coffee"], channels=channels).values())
    data = NoisyPatches(images, make_noise(name, **kwargs), patch_size=32, length=64)
    CameraNoise()(torch.rand(2, channels, 8, 8, device="cuda"))  # the constants' one copy
    luma(torch.rand(1, 3, 1, 1, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in (0, 8, 16):
            noisy, clean = data.batch(start, 8, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert noisy.shape == clean.shape == (8, channels, 32, 32) and bool(torch.isfinite(noisy).all())


def test_mixture_indexes_images_on_any_device():
    """The rows of each model's images go to the images' device (index_copy_ takes no host
    indices there): on the meta device here, standing in for an accelerator other than CUDA."""
    clean = torch.empty(6, 3, 8, 8, device="meta")
    noisy, target = MixedNoise([GaussianNoise(5), GaussianNoise((5, 50))]).pair(clean)
    assert noisy.device.type == target.device.type == "meta" and noisy.shape == clean.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_camera_noise_in_half_precision_is_finite(dtype):
    """The colour-matrix weights range up to 1e8, past fp16's largest value: they are drawn
    in fp32 whatever the images' dtype (fp16 images came out all NaN)."""
    clean = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    noisy, target = make_noise("camera").pair(clean, torch.Generator().manual_seed(0))
    assert noisy.dtype == target.dtype == dtype
    assert torch.isfinite(noisy).all() and torch.isfinite(target).all()
    assert (noisy.float() - target.float()).abs().mean() > 1e-3  # noise was added


def test_awgn_is_unclipped_by_default():
    """(the benchmarks' synthetic noise is not clipped; clipping biases dark and bright pixels)"""
    assert GaussianNoise(25).clip is False and PoissonGaussianNoise().clip is False
    noisy = GaussianNoise(50)(torch.zeros(1, 1, 64, 64), gen(1))
    assert noisy.min() < 0


def test_poisson_gaussian_draws_its_gains_log_uniformly():
    """Half the draws of a in (1e-4, 1e-2) fall under 1e-3, the range's geometric middle
    (a uniform draw puts 9% there: low noise would almost never appear)."""
    draws = []
    model = PoissonGaussianNoise(a=(1e-4, 1e-2), b=1e-6)
    flat = torch.ones(400, 1, 8, 8)
    noise = model(flat, gen(2)) - flat
    variance = noise.flatten(1).var(1)  # a + b at x = 1
    draws = variance - 1e-6
    below = (draws < 1e-3).float().mean()
    assert 0.35 < below < 0.65


def test_camera_gains_scale_red_and_blue_sites_by_their_own_gains():
    """The round trip is the identity whatever the gains, so it cannot see them swapped or
    inverted: the gains and the darkening are pinned on their own."""
    like = torch.zeros(1)
    params = sample_camera_params(2000, 3, gen(3), like=like)
    gains = params.gains()
    torch.testing.assert_close(gains[:, 0], params.red_gain * params.rgb_gain)
    torch.testing.assert_close(gains[:, 2], params.blue_gain * params.rgb_gain)
    torch.testing.assert_close(gains[:, 1], params.rgb_gain)
    # brightness 1 / N(0.8, 0.1): unprocessing darkens by about 0.8
    assert 1.2 < params.rgb_gain.mean() < 1.32 and (params.red_gain > params.blue_gain).float().mean() > 0.5
    # a mid-grey flat patch (below the highlight blend): each raw site divided by its own gain
    grey = torch.full((1, 3, 4, 4), 0.5)
    one = sample_camera_params(1, 3, gen(4), like=like)
    raw = unprocess(grey, one)
    from dds_fast.training.noise import _GAMMA, _apply_ccm, _inverse_smoothstep

    cam = _apply_ccm(_inverse_smoothstep(grey) ** _GAMMA, one.rgb2cam)
    expected = mosaic(cam / one.gains()[:, :, None, None])
    torch.testing.assert_close(raw, expected)
    # gray: linear levels up to 0.9 take the plain inverse gain, the highlight blend only above
    ramp = torch.linspace(0.80, 0.999, 200).view(1, 1, 10, 20)
    linear = _inverse_smoothstep(ramp) ** _GAMMA
    gray = sample_camera_params(1, 1, gen(5), like=like)
    raw = unprocess(ramp, gray)
    below = linear <= 0.9
    assert below.any() and (~below).any()
    torch.testing.assert_close(raw[below], (linear / gray.rgb_gain)[below])
    assert (raw[~below] > (linear / gray.rgb_gain)[~below]).all()
