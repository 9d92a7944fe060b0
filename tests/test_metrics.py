"""Metrics: 8-bit quantisation, PSNR against hand computation, SSIM against scikit-image."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

from dds_fast.metrics import batch_psnr, batch_ssim, psnr, ssim, to_uint8


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_to_uint8_rounds_clips_and_moves_channels_last():
    x = torch.tensor([[[-0.5, 0.0, 0.6 / 255, 1.49 / 255, 1.0, 2.0]]])  # [1, 1, 6]
    assert to_uint8(x).tolist() == [[[0], [0], [1], [1], [255], [255]]]
    assert to_uint8(rand(3, 4, 5)).shape == (4, 5, 3)
    assert to_uint8(rand(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    assert to_uint8(np.zeros((4, 5))).shape == (4, 5, 1)
    u8 = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    assert to_uint8(u8) is u8  # already 8-bit: used as is


def test_psnr_matches_hand_computation():
    clean = rand(3, 16, 16)
    noisy = clean + 0.05 * rand(3, 16, 16, seed=1)
    a = np.round(np.clip(noisy.numpy(), 0, 1) * 255)
    b = np.round(np.clip(clean.numpy(), 0, 1) * 255)
    expected = 10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2))
    assert psnr(noisy, clean) == pytest.approx(expected, abs=1e-9)


def test_psnr_known_value_and_identical_images():
    clean = np.full((8, 8, 3), 100, np.uint8)
    off = clean.copy()
    off[0, 0, 0] += 16  # MSE = 16^2 / 192 = 4/3
    assert psnr(off, clean) == pytest.approx(10 * math.log10(255**2 * 3 / 4))
    assert psnr(clean, clean) == math.inf


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 3]), st.floats(0.01, 0.3))
def test_psnr_tensor_and_numpy_agree(seed, channels, noise):
    clean = rand(channels, 12, 13, seed=seed)
    noisy = clean + noise * (rand(channels, 12, 13, seed=seed + 1) - 0.5)
    as_numpy = psnr(noisy.permute(1, 2, 0).numpy(), clean.permute(1, 2, 0).numpy())
    assert psnr(noisy, clean) == pytest.approx(as_numpy)


def skimage_ssim(out_u8, ref_u8, colour):
    return structural_similarity(
        ref_u8, out_u8, data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, channel_axis=-1 if colour else None,
    )


def test_ssim_colour_matches_skimage_on_quantised_images():
    clean = rand(3, 40, 48)
    noisy = clean + 0.1 * (rand(3, 40, 48, seed=1) - 0.5)
    expected = skimage_ssim(to_uint8(noisy), to_uint8(clean), colour=True)
    assert ssim(noisy, clean) == pytest.approx(expected, abs=1e-12)
    assert ssim(clean, clean) == pytest.approx(1.0)


def test_ssim_gray_matches_skimage_2d():
    clean = rand(1, 32, 32)
    noisy = clean + 0.1 * (rand(1, 32, 32, seed=2) - 0.5)
    expected = skimage_ssim(to_uint8(noisy)[..., 0], to_uint8(clean)[..., 0], colour=False)
    assert ssim(noisy, clean) == pytest.approx(expected, abs=1e-12)
    assert ssim(noisy[0].numpy(), clean[0].numpy()) == pytest.approx(expected, abs=1e-12)  # numpy [H, W]


def test_batch_helpers_average_per_image_scores():
    clean = rand(3, 3, 24, 24)
    noisy = clean + torch.tensor([0.02, 0.05, 0.1]).view(3, 1, 1, 1) * (rand(3, 3, 24, 24, seed=1) - 0.5)
    assert batch_psnr(noisy, clean) == pytest.approx(np.mean([psnr(n, c) for n, c in zip(noisy, clean)]))
    assert batch_ssim(noisy, clean) == pytest.approx(np.mean([ssim(n, c) for n, c in zip(noisy, clean)]))
    nhwc = noisy.permute(0, 2, 3, 1).numpy(), clean.permute(0, 2, 3, 1).numpy()
    assert batch_psnr(*nhwc) == pytest.approx(batch_psnr(noisy, clean))


@pytest.mark.parametrize(
    "output, target, message",
    [
        (torch.zeros(3, 8, 8), torch.zeros(3, 8, 9), "shape mismatch"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), "batch_psnr"),
        (torch.zeros(8, 8), torch.zeros(8, 8), r"\[C, H, W\]"),
        (torch.zeros(4, 8, 8), torch.zeros(4, 8, 8), "1 or 3 channels"),
        (np.zeros((8, 8, 3), np.int32), np.zeros((8, 8, 3), np.int32), "dtype"),
    ],
)
def test_psnr_rejects_bad_inputs(output, target, message):
    with pytest.raises(ValueError, match=message):
        psnr(output, target)


def test_tensor_chw_and_array_hwc_can_be_compared():
    image = rand(3, 8, 8)
    assert psnr(image, image.permute(1, 2, 0).numpy()) == math.inf


def test_empty_images_are_an_error_not_a_nan_score():
    for score, shape in ((psnr, (3, 0, 0)), (psnr, (3, 4, 0)), (batch_psnr, (0, 3, 4, 4)), (batch_ssim, (0, 3, 16, 16))):
        with pytest.raises(ValueError, match="empty image"):
            score(torch.rand(shape), torch.rand(shape))


def test_batch_helpers_reject_single_images():
    with pytest.raises(ValueError, match="expected a batch"):
        batch_psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_score_as_their_float32_values(dtype):
    clean = rand(3, 16, 16)
    output = (clean + 0.05 * rand(3, 16, 16, seed=1)).to(dtype)
    assert psnr(output, clean) == psnr(output.float(), clean)
    assert ssim(output, clean) == ssim(output.float(), clean)
    assert batch_psnr(output[None], clean[None]) == psnr(output.float(), clean)


@pytest.mark.parametrize("score", [psnr, ssim])
def test_nan_outputs_are_an_error_not_scored_as_black(score):
    # a NaN has no 8-bit value: the cast made it 0, so a diverged model scored as a black image
    clean = rand(3, 16, 16)
    output = clean.clone()
    output[0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        score(output, clean)
    with pytest.raises(ValueError, match="NaN"):
        score(clean, output.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("score", [psnr, ssim])
def test_floats_on_another_scale_are_an_error_not_clipped_to_white(score):
    """Floats on the 0-255 scale clipped to [0, 1] scored as a near-white image, with a
    plausible number; noisy images that overrun [0, 1] a little are still scored."""
    clean = rand(3, 16, 16)
    for output in (clean * 255, clean - 5, torch.where(clean > 0.5, float("inf"), clean)):
        with pytest.raises(ValueError, match=r"to_uint8: expected float values in \[0, 1\]"):
            score(output, clean)
        with pytest.raises(ValueError, match=r"to_uint8: expected float values in \[0, 1\]"):
            score(clean, output.permute(1, 2, 0).numpy())
    noisy = clean + 0.3 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert noisy.max() > 1.3 and noisy.min() < -0.2
    assert score(noisy, clean) == score(noisy.clamp(0, 1), clean)
