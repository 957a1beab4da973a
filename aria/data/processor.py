"""Samples -> model inputs: chat format, image/video processing, tokenization, supervision targets.

Letters: T tokens, N crops, S crop side.

Design decisions:
- The token stream is exactly what ``transformers``' ``AriaProcessor`` makes from the Aria chat
  template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, each image one
  ``<fim_prefix>`` + crops x Q ``<|img|>`` + ``<fim_suffix>`` block, Q from the projector table.
  Unlike ``AriaProcessor``, crops are counted per image (it gives every image the largest count of
  the call). We add a ``system`` role and videos: each sampled frame is an image block, optionally
  wrapped as ``[MM:SS]`` + block + ``\\n``. ``_render`` is the one implementation of this layout,
  for training (``encode``) and inference (``__call__`` / ``prompt_inputs``) alike.
- Media are *planned* before they are decoded: an image's crop count comes from its header size
  (``image_size`` -> ``ImageProcessor.num_crops``), a video's frames from its container index
  (``open_video`` -> ``sample_indices``). So the whole text is rendered and tokenized first and every
  cheap check (special tokens in text, too long for the row, nothing supervised) runs before any
  pixel is decoded.
- The whole rendered string is tokenized at once with character offsets; a token is supervised if
  it overlaps a supervised character span: assistant content plus its ``<|im_end|>\\n`` in a
  conversation, all text (and the appended end-of-text id) in a document. Media never are.
- ``targets`` are shifted here: ``targets[t]`` is the token after t if that one is supervised, else
  ``IGNORE_INDEX``; the last position never has a target, so packed samples cannot predict across
  their boundary.
- Crops are kept per media item in token order, each chunk of one size: image crops at
  ``image_size`` (980 by default) and video frames at ``video.image_size`` (490) may share a sample.
- With an image-token cache (``cached_media``, a training run's ``stage.image_token_cache_gb``),
  a media item read from a file whose every block the cache holds (an image's path; a video's path
  and frame index per frame) is planned but not decoded: the sample keeps its <|img|> slots and
  names the blocks (``EncodedSample.image_blocks``); the model fills them from the cache.
  Inference (``__call__``) always decodes. A kept item's header (an image's size, a video's frame
  count and rate) is remembered too, so that it is planned without opening its file (those opens
  were a third of the quickstart's loader time); only kept items' headers are, so they take no more
  entries than the cache.
- Text holding any special token string of the loaded tokenizer (``</s>``, ``<pad>``, Aria's
  markers, ...) is refused (``special_token_in_text``): tokenized, it would become a control id.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container

import torch

from aria.config import IGNORE_INDEX, VideoConfig
from aria.data.errors import DataError, MediaError
from aria.data.image import ImageProcessor, ProcessedImage, image_size, load_image
from aria.data.records import MediaRef, Part, Sample, Turn
from aria.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from aria.data.video import format_timestamp, open_video, sample_indices

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
class EncodedSample:
    input_ids: torch.Tensor
    """(T,) int64."""
    targets: torch.Tensor
    """(T,) int64, already shifted; IGNORE_INDEX where nothing is supervised."""
    crops: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Per media item in token order: pixel_values (N, 3, S, S), float32 (normalised) or uint8 (raw,
    ``raw_pixels``), and pixel_mask (N, S, S)."""
    where: str = ""
    num_images: int = 0
    num_frames: int = 0
    document: bool = False
    """A document (any cut of it is still a document, so a text-only one may be split across rows);
    False for a conversation, which is never split."""
    image_blocks: list[tuple[str | None, int, bool]] | None = None
    """With an image-token cache (``Processor.cached_media``): each media block in token order as
    (key, <|img|> slots, cached); a cached block has no entry in ``crops``. None without one."""

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_crops(self) -> int:
        return sum(c[0].shape[0] for c in self.crops)


def too_long(num_tokens: int, num_crops: int, seq_len: int) -> DataError:
    """The error for a sample that cannot fit a packed row."""
    return DataError(f"sample of {num_tokens} tokens ({num_crops} image crops) is longer than the row "
                     f"(seq_len={seq_len}); image blocks and conversations are never cut", "too_long")


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


@dataclass
class _Planned:
    """A media item whose image blocks are known but whose pixels are not decoded yet."""

    side: int
    """Crop side (picks the tokens per crop)."""
    blocks: list[int]
    """Crops of each image block: one block per image, one per video frame."""
    stamps: list[float] | None
    """Seconds of each video frame (None for an image)."""
    decode: Callable[[], list[ProcessedImage]]
    """The blocks' crops, one ``ProcessedImage`` per block."""
    keys: list[str] | None = None
    """Each block's key in an image-token cache: media read from a file (None otherwise)."""


def tokenizer_mismatch(tokenizer: Tokenizer, model_cfg) -> str | None:
    """Why ``tokenizer`` cannot feed the model of ``model_cfg`` (a phrase after "the tokenizer ..."),
    or None when it fits: the same ``<|img|>`` id, and no id beyond the embedding table."""
    if tokenizer.image_id != model_cfg.image_token_id:
        return (f"has <|img|> = id {tokenizer.image_id}, but the model's image_token_id is "
                f"{model_cfg.image_token_id}")
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        return (f"has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                f"(text.vocab_size) of {model_cfg.text.vocab_size}")
    return None


class Processor:
    """Tokenizer + image processor + video sampling: ``encode(sample)`` for training,
    ``__call__(messages, images, videos)`` for inference."""

    cached_media: Container[str] | None = None
    """An image-token cache (``aria.model.aria.ImageTokenCache``, set by the trainer with
    ``stage.image_token_cache_gb``): ``encode`` leaves out the pixels of media whose every block it
    holds, and gives each sample its ``image_blocks``."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_crop: dict[int, int], image_size: int = 980,
                 min_image_size: int = 336, split_image: bool = False,
                 video: VideoConfig | None = None, raw_pixels: bool = False) -> None:
        """``raw_pixels``: crops as uint8 (the model normalises them on the device); the training
        and evaluation loaders use it, inference callers get HF-style normalised floats."""
        self.tokenizer = tokenizer
        self.tokens_per_crop = {int(k): int(v) for k, v in tokens_per_crop.items()}
        self.video = video or VideoConfig()
        for side, what in ((image_size, "image_size"), (self.video.image_size, "video.image_size")):
            if side not in self.tokens_per_crop:
                raise ValueError(f"data.{what}={side} has no entry in the model's crop table "
                                 f"{self.tokens_per_crop} (crop side in px -> image tokens)")
        self.images = ImageProcessor(max_image_size=image_size, min_image_size=min_image_size,
                                     split_image=split_image, raw_pixels=raw_pixels)
        self.frames = ImageProcessor(max_image_size=self.video.image_size, min_image_size=min_image_size,
                                     raw_pixels=raw_pixels)
        self._headers: dict[str, tuple] = {}

    @classmethod
    def from_config(cls, data, model_cfg, tokenizer: Tokenizer | None = None) -> "Processor":
        """The processor a run's ``DataConfig`` describes, for ``model_cfg``'s crop table."""
        if tokenizer is None:
            if not data.tokenizer:
                raise ValueError("config field 'data.tokenizer' is empty: give a tokenizer directory")
            tokenizer = Tokenizer.load(data.tokenizer)
        return cls.for_model(tokenizer, model_cfg, image_size=data.image_size,
                             min_image_size=data.min_image_size, split_image=data.split_image,
                             video=data.video, raw_pixels=True)

    @staticmethod
    def crop_table(model_cfg) -> dict[int, int]:
        """Crop side in px -> image tokens per crop, from the model config (side = sqrt(patches) x
        patch_size)."""
        P = model_cfg.vision.patch_size
        return {round(patches ** 0.5) * P: q for patches, q in model_cfg.projector.patch_to_query.items()}

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, model_cfg, **kwargs) -> "Processor":
        """The processor for the model config's crop table (``crop_table``)."""
        problem = tokenizer_mismatch(tokenizer, model_cfg)
        if problem is not None:
            raise ValueError(f"the tokenizer {problem}")
        return cls(tokenizer, cls.crop_table(model_cfg), **kwargs)

    # -- media: plan (sizes from headers), then decode ----------------------------------------

    def _header(self, key: str, probe: Callable[[], tuple], keys: Callable[[tuple], list[str]]
                ) -> tuple:
        """``probe()`` of a media file (``key``: its kind and path), remembered once the image-token
        cache (``cached_media``) holds every block key that ``keys(header)`` names."""
        header = self._headers.get(key)
        if header is None:
            header = probe()
            if self.cached_media is not None and all(k in self.cached_media for k in keys(header)):
                self._headers[key] = header
        return header

    def _plan_image(self, ref: MediaRef) -> _Planned:
        if ref.data is None or isinstance(ref.data, (bytes, bytearray)):  # a file or a tar member
            name = None if ref.data is None else ref.name

            def source():  # a fresh file object for each read: the header probe, then the decode
                return ref.path if ref.data is None else io.BytesIO(ref.data)

            if ref.data is None:
                key = f"image:{ref.path}"
                height, width = self._header(key, lambda: image_size(ref.path), lambda _: [key])
            else:
                height, width = image_size(source(), name=name)

            def decode() -> list[ProcessedImage]:
                return [self.images(load_image(source(), name=name))]
            keys = None if ref.data is not None else [f"image:{ref.path}"]
        else:  # an in-memory PIL image (inference): the image processor composites transparency
            width, height = ref.data.size
            if width < 1 or height < 1:
                raise MediaError(f"image has no pixels ({width}x{height})", kind="bad_image")

            def decode() -> list[ProcessedImage]:
                return [self.images(ref.data)]
            keys = None
        return _Planned(self.images.max_image_size, [self.images.num_crops(height, width)], None, decode,
                        keys)

    def _plan_video(self, ref: MediaRef, stack: ExitStack) -> _Planned:
        side = self.video.image_size
        if isinstance(ref.data, list):  # already decoded frames (inference)
            frames = ref.data
            return _Planned(side, [1] * len(frames), [float(i) for i in range(len(frames))],
                            lambda: [self.frames(frame) for frame in frames])
        num_frames, fps = ref.num_frames, ref.fps
        if num_frames is None and fps is None:
            num_frames, fps = (None, self.video.fps) if self.video.fps is not None else (self.video.num_frames, None)
        if num_frames is not None:
            fps = None
        path = ref.path
        if isinstance(ref.data, (bytes, bytearray)):  # a tar member: decord reads files
            fd, path = tempfile.mkstemp(suffix=Path(ref.name).suffix or ".mp4")
            stack.callback(os.unlink, path)
            with os.fdopen(fd, "wb") as f:
                f.write(ref.data)
        opened = []

        def probe() -> tuple[int, float]:
            opened.append(open_video(path))
            return opened[0].num_total, opened[0].fps
        max_frames = ref.max_frames or self.video.max_frames

        def frame_keys(header: tuple[int, float]) -> list[str]:
            return [f"video:{path}@{i}" for i in sample_indices(*header, num_frames, fps, max_frames)]
        num_total, video_fps = probe() if ref.data is not None else self._header(f"video:{path}", probe, frame_keys)
        indices = sample_indices(num_total, video_fps, num_frames, fps, max_frames)
        keys = None if ref.data is not None else frame_keys((num_total, video_fps))

        def decode() -> list[ProcessedImage]:
            video = opened[0] if opened else open_video(path)
            return [self.frames(frame) for frame in video.decode(indices).frames]
        return _Planned(side, [1] * len(indices), [i / video_fps for i in indices], decode, keys)

    def _decode(self, plans: list[_Planned], cache: Container[str] | None = None
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[str | None, int, bool]] | None]:
        """The crops of the media to decode, and (with an image-token ``cache``) every block in token
        order as (key, slots, cached): media whose every block the cache holds are not decoded."""
        crops, image_blocks = [], None if cache is None else []
        for plan in plans:
            keys = plan.keys or [None] * len(plan.blocks)
            Q = self.tokens_per_crop[plan.side]
            if cache is not None and plan.keys is not None and all(key in cache for key in plan.keys):
                image_blocks += [(key, n * Q, True) for key, n in zip(keys, plan.blocks)]
                continue
            blocks = plan.decode()
            got = [b.num_crops for b in blocks]
            if got != plan.blocks:
                raise MediaError(f"media decoded to {got} crops per block, but its header gave "
                                 f"{plan.blocks}", kind="bad_media")
            crops += [(b.pixel_values, b.pixel_mask) for b in blocks]
            if image_blocks is not None:
                image_blocks += [(key, n * Q, False) for key, n in zip(keys, plan.blocks)]
        return crops, image_blocks

    # -- rendering ----------------------------------------------------------------------------

    def _check_text(self, sample: Sample) -> None:
        for t, turn in enumerate(sample.turns):
            for part in turn.parts:
                token = self.tokenizer.find_special_token(part.text) if part.type == "text" else None
                if token is not None:
                    name = part.field or f"turn {t} text"
                    raise DataError(f"'{name}' contains the special token {token} as text; it would "
                                    "become a control token", "special_token_in_text")

    def _render(self, sample: Sample, add_generation_prompt: bool, stack: ExitStack
                ) -> tuple[_Text, list[_Planned], int]:
        """The sample's text with supervised spans, its media plans in token order, and its
        <|img|> count. Nothing is decoded yet."""
        self._check_text(sample)
        text, plans, num_image_tokens = _Text(), [], 0
        for turn in sample.turns:
            supervised = turn.role is None or turn.role == "assistant"
            if turn.role is not None:
                text.add(f"{IM_START}{turn.role}\n")
            for part in turn.parts:
                if part.type == "text":
                    text.add(part.text, supervised)
                    continue
                ref = sample.media[part.media]
                plan = self._plan_image(ref) if ref.kind == "image" else self._plan_video(ref, stack)
                plans.append(plan)
                for k, crops in enumerate(plan.blocks):
                    count = crops * self.tokens_per_crop[plan.side]
                    if plan.stamps is not None and self.video.timestamps:
                        text.add(format_timestamp(plan.stamps[k]))
                    text.add(FIM_PREFIX + IMG * count + FIM_SUFFIX)
                    if plan.stamps is not None and self.video.timestamps:
                        text.add("\n")
                    num_image_tokens += count
            if turn.role is not None:
                text.add(f"{IM_END}\n", supervised)
        if add_generation_prompt:
            text.add(f"{IM_START}assistant\n")
        return text, plans, num_image_tokens

    def encode(self, sample: Sample, max_tokens: int | None = None) -> EncodedSample:
        """Tokens, shifted targets and crops of one sample; ``DataError`` on bad input. With
        ``max_tokens``, a sample with media longer than that is refused (``too_long``) before its
        media are decoded (a sample without media is left to the packer, which may split it)."""
        try:
            with ExitStack() as stack:
                return self._encode(sample, max_tokens, stack)
        except DataError as err:
            raise err.at(sample.where) from None

    def _encode(self, sample: Sample, max_tokens: int | None, stack: ExitStack) -> EncodedSample:
        text, plans, num_image_tokens = self._render(sample, False, stack)
        ids, supervised_mask = self._tokenize(text)
        if not sample.is_chat:  # a document ends with the end-of-text token, which is learned
            ids.append(self.tokenizer.eos_id)
            supervised_mask.append(True)
        if max_tokens is not None and plans and len(ids) > max_tokens:
            raise too_long(len(ids), sum(sum(p.blocks) for p in plans), max_tokens)
        found = ids.count(self.tokenizer.image_id)
        if found != num_image_tokens:
            raise DataError(f"tokenizer produced {found} <|img|> tokens for {num_image_tokens} image "
                            "slots", "tokenizer_mismatch")
        if not any(supervised_mask):
            raise DataError("no supervised token (empty assistant answer or document text)",
                            "no_supervised_tokens")
        # in lists, then one tensor each: a sample's few hundred ids cost less in Python than in
        # five tensor ops (~60 samples a quickstart step)
        targets = [i if s else IGNORE_INDEX for i, s in zip(ids[1:], supervised_mask[1:])] + [IGNORE_INDEX]
        input_ids, targets = torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long)
        crops, image_blocks = self._decode(plans, self.cached_media)
        return EncodedSample(input_ids, targets, crops, where=sample.where, image_blocks=image_blocks,
                             num_images=sum(p.stamps is None for p in plans),
                             num_frames=sum(len(p.stamps) for p in plans if p.stamps is not None),
                             document=not sample.is_chat)

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
            for i, item in enumerate(items):
                if item["type"] == "text":
                    parts.append(Part("text", item["text"], field=f"messages[{m}].content[{i}].text"))
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
        return self.prompt_inputs(Sample("chat", turns, media, "prompt"), add_generation_prompt)

    def prompt_inputs(self, sample: Sample, add_generation_prompt: bool = True) -> dict[str, Any]:
        """Model inputs (batch of one) for a conversation to be continued: ``input_ids`` (1, T), its
        crops grouped as ``group_crops`` does, and the crop list itself (``crops``) for batching."""
        with ExitStack() as stack:
            text, plans, _ = self._render(sample, add_generation_prompt, stack)
            crops, _ = self._decode(plans)
        inputs: dict[str, Any] = {"input_ids": torch.tensor([self.tokenizer.encode(str(text))]),
                                  "crops": crops}
        inputs.update(group_crops(crops, self.tokens_per_crop))
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
