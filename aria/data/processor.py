"""Samples -> model inputs: chat format, image/video processing, tokenization, supervision targets.

Letters: T tokens, N crops, S crop side.

Design decisions:
- The token stream is exactly what ``transformers``' ``AriaProcessor`` makes from the Aria chat
  template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, each image one
  ``<fim_prefix>`` + crops x Q ``<|img|>`` + ``<fim_suffix>`` block, Q from the projector table.
  Unlike ``AriaProcessor``, crops are counted per image (it gives every image the largest count of
  the call). We add a ``system`` role and videos: each sampled frame is an image block, optionally
  wrapped as ``[MM:SS]`` + block + ``\\n``.
- The whole rendered string is tokenized at once with character offsets; a token is supervised if
  it overlaps a supervised character span: assistant content plus its ``<|im_end|>\\n`` in a
  conversation, all text (and the appended end-of-text id) in a document. Media never are.
- ``targets`` are shifted here: ``targets[t]`` is the token after t if that one is supervised, else
  ``IGNORE_INDEX``; the last position never has a target, so packed samples cannot predict across
  their boundary.
- Crops are kept per media item in token order, each chunk of one size: image crops at
  ``image_size`` (980 by default) and video frames at ``video.image_size`` (490) may share a sample.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aria.data.errors import DataError
from aria.data.image import ImageProcessor, ProcessedImage, load_image
from aria.data.records import MediaRef, Part, Sample, Turn
from aria.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from aria.data.video import format_timestamp, load_video
from aria.model.loss import IGNORE_INDEX

# transformers' Aria chat template, character for character (the two line breaks are literal).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IM_START, IM_END = SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["im_end"]
FIM_PREFIX, FIM_SUFFIX, IMG = SPECIAL_TOKENS["fim_prefix"], SPECIAL_TOKENS["fim_suffix"], SPECIAL_TOKENS["image"]


@dataclass
class VideoOptions:
    num_frames: int = 8
    """Frames sampled uniformly when a video gives neither num_frames nor fps (official default)."""
    fps: float | None = None
    """Sample this many frames per second instead of uniformly (capped by max_frames)."""
    max_frames: int = 128
    """Cap on frames per video in fps mode."""
    image_size: int = 490
    """Crop size of video frames (490 px -> 128 tokens per frame for Aria)."""
    timestamps: bool = False
    """Write '[MM:SS]' before each frame and a line break after it."""


@dataclass
class EncodedSample:
    input_ids: torch.Tensor
    """(T,) int64."""
    targets: torch.Tensor
    """(T,) int64, already shifted; IGNORE_INDEX where nothing is supervised."""
    crops: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Per media item in token order: pixel_values (N, 3, S, S) float32 and pixel_mask (N, S, S)."""
    where: str = ""
    num_images: int = 0
    num_frames: int = 0

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_crops(self) -> int:
        return sum(c[0].shape[0] for c in self.crops)


class _Text:
    """A string built from pieces, remembering which character spans are supervised."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised and text:
            if self.spans and self.spans[-1][1] == self.length:  # merge with the previous span
                self.spans[-1] = (self.spans[-1][0], self.length + len(text))
            else:
                self.spans.append((self.length, self.length + len(text)))
        self.pieces.append(text)
        self.length += len(text)

    def __str__(self) -> str:
        return "".join(self.pieces)


class Processor:
    """Tokenizer + image processor + video sampling: ``encode(sample)`` for training,
    ``__call__(messages, images, videos)`` for inference."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_crop: dict[int, int], image_size: int = 980,
                 min_image_size: int = 336, split_image: bool = False,
                 video: VideoOptions | None = None) -> None:
        self.tokenizer = tokenizer
        self.tokens_per_crop = {int(k): int(v) for k, v in tokens_per_crop.items()}
        self.video = video or VideoOptions()
        for side, what in ((image_size, "image_size"), (self.video.image_size, "video.image_size")):
            if side not in self.tokens_per_crop:
                raise ValueError(f"data.{what}={side} has no entry in the model's crop table "
                                 f"{self.tokens_per_crop} (crop side in px -> image tokens)")
        self.images = ImageProcessor(max_image_size=image_size, min_image_size=min_image_size,
                                     split_image=split_image)
        self.frames = ImageProcessor(max_image_size=self.video.image_size, min_image_size=min_image_size)

    @classmethod
    def from_config(cls, data, model_cfg, tokenizer: Tokenizer | None = None) -> "Processor":
        """The processor a run's ``DataConfig`` describes, for ``model_cfg``'s crop table."""
        if tokenizer is None:
            if not data.tokenizer:
                raise ValueError("config field 'data.tokenizer' is empty: give a tokenizer directory")
            tokenizer = Tokenizer.load(data.tokenizer)
        v = data.video
        return cls.for_model(tokenizer, model_cfg, image_size=data.image_size,
                             min_image_size=data.min_image_size, split_image=data.split_image,
                             video=VideoOptions(v.num_frames, v.fps, v.max_frames, v.image_size, v.timestamps))

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, model_cfg, **kwargs) -> "Processor":
        """Crop table from the model config: crop side = sqrt(patches) * patch_size."""
        P = model_cfg.vision.patch_size
        table = {round(patches ** 0.5) * P: q for patches, q in model_cfg.projector.patch_to_query.items()}
        if tokenizer.image_id != model_cfg.image_token_id:
            raise ValueError(f"the tokenizer's <|img|> id is {tokenizer.image_id} but "
                             f"model.image_token_id is {model_cfg.image_token_id}")
        if tokenizer.vocab_size > model_cfg.text.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary (model.text.vocab_size) only {model_cfg.text.vocab_size}")
        return cls(tokenizer, table, **kwargs)

    # -- media --------------------------------------------------------------------------------

    def _image(self, ref: MediaRef) -> ProcessedImage:
        if ref.data is None:
            return self.images(load_image(ref.path))
        if isinstance(ref.data, (bytes, bytearray)):
            return self.images(load_image(io.BytesIO(ref.data), name=ref.name))
        return self.images(ref.data.convert("RGB"))

    def _video(self, ref: MediaRef) -> tuple[list[ProcessedImage], list[float]]:
        options = dict(num_frames=ref.num_frames, fps=ref.fps, max_frames=ref.max_frames or self.video.max_frames)
        if options["num_frames"] is None and options["fps"] is None:
            if self.video.fps is not None:
                options["fps"] = self.video.fps
            else:
                options["num_frames"] = self.video.num_frames
        if options["num_frames"] is not None:
            options["fps"] = None
        if isinstance(ref.data, list):  # already decoded frames (inference)
            frames, stamps = ref.data, [float(i) for i in range(len(ref.data))]
        elif isinstance(ref.data, (bytes, bytearray)):
            fd, tmp = tempfile.mkstemp(suffix=Path(ref.name).suffix or ".mp4")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(ref.data)
                video = load_video(tmp, **options)
            finally:
                os.unlink(tmp)
            frames, stamps = video.frames, video.timestamps
        else:
            video = load_video(ref.path, **options)
            frames, stamps = video.frames, video.timestamps
        return [self.frames(frame) for frame in frames], stamps

    # -- rendering ----------------------------------------------------------------------------

    def _render(self, sample: Sample, add_generation_prompt: bool = False
                ) -> tuple[_Text, EncodedSample, int]:
        """The sample's text with supervised spans, its crops (in ``out``) and its <|img|> count."""
        out = EncodedSample(torch.empty(0), torch.empty(0), where=sample.where)
        text = _Text()
        num_image_tokens = 0

        def block(crops: ProcessedImage, side: int) -> None:
            nonlocal num_image_tokens
            out.crops.append((crops.pixel_values, crops.pixel_mask))
            count = crops.num_crops * self.tokens_per_crop[side]
            text.add(FIM_PREFIX + IMG * count + FIM_SUFFIX)
            num_image_tokens += count

        for turn in sample.turns:
            supervised = turn.role is None or turn.role == "assistant"
            if turn.role is not None:
                text.add(f"{IM_START}{turn.role}\n")
            for part in turn.parts:
                if part.type == "text":
                    text.add(part.text, supervised)
                    continue
                ref = sample.media[part.media]
                if ref.kind == "image":
                    block(self._image(ref), self.images.max_image_size)
                    out.num_images += 1
                    continue
                frames, stamps = self._video(ref)
                for frame, stamp in zip(frames, stamps):
                    if self.video.timestamps:
                        text.add(format_timestamp(stamp))
                    block(frame, self.video.image_size)
                    if self.video.timestamps:
                        text.add("\n")
                out.num_frames += len(frames)
            if turn.role is not None:
                text.add(f"{IM_END}\n", supervised)
        if add_generation_prompt:
            text.add(f"{IM_START}assistant\n")
        return text, out, num_image_tokens

    def encode(self, sample: Sample) -> EncodedSample:
        """Tokens, shifted targets and crops of one sample; ``DataError`` on bad media."""
        try:
            return self._encode(sample)
        except DataError as err:
            raise err.at(sample.where) from None

    def _encode(self, sample: Sample) -> EncodedSample:
        text, out, num_image_tokens = self._render(sample)
        ids, supervised_mask = self._tokenize(text)
        if not sample.is_chat:  # a document ends with the end-of-text token, which is learned
            ids.append(self.tokenizer.eos_id)
            supervised_mask.append(True)
        input_ids = torch.tensor(ids, dtype=torch.long)
        found = int((input_ids == self.tokenizer.image_id).sum())
        if found != num_image_tokens:
            raise DataError(f"tokenizer produced {found} <|img|> tokens for {num_image_tokens} image "
                            "slots", "tokenizer_mismatch")
        labels = torch.where(torch.tensor(supervised_mask), input_ids, IGNORE_INDEX)
        if not bool((labels != IGNORE_INDEX).any()):
            raise DataError("no supervised token (empty assistant answer or document text)",
                            "no_supervised_tokens")
        out.input_ids = input_ids
        out.targets = torch.cat([labels[1:], torch.tensor([IGNORE_INDEX])])
        return out

    def _tokenize(self, text: _Text) -> tuple[list[int], list[bool]]:
        ids, offsets = self.tokenizer.encode_with_offsets(str(text))
        supervised = [False] * len(ids)
        if text.spans:
            span_i, spans = 0, text.spans
            for t, (start, end) in enumerate(offsets):
                while span_i < len(spans) and spans[span_i][1] <= start:
                    span_i += 1
                if span_i == len(spans):
                    break
                supervised[t] = end > spans[span_i][0] and start < spans[span_i][1]
        return list(ids), supervised

    # -- inference ----------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat-template text of HF-style messages (images as one placeholder block each)."""
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                body = content
            else:
                body = "".join(item["text"] if item["type"] == "text" else
                               FIM_PREFIX + IMG + FIM_SUFFIX if item["type"] == "image" else ""
                               for item in content)
            out.append(f"{IM_START}{message['role']}\n{body}{IM_END}\n")
        if add_generation_prompt:
            out.append(f"{IM_START}assistant\n")
        return "".join(out)

    def __call__(self, messages: list[dict], images: list[Any] | None = None,
                 videos: list[Any] | None = None, add_generation_prompt: bool = True) -> dict[str, Any]:
        """Model inputs (batch of one) for HF-style ``messages``; their image and video items take
        ``images`` / ``videos`` in order (PIL images or paths; videos as paths or PIL frame lists)."""
        pools = {"image": list(images or []), "video": list(videos or [])}
        media, turns = [], []
        for m, message in enumerate(messages):
            role = message.get("role")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{m}].role is {role!r}; expected system, user or assistant")
            items = message["content"]
            items = [{"type": "text", "text": items}] if isinstance(items, str) else items
            parts = []
            for item in items:
                if item["type"] == "text":
                    parts.append(Part("text", item["text"]))
                    continue
                if item["type"] not in pools or not pools[item["type"]]:
                    raise ValueError(f"messages[{m}] has more {item['type']} items than "
                                     f"{item['type']}s were given")
                source = pools[item["type"]].pop(0)
                ref = MediaRef(item["type"])
                if isinstance(source, (str, os.PathLike)):
                    ref.path = Path(source)
                else:
                    ref.data = source
                media.append(ref)
                parts.append(Part(item["type"], media=len(media) - 1))
            turns.append(Turn(role, parts))
        if pools["image"] or pools["video"]:
            raise ValueError(f"{len(pools['image'])} image(s) and {len(pools['video'])} video(s) are "
                             "left over: the messages have fewer media items")
        text, out, _ = self._render(Sample("chat", turns, media, "prompt"), add_generation_prompt)
        inputs: dict[str, Any] = {"input_ids": torch.tensor([self.tokenizer.encode(str(text))])}
        inputs.update(group_crops(out.crops, self.tokens_per_crop))
        return inputs


def group_crops(crops: list[tuple[torch.Tensor, torch.Tensor]], tokens_per_crop: dict[int, int]
                ) -> dict[str, Any]:
    """Batch crops (given in <|img|> order) for the model.

    One size: ``pixel_values`` (N, 3, S, S) and ``pixel_mask`` (N, S, S). Several sizes (e.g. 980 px
    images beside 490 px video frames): lists with one tensor per size, and
    ``image_feature_order``: for each <|img|> slot in order, its row in the concatenation of the
    per-size feature tensors, each flattened to (N_s * Q_s, D).
    """
    if not crops:
        return {"pixel_values": None, "pixel_mask": None, "image_feature_order": None}
    sides = sorted({pv.shape[-1] for pv, _ in crops})
    if len(sides) == 1:
        return {"pixel_values": torch.cat([pv for pv, _ in crops]),
                "pixel_mask": torch.cat([pm for _, pm in crops]), "image_feature_order": None}
    num_crops = {s: sum(pv.shape[0] for pv, _ in crops if pv.shape[-1] == s) for s in sides}
    first_row, row = {}, 0  # each size group's rows follow the previous groups' rows
    for s in sides:
        first_row[s] = row
        row += num_crops[s] * tokens_per_crop[s]
    seen = dict.fromkeys(sides, 0)
    order = []
    for pv, _ in crops:
        s, n = pv.shape[-1], pv.shape[0]
        start = first_row[s] + seen[s] * tokens_per_crop[s]
        order.append(torch.arange(start, start + n * tokens_per_crop[s]))
        seen[s] += n
    return {"pixel_values": [torch.cat([pv for pv, _ in crops if pv.shape[-1] == s]) for s in sides],
            "pixel_mask": [torch.cat([pm for pv, pm in crops if pv.shape[-1] == s]) for s in sides],
            "image_feature_order": torch.cat(order)}
