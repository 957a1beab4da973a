"""Aria's image processing: a PIL image -> normalised square crops plus their validity masks.

Letters: N crops, C channels (3), S crop side (``max_image_size``, 490 or 980), H/W heights/widths.

Same output as ``transformers``' ``AriaImageProcessorPil`` (pixels within 1e-6 in practice, masks
identical), per image:

1. Convert to RGB; transparency is composited onto white (as HF does).
2. Optional split: pick the best of ``split_resolutions`` (HF's ``select_best_resolution``), resize
   keeping the aspect ratio to fit it, pad it centred with zeros, cut it row-major into tiles of at
   most S x S. There is no extra global view (HF has none either).
3. Each crop: the longer side becomes S, the shorter ``max(int(short * S / long), min_image_size)``
   (so very thin images are stretched); BICUBIC resize; zero padding at the bottom/right up to
   S x S; ``pixel_mask`` is True on the resized region; rescale by 1/255 and normalise, so padding
   becomes ``-mean / std`` (-1 with Aria's mean = std = 0.5).

Design decisions:
- One image in, its own crops out. HF's processor reports the *largest* crop count of a call for
  every image (a known bug: a 2-crop and a 1-crop image get 2 x 2 image slots for 3 crops); here
  ``ProcessedImage.num_crops`` and ``ImageProcessor.num_crops(h, w)`` are per image.
- All geometry stays in PIL on uint8 (resize, centred paste, tile crops), which is lossless and
  exactly what HF does through its numpy <-> PIL round trips. Each crop then goes from uint8 to
  normalised float32 in one fused torch op (``x * (1/255/std) - mean/std``) written straight into a
  preallocated output; only the padding region is filled separately. No float64 pass, no
  ``np.pad``, no ``np.stack``.
- ``load_image`` turns every failure into ``MediaError`` (kinds ``missing_file``, ``bad_image``,
  ``too_large``) naming the path, so the dataset's skip-or-raise policy can count it. Truncated
  files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone), images over ``max_pixels``
  are refused before decoding, and the EXIF orientation is applied (as HF's ``load_image`` does),
  so a photo is processed the way it is displayed. ``image_size`` reads the same (height, width)
  from the header alone, so a sample's token count is known before any pixel is decoded.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import torch
from PIL import ExifTags, Image, ImageOps

from aria.config import IMAGE_SIZES
from aria.data.errors import MediaError

DEFAULT_SPLIT_GRID = ((1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3),
                      (2, 2), (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1),
                      (8, 1))  # (rows, columns) of 490 px
DEFAULT_SPLIT_RESOLUTIONS = [[h * 490, w * 490] for h, w in DEFAULT_SPLIT_GRID]  # (height, width)
DEFAULT_MAX_PIXELS = 50_000_000  # refuse larger images before decoding them (decompression bombs)
RESCALE_FACTOR = 1 / 255
_RESAMPLE = Image.Resampling.BICUBIC
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class ProcessedImage:
    """The crops of one image."""

    pixel_values: torch.Tensor
    """(N, C, S, S) float32, normalised; padding holds ``-mean / std``."""
    pixel_mask: torch.Tensor
    """(N, S, S) bool, True where the crop has image content."""

    @property
    def num_crops(self) -> int:
        return self.pixel_values.shape[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB; any transparency is composited onto white (HF's ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _open(path: str | os.PathLike | BinaryIO, name: str) -> Image.Image:
    """``Image.open`` (header only) with every failure a ``MediaError``."""
    try:
        # PIL warns at open from ~89 MP; we refuse from max_pixels with an error instead. (The
        # filter change is process-wide for the moment of the open; loader workers are processes.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError as e:
        raise MediaError(f"image file {name!r} does not exist", kind="missing_file") from e
    except Image.DecompressionBombError as e:
        raise MediaError(f"image {name!r} refused by PIL as a decompression bomb: {e}",
                         kind="too_large") from e
    except Exception as e:  # UnidentifiedImageError, SyntaxError, IsADirectoryError, ...
        raise MediaError(f"cannot open image {name!r}: {type(e).__name__}: {e}",
                         kind="bad_image") from e


def _name(path, name: str | None) -> str:
    if name is not None:
        return name
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else "<in-memory image>"


def image_size(path: str | os.PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> tuple[int, int]:
    """(height, width) of the image ``load_image`` would return, read from the header (EXIF
    orientation applied) without decoding pixels; ``MediaError`` as ``load_image`` for a missing,
    unidentifiable, empty or too large image. Decoding errors only show in ``load_image``."""
    name = _name(path, name)
    with _open(path, name) as opened:
        width, height = opened.size
        _check_size(width, height, name, max_pixels)
        orientation = 1
        # PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixel data;
        # one before them is already in ``info``. (A late one is rare; in split mode it could
        # change the crop count, which the processor then reports as bad media.)
        if opened.format != "PNG" or "exif" in opened.info:
            try:
                orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
            except Exception as e:  # a corrupt EXIF block
                raise MediaError(f"cannot read image {name!r}: {type(e).__name__}: {e}",
                                 kind="bad_image") from e
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def load_image(path: str | os.PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """Open, fully decode and convert to RGB the image at ``path`` (or in a binary file object, e.g.
    a webdataset member, called ``name`` in messages), or raise ``MediaError``.

    ``max_pixels`` bounds width x height, checked from the header before any pixel is decoded.
    PIL's own bomb check (``Image.MAX_IMAGE_PIXELS``, about 89 MP to warn and twice that to refuse)
    still applies first; its refusal becomes a ``MediaError`` too and its warning is silenced.
    """
    name = _name(path, name)
    opened = _open(path, name)
    try:
        image = _decode(opened, name, max_pixels)
    except BaseException:
        opened.close()
        raise
    if image is not opened:
        opened.close()
    return image


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError(f"image {name!r} has {width}x{height} = {width * height} pixels, "
                         f"more than max_pixels={max_pixels}", kind="too_large")
    if width < 1 or height < 1:
        raise MediaError(f"image {name!r} has no pixels ({width}x{height})", kind="bad_image")


def _decode(opened: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """The RGB pixels of a freshly opened image (which may itself be returned)."""
    _check_size(*opened.size, name, max_pixels)
    try:
        opened.load()  # raises on truncated or corrupt data
        image = opened
        if opened.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(opened)
        image = to_rgb(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        raise MediaError(f"cannot decode image {name!r}: {type(e).__name__}: {e}",
                         kind="bad_image") from e
    if image is opened and getattr(opened, "n_frames", 1) > 1:
        image = opened.copy()  # the first frame, detached from the file a multi-frame keeps open
    return image


def select_split_resolution(height: int, width: int,
                            resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) in ``resolutions`` that keeps the most of the image, then wastes least.

    Same arithmetic and tie-breaking (first wins) as HF's ``select_best_resolution``.
    """
    best, best_key = None, None
    for res_h, res_w in resolutions:
        scale = min(res_w / width, res_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(res_w * res_h - effective))
        if best_key is None or key > best_key:
            best, best_key = (res_h, res_w), key
    return best


def fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(h, w) of the image resized, aspect kept (rounded up), to fit ``target_h x target_w``."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def crop_resize_shape(height: int, width: int, max_size: int, min_size: int) -> tuple[int, int]:
    """(h, w) a crop is resized to: longer side ``max_size``, shorter at least ``min_size``."""
    scale = max_size / max(height, width)
    if width >= height:
        return max(int(height * scale), min_size), max_size
    return max_size, max(int(width * scale), min_size)


class ImageProcessor:
    """Aria's image processor: one PIL image -> ``ProcessedImage`` (see the module docstring)."""

    def __init__(self, max_image_size: int = 980, min_image_size: int = 336,
                 split_image: bool = False, split_resolutions: list[list[int]] | None = None,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), raw_pixels: bool = False) -> None:
        """``raw_pixels``: return uint8 pixels (padding 0) instead of normalised floats, for the data
        loader: 4x less to move between processes; the model normalises uint8 input itself, which
        is only right for Aria's mean = std = 0.5 (checked)."""
        if not isinstance(max_image_size, int) or max_image_size not in IMAGE_SIZES:
            raise ValueError(f"max_image_size must be 490 or 980 (the crop sizes Aria's projector "
                             f"has query counts for), got {max_image_size!r}")
        if not isinstance(min_image_size, int) or not 1 <= min_image_size <= max_image_size:
            raise ValueError(f"min_image_size must be an integer in [1, max_image_size="
                             f"{max_image_size}], got {min_image_size!r}")
        if split_resolutions is None:
            split_resolutions = DEFAULT_SPLIT_RESOLUTIONS
        if not split_resolutions or any(
                len(r) != 2 or not all(isinstance(v, int) and v > 0 for v in r)
                for r in split_resolutions):
            raise ValueError(f"split_resolutions must be a non-empty list of [height, width] pairs "
                             f"of positive integers, got {split_resolutions!r}")
        if len(image_mean) != 3 or len(image_std) != 3 or any(s == 0 for s in image_std):
            raise ValueError(f"image_mean and image_std need 3 values each, std non-zero; got "
                             f"mean={list(image_mean)!r}, std={list(image_std)!r}")
        self.max_image_size = max_image_size
        self.min_image_size = min_image_size
        self.split_image = bool(split_image)
        self.split_resolutions = [[int(h), int(w)] for h, w in split_resolutions]
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        if raw_pixels and (self.image_mean != [0.5] * 3 or self.image_std != [0.5] * 3):
            raise ValueError("raw_pixels needs mean = std = 0.5 (the normalisation the model applies "
                             "to uint8 pixels)")
        self.raw_pixels = raw_pixels
        # normalised = uint8 * scale_C + shift_C; padding (a zero pixel) becomes shift_C.
        self._scale_C11 = torch.tensor([RESCALE_FACTOR / s for s in self.image_std]).view(3, 1, 1)
        self._shift_C11 = torch.tensor(
            [-m / s for m, s in zip(self.image_mean, self.image_std)]).view(3, 1, 1)

    def num_crops(self, height: int, width: int) -> int:
        """How many crops an image of ``height x width`` pixels gives, without its pixels."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
        if not self.split_image:
            return 1
        res_h, res_w = select_split_resolution(height, width, self.split_resolutions)
        side = self.max_image_size
        return math.ceil(res_h / side) * math.ceil(res_w / side)

    def _split(self, image: Image.Image) -> list[Image.Image]:
        """Fit the image into the best split resolution, pad it centred, cut row-major tiles."""
        res_h, res_w = select_split_resolution(image.height, image.width, self.split_resolutions)
        new_h, new_w = fit_inside(image.height, image.width, res_h, res_w)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), _RESAMPLE)
        if (new_w, new_h) != (res_w, res_h):
            canvas = Image.new("RGB", (res_w, res_h))
            # Odd leftovers go to the right/bottom, as in HF's divmod.
            canvas.paste(image, ((res_w - new_w) // 2, (res_h - new_h) // 2))
            image = canvas
        side = self.max_image_size
        return [image.crop((x, y, min(x + side, res_w), min(y + side, res_h)))
                for y in range(0, res_h, side) for x in range(0, res_w, side)]

    def __call__(self, image: Image.Image) -> ProcessedImage:
        """The crops of ``image`` (any PIL mode), ``self.num_crops(h, w)`` of them."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor takes a PIL image, got {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise MediaError(f"image has no pixels ({image.width}x{image.height})",
                             kind="bad_image")
        image = to_rgb(image)
        crops = self._split(image) if self.split_image else [image]
        side = self.max_image_size
        if self.raw_pixels:
            pixel_values_NCSS = torch.zeros(len(crops), 3, side, side, dtype=torch.uint8)
        else:
            pixel_values_NCSS = torch.empty(len(crops), 3, side, side)
        pixel_mask_NSS = torch.zeros(len(crops), side, side, dtype=torch.bool)
        for k, crop in enumerate(crops):
            h, w = crop_resize_shape(crop.height, crop.width, side, self.min_image_size)
            if (w, h) != crop.size:
                crop = crop.resize((w, h), _RESAMPLE)
            # bytearray: a writable buffer, so torch does not warn about read-only memory.
            crop_HWC = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(h, w, 3)
            pixel_mask_NSS[k, :h, :w] = True
            if self.raw_pixels:
                pixel_values_NCSS[k, :, :h, :w] = crop_HWC.permute(2, 0, 1)
                continue
            torch.addcmul(self._shift_C11, crop_HWC.permute(2, 0, 1), self._scale_C11,
                          out=pixel_values_NCSS[k, :, :h, :w])
            pixel_values_NCSS[k, :, h:, :] = self._shift_C11
            pixel_values_NCSS[k, :, :h, w:] = self._shift_C11
        return ProcessedImage(pixel_values_NCSS, pixel_mask_NSS)

    def to_hf_dict(self) -> dict:
        """The nested ``"image_processor"`` entry of HF's ``processor_config.json``."""
        return {
            "image_processor_type": "AriaImageProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "rescale_factor": RESCALE_FACTOR,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "max_image_size": self.max_image_size,
            "min_image_size": self.min_image_size,
            "resample": int(_RESAMPLE),
            "split_image": self.split_image,
            "split_resolutions": [list(r) for r in self.split_resolutions],
        }
