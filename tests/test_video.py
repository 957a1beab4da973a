"""Video sampling and decoding: index rules on hand-computed cases, decoded frames identified by
colour, every failure a MediaError (including truncated and corrupt files), and the benchmark.

Test clips are written here with PyAV: 64x48 frames, each one solid colour that encodes its index
(three base-5 digits in R, G, B, levels 50 apart, so mpeg4's colour error of a few units cannot
move a frame to a neighbouring index).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from aria.data.errors import MediaError
from aria.data.video import (VideoFrames, format_timestamp, fps_indices, load_video, open_video, sample_indices,
                              uniform_indices)

REPO = Path(__file__).resolve().parents[1]
MAX_INDEX = 125  # three base-5 digits


def colour(index: int) -> tuple[int, int, int]:
    assert 0 <= index < MAX_INDEX
    return tuple(25 + 50 * digit for digit in (index // 25, index // 5 % 5, index % 5))


def index_of(frame_HWC: np.ndarray) -> int:
    """The frame index a decoded solid-colour frame encodes (inverse of ``colour``)."""
    mean = frame_HWC.reshape(-1, 3).astype(float).mean(0)
    assert np.abs(frame_HWC.astype(float) - mean).max() < 20, "frame is not one solid colour"
    r, g, b = (int(round((c - 25) / 50)) for c in mean)
    assert np.abs(mean - colour(25 * r + 5 * g + b)).max() < 15, f"colour {mean} is no index"
    return 25 * r + 5 * g + b


def write_video(path: Path, num_frames: int, fps: int, codec: str = "mpeg4") -> Path:
    """``num_frames`` frames of ``colour(i)``; the container is chosen by the file extension."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # writes the header even when there are no frames
        for i in range(num_frames):
            frame_HWC = np.empty((48, 64, 3), np.uint8)
            frame_HWC[:] = colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4_100x25": write_video(d / "a.mp4", 100, 25),
        "mkv_100x25": write_video(d / "a.mkv", 100, 25),
        "avi_100x25": write_video(d / "a.avi", 100, 25),
        "mkv_50x10": write_video(d / "b.mkv", 50, 10),
        "mp4_5x10": write_video(d / "short.mp4", 5, 10),
    }


# ---- the test clips decode as written ----------------------------------------------------------

@pytest.mark.parametrize("name", ["mp4_100x25", "mkv_100x25", "avi_100x25"])
def test_decord_decodes_every_written_frame(clips, name):
    reader = decord.VideoReader(str(clips[name]), ctx=decord.cpu(0), num_threads=1)
    assert (len(reader), reader.get_avg_fps()) == (100, 25.0)
    frames_NHWC = reader.get_batch(list(range(100))).asnumpy()
    assert [index_of(f) for f in frames_NHWC] == list(range(100))


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV built without libx264")
def test_h264_with_b_frames_decodes_the_right_frames(tmp_path):
    path = write_video(tmp_path / "h264.mp4", 60, 30, codec="libx264")
    video = load_video(path, num_frames=7)
    assert video.indices == [0, 8, 16, 24, 32, 40, 48]
    assert [index_of(np.asarray(f)) for f in video.frames] == video.indices


# ---- uniform_indices ---------------------------------------------------------------------------

def test_uniform_indices_hand_computed():
    assert uniform_indices(100, 8) == [0, 12, 24, 36, 48, 60, 72, 84]  # stride int(12.5) = 12
    assert uniform_indices(10, 3) == [0, 3, 6]
    assert uniform_indices(8, 8) == list(range(8))
    assert uniform_indices(15, 8) == list(range(8))  # stride int(1.875) = 1: the tail is unused
    assert uniform_indices(7, 1) == [0]


def test_uniform_indices_is_the_official_formula_when_the_video_is_long_enough():
    for num_total in range(1, 200):
        for num_frames in range(1, num_total + 1, 7):
            official = [int(num_total / num_frames) * i for i in range(num_frames)]
            assert uniform_indices(num_total, num_frames) == official


def test_uniform_indices_short_video_gives_every_frame_once():
    # The official rule would give [0, 0, 0, 0, 0, 0, 0, 0] (stride int(5 / 8) = 0).
    assert uniform_indices(5, 8) == [0, 1, 2, 3, 4]
    assert uniform_indices(1, 128) == [0]


@pytest.mark.parametrize("args", [(0, 8), (10, 0), (-1, 4)])
def test_uniform_indices_rejects_bad_counts(args):
    with pytest.raises(ValueError, match="must be >= 1"):
        uniform_indices(*args)


# ---- fps_indices -------------------------------------------------------------------------------

def test_fps_indices_hand_computed():
    # 2 s at 25 fps, sampled at 2 fps: t = 0, 0.5, 1, 1.5 s -> frames 0, 12.5, 25, 37.5; halves
    # round up (round() would give 12 and 38).
    assert fps_indices(50, 25.0, 2.0, 128) == [0, 13, 25, 38]
    assert fps_indices(100, 25.0, 1.0, 128) == [0, 25, 50, 75]
    # 0.7 s at 10 fps, 4 fps: t = 0, 0.25, 0.5 (0.75 is past the end) -> 0, 2.5, 5.
    assert fps_indices(7, 10.0, 4.0, 128) == [0, 3, 5]
    # 30 frames at 29.97 fps last 1.001 s, so t = 1 s is sampled; its nearest frame (29.97 -> 30)
    # is past the end: clamped to the last frame.
    assert fps_indices(30, 30000 / 1001, 1.0, 128) == [0, 29]
    assert fps_indices(1, 25.0, 1.0, 128) == [0]
    assert fps_indices(10, 25.0, 1e-12, 8) == [0]  # one sample per 30,000 years
    # 5 s at 2.2 fps: 11 samples, t = 5 s is the end (50 * 2.2 / 10 is 11.000000000000002 in
    # floats); step 10 / 2.2 = 4.55 frames.
    assert fps_indices(50, 10.0, 2.2, 128) == [0, 5, 9, 14, 18, 23, 27, 32, 36, 41, 45]


def test_fps_indices_faster_than_the_video_gives_every_frame_once():
    assert fps_indices(10, 10.0, 30.0, 128) == list(range(10))
    assert fps_indices(10, 10.0, 10.0, 128) == list(range(10))


def test_fps_indices_over_max_frames_spreads_over_the_whole_video():
    # fps=10 needs 40 frames; the cap of 8 gives step 100 / 8 = 12.5 frames from frame 0,
    # reaching frame 88 where the official stride would stop at 84.
    assert fps_indices(100, 25.0, 10.0, 8) == [0, 13, 25, 38, 50, 63, 75, 88]
    # Exactly max_frames needed: no spreading.
    assert fps_indices(100, 25.0, 1.0, 4) == [0, 25, 50, 75]
    # Faster than the video and longer than the cap: step 10 / 4 = 2.5 frames.
    assert fps_indices(10, 10.0, 30.0, 4) == [0, 3, 5, 8]


def test_fps_indices_long_video_is_covered_end_to_end():
    num_total = 30 * 3600  # an hour at 30 fps
    indices = fps_indices(num_total, 30.0, 1.0, 128)
    assert len(indices) == 128 and indices[0] == 0
    assert indices[-1] >= num_total - num_total / 128 - 1
    steps = np.diff(indices)
    assert steps.min() >= math.floor(num_total / 128) and steps.max() <= math.ceil(num_total / 128)


def test_fps_indices_are_increasing_in_range_and_capped():
    for num_total in (1, 2, 7, 30, 99, 250):
        for native_fps in (10.0, 23.976, 25.0, 30000 / 1001, 60.0):
            for fps in (0.3, 1.0, 2.0, 7.5, 60.0):
                for max_frames in (1, 4, 16, 128):
                    indices = fps_indices(num_total, native_fps, fps, max_frames)
                    assert 1 <= len(indices) <= max_frames
                    assert indices[0] == 0 and indices[-1] < num_total
                    assert all(a < b for a, b in zip(indices, indices[1:]))


@pytest.mark.parametrize("args, field", [
    ((10, 25.0, 0.0, 8), "fps"), ((10, 0.0, 1.0, 8), "native_fps"),
    ((10, float("nan"), 1.0, 8), "native_fps"), ((10, 25.0, 1.0, 0), "max_frames"),
    ((0, 25.0, 1.0, 8), "num_total"),
])
def test_fps_indices_rejects_bad_arguments(args, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        fps_indices(*args)


# ---- format_timestamp --------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "[00:00]"), (75.4, "[01:15]"), (59.999, "[00:59]"), (60.0, "[01:00]"), (3599, "[59:59]"),
    (123 * 60 + 4, "[123:04]"),
])
def test_format_timestamp(seconds, text):
    assert format_timestamp(seconds) == text


def test_format_timestamp_rejects_negative():
    with pytest.raises(ValueError, match="seconds"):
        format_timestamp(-1.0)


# ---- load_video --------------------------------------------------------------------------------

def frame_indices(video: VideoFrames) -> list[int]:
    return [index_of(np.asarray(frame)) for frame in video.frames]


@pytest.mark.parametrize("name", ["mp4_100x25", "mkv_100x25", "avi_100x25"])
def test_load_video_uniform(clips, name):
    video = load_video(clips[name], num_frames=8)
    assert video.indices == [0, 12, 24, 36, 48, 60, 72, 84]
    assert frame_indices(video) == video.indices
    assert video.fps == 25.0
    assert video.timestamps == pytest.approx([i / 25 for i in video.indices])
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)


def test_load_video_fps(clips):
    video = load_video(str(clips["mkv_50x10"]), fps=2.0)  # 5 s at 10 fps: every 5th frame
    assert video.indices == list(range(0, 50, 5))
    assert frame_indices(video) == video.indices
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5])
    assert [format_timestamp(t) for t in video.timestamps[::4]] == ["[00:00]", "[00:02]", "[00:04]"]


def test_load_video_fps_capped_by_max_frames(clips):
    video = load_video(clips["mp4_100x25"], fps=10.0, max_frames=8)
    assert video.indices == [0, 13, 25, 38, 50, 63, 75, 88]
    assert frame_indices(video) == video.indices


def test_load_video_uniform_is_capped_by_max_frames(clips):
    video = load_video(clips["mp4_100x25"], num_frames=8, max_frames=4)
    assert video.indices == [0, 25, 50, 75] and frame_indices(video) == video.indices


def test_sample_indices_caps_both_modes():
    assert sample_indices(100, 25.0, num_frames=8, max_frames=4) == uniform_indices(100, 4)
    assert sample_indices(100, 25.0, num_frames=3, max_frames=4) == uniform_indices(100, 3)
    assert sample_indices(100, 25.0, fps=10.0, max_frames=8) == fps_indices(100, 25.0, 10.0, 8)
    with pytest.raises(ValueError, match="exactly one"):
        sample_indices(100, 25.0)


def test_open_video_knows_the_frames_before_decoding(clips):
    video = open_video(clips["mkv_100x25"])
    assert (video.num_total, video.fps) == (100, 25.0)
    frames = video.decode([3, 50])
    assert frame_indices(frames) == [3, 50] and frames.timestamps == pytest.approx([3 / 25, 2.0])


def test_load_video_short_video_gives_every_frame(clips):
    video = load_video(clips["mp4_5x10"], num_frames=8)
    assert video.indices == [0, 1, 2, 3, 4] and frame_indices(video) == [0, 1, 2, 3, 4]


def test_load_video_under_decords_torch_bridge(clips):
    # The official code switches decord's global bridge to torch; get_batch then returns tensors.
    with decord.bridge.use_torch():
        video = load_video(clips["mp4_100x25"], num_frames=4)
    assert frame_indices(video) == [0, 25, 50, 75]


@pytest.mark.parametrize("kwargs", [{}, {"num_frames": 8, "fps": 1.0}])
def test_load_video_needs_exactly_one_of_num_frames_and_fps(clips, kwargs):
    with pytest.raises(ValueError, match="exactly one of num_frames and fps"):
        load_video(clips["mp4_100x25"], **kwargs)


# ---- errors ------------------------------------------------------------------------------------

def assert_media_error(path: Path, kind: str) -> MediaError:
    with pytest.raises(MediaError) as info:
        load_video(path, num_frames=4)
    assert info.value.kind == kind and str(path) in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    assert_media_error(tmp_path / "nope.mp4", "missing_file")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a video\n", bytes(range(256)) * 20])
def test_not_a_video(tmp_path, content):
    path = tmp_path / "x.mp4"
    path.write_bytes(content)
    assert_media_error(path, "bad_video")


def test_directory_is_a_bad_video(tmp_path):
    assert_media_error(tmp_path, "bad_video")


def test_video_stream_without_frames(tmp_path):
    assert_media_error(write_video(tmp_path / "zero.mp4", 0, 25), "empty_video")


def test_container_without_video_stream(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        samples = np.zeros((1, 2048), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    assert_media_error(path, "empty_video")


def test_truncated_mp4_is_a_bad_video(clips, tmp_path):
    # mp4 keeps its index (moov) at the end: half a file cannot be opened at all.
    assert_media_error(truncated(clips["mp4_100x25"], tmp_path / "half.mp4", 0.5), "bad_video")


@pytest.mark.parametrize("name", ["mkv_100x25", "avi_100x25"])
def test_truncated_stream_gives_the_frames_before_the_cut(clips, tmp_path, name):
    path = truncated(clips[name], tmp_path / f"half{clips[name].suffix}", 0.5)
    present = len(decord.VideoReader(str(path), num_threads=1))
    assert 10 < present < 90, "the cut should leave part of the video"
    video = load_video(path, num_frames=8)
    assert video.indices == uniform_indices(present, 8)
    assert frame_indices(video) == video.indices


class FakeReader:
    """Stands in for decord.VideoReader to reach failures no small file produces."""

    def __init__(self, frames: int = 10, fps: float = 25.0, batch_error: bool = False,
                 batch_frames: int | None = None):
        self.frames, self.fps = frames, fps
        self.batch_error, self.batch_frames = batch_error, batch_frames

    def __call__(self, *args, **kwargs) -> "FakeReader":
        return self

    def __len__(self) -> int:
        return self.frames

    def get_avg_fps(self) -> float:
        return self.fps

    def get_batch(self, indices):
        if self.batch_error:
            raise decord.DECORDError("[12:00:00] video_reader.cc:1: decode failed\nstack ...")
        return np.zeros((self.batch_frames or len(indices), 4, 4, 3), np.uint8)


@pytest.mark.parametrize("reader, kind, message", [
    (FakeReader(frames=0), "empty_video", "has no frames"),
    (FakeReader(fps=0.0), "bad_video", "frame rate 0.0"),
    (FakeReader(fps=float("nan")), "bad_video", "frame rate nan"),
    (FakeReader(batch_error=True), "bad_video", "cannot decode frames .* decode failed$"),
    (FakeReader(batch_frames=1), "bad_video", "decoded 1 frames .* wanted 4"),
])
def test_reader_failures_become_media_errors(clips, monkeypatch, reader, kind, message):
    monkeypatch.setattr(decord, "VideoReader", reader)
    with pytest.raises(MediaError, match=message) as info:
        load_video(clips["mp4_100x25"], num_frames=4)
    assert info.value.kind == kind


CORRUPT_PROBE = """
import json, sys
from aria.data.errors import MediaError
from aria.data.video import load_video
outcomes = {}
for path in sys.argv[1:]:
    try:
        outcomes[path] = len(load_video(path, num_frames=8).frames)
    except MediaError as err:
        outcomes[path] = err.kind
print(json.dumps(outcomes))
"""


def test_truncated_and_corrupt_files_never_crash_or_hang(clips, tmp_path):
    """Cuts at many points and overwritten bytes, decoded in a child process, so that a segfault
    or a hang fails this test instead of killing the run: each gives frames or a MediaError."""
    rng = random.Random(0)
    expected = {}  # path -> "frames", "bad_video", or None where either is fine
    for name in ("mp4_100x25", "mkv_100x25", "avi_100x25"):
        src = clips[name]
        for fraction in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            path = tmp_path / f"{name}_cut{int(fraction * 100)}{src.suffix}"
            truncated(src, path, fraction)
            # mp4 keeps its index at the end; mkv and avi keep the frames before the cut.
            if src.suffix == ".mp4":
                expected[path] = "bad_video" if fraction < 0.99 else None
            else:
                expected[path] = "frames" if fraction >= 0.5 else None
        for k in range(4):
            data = bytearray(src.read_bytes())
            for _ in range(5):
                offset = rng.randrange(len(data) - 64)
                data[offset:offset + 64] = rng.randbytes(64)
            path = tmp_path / f"{name}_noise{k}{src.suffix}"
            path.write_bytes(bytes(data))
            expected[path] = None
    result = subprocess.run([sys.executable, "-c", CORRUPT_PROBE, *map(str, expected)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = {Path(p).name: o for p, o in json.loads(result.stdout).items()}
    assert sorted(outcomes) == sorted(p.name for p in expected)
    for path, want in expected.items():
        got = outcomes[path.name]
        assert got in ("bad_video", "empty_video") or 1 <= got <= 8, (path.name, got)
        if want == "frames":
            assert isinstance(got, int), (path.name, got)
        elif want is not None:
            assert got == want, (path.name, got)
