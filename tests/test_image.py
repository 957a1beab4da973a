"""aria.data.image against transformers' AriaImageProcessorPil (the reference); load_image errors.

HF is always called with one image at a time, because its ``num_crops`` is the maximum over the
call (see ``test_crop_counts_are_per_image``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aria.data.errors import MediaError
from aria.data.image import (DEFAULT_SPLIT_RESOLUTIONS, ImageProcessor, ProcessedImage,
                             image_size, load_image)

ROOT = Path(__file__).resolve().parents[1]
# Measured: at most 1.2e-7 (4.8e-7 with std 0.2), float32 rounding. One intensity level is 2/255 =
# 7.8e-3 after normalisation: an off-by-one pixel fails by a factor of 780.
TOL = 1e-5


@pytest.fixture(scope="module")
def hf():
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil
    return AriaImageProcessorPil()


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([255 * x / w, 255 * y / h, 127 + 127 * np.sin((x + 2 * y) / 7)], -1)
    return pixels.astype(np.uint8)


def assert_matches_hf(ours: ProcessedImage, ref) -> float:
    """Masks identical, pixels within TOL; returns max |delta pixel|."""
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_mask.dtype == torch.bool
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert torch.equal(ours.pixel_mask, ref["pixel_mask"])
    delta = (ours.pixel_values - ref["pixel_values"]).abs().max().item()
    assert delta < TOL, delta
    return delta


# (height, width): tiny, very wide / tall (min_image_size kicks in), square, odd sizes (uneven
# centred padding), short side below 336 after scaling, larger than 980.
SIZES = [(20, 30), (50, 1500), (1500, 50), (64, 64), (333, 779), (101, 980), (1100, 1000)]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("side", [490, 980])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_hf(hf, size, side, split):
    h, w = size
    pixels = noise(h, w, seed=h * w) if (h + w) % 2 else gradient(h, w)
    image = Image.fromarray(pixels, "RGB")
    proc = ImageProcessor(max_image_size=side, split_image=split)
    ours = proc(image)
    ref = hf(image, max_image_size=side, split_image=split, return_tensors="pt")
    assert_matches_hf(ours, ref)
    assert ours.num_crops == proc.num_crops(h, w) == ref["num_crops"]


def test_thin_image_is_stretched_to_min_size():
    # 50x1500 at 490: scale 490/1500 gives 16 rows, raised to min_image_size = 336.
    image = Image.fromarray(gradient(50, 1500))
    out = ImageProcessor(max_image_size=490)(image)
    assert out.pixel_mask[0].sum(0).max().item() == 336  # valid rows
    assert out.pixel_mask[0].sum(1).max().item() == 490  # valid columns
    assert torch.all(out.pixel_values[0, :, 336:, :] == -1)
    out = ImageProcessor(max_image_size=490, min_image_size=100)(image)
    assert out.pixel_mask[0].sum(0).max().item() == 100


def test_split_pads_centred_and_crops_row_major():
    # 400x980 at 490: best resolution 490x980, no resize, 45 black rows above and below,
    # two 490x490 crops: left (red) then right (blue).
    pixels = np.zeros((400, 980, 3), np.uint8)
    pixels[:, :490, 0] = 255
    pixels[:, 490:, 2] = 255
    out = ImageProcessor(max_image_size=490, split_image=True)(Image.fromarray(pixels))
    assert out.num_crops == 2 and out.pixel_values.shape == (2, 3, 490, 490)
    assert out.pixel_mask.all()  # the crops fill 490x490: the black band is content, not padding
    red, blue = out.pixel_values
    assert torch.all(red[:, :45] == -1) and torch.all(red[:, 445:] == -1)
    one = torch.ones(400, 490)
    torch.testing.assert_close(red[0, 45:445], one)
    torch.testing.assert_close(blue[2, 45:445], one)
    assert torch.all(red[1:, 45:445] == -1) and torch.all(blue[:2, 45:445] == -1)


@pytest.mark.parametrize("size,side,expected", [
    ((50, 1500), 490, 4), ((50, 1500), 980, 2),    # 490x1960 keeps all 75000 pixels first
    ((50, 3500), 490, 8), ((50, 3500), 980, 4),    # 490x3920
    ((3500, 50), 490, 8), ((3500, 50), 980, 4),    # 3920x490
    ((64, 64), 490, 2), ((64, 64), 980, 1),        # every option keeps all: least waste, 490x980
    ((900, 1000), 490, 6), ((900, 1000), 980, 2),  # 980x1470: 980x980 and 980x490 crops at 980
    ((600, 300), 490, 2), ((600, 300), 980, 1),    # 980x490: one 980x490 crop at 980
])
def test_num_crops(size, side, expected):
    proc = ImageProcessor(max_image_size=side, split_image=True)
    assert proc.num_crops(*size) == expected
    assert proc(Image.fromarray(gradient(*size))).num_crops == expected
    assert ImageProcessor(max_image_size=side).num_crops(*size) == 1


def test_crop_counts_are_per_image(hf):
    proc = ImageProcessor(max_image_size=490, split_image=True)
    wide, square = Image.fromarray(gradient(50, 3500)), Image.fromarray(noise(64, 64))
    counts = [proc(wide).num_crops, proc(square).num_crops]
    assert counts == [8, 2] == [proc.num_crops(50, 3500), proc.num_crops(64, 64)]
    # HF's known bug, which this module exists to avoid: one call reports the largest count.
    ref = hf([wide, square], max_image_size=490, split_image=True, return_tensors="pt")
    assert ref["pixel_values"].shape[0] == 10 and ref["num_crops"] == 8


def test_non_rgb_modes_match_hf(hf):
    rgba = noise(70, 90, seed=1, channels=4)
    rgba[:35, :, 3] = 0  # top half fully transparent -> white
    images = {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": Image.fromarray(noise(70, 90, seed=2, channels=1), "L"),
        "LA": Image.fromarray(rgba[..., 2:], "LA"),
        "P": Image.fromarray(gradient(70, 90)).convert("P"),
    }
    p_transparent = Image.fromarray(gradient(70, 90)).convert("P")
    p_transparent.info["transparency"] = int(np.asarray(p_transparent)[0, 0])
    images["P+transparency"] = p_transparent
    proc = ImageProcessor(max_image_size=490)
    for mode, image in images.items():
        ours = proc(image)
        assert_matches_hf(ours, hf(image, max_image_size=490, return_tensors="pt"))
    top = proc(images["RGBA"]).pixel_values[0, :, :180, :]  # rows 0-34 of 70, resized to 381
    torch.testing.assert_close(top, torch.ones_like(top), msg="transparency must become white")


def test_to_hf_dict_matches_hf():
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil
    def as_json(d: dict) -> dict:  # HF keeps tuples where we write lists; JSON has lists only
        return json.loads(json.dumps(d))

    assert as_json(ImageProcessor().to_hf_dict()) == as_json(AriaImageProcessorPil().to_dict())
    kw = dict(max_image_size=490, min_image_size=100, split_image=True,
              split_resolutions=[[490, 980], [980, 490]], image_mean=[0.4, 0.5, 0.6],
              image_std=[0.2, 0.3, 0.4])
    ours = ImageProcessor(**kw).to_hf_dict()
    assert json.dumps(ours) and ours == as_json(AriaImageProcessorPil(**kw).to_dict())
    assert DEFAULT_SPLIT_RESOLUTIONS == AriaImageProcessorPil().split_resolutions


def test_custom_mean_std_match_hf(hf):
    image = Image.fromarray(gradient(120, 80))
    kw = dict(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])
    ours = ImageProcessor(max_image_size=490, **kw)(image)
    assert_matches_hf(ours, hf(image, max_image_size=490, return_tensors="pt", **kw))
    assert torch.allclose(ours.pixel_values[0, :, -1, -1], torch.tensor([-2.0, -5 / 3, -1.5]))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_image_size=448), "448"),
    (dict(max_image_size=224), "224"),
    (dict(max_image_size=490.0), "490.0"),
    (dict(min_image_size=600, max_image_size=490), "600"),
    (dict(split_resolutions=[]), "split_resolutions"),
    (dict(split_resolutions=[[490, 0]]), "split_resolutions"),
    (dict(image_std=(0.5, 0.0, 0.5)), "std"),
])
def test_bad_settings_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ImageProcessor(**kwargs)


def test_bad_inputs_to_call():
    proc = ImageProcessor()
    with pytest.raises(TypeError, match="PIL"):
        proc(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MediaError, match="no pixels"):
        proc(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="positive"):
        proc.num_crops(0, 10)


def test_load_image(tmp_path):
    rgba = noise(30, 40, seed=3, channels=4)
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    os.remove(tmp_path / "a.png")  # fully decoded: no longer needs the file
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.all(np.asarray(image) == 255)  # transparency composited onto white

    # EXIF orientation 6 (rotate 90 degrees clockwise to display) swaps width and height.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gradient(30, 40)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(str(tmp_path / "rot.jpg")).size == (30, 40)

    # A multi-frame GIF gives its first frame, usable after the file is gone.
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image = load_image(tmp_path / "anim.gif")
    os.remove(tmp_path / "anim.gif")
    assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_size_reads_the_header_only(tmp_path, fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: height and width swap
    Image.fromarray(gradient(30, 40)).save(tmp_path / f"rot.{fmt}", exif=exif)
    assert image_size(tmp_path / f"rot.{fmt}") == (40, 30) == load_image(tmp_path / f"rot.{fmt}").size[::-1]
    path = _truncated(tmp_path, fmt)  # pixels cut off: the header still answers
    assert image_size(path) == (64, 64)
    with pytest.raises(MediaError):
        load_image(path)
    with open(path, "rb") as f:
        assert image_size(f, name="member.png") == (64, 64)


@pytest.mark.parametrize("case,kind", [("missing", "missing_file"), ("text", "bad_image"), ("too_large", "too_large")])
def test_image_size_errors(tmp_path, case, kind):
    path, max_pixels = tmp_path / "x.png", 50_000_000
    if case == "text":
        path.write_text("not an image")
    elif case == "too_large":
        Image.new("RGB", (100, 60)).save(path)
        max_pixels = 5999
    with pytest.raises(MediaError) as err:
        image_size(path, max_pixels=max_pixels)
    assert err.value.kind == kind and str(path) in str(err.value)


def _truncated(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"cut.{fmt}"
    Image.fromarray(noise(64, 64, seed=4)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case,kind", [
    ("missing", "missing_file"), ("truncated_png", "bad_image"), ("truncated_jpg", "bad_image"),
    ("text", "bad_image"), ("empty", "bad_image"), ("directory", "bad_image"),
    ("too_large", "too_large"),
])
def test_load_image_errors(tmp_path, case, kind):
    max_pixels = 50_000_000
    if case == "missing":
        path = tmp_path / "nope.png"
    elif case.startswith("truncated"):
        path = _truncated(tmp_path, case.split("_")[1])
    elif case == "text":
        path = tmp_path / "notes.png"
        path.write_text("not an image\n" * 10)
    elif case == "empty":
        path = tmp_path / "empty.jpg"
        path.write_bytes(b"")
    elif case == "directory":
        path = tmp_path / "dir.png"
        path.mkdir()
    else:
        path = tmp_path / "big.png"
        Image.new("RGB", (100, 60)).save(path)
        max_pixels = 5999
    with pytest.raises(MediaError) as err:
        load_image(path, max_pixels=max_pixels)
    assert err.value.kind == kind
    assert str(path) in str(err.value)


def test_load_image_refuses_decompression_bomb_without_warning(tmp_path, recwarn):
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 100 MP, a few kB on disk
    with pytest.raises(MediaError, match="max_pixels") as err:
        load_image(path)
    assert err.value.kind == "too_large"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_raw_pixels_normalise_to_the_float_output():
    from aria.data.image import ImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    for split in (False, True):
        floats = ImageProcessor(max_image_size=490, split_image=split)(image)
        raw = ImageProcessor(max_image_size=490, split_image=split, raw_pixels=True)(image)
        assert raw.pixel_values.dtype == torch.uint8
        assert torch.equal(raw.pixel_mask, floats.pixel_mask)
        torch.testing.assert_close(raw.pixel_values.float() * (2 / 255) - 1, floats.pixel_values,
                                   atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mean = std = 0.5"):
        ImageProcessor(image_mean=(0.4, 0.4, 0.4), raw_pixels=True)
