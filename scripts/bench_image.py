"""Image processing throughput: ours (aria.data.image) vs transformers' AriaImageProcessorPil.

Both run single-threaded on the same generated images (half smooth gradients, half noise, sizes
drawn between 200x300 and 1600x1200), one call per image, as a data loader would use them.
Prints images/s and crops/s for each (max_image_size, split_image) and the ratio ours/HF.

    python scripts/bench_image.py            # 64 images
    python scripts/bench_image.py --quick    # 3 small images, for the test suite
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from aria.data.image import ImageProcessor

HEADER = (f"{'size':>5} {'split':>5} | {'ours img/s':>10} {'crops/s':>8} | "
          f"{'HF img/s':>9} {'crops/s':>8} | {'ours/HF':>7}")


def make_images(n: int, min_hw: tuple[int, int], max_hw: tuple[int, int],
                seed: int = 0) -> list[Image.Image]:
    """``n`` RGB images, alternately a smooth gradient and uniform noise, of random sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h = int(rng.integers(min_hw[0], max_hw[0] + 1))
        w = int(rng.integers(min_hw[1], max_hw[1] + 1))
        if i % 2:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            y, x = np.mgrid[0:h, 0:w]
            pixels = np.stack([255 * x / w, 255 * y / h, 127 + 127 * np.sin((x + y) / 37)], -1)
            pixels = pixels.astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def time_per_image(fn, images: list[Image.Image]) -> tuple[float, int]:
    """(seconds, total crops) of ``fn`` (image -> its crop count) over ``images``, warmed up."""
    fn(images[0])
    crops = 0
    start = time.perf_counter()
    for image in images:
        crops += fn(image)
    return time.perf_counter() - start, crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 small images (a smoke test)")
    parser.add_argument("--num-images", type=int, default=64)
    args = parser.parse_args()

    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    torch.set_num_threads(1)
    if args.quick:
        images = make_images(3, (40, 60), (300, 400))
    else:
        images = make_images(args.num_images, (200, 300), (1600, 1200))
    hf = AriaImageProcessorPil()
    print(f"{len(images)} images, single-threaded, one call per image")
    print(HEADER)
    print("-" * len(HEADER))
    for side in (490, 980):
        for split in (False, True):
            ours = ImageProcessor(max_image_size=side, split_image=split)
            t_ours, n_ours = time_per_image(lambda im: ours(im).num_crops, images)
            t_hf, n_hf = time_per_image(
                lambda im: hf(im, max_image_size=side, split_image=split,
                              return_tensors="pt")["pixel_values"].shape[0], images)
            if n_ours != n_hf:
                raise SystemExit(f"crop counts differ at {side}, split={split}: "
                                 f"ours {n_ours}, HF {n_hf}")
            n = len(images)
            print(f"{side:>5} {str(split):>5} | {n / t_ours:>10.1f} {n_ours / t_ours:>8.1f} | "
                  f"{n / t_hf:>9.1f} {n_hf / t_hf:>8.1f} | {t_hf / t_ours:>7.2f}")


if __name__ == "__main__":
    main()
