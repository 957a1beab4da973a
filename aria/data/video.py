"""Video frame sampling (which frames) and decoding (decord), for training and inference.

Design decisions:
- Sampling is pure index arithmetic (``uniform_indices``, ``fps_indices``), separate from
  decoding (``load_video``), so the rules are unit-tested on hand-computed cases without a file.
  ``max_frames`` caps both modes (uniform sampling of more frames than the cap takes the cap).
- Opening and decoding are separate steps (``open_video`` -> ``VideoFile.decode``): the frame
  count and rate come from the container index, so a sample's token count is known (and a sample
  too long for its row refused) before any frame is decoded.
- ``uniform_indices`` is the official Aria rule ``[int(n / k) * i for i in range(k)]``: integer
  stride from frame 0 (so the tail is never sampled when ``n`` is not a multiple of ``k``).
  One deliberate change: a video shorter than ``k`` frames gives every frame once (``0..n-1``)
  instead of the official ``k`` copies of frame 0, which would feed the model ``k`` identical
  images and no information about the rest of the clip.
- ``fps_indices`` samples one frame every ``1/fps`` seconds from t=0, taking the frame whose
  timestamp ``index / native_fps`` is nearest, rounding halves *up* (``floor(x + 0.5)``; Python's
  ``round`` rounds halves to even, which makes the step alternate with the parity of the sample).
  When more than ``max_frames`` would be needed it keeps the same rule with a longer step,
  ``num_total / max_frames`` frames, so a long video is covered end to end rather than cut off.
- Timestamps are ``index / native fps`` (the average frame rate decord reports), not container
  presentation times: the ``[MM:SS]`` labels only need second resolution.
- decord runs with one thread per reader: the data loader parallelises across worker processes,
  and decord's default (one thread per core in every worker) oversubscribes the CPU.
- Truncated files: decord indexes only the packets actually present, so a cut mkv/avi gives the
  frames before the cut and sampling works on those; a cut mp4/mov (its index is at the end of the
  file) cannot be opened and raises ``MediaError``. Overwritten bytes inside the stream are not
  detected: FFmpeg conceals the damage and returns plausible but wrong frames. Every decord
  failure becomes a ``MediaError`` naming the path; kinds: ``missing_file``, ``bad_video``,
  ``empty_video`` (no video stream, or no frames).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import decord
import numpy as np
from PIL import Image

from aria.data.errors import MediaError

# decord's message for FFmpeg's AVERROR_STREAM_NOT_FOUND: the file has no video stream, or one
# with no frames (the two look the same to it), or a header damaged so that it finds neither.
_NO_VIDEO_STREAM = "cannot find video stream"


@dataclass
class VideoFrames:
    """Decoded frames of one video and where they came from."""

    frames: list[Image.Image]
    """RGB frames, in the order of ``indices``."""
    indices: list[int]
    """Frame indices in the file (0-based, increasing)."""
    timestamps: list[float]
    """Seconds from the start, ``index / fps``."""
    fps: float
    """Native (average) frame rate of the file."""


def uniform_indices(num_total: int, num_frames: int) -> list[int]:
    """The official Aria rule, ``num_frames`` frames at integer stride ``num_total // num_frames``
    from frame 0; a video with fewer than ``num_frames`` frames gives each of its frames once."""
    if num_total < 1:
        raise ValueError(f"num_total must be >= 1, got {num_total}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_total < num_frames:
        return list(range(num_total))
    return [int(num_total / num_frames) * i for i in range(num_frames)]


def fps_indices(num_total: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """One frame every ``1/fps`` seconds from t=0 while t < the video's duration (nearest frame,
    halves rounded up, no duplicates: each frame once when ``fps >= native_fps``); if that takes
    more than ``max_frames`` samples, ``max_frames`` samples evenly spread over the whole video
    (step ``num_total / max_frames`` frames from frame 0)."""
    if num_total < 1:
        raise ValueError(f"num_total must be >= 1, got {num_total}")
    if not native_fps > 0 or not math.isfinite(native_fps):
        raise ValueError(f"native_fps must be a positive number, got {native_fps}")
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    # The step between samples in frames is num / den; kept as a fraction so that k * num / den
    # is one correctly rounded division and exact halves (25 fps at 2 fps: 12.5) stay exact.
    num, den = float(native_fps), float(fps)
    # Samples at k * step for k * step < num_total; the 1e-9 keeps float error from adding one
    # (50 frames at 10 fps, fps=2.2: 50 * 2.2 / 10 = 11.000000000000002).
    count = max(1, math.ceil(num_total * den / num - 1e-9))  # t = 0 is always sampled
    if count > max_frames:
        num, den, count = float(num_total), float(max_frames), max_frames
    indices: list[int] = []
    for k in range(count):
        # Duplicates are consecutive: a step under one frame (fps above the video's), or the
        # nearest frame to the last sample being frame num_total, clamped to the last frame.
        index = min(math.floor(k * num / den + 0.5), num_total - 1)
        if not indices or index != indices[-1]:
            indices.append(index)
    return indices


def format_timestamp(seconds: float) -> str:
    """``[MM:SS]`` with whole seconds rounded down (75.4 -> ``[01:15]``); minutes may pass 99."""
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    minutes, secs = divmod(int(seconds), 60)
    return f"[{minutes:02d}:{secs:02d}]"


def sample_indices(num_total: int, native_fps: float, num_frames: int | None = None,
                   fps: float | None = None, max_frames: int = 128) -> list[int]:
    """The frames to take: ``uniform_indices(n, min(num_frames, max_frames))`` (the official
    sampling, capped) or ``fps_indices(n, native_fps, fps, max_frames)``; exactly one of
    ``num_frames`` and ``fps`` must be given."""
    if (num_frames is None) == (fps is None):
        raise ValueError(f"give exactly one of num_frames and fps, got num_frames={num_frames}, "
                         f"fps={fps}")
    if num_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        return uniform_indices(num_total, min(num_frames, max_frames))
    return fps_indices(num_total, native_fps, fps, max_frames)


@dataclass
class VideoFile:
    """An opened video: its frame count and rate are known, no frame is decoded yet."""

    path: str
    reader: "decord.VideoReader"
    num_total: int
    """Frames in the file."""
    fps: float
    """Native (average) frame rate."""

    def decode(self, indices: list[int]) -> VideoFrames:
        """The frames at ``indices`` (from ``sample_indices``), or ``MediaError``."""
        try:
            batch = self.reader.get_batch(indices)
        except (decord.DECORDError, RuntimeError) as err:
            raise MediaError(f"cannot decode frames {indices} of video file {self.path}: "
                             f"{_first_line(err)}", kind="bad_video") from err
        # get_batch returns whatever decord's global bridge is set to (e.g. torch, as the official
        # code sets it); np.asarray accepts a torch tensor, and decord's own array via asnumpy.
        frames_NHWC = np.asarray(batch.asnumpy() if hasattr(batch, "asnumpy") else batch)
        if frames_NHWC.shape[0] != len(indices):
            raise MediaError(f"decoded {frames_NHWC.shape[0]} frames of video file {self.path}, "
                             f"wanted {len(indices)}", kind="bad_video")
        return VideoFrames(
            frames=[Image.fromarray(frame_HWC) for frame_HWC in frames_NHWC],
            indices=list(indices),
            timestamps=[index / self.fps for index in indices],
            fps=self.fps,
        )


def open_video(path: str | os.PathLike) -> VideoFile:
    """Open ``path`` with decord (frame count and rate, no decoding), or raise ``MediaError`` for a
    missing, unreadable or empty video."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"video file {path} does not exist", kind="missing_file")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        if _NO_VIDEO_STREAM in str(err):
            raise MediaError(f"video file {path} has no readable video stream (none, one with no "
                             "frames, or a damaged header)", kind="empty_video") from err
        raise MediaError(f"cannot open video file {path}: {_first_line(err)}",
                         kind="bad_video") from err
    num_total = len(reader)
    if num_total == 0:
        raise MediaError(f"video file {path} has no frames", kind="empty_video")
    native_fps = float(reader.get_avg_fps())
    if not native_fps > 0 or not math.isfinite(native_fps):
        raise MediaError(f"video file {path} reports frame rate {native_fps}", kind="bad_video")
    return VideoFile(path, reader, num_total, native_fps)


def load_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
               max_frames: int = 128) -> VideoFrames:
    """Decode the frames of ``path`` chosen by ``sample_indices``: uniform (the official sampling,
    at most ``max_frames``) or every ``1/fps`` seconds (capped by ``max_frames``); exactly one of
    ``num_frames`` and ``fps`` must be given. Raises ``MediaError`` for a missing, unreadable or
    empty video."""
    if (num_frames is None) == (fps is None):
        raise ValueError(f"give exactly one of num_frames and fps, got num_frames={num_frames}, "
                         f"fps={fps}")
    video = open_video(path)
    return video.decode(sample_indices(video.num_total, video.fps, num_frames, fps, max_frames))


def _first_line(err: BaseException) -> str:
    """decord's messages start with a timestamped source location and can run to a stack dump."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
