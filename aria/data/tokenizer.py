"""Text <-> token ids with Aria's special tokens, from a Hugging Face tokenizer directory or a
sentencepiece model.

Design decisions:
- Two backends, one interface: ``tokenizer.json`` (the Hugging Face ``tokenizers`` runtime, what the
  released Aria tokenizer ships and what ``AriaProcessor`` runs) or a sentencepiece ``.model``.
  Loading never imports transformers.
- A whole rendered string is encoded at once, with character offsets, exactly as ``AriaProcessor``
  tokenizes it; label masks are then derived from character spans (``processor.py``). Encoding a
  string piece by piece can differ at the seams (e.g. a prefix-space rule applied to the first piece
  only). Every token's span covers the character(s) it encodes: sentencepiece reports byte-fallback
  pieces of one character as zero-width spans but the last, and those are widened to the character,
  as ``tokenizers`` reports them, so both backends supervise the same tokens.
- The Aria special tokens must all exist; a tokenizer without them is refused with their names.
- ``special_tokens`` lists every control/special token string of the loaded tokenizer (not just
  Aria's five): such a string inside data text would silently become a control id (``</s>`` ends a
  document early with the ``tokenizers`` backend), so the processor refuses text that holds one.
  Added tokens that are ordinary text (the line-break symbol of our tokenizers) are not in it.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

SPECIAL_TOKENS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "fim_prefix": "<fim_prefix>",
    "fim_suffix": "<fim_suffix>",
    "image": "<|img|>",
}


class Tokenizer:
    """Encode/decode plus the ids of Aria's special tokens."""

    def __init__(self, backend, kind: str, source: str, eos_token: str | None, pad_token: str | None) -> None:
        self._backend, self.kind, self.source = backend, kind, source
        ids = {name: self.token_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
        missing = sorted(SPECIAL_TOKENS[n] for n, i in ids.items() if i is None)
        if missing:
            raise ValueError(f"tokenizer {source} lacks the Aria special token(s) {missing}; train one "
                             "with `python -m data_tools.train_tokenizer` or add them")
        self.im_start_id, self.im_end_id = ids["im_start"], ids["im_end"]
        self.fim_prefix_id, self.fim_suffix_id = ids["fim_prefix"], ids["fim_suffix"]
        self.image_id = ids["image"]
        self.eos_id = self._require(eos_token, "eos (end-of-text)")
        self.pad_id = self.token_to_id(pad_token) if pad_token else None
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _require(self, token: str | None, what: str) -> int:
        token_id = self.token_to_id(token) if token else None
        if token_id is None:
            raise ValueError(f"tokenizer {self.source} has no {what} token ({token!r})")
        return token_id

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A directory with ``tokenizer.json`` (preferred) or ``tokenizer.model``, or a ``.model`` file."""
        path = Path(path)
        if path.is_dir():
            config = {}
            if (path / "tokenizer_config.json").is_file():
                config = json.loads((path / "tokenizer_config.json").read_text())
            if (path / "tokenizer.json").is_file():
                from tokenizers import Tokenizer as HFTokenizer

                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
                return cls(backend, "tokenizers", str(path), _token(config.get("eos_token")) or "</s>",
                           _token(config.get("pad_token")))
            if (path / "tokenizer.model").is_file():
                return cls._sentencepiece(path / "tokenizer.model", _token(config.get("pad_token")))
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model")
        if path.suffix == ".model" and path.is_file():
            return cls._sentencepiece(path, None)
        raise FileNotFoundError(f"tokenizer not found: {path} (expected a directory with tokenizer.json "
                                "or tokenizer.model, or a sentencepiece .model file)")

    @classmethod
    def _sentencepiece(cls, model_file: Path, pad_token: str | None) -> "Tokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        return cls(sp, "sentencepiece", str(model_file), eos, pad_token or "<pad>")

    # -- interface ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "tokenizers":
            return self._backend.token_to_id(token)
        token_id = self._backend.piece_to_id(token)
        return None if token_id == self._backend.unk_id() and token != self._backend.id_to_piece(token_id) else token_id

    def ids_of_word(self, word: str) -> list[int]:
        """Every id whose token alone decodes to ``word`` (spaces around it aside): "and" is both
        "and" and its word-initial form."""
        ids = range(self.vocab_size)
        if self.kind == "tokenizers":
            texts = self._backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
        else:
            texts = [self._backend.decode([i]) for i in ids]
        return [i for i, text in zip(ids, texts) if text.strip() == word]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (special-token strings in it become their ids; no BOS/EOS added)."""
        if self.kind == "tokenizers":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the (start, end) character span of each token in ``text``."""
        if self.kind == "tokenizers":
            enc = self._backend.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        proto = self._backend.encode(text, return_type="proto")
        # sentencepiece reports UTF-8 byte offsets; spans elsewhere are in characters. char_at[b] is
        # the character holding byte b; a span ends after the character holding its last byte.
        char_at = [0] * (len(text.encode("utf-8")) + 1)
        at = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            char_at[at: at + n] = [i] * n
            at += n
        char_at[at] = len(text)
        spans = []
        for p in proto.pieces:
            start = char_at[p.begin]
            # A byte-fallback piece that is not the last byte of its character comes back zero-width
            # (begin == end): it still encodes part of the character at ``begin``.
            end = char_at[p.end - 1] + 1 if p.end > p.begin else min(start + 1, len(text))
            spans.append((start, end))
        return [p.id for p in proto.pieces], spans

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """Every special token string (control, unknown, and added/user-defined tokens that are not
        plain whitespace), longest first."""
        if self.kind == "tokenizers":
            found = [t.content for t in self._backend.get_added_tokens_decoder().values() if t.special]
        else:
            sp = self._backend
            found = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                     if sp.is_control(i) or sp.is_unknown(i)]
            found += _user_defined_pieces(sp)
        found += SPECIAL_TOKENS.values()
        return tuple(sorted({t for t in found if t and t.strip()}, key=lambda t: (-len(t), t)))

    @cached_property
    def _special_pattern(self) -> re.Pattern:
        return re.compile("|".join(re.escape(t) for t in self.special_tokens))

    def find_special_token(self, text: str) -> str | None:
        """The first special token string inside ``text``, if any."""
        match = self._special_pattern.search(text)
        return match.group(0) if match else None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.kind == "tokenizers":
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            specials = {self.image_id, self.im_start_id, self.im_end_id, self.fim_prefix_id,
                        self.fim_suffix_id, self.eos_id}
            ids = [i for i in ids if i not in specials]
        return self._backend.decode(list(ids))


def _user_defined_pieces(sp) -> list[str]:
    """The user-defined pieces of a sentencepiece model (always matched in text, like added tokens)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: control and unknown pieces (plus Aria's) still count
        return []
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in proto.pieces if p.type == user_defined]


def _token(value) -> str | None:
    """A token from tokenizer_config.json, given as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value
