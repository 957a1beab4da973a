"""The synthetic "shapes world": images and videos of coloured shapes, with questions, captions and text.

Run ``python -m data_tools.make_shapes --out DIR --seed S`` (see ``--help``). It writes, relative to DIR::

    images/{split}_{i:06d}.png      RGB scenes of 1-3 shapes on a 3x3 grid
    videos/{split}_{i:06d}.mp4      one shape moving left/right/up/down (mpeg4, yuv420p)
    chat_{split}.jsonl              single-turn questions with a one-word/phrase answer
    dialog_{split}.jsonl            the same questions, one multi-turn conversation per image or video
    dialog_every_{split}.jsonl      every question an image answers in one conversation; videos as dialog
    dialog_once_{split}.jsonl       the same, each object asked about once: no answer follows from the turns before
    dialog_type_{split}.jsonl       dialog_every's questions, one dialog per question type; videos as dialog
    caption_{split}.jsonl           {"kind": "caption"} / {"kind": "video"} documents
    image_caption_{split}.jsonl     the image ("kind": "caption") half of caption_{split}.jsonl
                                    (train: also the ``--caption-images`` that have no questions)
    text_{split}.jsonl              {"kind": "text"} scene descriptions in words only
    meta.json                       seed, sizes, counts, answer vocabularies, question templates
    wds/{kind}_{split}-{n:06d}.tar  the same four datasets as webdataset shards (media inside)

Design decisions:

- **Plan, then render.** Scenes and questions are planned in the main process from numpy generators
  seeded by ``(seed, split, stream, index)``; rendering and encoding are pure functions of a scene,
  so a worker pool changes speed, never output. Item ``i`` does not depend on how many items follow,
  and train and test draw from disjoint seed streams; test also re-draws any scene equal to a train
  scene, so the splits share no scene.
- **Balanced answers, identical templates.** Each question type draws its answers from a shuffled
  round-robin over its vocabulary (counts differ by at most one), and the scene is sampled around
  those answers: the subject object of each question gets the target attribute, everything else is
  drawn at random. The asked-about attributes (shape in a colour question, place in a shape
  question, colour and shape in a position question) are independent of the answer, so a model
  that reads only the text scores chance.
- **Only unique answers.** Colours within a scene are distinct and there is one shape per grid cell,
  so "the <colour> <shape>" and "at the <place>" always name one object; a colour question names a
  shape that occurs once in the scene.
- **Dialogs for training.** ``dialog_{split}.jsonl`` asks an image's four questions in one
  conversation (in a random order): the same answers to learn as ``chat``, for a quarter of the
  image encodings. Evaluation stays single-turn (``chat_test.jsonl``). ``dialog_every_{split}.jsonl``
  asks each image every question it answers (the colour of each shape that occurs once, the shape
  in each occupied cell, the place of each shape, the count; 4-10 questions): every object's
  attributes are bound to each other in the answers, not one object's per question type. But
  there an answer often follows from the turns before it ("What shape is at the top? star", then
  "Where is the red star?"), so a model learns part of its answers from the dialog's text, which a
  single-turn question never has. ``dialog_once_{split}.jsonl`` keeps of dialog_every's questions,
  in its order, the first about each object and the count: no object is named twice, so every
  answer but the count's needs the image (the count may follow from the objects asked about).
  ``dialog_type_{split}.jsonl`` keeps every question and asks it first of its kind: each image's
  dialog_every questions as one dialog per question type (the count; the shape in each cell; the
  colour of each shape; the place of each shape), each in dialog_every's order, the image in each.
  No answer follows from another type's turns (a shape question's answer and a colour question's
  place are what leak), and each type is learnt as the single-turn test asks it: nothing before it
  in the dialog. An image is encoded four times as often as in dialog_every (a run that keeps image
  tokens pays for it once: ``stage.image_token_cache_gb``); each video's dialog comes once. In rows
  of these shorter samples videos then hold a smaller share of the questions: the quickstart makes
  twice the videos (``--train-videos 1200``), which keeps their share and gives them twice the
  variety (a run answers its training videos' directions all right and the test's at 89-97%; the
  effect of the variety is within that spread so far: docs/quickstart_findings.md).
- **Visible at low resolution.** At 490 px a grid cell is ~163 px and shapes span 68-90% of it,
  i.e. about 2x2 of the model's 70 px patches; the palette is spread in hue and far from the light
  backgrounds.
- **Images for captions only.** ``--caption-images N`` renders N further training images after the
  questioned ones (``images/train_{i:06d}.png`` for i >= ``--train-images``, the next items of the
  same plan, so the questioned images are those of a world without them) and adds their captions
  to ``caption_train.jsonl`` and ``image_caption_train.jsonl``, not their questions or text: a
  vision encoder's pretraining (stage 0) reads more images than the dialogs after it, as real VLMs
  do, and the tokenizer's text stays that of the questioned images. The test split excludes their
  scenes too.
- **Video frames at a crop's size.** Videos are 490 px (``--video-size``), the processor's crop,
  so a training worker decodes them and resizes nothing: at 160 px, PIL's bicubic upscale of the
  8 frames was over half of a video's loading time (76 -> 32 ms per record).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {  # far apart in hue; every colour has a channel < 150, the backgrounds none below 232
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 25),
    "purple": (145, 55, 200),
    "orange": (245, 130, 15),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
MAX_SHAPES = 3
SPLITS = ("train", "test")

TEMPLATES = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is {at_position}?",
    "count": "How many shapes are there?",
    "position": "Where is the {colour} {shape}?",
    "direction": "Which way does the {colour} {shape} move?",
}
IMAGE_QTYPES = ("colour", "shape", "count", "position")
ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, MAX_SHAPES + 1)),
    "position": POSITIONS,
    "direction": DIRECTIONS,
}

# Geometry, as fractions of a grid cell (images) or of the frame (videos).
RADIUS_RANGE = (0.34, 0.45)  # half the shape's bounding box, per grid cell
CELL_MARGIN = 0.04  # keeps shapes in neighbouring cells apart
VIDEO_RADIUS_RANGE = (0.10, 0.14)
VIDEO_TRAVEL_RANGE = (0.40, 0.55)  # distance moved from the first frame to the last
BACKGROUND_RANGE = (232, 255)  # each channel of the light background
_STREAMS = ("image_scene", "video_scene") + tuple(f"{q}_answers" for q in TEMPLATES) + ("dialog_order", "every_order")


@dataclass(frozen=True)
class Shape:
    """One shape in an image: what it is, its grid cell, and its pixel geometry."""

    shape: str
    colour: str
    position: str
    cx: int
    cy: int
    r: int  # half the side of the bounding box


@dataclass(frozen=True)
class Scene:
    """An image: a light background and 1-3 shapes in grid reading order."""

    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class VideoScene:
    """A video: one shape moving in a straight line; ``path`` holds its centre in each frame."""

    background: tuple[int, int, int]
    shape: str
    colour: str
    direction: str
    r: int
    path: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Question:
    """One single-turn question: its type (a key of TEMPLATES), its words, and the exact answer."""

    qtype: str
    text: str
    answer: str


# ---------------------------------------------------------------------------------------------
# Sampling (pure: a numpy Generator in, a scene out)


def _rng(seed: int, split: str, stream: str, index: int | None = None) -> np.random.Generator:
    key = (SPLITS.index(split), _STREAMS.index(stream)) + (() if index is None else (index,))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def balanced_answers(rng: np.random.Generator, vocab: tuple[str, ...], n: int) -> list[str]:
    """``n`` answers as consecutive shuffled copies of ``vocab``: every value occurs n/len +- 1 times."""
    out: list[str] = []
    while len(out) < n:
        out.extend(vocab[j] for j in rng.permutation(len(vocab)))
    return out[:n]


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    lo, hi = BACKGROUND_RANGE
    return tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))


def _others(rng: np.random.Generator, vocab: tuple[str, ...], fixed: str, n: int) -> list[str]:
    """``n`` distinct values of ``vocab`` other than ``fixed``, in random order."""
    rest = [v for v in vocab if v != fixed]
    return [rest[j] for j in rng.permutation(len(rest))[:n]]


def sample_image_scene(rng: np.random.Generator, image_size: int, count: int, colour: str, shape: str,
                       position: str) -> tuple[Scene, list[Question]]:
    """A scene with ``count`` shapes and one question of each image type with the given answers.

    The colour question's answer is ``colour``, the shape question's ``shape``, the position
    question's ``position``; each question picks its subject object at random, and the subjects may
    coincide. Everything not fixed by an answer is uniform.
    """
    n = count
    colour_subj, shape_subj, position_subj = (int(v) for v in rng.integers(n, size=3))
    positions = _others(rng, POSITIONS, position, n - 1)
    positions.insert(position_subj, position)
    colours = _others(rng, tuple(COLOURS), colour, n - 1)
    colours.insert(colour_subj, colour)
    while True:  # the colour question's shape must be unique in the scene
        shapes = [SHAPES[j] for j in rng.integers(len(SHAPES), size=n)]
        shapes[shape_subj] = shape
        if shapes.count(shapes[colour_subj]) == 1:
            break

    cell = image_size / 3
    margin = max(1, round(CELL_MARGIN * cell))
    objects = []
    for s, c, p in zip(shapes, colours, positions):
        row, col = divmod(POSITIONS.index(p), 3)
        r = round(rng.uniform(*RADIUS_RANGE) * cell)
        lo_x, lo_y = math.ceil(col * cell) + margin + r, math.ceil(row * cell) + margin + r
        hi_x, hi_y = math.floor((col + 1) * cell) - margin - r, math.floor((row + 1) * cell) - margin - r
        cx, cy = (int(v) for v in rng.integers((lo_x, lo_y), (hi_x + 1, hi_y + 1)))
        objects.append(Shape(s, c, p, cx, cy, r))

    questions = [
        Question("colour", TEMPLATES["colour"].format(shape=shapes[colour_subj]), colour),
        Question("shape", TEMPLATES["shape"].format(at_position=at(positions[shape_subj])), shape),
        Question("count", TEMPLATES["count"], str(n)),
        Question("position", TEMPLATES["position"].format(colour=colours[position_subj],
                                                          shape=shapes[position_subj]), position),
    ]
    scene = Scene(_background(rng), tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))
    return scene, questions


def sample_video_scene(rng: np.random.Generator, video_size: int, num_frames: int,
                       direction: str) -> tuple[VideoScene, Question]:
    """One shape of random kind and colour crossing ~half the frame towards ``direction``."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    r = round(rng.uniform(*VIDEO_RADIUS_RANGE) * video_size)
    travel = round(rng.uniform(*VIDEO_TRAVEL_RANGE) * video_size)
    lo, hi = 1 + r, video_size - 2 - r  # inclusive range of centres that keep the shape in frame
    sign = 1 if direction in ("right", "down") else -1
    start = int(rng.integers(lo, hi - travel + 1)) + (0 if sign > 0 else travel)
    across = int(rng.integers(lo, hi + 1))
    along = [start + sign * round(travel * t / (num_frames - 1)) for t in range(num_frames)]
    path = tuple((a, across) if direction in ("left", "right") else (across, a) for a in along)
    scene = VideoScene(_background(rng), shape, colour, direction, r, path)
    return scene, Question("direction", TEMPLATES["direction"].format(colour=colour, shape=shape), direction)


def every_question(scene: Scene) -> list[tuple[int | None, Question]]:
    """Every question ``scene`` answers, each with the index of the shape it asks about (None for
    the count): the colour of each shape that occurs once in it, the shape in each occupied cell,
    the count, and the place of each shape."""
    kinds = [o.shape for o in scene.shapes]
    shapes = list(enumerate(scene.shapes))
    return ([(k, Question("colour", TEMPLATES["colour"].format(shape=o.shape), o.colour))
             for k, o in shapes if kinds.count(o.shape) == 1]
            + [(k, Question("shape", TEMPLATES["shape"].format(at_position=at(o.position)), o.shape))
               for k, o in shapes]
            + [(None, Question("count", TEMPLATES["count"], str(len(scene.shapes))))]
            + [(k, Question("position", TEMPLATES["position"].format(colour=o.colour, shape=o.shape), o.position))
               for k, o in shapes])


def once_each(quiz: list[tuple[int | None, Question]]) -> list[Question]:
    """The questions of ``quiz`` (``every_question``'s pairs, in a dialog's order) that ask about a
    shape no earlier one asked about, and the count."""
    asked: set[int | None] = set()
    kept = []
    for subject, question in quiz:
        if subject is None or subject not in asked:
            kept.append(question)
            asked.add(subject)
    return kept


def by_type(quiz: list[tuple[int | None, Question]]) -> list[list[Question]]:
    """The questions of ``quiz`` (``every_question``'s pairs, in a dialog's order) grouped by type,
    the types in the order they first come, each group in ``quiz``'s order."""
    groups: dict[str, list[Question]] = {}
    for _, question in quiz:
        groups.setdefault(question.qtype, []).append(question)
    return list(groups.values())


def plan_images(seed: int, split: str, n: int, image_size: int,
                exclude: frozenset[Scene] = frozenset()) -> list[tuple[Scene, list[Question]]]:
    """The first ``n`` image scenes of a split, each with its four questions; never a scene in ``exclude``."""
    targets = {q: balanced_answers(_rng(seed, split, f"{q}_answers"), ANSWERS[q], n) for q in IMAGE_QTYPES}
    plan = []
    for i in range(n):
        rng = _rng(seed, split, "image_scene", i)
        while True:
            scene, questions = sample_image_scene(rng, image_size, int(targets["count"][i]), targets["colour"][i],
                                                  targets["shape"][i], targets["position"][i])
            if scene not in exclude:
                break
        plan.append((scene, questions))
    return plan


def plans_of(data: str | Path, train_images: int | None = None, test_images: int | None = None
             ) -> tuple[list[tuple[Scene, list[Question]]], list[tuple[Scene, list[Question]]]]:
    """The train and test image plans a ``make_shapes`` directory was rendered from (the first
    ``train_images`` / ``test_images`` of each; default all), from its ``meta.json``."""
    data = Path(data)
    meta_path = data / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: expected a data_tools.make_shapes directory")
    meta = json.loads(meta_path.read_text())
    counts = {split: meta["counts"][split]["images"] for split in SPLITS}
    rendered = counts["train"] + meta["counts"]["train"].get("caption_images", 0)
    for split, wanted in (("train", train_images), ("test", test_images)):
        if wanted is not None:
            if not 1 <= wanted <= counts[split]:
                raise ValueError(f"--{split}-images {wanted}: {data} has {counts[split]} {split} images")
            counts[split] = wanted
    # the test plan excludes every scene of the full train split (caption-only images too), as make_shapes drew it
    plan_train = plan_images(meta["seed"], "train", rendered, meta["image_size"])
    plan_test = plan_images(meta["seed"], "test", counts["test"], meta["image_size"],
                            exclude=frozenset(scene for scene, _ in plan_train))
    return plan_train[: counts["train"]], plan_test


def plan_videos(seed: int, split: str, n: int, video_size: int, num_frames: int,
                exclude: frozenset[VideoScene] = frozenset()) -> list[tuple[VideoScene, Question]]:
    """The first ``n`` video scenes of a split with their direction question; never one in ``exclude``."""
    directions = balanced_answers(_rng(seed, split, "direction_answers"), DIRECTIONS, n)
    plan = []
    for i in range(n):
        rng = _rng(seed, split, "video_scene", i)
        while True:
            scene, question = sample_video_scene(rng, video_size, num_frames, directions[i])
            if scene not in exclude:
                break
        plan.append((scene, question))
    return plan


# ---------------------------------------------------------------------------------------------
# Words


def at(position: str) -> str:
    """The position with its preposition: "at the top left", "on the left", "in the center"."""
    special = {"left": "on the left", "right": "on the right", "center": "in the center"}
    return special.get(position, f"at the {position}")


def _a(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def caption(scene: Scene | VideoScene) -> str:
    """One deterministic sentence: "A red circle at the top left and a blue square in the center." """
    if isinstance(scene, VideoScene):
        return f"{_a(scene.colour, scene.shape).capitalize()} moves {scene.direction}."
    parts = [f"{_a(o.colour, o.shape)} {at(o.position)}" for o in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def position_of(x: float, y: float, size: int) -> str:
    """The grid cell holding pixel (x, y) of a ``size`` x ``size`` picture."""
    col, row = (min(2, int(3 * v / size)) for v in (x, y))
    return POSITIONS[3 * row + col]


def describe(scene: Scene | VideoScene, size: int) -> str:
    """A short paragraph of facts about a scene, for text-only pretraining."""
    if isinstance(scene, VideoScene):
        start, end = position_of(*scene.path[0], size), position_of(*scene.path[-1], size)
        return (f"{caption(scene)} The {scene.colour} {scene.shape} goes {scene.direction} "
                f"from the {start} to the {end}.")
    n = len(scene.shapes)
    facts = [caption(scene), "There is one shape." if n == 1 else f"There are {n} shapes."]
    facts += [f"The {o.colour} {o.shape} is {at(o.position)}." for o in scene.shapes]
    return " ".join(facts)


# ---------------------------------------------------------------------------------------------
# Rendering (pure: a scene in, pixels out)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape in the box of half-side ``r`` around (cx, cy); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":  # a little inside the box, so its area is close to the circle's
        h = 0.88 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad, ang = (r if k % 2 == 0 else 0.5 * r), math.pi * (k / 5 - 0.5)
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    rgb = COLOURS[colour]
    outline = _outline(shape, cx, cy, r)
    if outline is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        draw.polygon(outline, fill=rgb)


def render_image(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.shapes:
        draw_shape(draw, o.shape, o.colour, o.cx, o.cy, o.r)
    return image


def render_video(scene: VideoScene, video_size: int) -> np.ndarray:
    """The frames as uint8 (F, H, W, 3)."""
    frames = []
    for cx, cy in scene.path:
        image = Image.new("RGB", (video_size, video_size), scene.background)
        draw_shape(ImageDraw.Draw(image), scene.shape, scene.colour, cx, cy, scene.r)
        frames.append(np.asarray(image))
    return np.stack(frames)


def write_mp4(frames_FHW3: np.ndarray, path: str | Path, fps: int) -> None:
    """Encode frames with mpeg4/yuv420p in one thread (keeps the bytes reproducible)."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames_FHW3.shape[2], frames_FHW3.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.bit_rate = 1_000_000  # high for these sizes: keeps the colours of small shapes clean
        stream.codec_context.thread_count = 1
        for t, rgb in enumerate(frames_FHW3):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_image_file(job: tuple[Scene, int, str]) -> None:
    scene, image_size, path = job
    # zlib level 3: PNG encoding is most of the generation time, and level 6 is 2x slower for 2x smaller files.
    render_image(scene, image_size).save(path, format="PNG", compress_level=3)


def _write_video_file(job: tuple[VideoScene, int, int, str]) -> None:
    scene, video_size, fps, path = job
    write_mp4(render_video(scene, video_size), path, fps)


# ---------------------------------------------------------------------------------------------
# Records and the whole dataset


def _turns(media: str, *questions: Question) -> list[dict]:
    """User/assistant turns asking ``questions`` in order; the media item opens the first question."""
    turns = []
    for k, q in enumerate(questions):
        media_item = [{"type": media}] if k == 0 else []
        turns += [{"role": "user", "content": media_item + [{"type": "text", "text": q.text}]},
                  {"role": "assistant", "content": [{"type": "text", "text": q.answer}]}]
    return turns


def _dump(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _check_args(counts: dict[str, int], image_size: int, video_size: int, video_frames: int, video_fps: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 px so shapes stay visible, got {image_size}")
    if video_size < 32 or video_size % 2:
        raise ValueError(f"video_size must be even (yuv420p) and >= 32 px, got {video_size}")
    if video_frames < 2:
        raise ValueError(f"video_frames must be >= 2 to show motion, got {video_frames}")
    if video_fps < 1:
        raise ValueError(f"video_fps must be >= 1, got {video_fps}")


def make_shapes(out_dir: str | Path, seed: int, train_images: int = 2000, test_images: int = 200,
                train_videos: int = 600, test_videos: int = 100, image_size: int = 490, video_size: int = 490,
                video_frames: int = 8, video_fps: int = 8, workers: int | None = None,
                wds: bool = True, samples_per_shard: int = 500, caption_images: int = 0) -> dict:
    """Write the dataset to ``out_dir`` and return its meta dict (also written as ``meta.json``).

    ``caption_images`` further training images have a caption and no questions (see the module's
    docstring).

    ``workers`` processes render the media (default: all CPUs, at most 8); the output is the same
    for any number.
    """
    counts = {"train_images": train_images, "test_images": test_images,
              "train_videos": train_videos, "test_videos": test_videos, "caption_images": caption_images}
    _check_args(counts, image_size, video_size, video_frames, video_fps)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)

    captioned = plan_images(seed, "train", train_images + caption_images, image_size)
    image_plans = {"train": captioned[:train_images]}
    image_plans["test"] = plan_images(seed, "test", test_images, image_size,
                                      exclude=frozenset(s for s, _ in captioned))
    video_plans = {"train": plan_videos(seed, "train", train_videos, video_size, video_frames)}
    video_plans["test"] = plan_videos(seed, "test", test_videos, video_size, video_frames,
                                      exclude=frozenset(s for s, _ in video_plans["train"]))

    image_jobs, video_jobs = [], []
    meta_counts = {}
    for split in SPLITS:
        chat, dialogs, every, once, typed, captions, texts, asked = [], [], [], [], [], [], [], Counter()
        for i, (scene, questions) in enumerate(image_plans[split]):
            name = f"{split}_{i:06d}"
            rel = f"images/{name}.png"
            image_jobs.append((scene, image_size, str(out / rel)))
            chat += [{"id": f"{name}_{q.qtype}", "qtype": q.qtype, "messages": _turns("image", q), "images": [rel]}
                     for q in questions]
            order = _rng(seed, split, "dialog_order", i).permutation(len(questions))
            dialogs.append({"id": f"{name}_dialog", "messages": _turns("image", *(questions[j] for j in order)),
                            "images": [rel]})
            quiz = every_question(scene)
            quiz = [quiz[j] for j in _rng(seed, split, "every_order", i).permutation(len(quiz))]
            every.append({"id": f"{name}_every", "messages": _turns("image", *(q for _, q in quiz)),
                          "images": [rel]})
            once.append({"id": f"{name}_once", "messages": _turns("image", *once_each(quiz)), "images": [rel]})
            typed += [{"id": f"{name}_{group[0].qtype}", "messages": _turns("image", *group), "images": [rel]}
                      for group in by_type(quiz)]
            asked.update((q.qtype, q.answer) for q in questions)
            captions.append({"id": name, "kind": "caption", "images": [rel], "text": caption(scene)})
            texts.append({"id": name, "kind": "text", "text": describe(scene, image_size)})
        for i, (scene, _) in enumerate(captioned[train_images:] if split == "train" else [], start=train_images):
            name = f"{split}_{i:06d}"
            rel = f"images/{name}.png"
            image_jobs.append((scene, image_size, str(out / rel)))
            captions.append({"id": name, "kind": "caption", "images": [rel], "text": caption(scene)})
        for i, (scene, q) in enumerate(video_plans[split]):
            name = f"{split}_{i:06d}"
            video = {"path": f"videos/{name}.mp4", "num_frames": video_frames}
            video_jobs.append((scene, video_size, video_fps, str(out / video["path"])))
            asked[q.qtype, q.answer] += 1
            chat.append({"id": f"video_{name}_{q.qtype}", "qtype": q.qtype, "messages": _turns("video", q),
                         "video": video})
            dialogs.append({"id": f"video_{name}_dialog", "messages": _turns("video", q), "video": video})
            every.append(dialogs[-1])
            once.append(dialogs[-1])
            typed.append(dialogs[-1])
            captions.append({"id": f"video_{name}", "kind": "video", "video": video, "text": caption(scene)})
            texts.append({"id": f"video_{name}", "kind": "text", "text": describe(scene, video_size)})
        _dump(chat, out / f"chat_{split}.jsonl")
        _dump(dialogs, out / f"dialog_{split}.jsonl")
        _dump(every, out / f"dialog_every_{split}.jsonl")
        _dump(once, out / f"dialog_once_{split}.jsonl")
        _dump(typed, out / f"dialog_type_{split}.jsonl")
        _dump(captions, out / f"caption_{split}.jsonl")
        _dump([c for c in captions if c["kind"] == "caption"], out / f"image_caption_{split}.jsonl")
        _dump(texts, out / f"text_{split}.jsonl")
        answers = {q: {a: asked[q, a] for a in vocab} for q, vocab in ANSWERS.items()}
        meta_counts[split] = {"images": len(image_plans[split]), "videos": len(video_plans[split]),
                              "caption_images": caption_images if split == "train" else 0,
                              "chat": len(chat), "dialog": len(dialogs),
                              "dialog_every": len(every), "dialog_once": len(once), "dialog_type": len(typed),
                              "caption": len(captions), "text": len(texts),
                              "qtype": {q: sum(per.values()) for q, per in answers.items()}, "answers": answers}

    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers > 1 and len(image_jobs) + len(video_jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_video_file, video_jobs, chunksize=8))
            list(pool.map(_write_image_file, image_jobs, chunksize=16))
    else:
        for job in video_jobs:
            _write_video_file(job)
        for job in image_jobs:
            _write_image_file(job)

    meta = {
        "seed": seed,
        "image_size": image_size,
        "video_size": video_size,
        "video_frames": video_frames,
        "video_fps": video_fps,
        "shapes": list(SHAPES),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "positions": list(POSITIONS),
        "templates": TEMPLATES,
        "answers": {q: list(v) for q, v in ANSWERS.items()},
        "counts": meta_counts,
    }
    if wds:
        from data_tools.jsonl_to_wds import convert

        for kind in ("chat", "dialog", "caption", "text"):
            for split in SPLITS:
                for old in (out / "wds").glob(f"{kind}_{split}-*.tar"):
                    old.unlink()
                convert(out / f"{kind}_{split}.jsonl", out / "wds", f"{kind}_{split}",
                        samples_per_shard=samples_per_shard, strict=True, log=lambda _: None)
    with open(out / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.make_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=200)
    p.add_argument("--caption-images", type=int, default=0,
                   help="further training images with a caption and no questions (stage 0's captions)")
    p.add_argument("--train-videos", type=int, default=600)
    p.add_argument("--test-videos", type=int, default=100)
    p.add_argument("--image-size", type=int, default=490, help="image side in pixels")
    p.add_argument("--video-size", type=int, default=490,
                   help="video side in pixels (even); 490, a crop's size, needs no resize when read")
    p.add_argument("--video-frames", type=int, default=8)
    p.add_argument("--video-fps", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs, at most 8)")
    p.add_argument("--no-wds", action="store_true", help="skip the webdataset copies")
    p.add_argument("--samples-per-shard", type=int, default=500)
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        meta = make_shapes(a.out, a.seed, a.train_images, a.test_images, a.train_videos, a.test_videos,
                           a.image_size, a.video_size, a.video_frames, a.video_fps, a.workers,
                           wds=not a.no_wds, samples_per_shard=a.samples_per_shard, caption_images=a.caption_images)
    except ValueError as e:
        p.error(str(e))
    c = meta["counts"]
    print(f"wrote {a.out} in {time.perf_counter() - start:.1f} s: "
          + "; ".join(f"{s}: {c[s]['images']} images, {c[s]['videos']} videos, {c[s]['chat']} questions"
                      + (f", {c[s]['caption_images']} images with a caption only" if c[s]["caption_images"] else "")
                      for s in SPLITS))


if __name__ == "__main__":
    main()
