"""CPU benchmark of ``aria.data.video.load_video``: frames/s for the official uniform sampling.

Writes a synthetic clip (640x360, 30 fps, 300 frames of a moving colour gradient) with PyAV, once
per codec (mpeg4, and H.264 when PyAV has libx264), into a temporary directory, then times
``load_video(path, num_frames=n)`` for n = 8, 32, 128. A timing covers what a data-loader worker
pays per sample: opening the file (decord indexes every packet), decoding and seeking to the
sampled frames, and making PIL images. decord runs single-threaded, as in ``load_video``.

    .venv/bin/python scripts/bench_video_decode.py            # ~15 s on 2 cores
    .venv/bin/python scripts/bench_video_decode.py --quick    # tiny clip, one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from aria.data.video import load_video


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 160x90, 60-frame clip and one repeat (checks the script runs)")
    args = parser.parse_args()
    width, height, clip_frames, repeats = (160, 90, 60, 1) if args.quick else (640, 360, 300, 5)
    codecs = ["mpeg4"] + (["libx264"] if "libx264" in av.codecs_available else [])
    print(f"clip: {width}x{height}, 30 fps, {clip_frames} frames; median of {repeats}; "
          "decord single-threaded")
    print(f"{'codec':<8} {'frames':>6} {'ms/video':>9} {'frames/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in codecs:
            path = Path(tmp) / f"clip_{codec}.mp4"
            write_clip(path, codec, width, height, 30, clip_frames)
            for num_frames in (8, 32, 128):
                frames_per_s = bench_decode(path, num_frames, repeats)
                returned = min(num_frames, clip_frames)
                print(f"{codec:<8} {returned:>6} {1000 * returned / frames_per_s:>9.1f} "
                      f"{frames_per_s:>9.0f}")


if __name__ == "__main__":
    main()
