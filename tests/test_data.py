"""Data layer: bundled photos, image files and folders, patch datasets, SIDD layouts."""
import os
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.io
import torch
from torch.utils.data import DataLoader

from dds_fast.training.data import (
    _TRAIN_STREAM,
    PHOTO_NAMES,
    TEST_NAMES,
    TEXTURE_NAMES,
    NoisyPatches,
    PairedPatches,
    SIDDValidation,
    as_float,
    check_output_path,
    bundled_images,
    check_pair_headers,
    eight_bit,
    item_generator,
    list_images,
    load_image,
    load_image_folder,
    make_validation_set,
    random_flip_rotate,
    read_image,
    save_image,
    sidd_medium_pairs,
    to_channels,
)
from dds_fast.training.noise import GaussianNoise

png = pytest.importorskip("png")  # pypng, a dependency; absent on the GPU machines' image


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- bundled images


def test_bundled_images_are_float_chw_in_unit_range():
    images = bundled_images()
    assert tuple(images) == PHOTO_NAMES + TEXTURE_NAMES
    for name, image in images.items():
        assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3, name
        assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5, name
    assert images["astronaut"].shape == (3, 512, 512)
    assert not torch.equal(images["stereo_motorcycle_left"], images["stereo_motorcycle_right"])


def test_bundled_images_channel_conversion():
    gray = bundled_images(["astronaut", "camera"], channels=1)
    assert gray["astronaut"].shape == (1, 512, 512) and gray["camera"].shape == (1, 512, 512)
    colour_camera = bundled_images(["camera"])["camera"]
    assert torch.equal(bundled_images("camera")["camera"], colour_camera)  # a bare name, not its letters
    assert torch.equal(colour_camera[0], colour_camera[1]) and torch.equal(colour_camera[0], gray["camera"][0])


def test_test_images_load_but_stay_out_of_the_default_training_set():
    images = bundled_images(TEST_NAMES)
    assert tuple(images) == TEST_NAMES and not set(TEST_NAMES) & set(bundled_images())
    for name, image in images.items():
        assert image.shape[0] == 3 and min(image.shape[1:]) >= 512 and image.std() > 0.05, name


def test_bundled_images_unknown_name():
    with pytest.raises(ValueError, match="unknown bundled image.*'lena'"):
        bundled_images(["lena"])


def test_to_channels_uses_bt601_luma():
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2)
    assert torch.allclose(to_channels(rgb, 1), torch.full((1, 2, 2), 0.299))
    with pytest.raises(ValueError, match="1 or 3"):
        to_channels(rgb, 2)


# ----------------------------------------------------------------------------- image files


def write_png16(path, array):
    """A 16-bit PNG with alpha or colour, written with pypng (imageio cannot write these)."""
    height, width, channels = array.shape
    writer = png.Writer(width, height, greyscale=channels == 2, alpha=channels in (2, 4), bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, array.reshape(height, width * channels).tolist())


def test_load_8bit_rgb_gray_and_rgba_png(tmp_path):
    rgb = rng().integers(0, 256, (9, 11, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    iio.imwrite(tmp_path / "gray.png", rgb[..., 0])
    iio.imwrite(tmp_path / "rgba.png", np.dstack([rgb, np.full((9, 11), 7, np.uint8)]))
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.equal(load_image(tmp_path / "rgb.png"), expected)
    assert torch.equal(load_image(tmp_path / "gray.png"), expected[:1])
    assert torch.equal(load_image(tmp_path / "rgba.png"), expected)  # alpha dropped
    assert load_image(tmp_path / "gray.png", channels=3).shape == (3, 9, 11)
    assert load_image(tmp_path / "rgb.png", channels=1).shape == (1, 9, 11)


def test_load_16bit_gray_png_and_tiff(tmp_path):
    gray = rng().integers(0, 65536, (7, 5), dtype=np.uint16)
    iio.imwrite(tmp_path / "gray16.png", gray)
    iio.imwrite(tmp_path / "rgb16.tif", np.dstack([gray] * 3))
    expected = torch.from_numpy(gray.astype(np.float32) / 65535)
    assert torch.equal(load_image(tmp_path / "gray16.png")[0], expected)
    assert torch.equal(load_image(tmp_path / "rgb16.tif")[2], expected)


def test_load_planar_rgb_tiff(tmp_path):
    """A TIFF with each colour in a plane of its own: tifffile reads it as [3, H, W]."""
    import tifffile

    rgb = rng().integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), planarconfig="separate", photometric="rgb")
    image, bits = read_image(tmp_path / "planar.tif")
    assert bits == 16 and torch.equal(image, torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 65535))


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 40, 60), (2, 5, 7, 3)])
def test_a_multi_page_tiff_reads_as_its_first_page(tmp_path, shape):
    """tifffile reads a stack of pages as one array, whose first axis then looked like rows
    (two 4x4 pages: one 2x4 image of 4 channels)."""
    import tifffile

    pages = rng().integers(0, 256, shape, dtype=np.uint8)  # one series of pages
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="rgb" if pages.ndim == 4 else "minisblack")
    image, bits = read_image(tmp_path / "pages.tif")
    first = torch.from_numpy(pages[0].astype(np.float32) / 255)
    assert bits == 8 and torch.equal(image, first.permute(2, 0, 1) if first.dim() == 3 else first[None])


def write_packed_tiff(path, photometric, packed: bytes, width: int, bits: int = 4, colormap=()):
    """One row of samples under 8 bits, uncompressed (tifffile writes no such files of its own);
    a palette file's ``colormap``: its 3 * 2**bits 16-bit entries, reds then greens then blues."""
    import struct

    data_offset = 8 + 2 + 12 * (10 if colormap else 9) + 4
    entries = [(256, 4, 1, width), (257, 4, 1, 1), (258, 4, 1, bits), (259, 4, 1, 1), (262, 4, 1, photometric),
               (273, 4, 1, data_offset), (277, 4, 1, 1), (278, 4, 1, 1), (279, 4, 1, len(packed))]
    if colormap:
        entries.append((320, 3, len(colormap), data_offset + len(packed)))
    ifd = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + b"\x00" * 4 + packed
                     + struct.pack(f"<{len(colormap)}H", *colormap))


def test_4bit_tiff_samples_scale_to_the_full_range_as_shown(tmp_path):
    pytest.importorskip("imagecodecs")  # tifffile unpacks samples under 8 bits through it
    for photometric, expected in ((1, [0, 85, 255, 255]), (0, [255, 170, 0, 0])):  # MinIsBlack, MinIsWhite
        write_packed_tiff(tmp_path / "g4.tif", photometric, bytes([0x05, 0xFF]), 4)
        image, bits = read_image(tmp_path / "g4.tif")
        assert bits == 8 and torch.equal(image, torch.tensor(expected, dtype=torch.float32).view(1, 1, 4) / 255)


def test_load_inverted_and_palette_tiffs_as_shown(tmp_path):
    """tifffile returns stored samples: a MinIsWhite file stores white as 0, a palette file
    stores indices into a 16-bit colour map."""
    import tifffile

    gray = rng().integers(0, 256, (5, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "inverted.tif", 255 - gray, photometric="miniswhite")
    assert torch.equal(load_image(tmp_path / "inverted.tif")[0], torch.from_numpy(gray.astype(np.float32) / 255))
    colormap = rng(1).integers(0, 65536, (3, 256), dtype=np.uint16)
    indices = rng(2).integers(0, 256, (5, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "palette.tif", indices, photometric="palette", colormap=colormap)
    image, bits = read_image(tmp_path / "palette.tif")
    expected = torch.from_numpy(colormap[:, indices].astype(np.float32) / 65535)
    assert image.shape == (3, 5, 7) and torch.equal(image, expected)


def test_a_1bit_palette_tiff_reads_its_two_colours(tmp_path):
    pytest.importorskip("imagecodecs")  # tifffile unpacks samples under 8 bits through it
    # indices 1 0 1 1 into (red, blue) give blue, red, blue, blue: tifffile gives them as booleans, which would mask, not index
    write_packed_tiff(tmp_path / "p1.tif", 3, bytes([0b10110000]), 4, bits=1, colormap=(65535, 0, 0, 0, 0, 65535))
    image, _ = read_image(tmp_path / "p1.tif")
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(image[:, 0], torch.stack([blue, red, blue, blue], dim=1))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_load_cmyk_tiff_as_rgb_keeping_alpha(tmp_path, dtype):
    import tifffile

    top = np.iinfo(dtype).max
    cmyka = rng().integers(0, top + 1, (5, 7, 5), dtype=dtype)
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyka[..., :4], photometric="separated")
    tifffile.imwrite(tmp_path / "cmyka.tif", cmyka, photometric="separated", planarconfig="contig",
                     extrasamples=["unassalpha"])
    ink, black = cmyka[..., :3].astype(np.float64), cmyka[..., 3:4].astype(np.float64)
    rgb = np.round((top - ink) * (top - black) / top)  # the light each ink and the black let through
    image, bits = read_image(tmp_path / "cmyk.tif")
    assert bits == (16 if dtype == np.uint16 else 8)
    assert torch.equal(image, torch.from_numpy((rgb / top).astype(np.float32)).permute(2, 0, 1))
    with_alpha, _ = read_image(tmp_path / "cmyka.tif", keep_alpha=True)
    assert torch.equal(with_alpha[:3], image)
    assert torch.equal(with_alpha[3], torch.from_numpy(cmyka[..., 4].astype(np.float32) / top))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_reads_the_way_its_orientation_tag_shows_it(tmp_path, orientation):
    """Pillow's exif_transpose of the same picture as a PNG with that EXIF orientation shows
    how it should look."""
    import tifffile

    stored, _, shown = turned_by_exif(tmp_path, orientation)
    tifffile.imwrite(tmp_path / "turned.tif", stored, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    image, _ = read_image(tmp_path / "turned.tif")
    assert torch.equal(image, torch.from_numpy(shown.astype(np.float32) / 255).permute(2, 0, 1))


def test_a_tiff_is_read_as_one_whatever_its_name_and_a_png_named_tif_as_a_png(tmp_path):
    """By the file's first bytes: a 16-bit colour TIFF named .png went through Pillow (8-bit),
    and a PNG named .tif was refused by the TIFF reader."""
    import tifffile

    stored = rng().integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.png", stored, photometric="rgb", bigtiff=True)
    image, bits = read_image(tmp_path / "deep.png")
    assert bits == 16 and torch.equal(image, torch.from_numpy(stored.astype(np.float32) / 65535).permute(2, 0, 1))
    png = save_image(tmp_path / "plain.png", image)
    (tmp_path / "plain.tif").write_bytes(png.read_bytes())
    assert torch.equal(read_image(tmp_path / "plain.tif")[0], read_image(png)[0])


def test_tiff_alpha_stays_as_stored_after_the_colour(tmp_path):
    """An extra (alpha) sample is not a colour: a MinIsWhite file's alpha is not inverted."""
    import tifffile

    stored = rng().integers(0, 256, (5, 7, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", stored, photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "graya.tif", stored[..., 2:], photometric="miniswhite", extrasamples=["unassalpha"])
    expected = torch.from_numpy(stored.astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "rgba.tif", keep_alpha=True)[0], expected)
    gray, _ = read_image(tmp_path / "graya.tif", keep_alpha=True)
    assert torch.equal(gray[0], torch.from_numpy((255 - stored[..., 2]).astype(np.float32) / 255))
    assert torch.equal(gray[1], expected[3])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_colours_premultiplied_by_their_alpha_read_straight(tmp_path, dtype):
    """An associated alpha's colours are stored multiplied by it; PNG's alpha, which denoise
    writes, is straight: the straight colours read, multiplied back and rounded, are the
    stored ones; 100 at alpha 128 (8-bit) reads 199, as Pillow reads it; alpha 0 reads black."""
    import tifffile

    top = np.iinfo(dtype).max
    alpha = rng().integers(0, top + 1, (5, 7, 1), dtype=np.int64)
    straight = rng().integers(0, top + 1, (5, 7, 3), dtype=np.int64)
    alpha[0, 0], straight[0, 0] = 0, top
    stored = np.concatenate([(straight * alpha + top // 2) // top, alpha], axis=-1).astype(dtype)
    stored[1, 1] = [100, 100, 100, 128]
    stored[2, 2] = [1, 1, 1, 2]  # 127.5: rounded, not truncated
    tifffile.imwrite(tmp_path / "assoc.tif", stored, photometric="rgb", extrasamples=["assocalpha"])
    image, _ = read_image(tmp_path / "assoc.tif", keep_alpha=True)
    got = np.rint(image.permute(1, 2, 0).double().numpy() * top).astype(np.int64)
    assert np.array_equal(got[..., 3], stored[..., 3])
    assert np.array_equal((got[..., :3] * got[..., 3:] + top // 2) // top, stored[..., :3])
    if dtype == np.uint8:
        assert got[1, 1, :3].tolist() == [199] * 3 and got[2, 2, :3].tolist() == [128] * 3
    assert got[0, 0, :3].tolist() == [0, 0, 0]


@pytest.mark.parametrize("photometric,samples", [("minisblack", 1), ("miniswhite", 1), ("separated", 4)])
def test_tiff_premultiplied_samples_are_made_straight_before_their_colour_conversion(tmp_path, photometric, samples):
    """A MinIsWhite or CMYK file's samples are premultiplied as stored: made straight before
    they are inverted or turned into RGB (after, a half-transparent black read near white).
    Alphas of 0, 85 and 255 divide exactly: the file reads as its straight twin does."""
    import tifffile

    alpha = rng().choice([0, 85, 255], size=(5, 7, 1))
    stored = (rng().integers(0, 256, (5, 7, samples)) * alpha // 255).astype(np.uint8)
    straight = np.where(alpha > 0, stored.astype(np.int64) * 255 // np.maximum(alpha, 1), 0).astype(np.uint8)
    for name, colours, kind in (("assoc.tif", stored, "assocalpha"), ("straight.tif", straight, "unassalpha")):
        tifffile.imwrite(tmp_path / name, np.concatenate([colours, alpha.astype(np.uint8)], axis=-1),
                         photometric=photometric, extrasamples=[kind])
    image, _ = read_image(tmp_path / "assoc.tif", keep_alpha=True)
    assert torch.equal(image, read_image(tmp_path / "straight.tif", keep_alpha=True)[0])


@pytest.mark.parametrize("photometric,colours", [("minisblack", 1), ("rgb", 3)])
def test_tiff_extra_samples_that_are_no_alpha_are_dropped(tmp_path, photometric, colours):
    """A gray file with an alpha and an unspecified extra sample read as three colour planes
    (gray, alpha, the extra) before: the colours and the first alpha are the pixels."""
    import tifffile

    stored = rng().integers(0, 256, (5, 7, colours + 2), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "extras.tif", stored, photometric=photometric,
                     extrasamples=["unspecified", "unassalpha"])
    expected = torch.from_numpy(stored[..., list(range(colours)) + [colours + 1]].astype(np.float32) / 255)
    image, _ = read_image(tmp_path / "extras.tif", keep_alpha=True)
    assert torch.equal(image, expected.permute(2, 0, 1))
    assert torch.equal(read_image(tmp_path / "extras.tif")[0], image[:colours])


@pytest.mark.parametrize("photometric", ["cielab", "ycbcr"])
def test_tiff_in_an_unsupported_colour_space_is_refused_by_name(tmp_path, photometric):
    """tifffile returns such samples as stored (YCbCr too, unless JPEG-compressed): read as
    RGB they would be wrong colours."""
    import tifffile

    tifffile.imwrite(tmp_path / "odd.tif", rng().integers(0, 256, (5, 7, 3), dtype=np.uint8), photometric=photometric)
    with pytest.raises(ValueError, match=f"odd.tif.*photometric {photometric.upper()}"):
        read_image(tmp_path / "odd.tif")


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_load_16bit_png_with_colour_or_alpha_keeps_all_bits(tmp_path, channels):
    # Pillow truncates these to 8 bits
    array = rng(channels).integers(0, 65536, (10, 6, channels), dtype=np.uint16)
    write_png16(tmp_path / "deep.png", array)
    image = load_image(tmp_path / "deep.png")
    colour = array[..., :1] if channels == 2 else array[..., :3]  # alpha dropped
    expected = torch.from_numpy(colour.astype(np.float32) / 65535).permute(2, 0, 1)
    assert torch.equal(image, expected)


@pytest.mark.parametrize("greyscale", [True, False])
def test_load_16bit_png_with_fewer_significant_bits(tmp_path, greyscale):
    """A camera's 12 bits stored in a 16-bit PNG with an sBIT chunk (pypng writes bit depth 12
    that way) read at full scale, gray or colour alike."""
    twelve = rng().integers(0, 4096, (5, 4, 1 if greyscale else 3), dtype=np.uint16)
    with open(tmp_path / "twelve.png", "wb") as f:
        png.Writer(4, 5, greyscale=greyscale, bitdepth=12).write(f, twelve.reshape(5, -1).tolist())
    image, bits = read_image(tmp_path / "twelve.png")
    assert bits == 16
    expected = torch.from_numpy(twelve.astype(np.float32) / 4095).permute(2, 0, 1)
    torch.testing.assert_close(image, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bitdepth,greyscale", [(1, True), (2, True), (8, True), (16, True), (8, False), (16, False)])
def test_png_colour_key_reads_as_an_alpha_plane(tmp_path, bitdepth, greyscale):
    """A tRNS chunk names one gray level or colour as transparent: the alpha plane it
    implies keeps the file's bit depth."""
    top = 2 ** bitdepth - 1
    samples = rng(bitdepth).integers(0, top + 1, (6, 5, 1 if greyscale else 3), dtype=np.uint16)
    key = samples[0, 0]
    samples[1, :] = key
    if not greyscale:  # a pixel that matches the key in some channels only stays opaque
        samples[2, 0] = key[0], key[1], (int(key[2]) + 1) % (top + 1)
    with open(tmp_path / "keyed.png", "wb") as f:
        png.Writer(5, 6, greyscale=greyscale, bitdepth=bitdepth, transparent=tuple(int(v) for v in key)
                   ).write(f, samples.reshape(6, -1).tolist())
    image, bits = read_image(tmp_path / "keyed.png", keep_alpha=True)
    assert bits == (16 if bitdepth == 16 else 8)
    alpha = (samples != key).any(axis=-1, keepdims=True)
    expected = torch.from_numpy(np.dstack([samples / top, alpha]).astype(np.float32)).permute(2, 0, 1)
    assert alpha.sum() < alpha.size and image.shape == expected.shape
    torch.testing.assert_close(image, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("alphas", [(255, 0, 255, 255), (10, 128, 255, 0)])
def test_palette_png_transparency_reads_as_an_alpha_plane(tmp_path, alphas):
    """One fully transparent entry (Pillow gives its index) or an alpha per entry."""
    colours = rng().integers(0, 256, (4, 3))
    palette = [(*c, a) for c, a in zip(colours.tolist(), alphas)]
    indices = rng(1).integers(0, 4, (6, 5))
    with open(tmp_path / "palette.png", "wb") as f:
        png.Writer(5, 6, palette=palette, bitdepth=8).write(f, indices.tolist())
    image, bits = read_image(tmp_path / "palette.png", keep_alpha=True)
    expected = torch.from_numpy(np.array(palette, np.float32)[indices] / 255).permute(2, 0, 1)
    assert bits == 8 and torch.equal(image, expected)


def test_a_palette_of_grays_reads_as_a_gray_image(tmp_path):
    """As a gray photo saved with a palette: one plane (a colour model then warns), with its
    alpha where entries are transparent; a palette with one colour in use stays RGB."""
    import tifffile

    levels = rng().integers(0, 256, 4)
    indices = rng(1).integers(0, 4, (6, 5))
    expected = torch.from_numpy(levels[indices].astype(np.float32) / 255)[None]
    grays = [(int(v),) * 3 for v in levels]
    with open(tmp_path / "gray.png", "wb") as f:
        png.Writer(5, 6, palette=grays, bitdepth=8).write(f, indices.tolist())
    assert torch.equal(read_image(tmp_path / "gray.png")[0], expected)
    with open(tmp_path / "gray-alpha.png", "wb") as f:
        png.Writer(5, 6, palette=[(*g, 255 if k else 0) for k, g in enumerate(grays)], bitdepth=8).write(
            f, indices.tolist())
    image = read_image(tmp_path / "gray-alpha.png", keep_alpha=True)[0]
    assert torch.equal(image[:1], expected) and torch.equal(image[1], torch.from_numpy(indices > 0).float())
    with open(tmp_path / "colour.png", "wb") as f:
        png.Writer(5, 6, palette=grays[:3] + [(1, 2, 3)], bitdepth=8).write(f, indices.tolist())
    assert read_image(tmp_path / "colour.png")[0].shape == (3, 6, 5)
    colormap = np.repeat(rng(2).integers(0, 65536, (1, 256), dtype=np.uint16), 3, axis=0)
    tifffile.imwrite(tmp_path / "gray.tif", indices.astype(np.uint8), photometric="palette", colormap=colormap)
    image, bits = read_image(tmp_path / "gray.tif")
    assert bits == 16 and torch.equal(image, torch.from_numpy(colormap[0, indices].astype(np.float32) / 65535)[None])


def test_a_large_image_is_read_despite_pillows_decompression_bomb_limit(tmp_path, monkeypatch):
    """Pillow refuses images over Image.MAX_IMAGE_PIXELS (warns over half of it); the limit
    here is shrunk to 10 pixels so that a small file stands for a huge one."""
    import warnings

    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    rgb = rng().integers(0, 256, (16, 16, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "big.png", rgb)
    write_png16(tmp_path / "big16.png", rgb.astype(np.uint16) * 257)  # read with pypng, its EXIF with Pillow
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert torch.equal(load_image(tmp_path / "big.png"), expected)
        assert torch.equal(load_image(tmp_path / "big16.png"), expected)
    with pytest.raises(ValueError, match="broken.png"):
        load_image(tmp_path / "broken.png")
    assert Image.MAX_IMAGE_PIXELS == 10  # lifted for these reads only


def test_a_pipe_is_refused_as_no_regular_file_without_opening_it(tmp_path):
    """(it was "not found"; opening a FIFO with no writer would block)"""
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"image {re.escape(str(fifo))} is not a regular file"):
        read_image(fifo)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_image(tmp_path / "none.png")


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch):
    """(found at the save, after the whole denoise; a root user may write anywhere, so the
    system's answer is stood in for)"""
    refused = tmp_path / "locked"
    refused.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != refused)
    with pytest.raises(PermissionError, match=f"folder {re.escape(str(refused))} is not writable"):
        check_output_path(refused / "out.png")
    assert check_output_path(tmp_path / "out.png") == tmp_path / "out.png"


def test_a_jpeg_past_its_side_limit_is_refused_before_the_work_and_the_encoder(tmp_path):
    """libjpeg writes at most 65,500 pixels a side: a denoise learnt that from a 'broken data
    stream' after the whole image (a PNG takes any size)."""
    with pytest.raises(ValueError, match=r"out.jpg: JPEG holds at most 65,500 pixels a side, the image is 2 x 65501; "
                                         r"write a .png"):
        check_output_path(tmp_path / "out.jpg", size=(2, 65501))
    assert check_output_path(tmp_path / "out.jpg", size=(65500, 3)) == tmp_path / "out.jpg"
    assert check_output_path(tmp_path / "out.png", size=(2, 65501)) == tmp_path / "out.png"
    with pytest.raises(ValueError, match="JPEG holds at most 65,500 pixels a side"):
        save_image(tmp_path / "wide.jpeg", torch.rand(1, 1, 65501))
    assert not (tmp_path / "wide.jpeg").exists()


def test_load_jpeg(tmp_path):
    flat = np.full((16, 16, 3), 128, np.uint8)
    iio.imwrite(tmp_path / "flat.jpg", flat)
    assert torch.allclose(load_image(tmp_path / "flat.jpg"), torch.full((3, 16, 16), 128 / 255), atol=2 / 255)


@pytest.mark.parametrize("compression, atol", [("tiff_lzw", 0), ("tiff_adobe_deflate", 0), ("jpeg", 3 / 255)])
def test_compressed_tiffs_load(tmp_path, compression, atol):
    """LZW and JPEG are the TIFF compressions scanners and cameras write; tifffile decodes them
    through imagecodecs, a dependency for that reason. Pixels as Pillow decodes them (JPEG
    decoders may differ by a level or two)."""
    from PIL import Image

    pixels = np.repeat(np.repeat(rng().integers(0, 256, (4, 5, 3), dtype=np.uint8), 4, 0), 4, 1)
    Image.fromarray(pixels).save(tmp_path / "image.tif", compression=compression)
    if compression != "tiff_adobe_deflate":
        pytest.importorskip("imagecodecs")  # installed with the package; not on a --no-deps install
    with Image.open(tmp_path / "image.tif") as image:
        decoded = np.asarray(image.convert("RGB"))
    assert compression == "jpeg" or np.array_equal(decoded, pixels)
    expected = torch.from_numpy(decoded.astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(load_image(tmp_path / "image.tif"), expected, rtol=0, atol=atol)


def test_load_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image(tmp_path / "broken.png")
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 5), np.uint8))  # (which the network would refuse, late)
    with pytest.raises(ValueError, match=r"empty.tif: the image is empty \(0 x 5 pixels\)"):
        load_image(tmp_path / "empty.tif")


def test_folder_listing_and_loading(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        iio.imwrite(tmp_path / name, rng().integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._b.png").write_bytes(b"\0\5\26\7 macOS metadata")  # (AppleDouble: a copy to a FAT or SMB disk)
    (tmp_path / ".cache").mkdir()
    iio.imwrite(tmp_path / ".cache" / "thumb.png", rng().integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    images = load_image_folder(tmp_path, channels=1, recursive=True)
    assert sorted(images) == ["a.JPG", "b.png", "sub/c.png"]
    assert all(im.shape == (1, 8, 8) for im in images.values())


def test_a_folders_8_bit_images_can_stay_uint8(tmp_path):
    """A quarter of the memory for a folder of photos (a trainer holds them all), the same
    pixels: 8-bit files as their levels, as_float giving back what load_image reads bit for
    bit; 16-bit files and converted pixels (gray from colour) stay floats."""
    iio.imwrite(tmp_path / "a.png", rng().integers(0, 256, (9, 7, 3), dtype=np.uint8))
    iio.imwrite(tmp_path / "b.jpg", rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    png.from_array(rng(2).integers(0, 65536, (9, 7), dtype=np.uint16), "L;16").save(tmp_path / "c.png")
    floats = load_image_folder(tmp_path)
    kept = load_image_folder(tmp_path, keep_8_bit=True)
    assert {name: image.dtype for name, image in kept.items()} == {
        "a.png": torch.uint8, "b.jpg": torch.uint8, "c.png": torch.float32}
    for name, image in kept.items():
        assert torch.equal(as_float(image), floats[name]), name
    gray = load_image_folder(tmp_path, channels=1, keep_8_bit=True)
    assert gray["a.png"].dtype == torch.float32  # luma of colour: no 8-bit levels
    assert torch.equal(gray["a.png"], load_image(tmp_path / "a.png", channels=1))
    negative_zero = floats["a.png"].clone()
    negative_zero[0, 0, 0] = -0.0  # equal to 0.0, but as_float of its level gives +0.0
    for image in (floats["a.png"] * 0.5, torch.rand(3, 4, 4), floats["a.png"].double(), torch.empty(3, 0, 4),
                  negative_zero, torch.full((3, 2, 2), float("nan"))):
        assert eight_bit(image) is image


def test_uint8_levels_make_the_same_patches_and_validation_set_as_their_floats():
    images = [torch.randint(0, 256, (3, 24, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
              for k in range(2)]
    floats = [as_float(image) for image in images]
    for channels in (None, 1):
        patches = [NoisyPatches(x, GaussianNoise(25), patch_size=8, length=6, channels=channels, seed=5)
                   for x in (images, floats)]
        assert patches[0].images[0].dtype == (torch.uint8 if channels is None else torch.float32)
        for k in range(6):
            assert all(torch.equal(a, b) for a, b in zip(patches[0][k], patches[1][k]))
        assert all(torch.equal(a, b) for a, b in zip(patches[0].batch(1, 4), patches[1].batch(1, 4)))
        for size in (None, 8):
            sets = [make_validation_set(x, GaussianNoise(25), seed=2, patch_size=size, crops_per_image=2,
                                        channels=channels) for x in (images, floats)]
            assert len(sets[0]) == len(sets[1]) > 0
            for k in range(len(sets[0])):
                assert all(torch.equal(a, b) for a, b in zip(sets[0][k], sets[1][k]))
    # a float image is made gray in its own precision, as before uint8 levels were taken
    double = torch.rand(3, 24, 20, dtype=torch.float64)
    gray = NoisyPatches([double], GaussianNoise(25), patch_size=8, channels=1).images[0]
    assert torch.equal(gray, to_channels(double, 1).float())
    # real pairs take floats only: their clean image is read as it is
    with pytest.raises(ValueError, match="pair 0, clean image: expected floating-point values in \\[0, 1\\], got"):
        PairedPatches([(floats[0], images[0])], 8, 2)[0]


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .*empty"):
        list_images(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        list_images(tmp_path / "file.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.png"):
        load_image_folder(tmp_path / "bad")


# ----------------------------------------------------------------------------- synthetic patches


@pytest.fixture(scope="module")
def photos():
    return bundled_images(["chelsea", "camera", "coins"])


@pytest.mark.parametrize("channels", [1, 3])
def test_noisy_patches_shapes_ranges_and_noise(photos, channels):
    data = NoisyPatches(photos, GaussianNoise(25), patch_size=48, length=16, channels=channels, seed=3)
    assert len(data) == 16
    noisy, clean = next(iter(DataLoader(data, batch_size=16)))
    assert noisy.shape == clean.shape == (16, channels, 48, 48)
    assert clean.dtype == torch.float32 and clean.min() >= 0 and clean.max() <= 1
    assert (noisy - clean).std() * 255 == pytest.approx(25, rel=0.05)


def test_noisy_patches_are_reproducible_and_vary(photos):
    def make(seed):
        return NoisyPatches(photos, GaussianNoise(25), patch_size=32, length=8, seed=seed)

    a, b, c = make(0), make(0), make(1)
    for i in range(8):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    assert not torch.equal(a[0][1], a[1][1])  # different items, different crops
    assert not torch.equal(a[0][1], c[0][1])  # different seed
    first = a[0][1]
    a.set_epoch(1)
    assert not torch.equal(a[0][1], first)  # new epoch, new crops


def test_noisy_patches_batch_has_the_items_crops_and_its_own_noise(photos):
    data = NoisyPatches(photos, GaussianNoise(25), patch_size=32, length=12, seed=2)
    noisy, clean = data.batch(4, 8)
    assert torch.equal(clean, torch.stack([data[i][1] for i in range(4, 12)]))
    assert (noisy - clean).std() * 255 == pytest.approx(25, rel=0.1)
    again, _ = data.batch(4, 8)
    assert torch.equal(noisy, again)
    assert not torch.equal(data.batch(0, 8)[0][4:], noisy[:4])  # noise of another batch
    # ... and of its own stream, not a fresh copy of the stream its first item's crop came from
    first_items_stream = item_generator(2, _TRAIN_STREAM, 0, 4)
    assert not torch.allclose(noisy - clean, 25 / 255 * torch.randn(clean.shape, generator=first_items_stream),
                              atol=1e-6)
    data.set_epoch(1)
    assert not torch.equal(data.batch(4, 8)[1], clean)


def test_noisy_patches_put_a_colour_crops_channels_in_each_order_and_leave_a_gray_one():
    """The same crop and flip as without ``permute_channels``, its channels in one of their 6
    orders (the bundled photos hold almost no green)."""
    g = torch.Generator().manual_seed(0)
    image, gray = torch.rand(3, 10, 12, generator=g), torch.rand(1, 10, 12, generator=g)
    plain = NoisyPatches([image], GaussianNoise(0), patch_size=4, length=60, seed=1)
    permuted = NoisyPatches([image], GaussianNoise(0), patch_size=4, length=60, seed=1, permute_channels=True)
    orders = set()
    for i in range(len(plain)):
        crop, shuffled = plain._clean(i)[0], permuted._clean(i)[0]
        order = tuple(k for c in range(3) for k in range(3) if torch.equal(shuffled[c], crop[k]))
        assert sorted(order) == [0, 1, 2]
        orders.add(order)
    assert len(orders) == 6
    alone = NoisyPatches([gray], GaussianNoise(0), patch_size=4, length=4, seed=1)
    assert torch.equal(NoisyPatches([gray], GaussianNoise(0), patch_size=4, length=4, seed=1,
                                    permute_channels=True)._clean(3)[0], alone._clean(3)[0])


def test_noisy_patches_crops_come_from_the_images():
    image = torch.arange(3 * 10 * 12, dtype=torch.float32).view(3, 10, 12) / 360
    data = NoisyPatches([image], GaussianNoise(0), patch_size=4, length=200, augment=False)
    corners = set()
    for i in range(len(data)):
        _, clean = data[i]
        top, left = [int(v) for v in torch.nonzero(image[0] == clean[0, 0, 0])[0]]
        assert torch.equal(clean, image[:, top : top + 4, left : left + 4])
        corners.add((top, left))
    # every offset, the last row and column included
    assert {top for top, _ in corners} == set(range(7)) and {left for _, left in corners} == set(range(9))


def test_validation_crops_are_drawn_apart_from_training_crops():
    """Same seed: validation crop j must not follow training item j (a shared stream would
    make the one's left offset the other's top)."""
    side = 40
    rows = torch.arange(float(side)).view(1, side, 1).expand(1, side, side) / 64
    image = torch.cat([rows, rows.transpose(1, 2), rows])  # channel 0 holds the row, 1 the column
    validation = make_validation_set([image], GaussianNoise(0), seed=0, patch_size=8, crops_per_image=32)
    training = NoisyPatches([image], GaussianNoise(0), patch_size=8, length=32, seed=0, augment=False)
    corner = lambda crop: (round(float(crop[0, 0, 0]) * 64), round(float(crop[1, 0, 0]) * 64))  # noqa: E731
    pairs = [(corner(clean), corner(training[j][1])) for j, (_, clean) in enumerate(validation)]
    # independent draws over 33 offsets agree about once in 32 pairs
    assert sum(v[1] == t[0] for v, t in pairs) <= 6 and sum(v == t for v, t in pairs) <= 2


def test_random_flip_rotate_covers_the_eight_symmetries():
    square = torch.arange(9.0).view(1, 3, 3)
    seen = {tuple(random_flip_rotate(item_generator(0, i), square)[0].flatten().tolist()) for i in range(200)}
    assert len(seen) == 8


def test_noisy_patches_errors(photos):
    with pytest.raises(ValueError, match=r"image 0 of size \(20, 30\) is smaller than patch_size 24"):
        NoisyPatches([torch.rand(3, 20, 30)], GaussianNoise(25), patch_size=24)
    with pytest.raises(ValueError, match=r"image photos/small.png of size \(20, 30\) is smaller than patch_size 24"):
        NoisyPatches({"photos/big.png": torch.rand(3, 30, 30), "photos/small.png": torch.rand(3, 20, 30)},
                     GaussianNoise(25), patch_size=24)
    with pytest.raises(ValueError, match="image photos/small.png of size"):
        make_validation_set({"photos/small.png": torch.rand(3, 20, 30)}, GaussianNoise(25), patch_size=24)
    with pytest.raises(ValueError, match="mix gray and colour"):
        NoisyPatches([torch.rand(3, 20, 20), torch.rand(1, 20, 20)], GaussianNoise(25), patch_size=8)
    with pytest.raises(ValueError, match="no images"):
        NoisyPatches([], GaussianNoise(25))
    # other integers than uint8 levels: 0..255 read as intensities would make the noise 255x too weak
    with pytest.raises(ValueError, match=r"image 0: expected floating-point values in \[0, 1\] or uint8 levels, "
                                         r"got torch.int16"):
        NoisyPatches([torch.full((3, 20, 20), 200, dtype=torch.int16)], GaussianNoise(25), patch_size=8)
    with pytest.raises(ValueError, match="expected floating-point values"):
        make_validation_set([torch.full((3, 20, 20), 200, dtype=torch.int32)], GaussianNoise(25))
    with pytest.raises(IndexError):
        NoisyPatches(photos, GaussianNoise(25), patch_size=8, length=4)[4]


@pytest.mark.parametrize("image,expected", [(torch.rand(3, 20, 20) * 255, r"values in \[0, 1\], got values .* to 2"),
                                            (torch.full((3, 20, 20), -3.0), r"values in \[0, 1\], got values from -3"),
                                            (torch.full((3, 20, 20), float("nan")), "finite values, got values from nan")])
def test_clean_images_outside_the_unit_range_are_refused(image, expected):
    """Floats in 0..255 would make every noise level 255x too weak, as integers would."""
    image[:, 0, 0] = 0.5
    for build in (lambda: NoisyPatches([image], GaussianNoise(25), patch_size=8),
                  lambda: make_validation_set([image], GaussianNoise(25)),
                  lambda: PairedPatches([(torch.rand(3, 20, 20), image)], 8, 2)[0]):
        with pytest.raises(ValueError, match=expected):
            build()
    overshoot = torch.rand(3, 20, 20) * 1.2 - 0.1  # as resampling leaves it
    assert len(NoisyPatches([overshoot], GaussianNoise(25), patch_size=8, length=2)) == 2
    # unclipped noise leaves [0, 1] (here sigma 400 of 255), but not for another scale
    noisy = torch.rand(3, 20, 20) + 400 / 255 * torch.randn(3, 20, 20, generator=torch.Generator().manual_seed(0))
    assert noisy.min() < -3.5 and noisy.max() > 5
    assert PairedPatches([(noisy, torch.rand(3, 20, 20))], 8, 2)[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"pair 0, noisy image: expected float values in \[0, 1\] \(noise may "
                                         r"overrun it\), got values from 0 to 255"):
        PairedPatches([(torch.linspace(0, 255, 1200).view(3, 20, 20), torch.rand(3, 20, 20))], 8, 2)[0]
    with pytest.raises(ValueError, match="pair 0, noisy image: expected finite values"):
        PairedPatches([(torch.full((3, 20, 20), float("inf")), torch.rand(3, 20, 20))], 8, 2)[0]


@pytest.mark.parametrize("build,name", [
    (lambda images: NoisyPatches(images, GaussianNoise(25), patch_size=8.0), "patch_size"),
    (lambda images: NoisyPatches(images, GaussianNoise(25), patch_size=8, length=2.5), "length"),
    (lambda images: NoisyPatches(images, GaussianNoise(25), patch_size=8, seed=-1), "seed"),
    (lambda images: make_validation_set(images, GaussianNoise(25), patch_size=8.5), "patch_size"),
    (lambda images: make_validation_set(images, GaussianNoise(25), crops_per_image=0), "crops_per_image"),
    (lambda images: PairedPatches([(images[0], images[0])], patch_size=8.0), "patch_size"),
    (lambda images: PairedPatches([(images[0], images[0])], patch_size=8, interleave=True), "interleave"),
    (lambda images: PairedPatches([(images[0], images[0])], patch_size=8, seed=-2), "seed"),
])
def test_dataset_arguments_are_checked_by_name(build, name):
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        build([torch.rand(3, 20, 20)])


def test_validation_set_is_fixed_by_seed(photos):
    a = make_validation_set(photos, GaussianNoise(25), seed=7, patch_size=40, crops_per_image=2)
    b = make_validation_set(photos, GaussianNoise(25), seed=7, patch_size=40, crops_per_image=2)
    assert len(a) == 6
    for (na, ca), (nb, cb) in zip(a, b):
        assert na.shape == ca.shape == (3, 40, 40)
        assert torch.equal(na, nb) and torch.equal(ca, cb)
    whole = make_validation_set(photos, GaussianNoise(25), seed=7, channels=1)
    assert [clean.shape for _, clean in whole] == [(1, *im.shape[1:]) for im in photos.values()]


# ----------------------------------------------------------------------------- SIDD


def write_sidd_medium(root, scenes=("0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N")):
    """Two scenes, two frames each; noisy = 255 - clean so alignment can be checked."""
    for s, scene in enumerate(scenes):
        folder = root / "Data" / scene
        folder.mkdir(parents=True)
        for frame in ("010", "011"):
            clean = rng(s).integers(0, 256, (24, 30, 3), dtype=np.uint8)
            prefix = scene[:4]
            iio.imwrite(folder / f"{prefix}_GT_SRGB_{frame}.PNG", clean, extension=".png")
            iio.imwrite(folder / f"{prefix}_NOISY_SRGB_{frame}.PNG", 255 - clean, extension=".png")


def test_sidd_medium_pairs_and_aligned_patches(tmp_path):
    write_sidd_medium(tmp_path)
    (tmp_path / "Data" / "0001_001_S6_00100_00060_3200_L" / "0001_NOISY_SRGB_010.txt").write_text("notes")
    pairs = sidd_medium_pairs(tmp_path)
    assert len(pairs) == 4  # the stray notes are no frame
    assert all("_NOISY_SRGB_" in n.name and n.name.replace("NOISY", "GT") == c.name for n, c in pairs)
    data = PairedPatches(pairs, patch_size=16, patches_per_pair=3, seed=1)
    assert len(data) == 12
    for i in range(len(data)):
        noisy, clean = data[i]
        assert noisy.shape == clean.shape == (3, 16, 16)
        assert torch.allclose(noisy, 1 - clean, atol=1e-6)  # same crop and flip/rotation on both
    again = PairedPatches(pairs, patch_size=16, patches_per_pair=3, seed=1, cache_size=0)
    assert all(torch.equal(data[i][0], again[i][0]) for i in range(len(data)))
    gray = PairedPatches(pairs, patch_size=16, patches_per_pair=1, channels=1)
    assert gray[0][0].shape == (1, 16, 16)


def test_paired_patches_interleave_pairs_in_a_seeded_order_each_epoch():
    """A batch of consecutive items takes its crops from different pairs, each pair read
    patches_per_pair times an epoch, in an order of its own each epoch, fixed by the seed."""
    pairs = [(torch.full((1, 8, 8), k / 10), torch.full((1, 8, 8), k / 10)) for k in range(5)]

    def order(data, epoch):
        data.set_epoch(epoch)
        pairs_read = [round(data[i][1][0, 0, 0].item() * 10) for i in range(len(data))]
        assert pairs_read == [data.pair_of(i) for i in range(len(data))]
        return pairs_read

    data = PairedPatches(pairs, patch_size=4, patches_per_pair=3, seed=1, interleave=2)
    first = order(data, 0)
    assert sorted(first) == sorted(list(range(5)) * 3)
    # groups of 3 and 2 pairs (not 2, 2 and a last pair alone, whose 3 crops would fill a batch)
    assert all(first[i] != first[i + 1] for i in range(14))
    assert first[:9] == first[:3] * 3 and first[9:] == first[9:11] * 3  # each file decoded once an epoch
    assert data.cache_size == 3
    assert order(data, 1) != first and sorted(order(data, 1)) == sorted(first)
    assert order(PairedPatches(pairs, patch_size=4, patches_per_pair=3, seed=1, interleave=2), 0) == first
    with pytest.raises(ValueError, match="interleave must be an int >= 1, got 0"):
        PairedPatches(pairs, interleave=0)


@pytest.mark.parametrize("pairs, interleave, per_pair", [(17, 16, 32), (17, 16, 4), (40, 16, 5), (32, 16, 2)])
def test_paired_patches_batches_never_repeat_a_pair_and_an_epoch_reads_each(pairs, interleave, per_pair):
    """Whole batches of ``interleave`` consecutive items hold distinct pairs, the items the
    loop reads (len // batch batches) cover every pair, and each pair gives per_pair crops."""
    data = PairedPatches([(torch.zeros(1, 4, 4),) * 2] * pairs, patch_size=4, patches_per_pair=per_pair,
                         interleave=interleave)
    read = [data.pair_of(i) for i in range(len(data))]
    assert sorted(read) == sorted(list(range(pairs)) * per_pair)
    used = read[:len(read) // interleave * interleave]
    assert all(len(set(used[b:b + interleave])) == interleave for b in range(0, len(used), interleave))
    assert set(used) == set(range(pairs))


def test_pair_headers_leave_a_palette_s_planes_to_the_decoder(tmp_path):
    """A palette of grays decodes as one plane: the header check no longer refuses it beside
    a gray PNG (it counted every palette as colour), and the pair reads as the decoder does."""
    from PIL import Image

    indices = rng().integers(0, 4, (20, 20), dtype=np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([v for g in (0, 60, 120, 255) for v in (g, g, g)])
    palette.save(tmp_path / "clean.png")
    iio.imwrite(tmp_path / "noisy.png", np.array([0, 60, 120, 255], np.uint8)[indices])
    pair = [(tmp_path / "noisy.png", tmp_path / "clean.png")]
    assert check_pair_headers(pair, 16) == [(20, 20)]
    noisy, clean = PairedPatches(pair, 16, 1)[0]
    assert noisy.shape == clean.shape == (1, 16, 16)
    iio.imwrite(tmp_path / "noisy.png", rng().integers(0, 256, (20, 20, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="colour channels differ for .*noisy.png and .*clean.png: 3 vs 1"):
        PairedPatches(pair, 16, 1)[0]


def test_paired_patches_from_tensors():
    clean = torch.rand(3, 20, 20)
    data = PairedPatches([(clean + 1, clean)], patch_size=8, patches_per_pair=4)
    noisy, crop = data[2]
    assert torch.allclose(noisy, crop + 1)


def test_paired_patches_reject_mismatched_channels_and_integer_tensors(tmp_path):
    colour, gray = rng().integers(0, 256, (16, 16, 3), dtype=np.uint8), rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    iio.imwrite(tmp_path / "noisy.png", colour)
    iio.imwrite(tmp_path / "clean.png", gray)
    for channels in (None, 3):  # channels=3 would otherwise turn the gray target into colour silently
        with pytest.raises(ValueError, match="colour channels differ for .*noisy.png and .*clean.png: 3 vs 1"):
            PairedPatches([(tmp_path / "noisy.png", tmp_path / "clean.png")], 8, 2, channels=channels)[0]
    with pytest.raises(ValueError, match="colour channels differ for pair 0: 3 vs 1"):
        PairedPatches([(torch.rand(3, 16, 16), torch.rand(1, 16, 16))], 8, 2)[0]
    with pytest.raises(ValueError, match="pair 0, clean image: expected floating-point values"):
        PairedPatches([(torch.rand(3, 16, 16), torch.full((3, 16, 16), 9, dtype=torch.uint8))], 8, 2)[0]
    mixed = PairedPatches([(torch.rand(3, 16, 16),) * 2, (torch.rand(1, 16, 16),) * 2], 8, 1, interleave=2)
    mixed[0]
    with pytest.raises(ValueError, match="pairs mix gray and colour: pair . has 1 colour channels, pair . 3"):
        mixed[1]  # the batch would fail to stack, naming no pair
    assert PairedPatches([(torch.rand(3, 16, 16),) * 2, (torch.rand(1, 16, 16),) * 2], 8, 1, channels=1)[1][0].shape[0] == 1
    with pytest.raises(ValueError, match="pair 0 must be a \\(noisy, clean\\) pair"):
        PairedPatches([(torch.rand(3, 16, 16),) * 3], 8, 2)
    rgba = np.dstack([colour, np.full((16, 16), 255, np.uint8)])  # alpha is not a colour channel
    iio.imwrite(tmp_path / "clean.png", rgba)
    noisy, clean = PairedPatches([(tmp_path / "noisy.png", tmp_path / "clean.png")], 8, 2, augment=False)[0]
    assert noisy.shape == clean.shape == (3, 8, 8) and torch.equal(noisy, clean)


def test_sidd_medium_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "Data")):
        sidd_medium_pairs(tmp_path)
    (tmp_path / "Data" / "scene").mkdir(parents=True)
    with pytest.raises(ValueError, match="no \\*_NOISY_SRGB_\\*.PNG"):
        sidd_medium_pairs(tmp_path)
    iio.imwrite(tmp_path / "Data" / "scene" / "0001_NOISY_SRGB_010.PNG", np.zeros((8, 8, 3), np.uint8), extension=".png")
    with pytest.raises(FileNotFoundError, match="0001_GT_SRGB_010.PNG"):
        sidd_medium_pairs(tmp_path)
    iio.imwrite(tmp_path / "Data" / "scene" / "0001_GT_SRGB_010.PNG", np.zeros((8, 9, 3), np.uint8), extension=".png")
    with pytest.raises(ValueError, match="sizes differ .*0001_NOISY_SRGB_010.PNG"):
        PairedPatches(sidd_medium_pairs(tmp_path), patch_size=4)[0]


def test_sidd_medium_refuses_a_ground_truth_without_its_noisy_image_and_skips_hidden_folders(tmp_path):
    write_sidd_medium(tmp_path)
    hidden = tmp_path / "Data" / ".Trash"
    hidden.mkdir()
    iio.imwrite(hidden / "0009_NOISY_SRGB_010.PNG", np.zeros((24, 30, 3), np.uint8), extension=".png")
    assert len(sidd_medium_pairs(tmp_path)) == 4  # (its noisy image has no ground truth either)
    (tmp_path / "Data" / "0001_001_S6_00100_00060_3200_L" / "0001_NOISY_SRGB_011.PNG").unlink()
    with pytest.raises(FileNotFoundError, match=r"SIDD noisy image .*0001_NOISY_SRGB_011.PNG missing for ground "
                                                r"truth .*0001_GT_SRGB_011.PNG"):
        sidd_medium_pairs(tmp_path)


@pytest.mark.parametrize("orientation", [3, 6])
def test_a_pair_turned_differently_by_its_exif_tags_is_refused_before_and_on_decoding(tmp_path, orientation):
    """Decoding turns a file as its EXIF orientation says: a noisy file tagged and its ground
    truth not would be decoded out of line (90 degrees: of other sizes; 180: the same size)."""
    from PIL import Image

    write_sidd_medium(tmp_path)
    noisy, clean = sidd_medium_pairs(tmp_path)[0]
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(noisy) as image:
        image.load()
    image.save(noisy, format="PNG", exif=exif)
    message = rf"EXIF orientations differ for .*{noisy.name} and .*{clean.name}: {orientation} vs 1"
    with pytest.raises(ValueError, match=message):
        check_pair_headers([(noisy, clean)], 16)
    with pytest.raises(ValueError, match=message):
        PairedPatches([(noisy, clean)], patch_size=16)[0]
    with Image.open(clean) as image:  # both tagged alike: they line up, at the turned size
        image.load()
    image.save(clean, format="PNG", exif=exif)
    turned = (30, 24) if orientation == 6 else (24, 30)
    assert check_pair_headers([(noisy, clean)], 16) == [turned]
    noisy_crop, clean_crop = PairedPatches([(noisy, clean)], patch_size=16)[0]
    assert torch.allclose(noisy_crop, 1 - clean_crop, atol=1e-6)
    assert read_image(noisy)[0].shape[-2:] == turned


def write_sidd_validation(root, noisy, clean):
    scipy.io.savemat(root / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(root / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": clean})


def test_sidd_validation_blocks(tmp_path):
    clean = rng().integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    write_sidd_validation(tmp_path, 255 - clean, clean)
    data = SIDDValidation(tmp_path)
    assert len(data) == 6 and data.blocks_per_image == 3
    noisy, gt = data[4]  # image 1, block 1
    assert noisy.shape == gt.shape == (3, 16, 16) and gt.dtype == torch.float32
    assert torch.equal(gt, torch.from_numpy(clean[1, 1]).permute(2, 0, 1).float() / 255)
    assert torch.allclose(noisy, 1 - gt, atol=1e-6)


def test_sidd_validation_errors_name_the_path(tmp_path):
    """Each error comes from the dataset and, before training, from the files' tables of
    variables (``sidd_validation_files(..., check_blocks=True)``), which load no blocks."""
    from dds_fast.training.data import sidd_validation_files

    def refused(error, match):
        for read in (SIDDValidation, lambda root: sidd_validation_files(root, check_blocks=True)):
            with pytest.raises(error, match=match):
                read(tmp_path)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        SIDDValidation(tmp_path / "nowhere")
    refused(FileNotFoundError, "ValidationNoisyBlocksSrgb.mat")
    blocks = np.zeros((1, 2, 8, 8, 3), np.uint8)
    scipy.io.savemat(tmp_path / "ValidationNoisyBlocksSrgb.mat", {"wrong_key": blocks})
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": blocks})
    refused(ValueError, "ValidationNoisyBlocksSrgb.mat has no variable .*wrong_key")
    write_sidd_validation(tmp_path, blocks.astype(np.float64), blocks)
    refused(ValueError, "should be uint8")
    write_sidd_validation(tmp_path, *[np.zeros((1, 2, 8, 8, 4), np.uint8)] * 2)  # not read as RGBA
    refused(ValueError, re.escape("should be uint8 [images, blocks, H, W, 3]"))
    write_sidd_validation(tmp_path, blocks, np.zeros((1, 3, 8, 8, 3), np.uint8))
    refused(ValueError, "differ in shape")
    (tmp_path / "ValidationGtBlocksSrgb.mat").write_bytes(b"garbage" * 20)
    refused(ValueError, "cannot read MATLAB file .*ValidationGtBlocksSrgb.mat")
    for empty in ((0, 2, 8, 8, 3), (1, 2, 0, 8, 3)):  # loads as no pairs, or fails in numpy's reshape
        write_sidd_validation(tmp_path, np.zeros(empty, np.uint8), np.zeros(empty, np.uint8))
        refused(ValueError, "ValidationNoisyBlocksSrgb.mat: .* got uint8 " + re.escape(str(empty)))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,bits,tolerance", [("out.png", 8, 0.5 / 255), ("out.png", 16, 0.5 / 65535),
                                                 ("out.jpg", 8, 0.02)])
def test_save_image_round_trip(tmp_path, channels, name, bits, tolerance):
    # a smooth random image, which JPEG keeps within a few levels
    coarse = torch.rand(channels, 3, 4, generator=torch.Generator().manual_seed(channels))
    image = torch.nn.functional.interpolate(coarse[None], size=(16, 24), mode="bilinear", align_corners=True)[0]
    path = save_image(tmp_path / name, image, bits)
    loaded, file_bits = read_image(path)
    assert file_bits == bits and loaded.shape == image.shape
    error = (loaded - image).abs()
    assert (error.mean() if name.endswith(".jpg") else error.max()) <= tolerance + 1e-7


def test_save_image_errors(tmp_path):
    with pytest.raises(ValueError, match="16-bit"):
        save_image(tmp_path / "a.jpg", torch.rand(3, 4, 4), 16)
    with pytest.raises(ValueError, match="unsupported format '.bmp'"):
        save_image(tmp_path / "a.bmp", torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_image(tmp_path / "a.png", torch.rand(5, 4, 4))
    with pytest.raises(ValueError, match="no alpha"):
        save_image(tmp_path / "a.jpg", torch.rand(4, 4, 4))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_image(tmp_path / "missing" / "a.png", torch.rand(3, 4, 4))
    image = torch.rand(3, 4, 4)
    image[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_image(tmp_path / "a.png", image)
    with pytest.raises(ValueError, match="float image in .0, 1. or uint8 levels, got torch.int32"):
        save_image(tmp_path / "a.png", torch.full((3, 4, 4), 200, dtype=torch.int32))
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        read_image(tmp_path)


def test_save_image_takes_uint8_levels_as_the_metrics_do(tmp_path):
    levels = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for bits in (8, 16):
        loaded, _ = read_image(save_image(tmp_path / "levels.png", levels, bits))
        assert torch.equal((loaded * 255).round().to(torch.uint8), levels)


def test_a_failed_save_leaves_the_file_it_would_replace(tmp_path, monkeypatch):
    """``dds-fast denoise x.png -o x.png`` must not lose x.png when the write fails."""
    from PIL import Image

    path = save_image(tmp_path / "photo.png", torch.rand(3, 8, 8))
    before = path.read_bytes()

    def fail(self, target, *args, **kwargs):
        Path(target).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_image(path, torch.rand(3, 8, 8))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_a_jpeg_reads_the_way_its_exif_orientation_shows_it(tmp_path):
    """Cameras store a portrait photo's pixels turned, with an EXIF tag saying how to show them."""
    from PIL import Image

    stored = (np.arange(4 * 6 * 3) * 3 % 256).astype(np.uint8).reshape(4, 6, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", exif=exif, quality=100)
    image, _ = read_image(tmp_path / "portrait.jpg")
    assert image.shape == (3, 6, 4)
    plain, _ = read_image(save_image(tmp_path / "plain.png", torch.from_numpy(stored).permute(2, 0, 1) / 255))
    # turned clockwise: the stored first column, bottom up, is the shown first row
    torch.testing.assert_close(image, plain.rot90(-1, dims=(1, 2)), atol=8 / 255, rtol=0)


def turned_by_exif(tmp_path, orientation):
    """A random 4x6 RGB picture as stored, an EXIF block with ``orientation``, and the picture
    as Pillow's exif_transpose shows an 8-bit PNG of it with that block."""
    from PIL import Image, ImageOps

    stored = rng().integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "eight.png", exif=exif)
    with Image.open(tmp_path / "eight.png") as eight:
        return stored, exif, np.asarray(ImageOps.exif_transpose(eight))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_16bit_png_reads_the_way_its_exif_orientation_shows_it(tmp_path, orientation):
    """pypng, which reads 16-bit colour, skips the eXIf chunk; Pillow's exif_transpose of the
    same picture in 8 bits shows how it should look."""
    stored, exif, shown = turned_by_exif(tmp_path, orientation)
    write_png16(tmp_path / "deep.png", stored.astype(np.uint16) * 257)  # 257 * v / 65535 = v / 255
    with open(tmp_path / "deep.png", "rb") as f:
        chunks = list(png.Reader(file=f).chunks())
    chunks.insert(1, (b"eXIf", exif.tobytes()))  # after IHDR
    with open(tmp_path / "deep.png", "wb") as f:
        png.write_chunks(f, chunks)
    image, bits = read_image(tmp_path / "deep.png")
    assert bits == 16 and torch.equal(image, torch.from_numpy(shown.astype(np.float32) / 255).permute(2, 0, 1))


def _png_chunks(path):
    """A PNG's chunks as (type, data) pairs."""
    data, chunks, at = Path(path).read_bytes(), [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def _write_png_chunks(path, chunks):
    import zlib

    out = bytearray(b"\x89PNG\r\n\x1a\n")
    for kind, data in chunks:
        out += len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    Path(path).write_bytes(bytes(out))


def test_a_pngs_exif_orientation_is_read_without_decoding_its_pixels_where_pillow_would(tmp_path, monkeypatch):
    """Pillow's PNG getexif decodes the whole image to reach chunks after the pixels: a pair
    check of SIDD's 12-megapixel PNGs took seconds a pair, before training and at each load."""
    from PIL import Image, ImageFile

    from dds_fast.training.data import _exif_orientation

    exif = Image.Exif()
    exif[0x0112] = 6
    before = tmp_path / "before.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(before, exif=exif)
    chunks = _png_chunks(before)
    kinds = [kind for kind, _ in chunks]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")
    after = tmp_path / "after.png"  # the eXIf chunk moved behind the pixels, where PNG allows it too
    moved = [c for c in chunks if c[0] != b"eXIf"]
    _write_png_chunks(after, moved[:-1] + [c for c in chunks if c[0] == b"eXIf"] + moved[-1:])
    xmp = tmp_path / "xmp.png"  # orientation from an XMP packet alone, as Pillow reads it too
    packet = b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    _write_png_chunks(xmp, moved[:1] + [(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + packet)] + moved[1:])
    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: loads.append(image.size) or load(image))
    assert [_exif_orientation(before), _exif_orientation(xmp)] == [6, 8] and loads == []
    assert _exif_orientation(after) == 6 and loads  # (read as Pillow reads it: decoded)
    with Image.open(xmp) as image:
        assert image.getexif().get(0x0112) == 8
    cut = tmp_path / "cut.png"  # without eXIf, cut inside the pixel data: Pillow decodes to look behind them
    _write_png_chunks(cut, moved)
    cut.write_bytes(cut.read_bytes()[:8 + 25 + 8 + 4])  # signature, IHDR, IDAT's head and 4 bytes of its data
    for read in (lambda: check_pair_headers([(cut, before)], 4), lambda: read_image(cut)):
        with pytest.raises(ValueError, match=f"cannot read image {cut}") as raised:
            read()
        assert str(raised.value).count("cannot read image") == 1
