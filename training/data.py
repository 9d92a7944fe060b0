"""Images, training patches and validation sets for denoising.

* :func:`bundled_images` — the scikit-image photos and textures that ship with the package
  (no download), for tests, demos and small offline training runs.
* :func:`load_image`, :func:`list_images`, :func:`load_image_folder` — PNG/JPEG/BMP/TIFF
  files of any size, gray or colour, 8 or 16 bits, as float tensors [C, H, W] in [0, 1]
  (a folder's 8-bit images optionally kept as uint8, :func:`eight_bit`: a quarter of the
  memory; the datasets take such images too, as their levels / 255).
* :class:`NoisyPatches` — synthetic training pairs: random crops + flips/rotations of
  clean images, with noise from a :mod:`~dds_fast.training.noise` model.
* :func:`make_validation_set` — fixed (seeded) crops and noise, built once.
* :func:`sidd_medium_pairs`, :class:`PairedPatches`, :class:`SIDDValidation` — real
  noisy/clean pairs in the SIDD-Medium sRGB layout and the SIDD validation blocks.

Datasets yield ``(noisy, clean)`` float32 tensors [C, H, W]. Randomness of item ``i`` is a
pure function of ``(seed, epoch, i)``, so results do not depend on DataLoader workers or the
order items are asked for (``NoisyPatches.batch``, the trainer's path, keeps the items' crops
but draws the noise per batch, from ``(seed, epoch, start)``: another batch size gives a crop
other noise); call ``set_epoch`` to get fresh crops each epoch (not with
``persistent_workers=True``: such workers keep the copy of the dataset they started with, which
``set_epoch`` in the main process never reaches).
"""
from __future__ import annotations

import bisect
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.io
import skimage.data
import tifffile
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from dds_fast.checkpoint import atomic_write
from dds_fast.config import checked_int
from dds_fast.metrics import NOISY_RANGE, check_float_scale

from .noise import NoiseModel, luma

__all__ = [
    "read_image",
    "read_icc_profile",
    "icc_profile_fits",
    "save_image",
    "PHOTO_NAMES",
    "TEXTURE_NAMES",
    "TEST_NAMES",
    "IMAGE_EXTENSIONS",
    "bundled_images",
    "to_channels",
    "load_image",
    "list_images",
    "load_image_folder",
    "eight_bit",
    "as_float",
    "item_generator",
    "random_flip_rotate",
    "NoisyPatches",
    "PairedImages",
    "make_validation_set",
    "PairedPatches",
    "sidd_medium_pairs",
    "check_pair_headers",
    "sidd_validation_files",
    "SIDDValidation",
]

# scikit-image data that is stored inside the package (anything else needs pooch + network).
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle_left",
    "stereo_motorcycle_right",
    "camera",
    "moon",
    "coins",
)
TEXTURE_NAMES = ("brick", "grass", "gravel", "text", "page")
# Also stored in the package, but not photos of everyday scenes (a stained tissue sample, a
# fundus photo, a telescope image): kept out of the default training set, so a trained
# model can be tested on images that neither training nor validation touched.
TEST_NAMES = ("immunohistochemistry", "retina", "hubble_deep_field")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# ----------------------------------------------------------------------------- images


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert [C, H, W] (C = 1 or 3) to ``channels``: gray -> RGB repeats, RGB -> gray takes BT.601 luma."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image shaped [1 or 3, H, W], got {tuple(image.shape)}")
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1).clone()
    return luma(image)


def _colour_planes(array: np.ndarray) -> int:
    """1 (gray) or 3 (colour): the planes of an HW / HWC array other than an alpha plane."""
    return 1 if array.ndim == 2 or array.shape[-1] <= 2 else 3


def _to_tensor(array: np.ndarray, source: str, keep_alpha: bool = False) -> torch.Tensor:
    """HW / HWC integer or bool array -> float32 [C, H, W] in [0, 1], alpha dropped unless
    ``keep_alpha`` (then the last of 2 or 4 channels)."""
    if array.dtype == np.uint8:
        scaled = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        scaled = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        scaled = array.astype(np.float32)
    else:
        raise ValueError(f"{source}: unsupported pixel type {array.dtype} (expected 8- or 16-bit integers)")
    if scaled.ndim == 2:
        scaled = scaled[..., None]
    if scaled.ndim != 3 or scaled.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{source}: expected a gray or colour image, got array shape {array.shape}")
    if 0 in scaled.shape[:2]:
        raise ValueError(f"{source}: the image is empty ({scaled.shape[0]} x {scaled.shape[1]} pixels)")
    if not keep_alpha:  # 2 = gray + alpha, 4 = RGBA: keep the colour planes only
        scaled = scaled[..., : _colour_planes(scaled)]
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def bundled_images(names: Sequence[str] | None = None, channels: int = 3) -> dict[str, torch.Tensor]:
    """The offline scikit-image photos as float32 [channels, H, W] tensors in [0, 1].

    ``names`` defaults to all of :data:`PHOTO_NAMES` and :data:`TEXTURE_NAMES` (not
    :data:`TEST_NAMES`); ``stereo_motorcycle_left`` / ``_right`` are the two frames of the
    stereo pair.
    """
    if isinstance(names, str):  # (a bare name would split into letters)
        names = (names,)
    names = tuple(PHOTO_NAMES + TEXTURE_NAMES) if names is None else tuple(names)
    known = PHOTO_NAMES + TEXTURE_NAMES + TEST_NAMES
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown bundled image(s) {unknown}; available: {list(known)}")
    images = {}
    for name in names:
        if name.startswith("stereo_motorcycle"):
            left, right, _disparity = skimage.data.stereo_motorcycle()
            array = left if name.endswith("left") else right
        else:
            array = getattr(skimage.data, name)()
        images[name] = to_channels(_to_tensor(array, f"skimage.data.{name}"), channels)
    return images


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
    """(bit depth, colour type, height, width) of a PNG file, or None if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25], int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _read_png16_colour(path: Path) -> np.ndarray:
    """A 16-bit colour PNG as uint16 [H, W, C], through pypng: Pillow (and so imageio)
    silently truncates these to 8 bits. The stored samples, as Pillow reads 16-bit gray:
    pypng's ``asDirect`` would scale them down to an sBIT chunk's depth (0..4095 for a
    camera's 12 bits), which the caller's division by 65535 would read as 16x too dark."""
    import png  # only 16-bit files need pypng (the GPU machines' image lacks it)

    with open(path, "rb") as f:  # pypng leaves a file it opens itself open
        width, height, rows, info = png.Reader(file=f).read()
        array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])
    return array if "transparent" not in info else _key_alpha(array, info["transparent"])


def _key_alpha(array: np.ndarray, key) -> np.ndarray:
    """``array`` (gray or RGB) with an alpha plane from a PNG's tRNS colour key: transparent
    where a pixel is the key, opaque elsewhere, in the array's own bit depth."""
    colour = array.reshape(*array.shape[:2], -1)
    if array.dtype == np.bool_:  # Pillow gives a 1-bit file's key as 0 or 255
        key, top = np.asarray(key, bool), True
    else:  # not cast: a key out of the samples' range matches no pixel
        key, top = np.asarray(key), np.iinfo(array.dtype).max
    opaque = (colour != key).any(axis=-1)
    return np.dstack([colour, np.where(opaque, top, 0).astype(array.dtype)])


# The flips and turns of ImageOps.exif_transpose, by EXIF orientation, for [H, W(, C)] arrays.
_EXIF_TRANSPOSE = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a),
}

# tifffile decodes JPEG-compressed YCbCr to RGB, and returns other YCbCr samples as stored.
_TIFF_JPEG = {tifffile.COMPRESSION.OJPEG, tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.ALT_JPEG,
              tifffile.COMPRESSION.JPEG_LOSSY}


def _read_tiff(path: Path) -> tuple[np.ndarray, int]:
    """A TIFF's first page as [H, W(, C)] with its Orientation tag (1, as stored, when absent),
    through tifffile: Pillow cannot read 16-bit colour TIFFs.
    tifffile returns the stored samples, so a planar-configuration file (each colour a plane
    of its own, [C, H, W]), an inverted gray one (MinIsWhite), a palette one (indices into
    a 16-bit colour map) and a CMYK one are turned into the pixels a viewer shows here, with
    the first alpha sample after the colour ones (other extra samples dropped; colours
    premultiplied by it made straight); other colour spaces are refused."""
    kinds = tifffile.PHOTOMETRIC
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]  # the first image of a multi-page file (a stack of pages reads as one array)
        # (an empty page's own shape is (0, 0): the file's, for the error that names its size)
        array = page.asarray() if 0 not in page.shape else tiff.asarray()
        photometric, colours = page.photometric, page.samplesperpixel - len(page.extrasamples)
        orientation = page.tags.valueof("Orientation", 1)
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1:
            array = np.moveaxis(array, -3, -1)
        if photometric == kinds.PALETTE:
            pixels = page.colormap.astype(np.uint16).T[array.astype(np.intp)]  # (1-bit: bool, which would mask)
            if (pixels == pixels[..., :1]).all():  # a map of grays is a gray image
                pixels = pixels[..., 0]
            return np.ascontiguousarray(pixels), orientation
        cmyk = photometric == kinds.SEPARATED and colours == 4 and page.tags.valueof("InkSet", 1) == 1
        if not (photometric in (kinds.MINISBLACK, kinds.MINISWHITE, kinds.RGB) or cmyk
                or (photometric == kinds.YCBCR and page.compression in _TIFF_JPEG)):
            raise ValueError(f"unsupported TIFF colour space: photometric {getattr(photometric, 'name', photometric)} "
                             f"with {colours} colour samples (readable: gray, RGB, palette, CMYK, JPEG-compressed "
                             f"YCbCr)")
    bits = page.bitspersample
    if array.dtype in (np.uint8, np.uint16) and bits < 8 * array.itemsize:  # 2-, 4-, 12-bit samples, as stored
        top = np.iinfo(array.dtype).max
        array = ((array.astype(np.uint32) * top + (2 ** bits - 1) // 2) // (2 ** bits - 1)).astype(array.dtype)
    # the first extra sample that is an alpha (1 associated, 2 unassociated); others are no pixels
    alpha = next((k for k, kind in enumerate(page.extrasamples) if kind in (1, 2)), None)
    if alpha is not None and page.extrasamples[alpha] == 1 and array.dtype in (np.uint8, np.uint16):
        array = _straight_alpha(array, colours, colours + alpha)  # on the samples as stored (inks too)
    colour = array[..., :colours] if page.extrasamples else array  # a view, without the alpha
    if photometric == kinds.MINISWHITE:  # white stored as 0
        colour[...] = ~colour if array.dtype == np.bool_ else np.iinfo(array.dtype).max - colour
    elif cmyk:
        top = np.iinfo(array.dtype).max
        white = top - colour.astype(np.uint32)  # 16-bit products need 32 bits
        rgb = (white[..., :3] * white[..., 3:] + top // 2) // top  # rounded
        array = np.concatenate([rgb.astype(array.dtype), array[..., colours:]], axis=-1)
        colours = 3
    if page.extrasamples:  # the colour samples and the first alpha one
        array = array[..., list(range(colours)) + ([] if alpha is None else [colours + alpha])]
    return array, orientation


def _straight_alpha(array: np.ndarray, colours: int, alpha_index: int) -> np.ndarray:
    """``array`` with its colour samples divided by the associated (premultiplied) alpha, rounded:
    the straight alpha that PNG keeps and the network denoises (a transparent pixel's samples 0)."""
    top = np.iinfo(array.dtype).max
    alpha = array[..., alpha_index:alpha_index + 1].astype(np.uint64)
    colour = array[..., :colours].astype(np.uint64)
    straight = np.where(alpha > 0, np.minimum((colour * top + alpha // 2) // np.maximum(alpha, 1), top), 0)
    out = array.copy()
    out[..., :colours] = straight.astype(array.dtype)
    return out


def _exif_orientation(path: Path) -> int:
    """The EXIF orientation that decoding ``path`` applies, as Pillow reads it (1: as stored)."""
    with _open_image(path) as image:
        if image.format == "PNG" and not _png_chunks_after_pixels(path):
            # Pillow's PNG getexif decodes every pixel to reach chunks after them: there are
            # none, so the chunks read at open hold all it would see
            exif = Image.Image.getexif(image)
        else:
            exif = image.getexif()
        orientation = exif.get(0x0112)
    return orientation if orientation in _EXIF_TRANSPOSE else 1


def _png_chunks_after_pixels(path: Path) -> bool:
    """Whether a PNG holds chunks other than IEND after its pixel data (IDAT), walked by their
    lengths without decoding; a file cut short counts as holding some (the decoder tells)."""
    with open(path, "rb") as f:
        f.seek(len(_PNG_SIGNATURE))
        seen_pixels = False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return True
            kind = head[4:]
            if kind == b"IEND":
                return False
            if kind == b"IDAT":
                seen_pixels = True
            elif seen_pixels:
                return True
            f.seek(int.from_bytes(head[:4], "big") + 4, os.SEEK_CUR)  # the data and its CRC


@contextmanager
def _open_image(path: Path):
    """``Image.open`` without Pillow's decompression-bomb limit, which refuses (or warns on)
    large images: a file the user names is read whatever its size. The limit comes back
    when the file is closed."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _is_tiff(path: Path) -> bool:
    """Whether ``path`` starts as a TIFF (classic or BigTIFF, either byte order) does: by its
    bytes, not its name (through Pillow a 16-bit TIFF named .png would come out 8-bit)."""
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _decode(path: Path) -> np.ndarray:
    if _is_tiff(path):
        array, orientation = _read_tiff(path)
        turn = _EXIF_TRANSPOSE.get(orientation)
        return array if turn is None else np.ascontiguousarray(turn(array))
    header = _png_header(path)
    if header is not None and header[0] == 16 and header[1] in (2, 4, 6):
        turn = _EXIF_TRANSPOSE.get(_exif_orientation(path))  # (the eXIf chunk that pypng skips)
        array = _read_png16_colour(path)
        return array if turn is None else turn(array)
    with _open_image(path) as image:
        # pixels as a viewer shows them: a camera's JPEG often stores them turned, with an EXIF tag
        image = ImageOps.exif_transpose(image)
        key = image.info.get("transparency") if image.mode in ("1", "L", "I;16", "RGB") else None
        if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
            # palette entries that are (partly) transparent
            image = image.convert("LA" if _gray_palette(image) else "RGBA")
        elif image.mode == "P":  # a palette of grays is a gray image: a colour model would be told so
            image = image.convert("L" if _gray_palette(image) else "RGB")
        elif image.mode in ("CMYK", "YCbCr"):  # print colour spaces -> RGB
            image = image.convert("RGB")
        array = np.asarray(image)
    if key is None:
        return array
    if image.mode == "L" and header is not None and header[0] < 8:  # Pillow scales 2- and 4-bit gray, not its key
        key = key * 255 // (2 ** header[0] - 1)
    return _key_alpha(array, key)


def _gray_palette(image: Image.Image) -> bool:
    """Whether every palette entry a palette image uses is a gray (red = green = blue)."""
    palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    indices = np.unique(np.asarray(image.convert("P") if image.mode == "PA" else image))
    used = palette[indices[indices < len(palette)]]
    return len(used) > 0 and bool((used == used[:, :1]).all())


def _read_array(path: Path) -> np.ndarray:
    """Decode an image file to its stored integer array, with errors that name the file."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not path.is_file():
        if path.exists():  # a pipe or a device: the decoders seek
            raise ValueError(f"image {path} is not a regular file")
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return _decode(path)
    except Exception as err:  # any decoder failure means a corrupt or unsupported file
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_image(path, keep_alpha: bool = False) -> tuple[torch.Tensor, int]:
    """One image as float32 [C, H, W] in [0, 1] and the file's bits per sample (8 or 16).
    C is 1 or 3; with ``keep_alpha``, a file's alpha plane follows as one more channel."""
    path = Path(path)
    array = _read_array(path)
    return _to_tensor(array, str(path), keep_alpha), 16 if array.dtype == np.uint16 else 8


@contextmanager
def _opened_for_metadata(path: Path):
    """``(tiff, None)`` or ``(None, image)``: a TIFF through tifffile (by its bytes), anything
    else through Pillow, for what a file says beside its first image's pixels."""
    if _is_tiff(path):
        with tifffile.TiffFile(path) as tiff:
            yield tiff, None
    else:
        with _open_image(path) as image:
            yield None, image


def read_icc_profile(path) -> bytes | None:
    """The ICC colour profile an image file carries (PNG iCCP, JPEG APP2, TIFF tag 34675), or
    None: the pixels mean colours only with it (a phone's Display P3 photo read as sRGB looks
    dull), so a denoised copy keeps it (``save_image(..., icc_profile=)``)."""
    path = Path(path)
    try:
        with _opened_for_metadata(path) as (tiff, image):
            profile = tiff.pages[0].tags.valueof("InterColorProfile") if tiff else image.info.get("icc_profile")
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return bytes(profile) if profile else None


def image_frames(path) -> int:
    """How many pictures a file holds that ``read_image`` (which reads the first) leaves out:
    a multi-page TIFF's full-resolution pages (not its thumbnails or masks), an animated GIF's,
    PNG's or WebP's frames. 1 where the count fails (a frame past the first cut off, which
    reading the first does not need): it only feeds a warning."""
    try:
        with _opened_for_metadata(Path(path)) as (tiff, image):
            if tiff:  # SubfileType bit 0: a reduced-resolution copy; bit 2: a transparency mask
                return sum(1 for page in tiff.pages if not page.subfiletype & 0b101)
            # (other formats' extra frames are previews or layers: a camera JPEG's MPF, a PSD)
            return image.n_frames if image.format in ("GIF", "PNG", "WEBP") else 1
    except Exception:
        return 1


def icc_profile_fits(profile: bytes, channels: int) -> bool:
    """Whether an ICC ``profile`` describes images of ``channels`` colour planes: its colour
    space (bytes 16-20) is RGB for 3 and gray for 1, as PNG and JPEG files require (a CMYK
    file's profile does not fit the RGB it is read as)."""
    return profile[16:20] == {3: b"RGB ", 1: b"GRAY"}.get(channels)


def load_image(path, channels: int | None = None) -> torch.Tensor:
    """Read one image as float32 [C, H, W] in [0, 1]; ``channels`` (1 or 3) converts, None keeps the file's."""
    image, _ = read_image(path)
    return image if channels is None else to_channels(image, channels)


JPEG_MAX_SIDE = 65500  # libjpeg's limit


def check_output_path(path, alpha: bool = False, size: Sequence[int] | None = None) -> Path:
    """``path`` if ``save_image`` can write there: a .png, .jpg or .jpeg file (a .png for an
    image with an ``alpha`` plane, or one of ``size`` (H, W) past JPEG's 65,500 pixels a side)
    in a folder that exists; checked before long work, which a bad path would otherwise throw
    away."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"output {path}: unsupported format {path.suffix!r}; use .png, .jpg or .jpeg")
    if path.suffix.lower() != ".png":
        if alpha:
            raise ValueError(f"output {path}: JPEG holds no alpha channel; write a .png")
        if size is not None and max(size) > JPEG_MAX_SIDE:
            raise ValueError(f"output {path}: JPEG holds at most {JPEG_MAX_SIDE:,} pixels a side, the image is "
                             f"{size[0]} x {size[1]}; write a .png")
    return check_writable_file(path)


def check_writable_file(path) -> Path:
    """``path`` if a file can be written there: in a folder that exists, not a folder itself."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # (the file is written beside it, then renamed)
        raise PermissionError(f"output {path}: folder {path.parent} is not writable")
    return path


def save_image(path, image: torch.Tensor, bits: int = 8, icc_profile: bytes | None = None) -> Path:
    """Write [C, H, W] in [0, 1] (or uint8 levels; C = 1 or 3, or 2 and 4 with alpha last, PNG only) as PNG
    (8 or 16 bits, through pypng, which keeps 16-bit colour) or JPEG (8 bits, quality 95),
    with ``icc_profile`` if given (``read_icc_profile`` of the input), atomically: a failed
    write leaves what was at ``path`` (perhaps the input) as it was."""
    if image.dim() != 3 or image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"save_image: expected [C, H, W] with C = 1 or 3 (2 or 4 with alpha), got "
                         f"{tuple(image.shape)}")
    path = check_output_path(path, alpha=image.shape[0] in (2, 4), size=image.shape[-2:])
    colours = image.shape[0] - (image.shape[0] in (2, 4))
    if icc_profile and not icc_profile_fits(icc_profile, colours):
        raise ValueError(f"save_image: the ICC profile for {path} is for {icc_profile[16:20]!r} images, not "
                         f"{colours}-channel ones")
    if bits not in (8, 16) or (bits == 16 and path.suffix.lower() != ".png"):
        raise ValueError(f"save_image: {bits}-bit output is not supported for {path.name} (8-bit PNG/JPEG, 16-bit PNG)")
    if image.dtype == torch.uint8:  # 8-bit levels, as the metrics take them
        image = image.float() / 255
    elif image.dtype == torch.bool:
        image = image.float()
    elif not image.is_floating_point():  # levels of an unknown scale would all clamp to white
        raise ValueError(f"save_image: expected a float image in [0, 1] or uint8 levels, got {image.dtype}")
    if torch.isnan(image).any():  # NaN has no pixel value: the cast would write it as black
        raise ValueError(f"save_image: the image for {path} holds NaN values")
    top = 2 ** bits - 1
    array = (image.detach().float().clamp(0, 1) * top).round().to(torch.int32).permute(1, 2, 0).cpu().numpy()
    channels = array.shape[-1]

    def write(tmp: Path) -> None:
        if bits == 16:  # Pillow cannot write 16-bit colour
            import png  # only 16-bit files need pypng (the GPU machines' image lacks it)

            writer = png.Writer(array.shape[1], array.shape[0], greyscale=channels < 3, alpha=channels in (2, 4),
                                bitdepth=16)
            with open(tmp, "wb") as f:
                writer.write(f, array.reshape(array.shape[0], -1))
            if icc_profile:  # pypng writes no iCCP: name, NUL, method 0 (zlib), the profile; after IHDR
                with open(tmp, "rb") as f:
                    chunks = list(png.Reader(file=f).chunks())
                chunks.insert(1, (b"iCCP", b"ICC profile\0\0" + zlib.compress(icc_profile)))
                with open(tmp, "wb") as f:
                    png.write_chunks(f, chunks)
        else:
            pixels = array.astype(np.uint8)
            mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
            extra = {"icc_profile": icc_profile} if icc_profile else {}
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode).save(tmp, quality=95, **extra)

    return atomic_write(path, write)


def list_images(folder, recursive: bool = False) -> list[Path]:
    """Sorted image files (by :data:`IMAGE_EXTENSIONS`, any case) in ``folder``, hidden ones
    aside (macOS leaves ``._name.png`` metadata files beside copied images); errors if there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
    return files


def load_image_folder(folder, channels: int | None = None, recursive: bool = False,
                      keep_8_bit: bool = False) -> dict[str, torch.Tensor]:
    """All images of a folder, keyed by path relative to it, as float32 [C, H, W] tensors;
    with ``keep_8_bit``, those whose pixels are 8-bit levels after the ``channels`` conversion
    as uint8 (``eight_bit``), one at a time as they load: a quarter of the memory for 8-bit
    files (not for colour files made gray, whose luma is no 8-bit level)."""
    folder = Path(folder)
    kept = eight_bit if keep_8_bit else (lambda image: image)
    return {str(p.relative_to(folder)): kept(load_image(p, channels)) for p in list_images(folder, recursive)}


def as_float(image: torch.Tensor) -> torch.Tensor:
    """An image's pixels as floats in [0, 1]: uint8 levels / 255 (as a file's 8-bit levels
    read), floats as float32."""
    return image.float().div_(255) if image.dtype == torch.uint8 else image.float()


def eight_bit(image: torch.Tensor) -> torch.Tensor:
    """``image`` as its uint8 levels where ``as_float`` gives it back bit for bit (an 8-bit
    file's pixels, not converted since), else ``image`` itself."""
    if image.dtype != torch.float32 or image.numel() == 0:
        return image
    levels = image.mul(255).round_()
    low, high = torch.aminmax(levels)
    if not 0 <= float(low) <= float(high) <= 255:  # (NaN fails too)
        return image
    levels = levels.to(torch.uint8)
    # bit patterns, not values: -0.0 would come back as 0.0
    same = torch.equal(as_float(levels).view(torch.int32), image.contiguous().view(torch.int32))
    return levels if same else image


# ----------------------------------------------------------------------------- sampling


# Stream tags keep the datasets' random streams apart: a training patch and a validation
# crop built from the same seed and indices must not share crop position and noise.
_TRAIN_STREAM, _VALIDATION_STREAM, _PAIRED_STREAM, _BATCH_NOISE_STREAM, _PAIR_ORDER_STREAM = 0, 1, 2, 3, 4


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A host batch on ``device``, without waiting for the device: a copy to a GPU from pageable
    memory first waits for the work queued there (a replayed training step, say), one from
    pinned memory does not."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def item_generator(seed: int, *indices: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, *indices)``; SeedSequence mixes them so
    nearby items are independent."""
    state = np.random.SeedSequence([seed, *indices]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def random_flip_rotate(generator: torch.Generator, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply one random transform of the square's symmetry group (4 rotations x flip) to all ``images``."""
    turns, flip = _randint(4, generator), _randint(2, generator)
    out = []
    for image in images:
        image = torch.rot90(image, turns, dims=(-2, -1))
        out.append(image.flip(-1) if flip else image)
    return tuple(out)


def random_channel_order(generator: torch.Generator, image: torch.Tensor) -> torch.Tensor:
    """``image`` [3, H, W] with its channels in one of their 6 orders, drawn from ``generator``
    (other channel counts as they are). Colour augmentation: the bundled photos hold almost no
    green, and a model trained on them alone turned greens olive (benchmarks/NOTES.md)."""
    if image.shape[-3] != 3:
        return image
    return image[..., torch.randperm(3, generator=generator), :, :]


def _crop_box(height: int, width: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    return _randint(height - size + 1, generator), _randint(width - size + 1, generator)


_RANGE_MARGIN = 0.5


def _check_image_tensor(label: str, image, unit_range: bool = True, levels: bool = False) -> None:
    """A float [1 or 3, H, W] image, or uint8 levels where the caller reads them through
    ``as_float`` (``levels``); clean float ones in [0, 1] (``unit_range``), noisy ones finite and
    on that scale (within ``dds_fast.metrics.NOISY_RANGE``)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{label}: expected a tensor shaped [1 or 3, H, W], got {shape}")
    if levels and image.dtype == torch.uint8:
        return
    if not image.is_floating_point():  # 0..255 read as intensities would make every noise level 255x too weak
        raise ValueError(f"{label}: expected floating-point values in [0, 1]{' or uint8 levels' if levels else ''}, "
                         f"got {image.dtype} (scale integer pixels by their maximum, e.g. / 255)")
    if image.numel() == 0:
        return
    # Floats in 0..255 fail as integers do; the margin lets resampling overshoot pass.
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{label}: expected finite values, got values from {low} to {high}")
    if unit_range and (low < -_RANGE_MARGIN or high > 1 + _RANGE_MARGIN):
        raise ValueError(f"{label}: expected values in [0, 1], got values from {low} to {high} (scale "
                         f"pixels by their maximum, e.g. / 255)")
    if not unit_range:  # (a clean image's tighter bound is checked above)
        check_float_scale(label, low, high, NOISY_RANGE)


def _image_list(images, channels: int | None) -> tuple[list[str], list[torch.Tensor]]:
    """Labels (``image <key>`` of a mapping, ``image <position>`` of a sequence) and the clean
    images, float or uint8 levels (the caller reads them through ``as_float``)."""
    if isinstance(images, Mapping):
        labels, values = [f"image {key}" for key in images], list(images.values())
    else:
        values = list(images)
        labels = [f"image {k}" for k in range(len(values))]
    if not values:
        raise ValueError("no images given")
    for label, image in zip(labels, values):
        _check_image_tensor(label, image, levels=True)
    if channels is not None:  # (gray from colour is a weighted sum: floats)
        return labels, [v if v.shape[0] == channels else to_channels(as_float(v) if v.dtype == torch.uint8 else v,
                                                                     channels) for v in values]
    if len({v.shape[0] for v in values}) > 1:
        raise ValueError("images mix gray and colour: pass channels=1 or channels=3")
    return labels, values


def _check_patch(labels: Sequence[str], images: Sequence[torch.Tensor], patch_size: int) -> None:
    for label, image in zip(labels, images):
        if min(image.shape[-2:]) < patch_size:
            raise ValueError(f"{label} of size {tuple(image.shape[-2:])} is smaller than patch_size {patch_size}")


class NoisyPatches(Dataset):
    """Synthetic training pairs: item ``i`` is ``(noisy, clean)``, float32 [C, P, P].

    Each item picks an image uniformly, a uniform random crop of ``patch_size``, optionally
    one of the 8 flips/rotations (``augment``) and one of the 6 orders of a colour crop's
    channels (``permute_channels``), and draws noise from ``noise``, all from a generator seeded
    by ``(seed, epoch, i)``. ``length`` is the number of patches per epoch. The noisy patch is
    not clipped unless the noise model clips; the clean one is the noise model's target
    (:meth:`NoiseModel.pair`). The training loop takes whole batches (:meth:`batch`), with
    the noise drawn on the training device. ``images`` is a list of [C, H, W] tensors (floats
    in [0, 1], or uint8 levels read as levels / 255, as ``load_image_folder`` keeps 8-bit
    files), or a dict of them whose keys (file paths, say) name them in errors.
    """

    def __init__(
        self,
        images,
        noise: NoiseModel,
        patch_size: int = 128,
        length: int = 1024,
        channels: int | None = None,
        seed: int = 0,
        augment: bool = True,
        permute_channels: bool = False,
    ):
        patch_size = checked_int(patch_size, "patch_size", "NoisyPatches")
        length = checked_int(length, "length", "NoisyPatches")
        seed = checked_int(seed, "seed", "NoisyPatches", low=0)
        labels, values = _image_list(images, channels)
        self.images = [im if im.dtype == torch.uint8 else im.float() for im in values]  # (uint8: as_float per crop)
        _check_patch(labels, self.images, patch_size)
        self.noise, self.patch_size, self.length = noise, patch_size, length
        self.seed, self.augment, self.permute_channels, self.epoch = seed, augment, permute_channels, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _clean(self, index: int) -> tuple[torch.Tensor, torch.Generator]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} patches")
        g = item_generator(self.seed, _TRAIN_STREAM, self.epoch, index)
        image = self.images[_randint(len(self.images), g)]
        top, left = _crop_box(image.shape[-2], image.shape[-1], self.patch_size, g)
        clean = as_float(image[:, top : top + self.patch_size, left : left + self.patch_size])
        if self.augment:
            (clean,) = random_flip_rotate(g, clean)
        if self.permute_channels:
            clean = random_channel_order(g, clean)
        return clean.contiguous(), g

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean, g = self._clean(index)
        return self.noise.pair(clean, g)

    def batch(self, start: int, size: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``start`` to ``start + size`` as one batch on ``device``: the same crops as
        the items, the noise drawn for the whole batch at once on ``device`` (the camera
        pipeline costs about 10 ms per 128x128 patch on one CPU core) from a generator
        seeded by (seed, epoch, start)."""
        clean = to_device(torch.stack([self._clean(i)[0] for i in range(start, start + size)]), device)
        generator = item_generator(self.seed, _BATCH_NOISE_STREAM, self.epoch, start, device=clean.device)
        return self.noise.pair(clean, generator)


class PairedImages(Dataset):
    """A fixed list of ``(noisy, clean)`` tensor pairs (shapes may differ between items)."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[index]


def make_validation_set(
    images,
    noise: NoiseModel,
    seed: int = 0,
    patch_size: int | None = None,
    crops_per_image: int = 1,
    channels: int | None = None,
) -> PairedImages:
    """Noisy/clean pairs fixed once from ``seed``: whole images (``patch_size=None``) or seeded
    crops; ``images`` as ``NoisyPatches`` takes them."""
    seed = checked_int(seed, "seed", "make_validation_set", low=0)
    crops_per_image = checked_int(crops_per_image, "crops_per_image", "make_validation_set")
    if patch_size is not None:
        patch_size = checked_int(patch_size, "patch_size", "make_validation_set")
    labels, values = _image_list(images, channels)
    if patch_size is not None:
        _check_patch(labels, values, patch_size)
    pairs = []
    for k, image in enumerate(values):
        for j in range(crops_per_image if patch_size is not None else 1):
            g = item_generator(seed, _VALIDATION_STREAM, k, j)
            if patch_size is None:
                clean = as_float(image)
            else:
                top, left = _crop_box(image.shape[-2], image.shape[-1], patch_size, g)
                clean = as_float(image[:, top : top + patch_size, left : left + patch_size]).contiguous()
            pairs.append(noise.pair(clean, g))
    return PairedImages(pairs)


# ----------------------------------------------------------------------------- real pairs (SIDD)


def sidd_medium_pairs(root) -> list[tuple[Path, Path]]:
    """(noisy, clean) file pairs of SIDD-Medium sRGB: ``root/Data/<scene>/*_NOISY_SRGB_*.PNG`` and ``*_GT_SRGB_*``."""
    root = Path(root)
    data = root / "Data"
    if not data.is_dir():
        raise FileNotFoundError(f"SIDD-Medium folder {data} not found (expected {root}/Data/<scene>/*_NOISY_SRGB_*.PNG)")
    def listed(kind: str) -> list[Path]:
        # (hidden: macOS's ._ metadata files, a .Trash folder)
        return [path for path in sorted(data.glob(f"*/*_{kind}_SRGB_*")) if path.suffix.lower() == ".png"
                and not path.name.startswith(".") and not path.parent.name.startswith(".")]

    pairs = []
    for noisy in listed("NOISY"):
        clean = noisy.with_name(noisy.name.replace("_NOISY_SRGB_", "_GT_SRGB_"))
        if not clean.is_file():
            raise FileNotFoundError(f"SIDD ground truth {clean} missing for noisy image {noisy}")
        pairs.append((noisy, clean))
    paired = {clean for _, clean in pairs}
    for clean in listed("GT"):
        if clean not in paired:
            noisy = clean.with_name(clean.name.replace("_GT_SRGB_", "_NOISY_SRGB_"))
            raise FileNotFoundError(f"SIDD noisy image {noisy} missing for ground truth {clean}")
    if not pairs:
        raise ValueError(f"no *_NOISY_SRGB_*.PNG images in {data}/<scene>/")
    return pairs


def check_pair_headers(pairs: Sequence[tuple[Path, Path]], patch_size: int) -> list[tuple[int, int]]:
    """Each (noisy, clean) pair's (height, width), read from PNG headers without decoding and
    checked as :class:`PairedPatches` checks a pair it decodes: one size and as many colour
    planes for both, and room for a crop of ``patch_size``. Cheap enough to run before
    training, so that a bad pair is not found hours in; a pair with a file of another type
    is left to the decoder (its size then None), unless Pillow cannot tell the type: refused;
    so are the colour planes of a palette PNG (gray when every colour it uses is)."""
    sizes = []
    for noisy, clean in pairs:
        headers = [_png_header(Path(path)) for path in (noisy, clean)]
        for path, header in zip((noisy, clean), headers):
            if header is None:
                try:
                    with _open_image(Path(path)):  # (its header alone)
                        pass
                except Exception as err:  # Pillow's UnidentifiedImageError, or an unreadable file
                    raise ValueError(f"cannot read image {path}: {err}") from err
        if None in headers:
            sizes.append(None)
            continue
        turned = _check_orientations(noisy, clean) >= 5  # (orientations 5 to 8 swap height and width)
        size = [header[3:1:-1] if turned else header[2:] for header in headers]
        # gray (+ alpha), colour (+ alpha); a palette's planes are the decoder's to tell (an all-gray one is gray)
        colours = [{0: 1, 4: 1, 2: 3, 6: 3}.get(header[1]) for header in headers]
        _check_pair(f"{noisy} and {clean}", size, colours, patch_size)
        sizes.append(size[0])
    return sizes


def _check_orientations(noisy, clean) -> int:
    """The EXIF orientation that decoding turns both files of a pair by: the same, or their
    pixels would not line up (a TIFF's own tag is tifffile's to read, and not compared)."""
    orientations = []
    for path in (noisy, clean):
        try:
            orientations.append(None if _is_tiff(Path(path)) else _exif_orientation(Path(path)))
        except Exception as err:  # a file cut short, say: Pillow's message names no file
            raise ValueError(f"cannot read image {path}: {err}") from err
    if None not in orientations and orientations[0] != orientations[1]:
        raise ValueError(f"noisy/clean EXIF orientations differ for {noisy} and {clean}: {orientations[0]} vs "
                         f"{orientations[1]} (1: as stored); decoding turns each as its tag says, so the pair "
                         f"would not line up")
    return orientations[0] or 1


def _check_pair(names: str, size: list, colours: list[int], patch_size: int) -> None:
    """A noisy/clean pair of one size and as many colour planes, with room for a crop."""
    if size[0] != size[1]:
        raise ValueError(f"noisy/clean sizes differ for {names}: {size[0]} vs {size[1]}")
    if None not in colours and colours[0] != colours[1]:  # (None: not known before decoding)
        raise ValueError(f"noisy/clean colour channels differ for {names}: {colours[0]} vs {colours[1]}")
    if min(size[0]) < patch_size:
        raise ValueError(f"{names}: size {size[0]} is smaller than patch_size {patch_size}")


class PairedPatches(Dataset):
    """Random aligned crops of real noisy/clean pairs, e.g. from :func:`sidd_medium_pairs`.

    ``pairs`` holds (noisy, clean) file paths, read lazily, or [C, H, W] tensors. Each epoch
    takes the pairs in an order drawn from ``(seed, epoch)``, in groups of ``interleave``
    pairs or a few more (a remainder is spread over the groups: a last group of fewer pairs
    would fill whole batches with crops of one image): a group's items take one crop of each
    of its pairs in turn, so that consecutive items (a batch of at most ``interleave``) come
    from different pairs, and reading items in order decodes each file once an epoch. The
    last ``cache_size`` (by default ``max(2, the largest group)``) decoded pairs are kept
    (per DataLoader worker) as their stored integer arrays, since full SIDD images are
    large. Crop position and the flip/rotation (shared by both images) come from
    ``(seed, epoch, i)``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple],
        patch_size: int = 128,
        patches_per_pair: int = 64,
        channels: int | None = None,
        seed: int = 0,
        augment: bool = True,
        cache_size: int | None = None,
        interleave: int = 1,
    ):
        if not pairs:
            raise ValueError("no image pairs given")
        patch_size = checked_int(patch_size, "patch_size", "PairedPatches")
        patches_per_pair = checked_int(patches_per_pair, "patches_per_pair", "PairedPatches")
        interleave = checked_int(interleave, "interleave", "PairedPatches")
        seed = checked_int(seed, "seed", "PairedPatches", low=0)
        self.pairs = list(pairs)
        for k, pair in enumerate(self.pairs):
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"PairedPatches: pair {k} must be a (noisy, clean) pair, got {pair!r:.200}")
        self.patch_size, self.patches_per_pair, self.channels = patch_size, patches_per_pair, channels
        self.seed, self.augment = seed, augment
        self.interleave = interleave
        groups = max(1, len(self.pairs) // interleave)
        size, extra = divmod(len(self.pairs), groups)
        # the first pair of each group in an epoch's order, and one past the last
        self._group_starts = [g * size + min(g, extra) for g in range(groups + 1)]
        self.cache_size = max(2, size + (extra > 0)) if cache_size is None else cache_size
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._first_colours: tuple[str, int] | None = None  # (pair, colour planes) of the first pair read
        self.epoch = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # the training loop sets it before every batch
            self.epoch = epoch
            self._order = torch.randperm(len(self.pairs), generator=item_generator(self.seed, _PAIR_ORDER_STREAM, epoch))

    def pair_of(self, index: int) -> int:
        """The pair that item ``index`` crops this epoch."""
        starts = self._group_starts
        group = bisect.bisect_right(starts, index // self.patches_per_pair) - 1
        position = index - starts[group] * self.patches_per_pair
        return int(self._order[starts[group] + position % (starts[group + 1] - starts[group])])

    def __len__(self) -> int:
        return len(self.pairs) * self.patches_per_pair

    def _load(self, k: int) -> tuple:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        noisy, clean = self.pairs[k]
        if isinstance(noisy, torch.Tensor):
            for name, image in (("noisy", noisy), ("clean", clean)):
                _check_image_tensor(f"pair {k}, {name} image", image, unit_range=name == "clean")
            loaded = (noisy, clean)
            names = f"pair {k}"
            size = [tuple(a.shape[-2:]) for a in loaded]
            colours = [a.shape[0] for a in loaded]
        else:
            loaded = (_read_array(Path(noisy)), _read_array(Path(clean)))
            _check_orientations(noisy, clean)
            names = f"{noisy} and {clean}"
            size = [a.shape[:2] for a in loaded]
            colours = [_colour_planes(a) for a in loaded]
        _check_pair(names, size, colours, self.patch_size)
        if self.channels is None:  # items of one batch must stack
            if self._first_colours is None:
                self._first_colours = (names, colours[0])
            elif self._first_colours[1] != colours[0]:
                raise ValueError(f"pairs mix gray and colour: {names} has {colours[0]} colour channels, "
                                 f"{self._first_colours[0]} {self._first_colours[1]}; pass channels=1 or channels=3")
        if self.cache_size > 0:
            self._cache[k] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        k = self.pair_of(index)
        pair = self._load(k)
        g = item_generator(self.seed, _PAIRED_STREAM, self.epoch, index)
        tensor = isinstance(pair[0], torch.Tensor)
        height, width = pair[0].shape[-2:] if tensor else pair[0].shape[:2]
        top, left = _crop_box(height, width, self.patch_size, g)
        rows, cols = slice(top, top + self.patch_size), slice(left, left + self.patch_size)
        if tensor:
            crops = [a[:, rows, cols].float() for a in pair]
        else:  # crop the stored integers first: converting a whole SIDD image to float is costly
            crops = [_to_tensor(np.ascontiguousarray(a[rows, cols]), str(p)) for a, p in zip(pair, self.pairs[k])]
        if self.channels is not None:
            crops = [to_channels(c, self.channels) for c in crops]
        if self.augment:
            crops = random_flip_rotate(g, *crops)
        noisy, clean = (c.contiguous() for c in crops)
        return noisy, clean


_SIDD_VAL_FILES = {"noisy": "ValidationNoisyBlocksSrgb", "clean": "ValidationGtBlocksSrgb"}


def _mat_blocks_shape(path: Path, key: str, load: bool = False) -> tuple[tuple[int, ...], np.ndarray | None]:
    """The shape of the blocks ``key`` in the MATLAB file ``path``, checked, and with ``load``
    the blocks; without, only the file's table of variables is read (``scipy.io.whosmat``)."""
    try:
        if load:
            contents = scipy.io.loadmat(path)
            table = {k: (v.shape, str(v.dtype)) for k, v in contents.items() if not k.startswith("__")}
        else:
            table = {name: (shape, kind) for name, shape, kind in scipy.io.whosmat(path)}  # (MATLAB's class names)
    except NotImplementedError as err:  # MATLAB v7.3 files are HDF5, which loadmat cannot read
        raise ValueError(f"cannot read {path} with scipy.io.loadmat (MATLAB v7.3/HDF5?): {err}") from err
    except Exception as err:
        raise ValueError(f"cannot read MATLAB file {path}: {err}") from err
    if key not in table:
        raise ValueError(f"{path} has no variable {key!r} (found {list(table)})")
    shape, dtype = table[key]
    if dtype != "uint8" or len(shape) != 5 or shape[-1] != 3 or 0 in shape:
        raise ValueError(
            f"{path}: {key} should be uint8 [images, blocks, H, W, 3] (SIDD: [40, 32, 256, 256, 3]), "
            f"got {dtype} {tuple(shape)}"
        )
    return tuple(shape), contents[key] if load else None


def _load_mat_blocks(path: Path, key: str) -> np.ndarray:
    return _mat_blocks_shape(path, key, load=True)[1]


def sidd_validation_files(root, check_blocks: bool = False) -> tuple[Path, Path]:
    """The noisy and the ground-truth .mat files of the SIDD validation blocks in ``root``;
    errors name what is missing, and with ``check_blocks`` what is wrong with the blocks'
    type and shape, read from the files' tables of variables (a cheap check before a run
    that needs them)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SIDD validation folder not found: {root}")
    files = tuple(root / f"{_SIDD_VAL_FILES[kind]}.mat" for kind in ("noisy", "clean"))
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"SIDD validation file not found: {path}")
    if check_blocks:
        shapes = [_mat_blocks_shape(path, _SIDD_VAL_FILES[kind])[0] for path, kind in zip(files, ("noisy", "clean"))]
        if shapes[0] != shapes[1]:
            raise ValueError(f"SIDD validation blocks in {root} differ in shape: noisy {shapes[0]} vs clean "
                             f"{shapes[1]}")
    return files


class SIDDValidation(Dataset):
    """The SIDD sRGB validation blocks (1280 pairs of 256x256 for the official files).

    ``root`` holds ``ValidationNoisyBlocksSrgb.mat`` and ``ValidationGtBlocksSrgb.mat``. Blocks
    stay uint8 in memory and become float32 [3, H, W] in [0, 1] per item; item order is
    image-major (image ``i // blocks_per_image``, block ``i % blocks_per_image``).
    """

    def __init__(self, root):
        noisy_path, clean_path = sidd_validation_files(root, check_blocks=True)
        noisy = _load_mat_blocks(noisy_path, _SIDD_VAL_FILES["noisy"])
        clean = _load_mat_blocks(clean_path, _SIDD_VAL_FILES["clean"])
        self.blocks_per_image = noisy.shape[1]
        self.noisy = noisy.reshape(-1, *noisy.shape[2:])
        self.clean = clean.reshape(-1, *clean.shape[2:])

    def __len__(self) -> int:
        return len(self.noisy)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_tensor(self.noisy[index], "SIDD block"), _to_tensor(self.clean[index], "SIDD block")
