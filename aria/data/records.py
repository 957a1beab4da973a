"""Parse and validate one JSON record (docs/data_format.md) into a ``Sample``.

Design decisions:
- Validation happens here, once, before any media is decoded: types first (so that no malformed
  value reaches a ``len()`` or a path operation), roles, content types, media counts, media paths,
  text that is not valid Unicode. Every problem raises ``DataError`` with a stable ``kind`` (for the
  skip counters) and a message naming the offending field (``messages[2].content[0].text``).
  Special-token strings inside text are refused by the processor, which knows the tokenizer.
- Unknown top-level keys are ignored (datasets carry ids, sources, question types, ...); unknown
  keys inside a message or a content item are refused, since there they usually mean a schema the
  record was not written for (and text that would silently not be trained on).
- Media are resolved but not loaded: a ``MediaRef`` holds a path (JSONL datasets; relative to the
  dataset directory, and refused if it escapes it unless explicitly allowed) or the bytes of a tar
  member (webdataset shards).
- Conversations and documents share one representation: a list of turns made of parts. A document
  is a single turn with ``role=None`` (no chat markup, all text supervised).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aria.data.errors import DataError

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "video")
DOCUMENT_KINDS = ("text", "caption", "interleaved", "video")
MESSAGE_KEYS = ("role", "content")
ITEM_KEYS = ("type", "text")


@dataclass
class MediaRef:
    kind: str
    """'image' or 'video'."""
    path: Path | None = None
    data: Any = None
    """Tar-member bytes, or an already decoded PIL image / list of frames (inference)."""
    name: str = ""
    """How the record named it (for messages)."""
    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None


@dataclass
class Part:
    type: str
    """'text', 'image' or 'video'."""
    text: str = ""
    media: int = -1
    """Index into ``Sample.media`` for image/video parts."""
    field: str = ""
    """Where a text part's text is in the record (``messages[2].content[0].text``), for messages."""


@dataclass
class Turn:
    role: str | None
    """'system' / 'user' / 'assistant', or None for a document."""
    parts: list[Part]


@dataclass
class Sample:
    kind: str
    """'chat' or one of the document kinds."""
    turns: list[Turn]
    media: list[MediaRef] = field(default_factory=list)
    where: str = ""
    """'file:line' or 'shard.tar:key', for messages."""

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat"


def parse_json_line(line: str | bytes, where: str) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise DataError(f"malformed JSON ({err})", "bad_json", where) from None
    except RecursionError:
        raise DataError("malformed JSON (nested too deeply to parse)", "bad_json", where) from None
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}", "invalid_record", where)
    return record


class MediaResolver:
    """Turns the media names of a record into ``MediaRef`` paths or tar-member bytes."""

    def __init__(self, base_dir: Path | None = None, members: Mapping[str, bytes] | None = None,
                 allow_outside: bool = False) -> None:
        self.base_dir = None if base_dir is None else Path(base_dir).resolve()
        self.members = members
        self.allow_outside = allow_outside

    def __call__(self, kind: str, name: Any, field_name: str) -> MediaRef:
        if not isinstance(name, str) or not name:
            raise DataError(f"'{field_name}' must be a non-empty path string, got {name!r}", "invalid_record")
        if self.members is not None:
            if name not in self.members:
                raise DataError(f"'{field_name}' names '{name}', which is not a member of this sample "
                                f"(members: {sorted(self.members)})", "missing_file")
            return MediaRef(kind, data=self.members[name], name=name)
        try:
            path = (self.base_dir / name).resolve() if self.base_dir is not None else Path(name).resolve()
        except (ValueError, OSError) as err:  # a NUL byte, a symlink loop, ...
            raise DataError(f"'{field_name}' path {name!r} is not a usable path ({err})",
                            "invalid_record") from None
        if not self.allow_outside and self.base_dir is not None and not path.is_relative_to(self.base_dir):
            raise DataError(f"'{field_name}' path '{name}' resolves outside the dataset directory "
                            f"{self.base_dir} (set data.allow_outside_media=true to allow it)", "path_escape")
        return MediaRef(kind, path=path, name=name)


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"'{field_name}' must be a string, got {type(value).__name__}", "invalid_record")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate such as "\ud800" in the JSON
        raise DataError(f"'{field_name}' is not valid Unicode text ({err.reason} at character "
                        f"{err.start})", "bad_text") from None
    return value


Item = tuple[dict, str]
"""A content item and the field path of its text (for messages)."""


def _content_items(content: Any, field_name: str) -> list[Item]:
    if isinstance(content, str):
        return [({"type": "text", "text": content}, field_name)]
    if not isinstance(content, list):
        raise DataError(f"'{field_name}' must be a string or a list of items, got "
                        f"{type(content).__name__}", "invalid_record")
    items = []
    for i, item in enumerate(content):
        path = f"{field_name}[{i}]"
        if not isinstance(item, dict) or "type" not in item:
            raise DataError(f"'{path}' must be an object with a 'type'", "invalid_record")
        unknown = sorted(set(item) - set(ITEM_KEYS), key=str)
        if unknown:
            raise DataError(f"'{path}' has unknown key(s) {unknown}; items have {ITEM_KEYS}", "invalid_record")
        kind = item["type"]
        if not isinstance(kind, str) or kind not in CONTENT_TYPES:
            raise DataError(f"'{path}' has unknown content type {kind!r}; expected one of "
                            f"{CONTENT_TYPES}", "unknown_content_type")
        if kind != "text" and item.get("text") is not None:
            raise DataError(f"'{path}' is a {kind} item with a text ({item['text']!r}); put text in "
                            "a text item", "invalid_record")
        items.append((item, f"{path}.text"))
    return items


def _images(record: dict) -> list:
    images = record.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        raise DataError(f"'images' must be a list of paths, got {type(images).__name__}", "invalid_record")
    return images


def _video_specs(record: dict) -> list[dict]:
    """The video objects of a record: 'video' (one object or a list) or 'videos' (a list)."""
    name = "videos" if "videos" in record else "video"
    spec = record.get(name)
    if spec is None:
        return []
    specs = list(spec) if isinstance(spec, list) else [spec]
    for i, s in enumerate(specs):
        if isinstance(s, str):
            specs[i] = {"path": s}
        elif not isinstance(s, dict) or "path" not in s:
            raise DataError(f"'{name}' entries must be objects with a 'path', got {s!r}", "invalid_record")
    return specs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _video_ref(resolve: MediaResolver, spec: dict, i: int) -> MediaRef:
    ref = resolve("video", spec["path"], f"video[{i}].path")
    num_frames, fps, max_frames = spec.get("num_frames"), spec.get("fps"), spec.get("max_frames")
    # The official format writes num_frames <= 0 or null to mean "use the default".
    if num_frames is not None and not _is_int(num_frames):
        raise DataError(f"'video[{i}].num_frames' must be an integer, got {num_frames!r}", "invalid_record")
    ref.num_frames = num_frames if num_frames is not None and num_frames > 0 else None
    if fps is not None and not (isinstance(fps, (int, float)) and not isinstance(fps, bool)
                                and math.isfinite(fps) and fps > 0):
        raise DataError(f"'video[{i}].fps' must be a positive finite number, got {fps!r}", "invalid_record")
    if max_frames is not None and not (_is_int(max_frames) and max_frames > 0):
        raise DataError(f"'video[{i}].max_frames' must be a positive integer, got {max_frames!r}",
                        "invalid_record")
    ref.fps, ref.max_frames = fps, max_frames
    return ref


def _attach_media(items_per_turn: list[list[Item]], record: dict, resolve: MediaResolver
                  ) -> tuple[list[list[Part]], list[MediaRef]]:
    """Builds parts, matching image items to 'images' and video items to 'video' in order."""
    images = _images(record)
    videos = _video_specs(record)
    n_image_items = sum(it["type"] == "image" for items in items_per_turn for it, _ in items)
    n_video_items = sum(it["type"] == "video" for items in items_per_turn for it, _ in items)
    if n_image_items != len(images):
        raise DataError(f"{n_image_items} image item(s) in the content but {len(images)} path(s) in "
                        "'images'", "image_count_mismatch")
    if n_video_items != len(videos):
        raise DataError(f"{n_video_items} video item(s) in the content but {len(videos)} video(s) in "
                        "'video'", "video_count_mismatch")
    media: list[MediaRef] = []
    next_image = next_video = 0
    turns = []
    for items in items_per_turn:
        parts = []
        for item, path in items:
            if item["type"] == "text":
                parts.append(Part("text", _text(item.get("text"), path), field=path))
                continue
            if item["type"] == "image":
                media.append(resolve("image", images[next_image], f"images[{next_image}]"))
                next_image += 1
            else:
                media.append(_video_ref(resolve, videos[next_video], next_video))
                next_video += 1
            parts.append(Part(item["type"], media=len(media) - 1))
        turns.append(parts)
    return turns, media


def parse_record(record: dict, where: str, resolve: MediaResolver) -> Sample:
    """Validate ``record`` and turn it into a ``Sample``; raises ``DataError`` located at ``where``."""
    try:
        kind = record.get("kind", "chat" if "messages" in record else None)
        if kind == "chat":
            return _parse_chat(record, where, resolve)
        if isinstance(kind, str) and kind in DOCUMENT_KINDS:
            return _parse_document(kind, record, where, resolve)
        raise DataError(f"record has neither 'messages' nor a known 'kind' (got kind={kind!r}; "
                        f"document kinds are {DOCUMENT_KINDS})", "invalid_record")
    except DataError as err:
        raise err.at(where) from None


def _parse_chat(record: dict, where: str, resolve: MediaResolver) -> Sample:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list", "invalid_record")
    roles, items = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"'messages[{m}]' must be an object", "invalid_record")
        unknown = sorted(set(message) - set(MESSAGE_KEYS), key=str)
        if unknown:
            raise DataError(f"'messages[{m}]' has unknown key(s) {unknown}; messages have "
                            f"{MESSAGE_KEYS}", "invalid_record")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"'messages[{m}].role' is {role!r}; expected one of {ROLES}", "unknown_role")
        roles.append(role)
        items.append(_content_items(message.get("content"), f"messages[{m}].content"))
    if "assistant" not in roles:
        raise DataError("no assistant message: nothing to learn from", "no_assistant")
    parts, media = _attach_media(items, record, resolve)
    return Sample("chat", [Turn(r, p) for r, p in zip(roles, parts)], media, where)


def _parse_document(kind: str, record: dict, where: str, resolve: MediaResolver) -> Sample:
    if kind == "interleaved":
        items = _content_items(record.get("content"), "content")
    else:
        items = []
        if kind == "caption":
            if not _images(record):
                raise DataError("a caption record needs 'images'", "invalid_record")
            items += [({"type": "image"}, "")] * len(_images(record))
        elif kind == "video":
            if not _video_specs(record):
                raise DataError("a video record needs 'video'", "invalid_record")
            items += [({"type": "video"}, "")] * len(_video_specs(record))
        items.append(({"type": "text", "text": record.get("text")}, "text"))
    parts, media = _attach_media([items], record, resolve)
    if not any(p.type == "text" and p.text for p in parts[0]):
        raise DataError("the document has no text", "invalid_record")
    return Sample(kind, [Turn(None, parts[0])], media, where)
