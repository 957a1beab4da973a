"""Parse and validate one JSON record (docs/data_format.md) into a ``Sample``: Aria's schema
(``messages``), documents (``kind``) or LLaVA / ShareGPT conversations (``conversations``).

Design decisions:
- Validation happens here, once, before any media is decoded: types first (so that no malformed
  value reaches a ``len()`` or a path operation), roles, content types, media counts, media paths,
  text that is not valid Unicode. Every problem raises ``DataError`` with a stable ``kind`` (for the
  skip counters) and a message naming the offending field (``messages[2].content[0].text``).
  Special-token strings inside text are refused by the processor, which knows the tokenizer.
- Unknown top-level keys are ignored (datasets carry ids, sources, question types, ...); unknown
  keys inside a message or a content item are refused, since there they usually mean a schema the
  record was not written for (and text that would silently not be trained on).
- Media are resolved but not loaded: a ``MediaRef`` holds a path (relative to the dataset
  directory, and refused if it escapes it unless explicitly allowed) or bytes held by the record's
  container (a tar member of a webdataset sample, an image embedded in a Hugging Face dataset row).
  A resolver remembers its last ``RESOLVED_PATHS`` resolved names: resolving follows every
  component's links (~0.2 ms a name, six ``lstat`` calls), and a run that reads its images many
  times (the quickstart: each ~35 times) would pay it at every read.
- Conversations and documents share one representation: a list of turns made of parts. A document
  is a single turn with ``role=None`` (no chat markup, all text supervised).
- The schema is recognised per record, by its keys: ``conversations`` is LLaVA / ShareGPT,
  ``messages`` (or a ``kind``) is Aria's; a record with both is refused. One dataset may mix them,
  and every container (JSONL, a JSON list, shards, Hugging Face datasets) carries either.
- A LLaVA record is not rewritten into an Aria record and parsed again: it is parsed into the same
  content items (each with the field path of its text), then ``_attach_media`` (shared) matches
  media to items, resolves paths and checks counts. So every check is the same, and every message
  names the LLaVA field (``conversations[3].value``, ``image[1]``), not an invented Aria one.
- LLaVA placeholders keep their place: ``"Q1 <image> Q2"`` becomes text, image, text items. The
  line break LLaVA writes between a placeholder and its text (``"<image>\nWhat ..."``, or
  ``"What ...\n<image>"``) is a separator, not content: one ``\n`` directly after a placeholder
  (else one directly before it) goes with it, so the tokens are those of the Aria record with
  ``[{"type": "image"}, {"type": "text", "text": "What ..."}]``, the layout Aria was fine-tuned on.
  A record with media but no placeholder at all gets them at the start of its first user turn
  (images, then videos), as LLaVA does.
- ``columns`` (a dataset's column mapping, ``apply_columns``) renames a record's fields before
  parsing, so a dataset whose columns are named otherwise needs no rewrite.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aria.data.errors import DataError

ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLAVA_TURN_KEYS = ("from", "value")
PLACEHOLDERS = {"<image>": "image", "<video>": "video"}
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
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


RESOLVED_PATHS = 2 ** 16  # names a MediaResolver remembers (~10 MB at most)


class MediaResolver:
    """Turns the media names of a record into ``MediaRef`` paths or in-memory bytes: ``members``
    (tar members of a shard sample, images embedded in a Hugging Face dataset row) first, then
    files under ``base_dir``. Without a ``base_dir`` a name that is not a member is missing."""

    def __init__(self, base_dir: Path | None = None, members: Mapping[str, bytes] | None = None,
                 allow_outside: bool = False) -> None:
        self.base_dir = None if base_dir is None else Path(base_dir).resolve()
        self.members = members
        self.allow_outside = allow_outside
        self._resolved = functools.lru_cache(maxsize=RESOLVED_PATHS)(self._resolve)

    def __call__(self, kind: str, name: Any, field_name: str) -> MediaRef:
        if not isinstance(name, str) or not name:
            raise DataError(f"'{field_name}' must be a non-empty path string, got {name!r}", "invalid_record")
        if self.members is not None:
            if name in self.members:
                return MediaRef(kind, data=self.members[name], name=name)
            if self.base_dir is None:
                raise DataError(f"'{field_name}' names '{name}', which is not a member of this sample "
                                f"(members: {sorted(self.members)})", "missing_file")
        try:
            path, inside = self._resolved(name)
        except (ValueError, OSError) as err:  # a NUL byte, a symlink loop, ...
            raise DataError(f"'{field_name}' path {name!r} is not a usable path ({err})",
                            "invalid_record") from None
        if not (self.allow_outside or inside):
            raise DataError(f"'{field_name}' path '{name}' resolves outside the dataset directory "
                            f"{self.base_dir} (set data.allow_outside_media=true to allow it)", "path_escape")
        return MediaRef(kind, path=path, name=name)

    def _resolve(self, name: str) -> tuple[Path, bool]:
        """The resolved path, and whether it lies in ``base_dir`` (always, without one)."""
        if self.base_dir is None:
            return Path(name).resolve(), True
        path = (self.base_dir / name).resolve()
        return path, path.is_relative_to(self.base_dir)


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


Media = tuple[Any, str]
"""A media entry of a record (a path, or a video object) and its field path (``images[1]``)."""


@dataclass
class _MediaList:
    entries: list[Media]
    field: str
    """The record field they come from, for messages ('images', 'image', 'video', ...)."""
    items: str
    """What the content calls the items they fill, for messages."""


def _images(record: dict) -> list[Media]:
    images = record.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        raise DataError(f"'images' must be a list of paths, got {type(images).__name__}", "invalid_record")
    return [(image, f"images[{i}]") for i, image in enumerate(images)]


def _video_objects(entries: list[Media]) -> list[Media]:
    """Video entries as objects with a 'path' (a bare path string is one)."""
    out = []
    for spec, field_name in entries:
        if isinstance(spec, str):
            spec = {"path": spec}
        elif not isinstance(spec, dict) or "path" not in spec:
            raise DataError(f"'{field_name}' must be a path or an object with a 'path', got {spec!r}",
                            "invalid_record")
        out.append((spec, field_name))
    return out


def _video_specs(record: dict) -> list[Media]:
    """The video objects of a record: 'video' (one object or a list) or 'videos' (a list)."""
    name = "videos" if "videos" in record else "video"
    spec = record.get(name)
    if spec is None:
        return []
    specs = list(spec) if isinstance(spec, list) else [spec]
    return _video_objects([(s, f"{name}[{i}]") for i, s in enumerate(specs)])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _video_ref(resolve: MediaResolver, spec: dict, field_name: str) -> MediaRef:
    ref = resolve("video", spec["path"], f"{field_name}.path")
    num_frames, fps, max_frames = spec.get("num_frames"), spec.get("fps"), spec.get("max_frames")
    # The official format writes num_frames <= 0 or null to mean "use the default".
    if num_frames is not None and not _is_int(num_frames):
        raise DataError(f"'{field_name}.num_frames' must be an integer, got {num_frames!r}", "invalid_record")
    ref.num_frames = num_frames if num_frames is not None and num_frames > 0 else None
    if fps is not None and not (isinstance(fps, (int, float)) and not isinstance(fps, bool)
                                and math.isfinite(fps) and fps > 0):
        raise DataError(f"'{field_name}.fps' must be a positive finite number, got {fps!r}", "invalid_record")
    if max_frames is not None and not (_is_int(max_frames) and max_frames > 0):
        raise DataError(f"'{field_name}.max_frames' must be a positive integer, got {max_frames!r}",
                        "invalid_record")
    ref.fps, ref.max_frames = fps, max_frames
    return ref


def _attach_media(items_per_turn: list[list[Item]], images: _MediaList, videos: _MediaList,
                  resolve: MediaResolver) -> tuple[list[list[Part]], list[MediaRef]]:
    """Builds parts, matching image items to ``images`` and video items to ``videos`` in order."""
    for kind, given in (("image", images), ("video", videos)):
        n_items = sum(it["type"] == kind for items in items_per_turn for it, _ in items)
        if n_items != len(given.entries):
            noun = "path(s)" if kind == "image" else "video(s)"
            raise DataError(f"{n_items} {given.items} but {len(given.entries)} {noun} in '{given.field}'",
                            f"{kind}_count_mismatch")
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
                name, field_name = images.entries[next_image]
                media.append(resolve("image", name, field_name))
                next_image += 1
            else:
                media.append(_video_ref(resolve, *videos.entries[next_video]))
                next_video += 1
            parts.append(Part(item["type"], media=len(media) - 1))
        turns.append(parts)
    return turns, media


def apply_columns(record: dict, columns: Mapping[str, str] | None) -> dict:
    """``record`` with its fields renamed by a dataset's column mapping {field: column}: column
    ``c`` becomes field ``f``, and a column that is mapped away no longer counts as its own name."""
    if not columns:
        return record
    renamed = set(columns.values()) | set(columns)
    out = {k: v for k, v in record.items() if k not in renamed}
    out.update({f: record[c] for f, c in columns.items() if c in record})
    return out


def parse_record(record: dict, where: str, resolve: MediaResolver) -> Sample:
    """Validate ``record`` and turn it into a ``Sample``; raises ``DataError`` located at ``where``."""
    try:
        if "conversations" in record:
            both = sorted(k for k in ("messages", "kind") if k in record)
            if both:
                raise DataError(f"record has both 'conversations' (LLaVA / ShareGPT) and {both} (Aria): "
                                "one schema per record", "invalid_record")
            return _parse_llava(record, where, resolve)
        kind = record.get("kind", "chat" if "messages" in record else None)
        if kind == "chat":
            return _parse_chat(record, where, resolve)
        if isinstance(kind, str) and kind in DOCUMENT_KINDS:
            return _parse_document(kind, record, where, resolve)
        raise DataError(f"record has neither 'messages', 'conversations' nor a known 'kind' (got "
                        f"kind={kind!r}; document kinds are {DOCUMENT_KINDS})", "invalid_record")
    except DataError as err:
        raise err.at(where) from None


def _aria_media(record: dict) -> tuple[_MediaList, _MediaList]:
    return (_MediaList(_images(record), "images", "image item(s) in the content"),
            _MediaList(_video_specs(record), "videos" if "videos" in record else "video",
                       "video item(s) in the content"))


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
    parts, media = _attach_media(items, *_aria_media(record), resolve)
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
    parts, media = _attach_media([items], *_aria_media(record), resolve)
    if not any(p.type == "text" and p.text for p in parts[0]):
        raise DataError("the document has no text", "invalid_record")
    return Sample(kind, [Turn(None, parts[0])], media, where)


# -- LLaVA / ShareGPT ---------------------------------------------------------------------------


def _llava_media(record: dict, kind: str) -> _MediaList:
    """The images ('image' or 'images': a path or a list) or videos ('video' / 'videos') of a
    LLaVA record."""
    keys = (kind, f"{kind}s")
    given = [k for k in keys if record.get(k) is not None]
    if len(given) > 1:
        raise DataError(f"record has both '{keys[0]}' and '{keys[1]}'", "invalid_record")
    key = given[0] if given else keys[0]
    value = record.get(key)
    entries = [] if value is None else [(v, f"{key}[{i}]") for i, v in enumerate(value)] \
        if isinstance(value, list) else [(value, key)]
    if kind == "video":
        entries = _video_objects(entries)
    return _MediaList(entries, key, f"'<{kind}>' placeholder(s) in 'conversations'")


def _llava_items(value: str, field_name: str) -> list[Item]:
    """Text and media items of one LLaVA turn, in place (see the module docstring for the line
    breaks next to placeholders)."""
    pieces = _PLACEHOLDER_RE.split(value)  # text, placeholder, text, ..., text
    for j in range(1, len(pieces), 2):
        if pieces[j + 1].startswith("\n"):
            pieces[j + 1] = pieces[j + 1][1:]
        elif pieces[j - 1].endswith("\n"):
            pieces[j - 1] = pieces[j - 1][:-1]
    items: list[Item] = []
    for j, piece in enumerate(pieces):
        if j % 2:
            items.append(({"type": PLACEHOLDERS[piece]}, field_name))
        elif piece:
            items.append(({"type": "text", "text": piece}, field_name))
    return items


def _parse_llava(record: dict, where: str, resolve: MediaResolver) -> Sample:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("'conversations' must be a non-empty list", "invalid_record")
    roles, items = [], []
    system = record.get("system")
    if system is not None and system != "":  # ShareGPT's top-level system prompt
        roles.append("system")
        items.append([({"type": "text", "text": _text(system, "system")}, "system")])
    for t, turn in enumerate(turns):
        field_name = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise DataError(f"'{field_name}' must be an object", "invalid_record")
        unknown = sorted(set(turn) - set(LLAVA_TURN_KEYS), key=str)
        if unknown:
            raise DataError(f"'{field_name}' has unknown key(s) {unknown}; turns have {LLAVA_TURN_KEYS}",
                            "invalid_record")
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in LLAVA_ROLES:
            raise DataError(f"'{field_name}.from' is {speaker!r}; expected one of {tuple(LLAVA_ROLES)}",
                            "unknown_role")
        roles.append(LLAVA_ROLES[speaker])
        items.append(_llava_items(_text(turn.get("value"), f"{field_name}.value"), f"{field_name}.value"))
    if "assistant" not in roles:
        raise DataError("no 'gpt' turn in 'conversations': nothing to learn from", "no_assistant")
    images, videos = _llava_media(record, "image"), _llava_media(record, "video")
    if not any(it["type"] != "text" for turn_items in items for it, _ in turn_items):
        # no placeholder: the media go first in the first user turn, as LLaVA puts its single image
        first = roles.index("user") if "user" in roles else 0
        items[first] = ([({"type": "image"}, "")] * len(images.entries)
                        + [({"type": "video"}, "")] * len(videos.entries) + items[first])
    parts, media = _attach_media(items, images, videos, resolve)
    return Sample("chat", [Turn(r, p) for r, p in zip(roles, parts)], media, where)
