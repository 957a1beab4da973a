"""Data pipeline throughput on the CPU: image processing (ours vs transformers' AriaImageProcessorPil,
same images, same run), video decoding, and the whole loader (parse, decode, process, tokenize, pack).

    python scripts/bench_data.py            # the full tables (about a minute on 2 cores)
    python scripts/bench_data.py --quick    # tiny inputs: checks the script runs (used by the tests)

Images: half smooth gradients, half noise, sizes between 200x300 and 1600x1200, one call per image,
single-threaded. Video: a synthetic 640x360 30 fps clip per codec, ``load_video`` with uniform
sampling (decord single-threaded; a timing covers opening, seeking, decoding and PIL conversion).
Loader: the shapes world at 490 px, one worker process, packed rows of 2048 tokens. Loader at Aria
scale: photo-sized JPEGs (about 1000 px) processed at 980 px with Aria's crop table {490: 128,
980: 256} (256 <|img|> tokens per image), rows of 8192 tokens, 1 and 2 worker processes; it prints
samples/s, crops/s and batches/s, and the float32 pixel megabytes each batch carries to the trainer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from aria.data.image import ImageProcessor
from aria.data.video import load_video


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


def write_clip(path: Path, codec: str, width: int, height: int, fps: int, num_frames: int) -> None:
    """A clip whose every frame differs (a gradient moving diagonally), so no frame is free."""
    y_HW, x_HW = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame_HWC = np.stack([(x_HW + 4 * i) % 256, (y_HW + 2 * i) % 256,
                                  ((x_HW + y_HW) // 2 + i) % 256], axis=-1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bench_decode(path: str | Path, num_frames: int, repeats: int) -> float:
    """Sampled frames returned per second by ``load_video(path, num_frames=...)``, from the
    median of ``repeats`` timed calls (after one untimed call that warms the file cache)."""
    load_video(path, num_frames=num_frames)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        video = load_video(path, num_frames=num_frames)
        seconds.append(time.perf_counter() - start)
    return len(video.frames) / statistics.median(seconds)


def bench_images(quick: bool, num_images: int) -> None:
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    images = make_images(3, (40, 60), (300, 400)) if quick else make_images(num_images, (200, 300), (1600, 1200))
    hf = AriaImageProcessorPil()
    header = (f"{'size':>5} {'split':>5} | {'ours img/s':>10} {'crops/s':>8} | "
              f"{'HF img/s':>9} {'crops/s':>8} | {'ours/HF':>7}")
    print(f"\n== images: {len(images)} images, single-threaded, one call per image ==")
    print(header)
    print("-" * len(header))
    for side in (490, 980):
        for split in (False, True):
            ours = ImageProcessor(max_image_size=side, split_image=split)
            t_ours, n_ours = time_per_image(lambda im: ours(im).num_crops, images)
            t_hf, n_hf = time_per_image(
                lambda im: hf(im, max_image_size=side, split_image=split,
                              return_tensors="pt")["pixel_values"].shape[0], images)
            if n_ours != n_hf:
                raise SystemExit(f"crop counts differ at {side}, split={split}: ours {n_ours}, HF {n_hf}")
            n = len(images)
            print(f"{side:>5} {str(split):>5} | {n / t_ours:>10.1f} {n_ours / t_ours:>8.1f} | "
                  f"{n / t_hf:>9.1f} {n_hf / t_hf:>8.1f} | {t_hf / t_ours:>7.2f}")


def bench_video(quick: bool) -> None:
    width, height, clip_frames, repeats = (160, 90, 60, 1) if quick else (640, 360, 300, 5)
    codecs = ["mpeg4"] + (["libx264"] if "libx264" in av.codecs_available else [])
    print(f"\n== video: {width}x{height}, 30 fps, {clip_frames} frames; median of {repeats} ==")
    print(f"{'codec':<8} {'frames':>6} {'ms/video':>9} {'frames/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in codecs:
            path = Path(tmp) / f"clip_{codec}.mp4"
            write_clip(path, codec, width, height, 30, clip_frames)
            for num_frames in (8, 32, 128):
                frames_per_s = bench_decode(path, num_frames, repeats)
                returned = min(num_frames, clip_frames)
                print(f"{codec:<8} {returned:>6} {1000 * returned / frames_per_s:>9.1f} {frames_per_s:>9.0f}")


def bench_loader(quick: bool) -> None:
    from aria.config import DataConfig, load_model_config
    from aria.data.loader import build_train_loader
    from aria.data.processor import Processor
    from aria.data.tokenizer import Tokenizer
    from data_tools.make_shapes import make_shapes
    from data_tools.train_tokenizer import train

    batches = 3 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        seq_len, rows = (512, 2) if quick else (2048, 4)
        make_shapes(tmp, seed=0, train_images=20 if quick else 400, test_images=4, train_videos=4 if quick else 80,
                    test_videos=2)
        train([f"{tmp}/text_train.jsonl"], f"{tmp}/tok", vocab_size=512)
        processor = Processor.for_model(Tokenizer.load(f"{tmp}/tok"), load_model_config("tiny"), image_size=490)
        print(f"\n== loader: shapes world (image and video questions), 490 px, rows of {seq_len}, 1 worker ==")
        print(f"{'rows/batch':>10} {'batches/s':>9} {'samples/s':>9} {'tokens/s':>9} {'crops/s':>8} {'padding':>7}")
        data = DataConfig(train=f"{tmp}/chat_train.jsonl", num_workers=1, image_size=490)
        loader = iter(build_train_loader(data, processor, seq_len=seq_len, batch_size=rows))
        next(loader)  # worker start-up is not throughput
        samples = tokens = crops = slots = 0
        start = time.perf_counter()
        for _ in range(batches):
            b = next(loader)
            samples, tokens, slots = samples + b.num_samples, tokens + b.num_tokens, slots + b.input_ids.numel()
            crops += b.pixel_values.shape[0] if b.pixel_values is not None else 0
        dt = time.perf_counter() - start
        loader.close()  # stop the worker before its files go
        print(f"{rows:>10} {batches / dt:>9.2f} {samples / dt:>9.1f} {tokens / dt:>9.0f} {crops / dt:>8.1f} "
              f"{1 - tokens / slots:>7.1%}")
        bench_aria_loader(quick, Path(tmp) / "tok")


def write_photos(directory: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs of 700-1400 px a side (half gradients, half noise); their relative paths."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(make_images(n, (700, 700), (1400, 1400), seed)):
        name = f"images/{i:04d}.jpg"
        image.save(directory / name, quality=90)
        names.append(name)
    return names


def bench_aria_loader(quick: bool, tokenizer_dir: Path) -> None:
    import json

    from aria.config import DataConfig
    from aria.data.loader import build_train_loader
    from aria.data.processor import Processor
    from aria.data.tokenizer import Tokenizer

    seq_len, batches, num_photos = (1024, 2, 6) if quick else (8192, 4, 48)
    processor = Processor(Tokenizer.load(tokenizer_dir), {490: 128, 980: 256}, image_size=980)
    print(f"\n== loader at Aria scale: ~1000 px JPEGs at 980 px (256 tokens each), rows of {seq_len}, "
          "1 row per batch ==")
    print(f"{'workers':>7} {'batches/s':>9} {'samples/s':>9} {'crops/s':>8} {'tokens/s':>9} {'MB px/batch':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        names = write_photos(Path(tmp), num_photos)
        with open(Path(tmp) / "train.jsonl", "w") as f:
            for i, name in enumerate(names):
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
                    {"role": "assistant", "content": f"Picture number {i}."}], "images": [name]}) + "\n")
        for workers in (1, 2):
            data = DataConfig(train=tmp, num_workers=workers, image_size=980)
            loader = iter(build_train_loader(data, processor, seq_len=seq_len, batch_size=1))
            for _ in range(workers):
                next(loader)  # worker start-up is not throughput
            samples = tokens = crops = 0
            start = time.perf_counter()
            for _ in range(batches):
                b = next(loader)
                samples, tokens = samples + b.num_samples, tokens + b.num_tokens
                crops += b.pixel_values.shape[0] if b.pixel_values is not None else 0
            dt = time.perf_counter() - start
            loader.close()
            megabytes = crops * 3 * 980 * 980 * 4 / batches / 1e6
            print(f"{workers:>7} {batches / dt:>9.2f} {samples / dt:>9.1f} {crops / dt:>8.1f} {tokens / dt:>9.0f} "
                  f"{megabytes:>11.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs (a smoke test)")
    parser.add_argument("--num-images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_images(args.quick, args.num_images)
    bench_video(args.quick)
    bench_loader(args.quick)


if __name__ == "__main__":
    main()
