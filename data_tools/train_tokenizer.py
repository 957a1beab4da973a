"""Train a sentencepiece BPE tokenizer with Aria's special tokens, saved for us and for transformers.

    python -m data_tools.train_tokenizer --input DATA [DATA ...] --out DIR [--vocab-size 1024]
                                         [--image-token-id 9]

DATA: text files (one document per line), JSONL record files (every text field is used) or
directories of them. DIR receives ``tokenizer.model`` (sentencepiece), ``tokenizer.json`` and
``tokenizer_config.json`` (loadable by ``AutoTokenizer.from_pretrained(DIR)`` and usable by
``AriaProcessor``) and ``chat_template.jinja``.

Id layout: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>`` (end of text), then ``<pad>``, ``<|im_start|>``,
``<|im_end|>``, ``<fim_prefix>``, ``<fim_suffix>``, reserved tokens up to ``<|img|>`` at
``--image-token-id`` (9, as in Aria), then a line-break token. Line breaks are a token of their own
so that the chat header ``assistant\\n`` never merges with the answer that follows it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

FIRST_USER_ID = 3  # after <unk>, <s>, </s>
NAMED = ["<pad>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_suffix>"]
IMAGE_TOKEN = "<|img|>"


def special_symbols(image_token_id: int) -> list[str]:
    reserved = image_token_id - FIRST_USER_ID - len(NAMED)
    if reserved < 0:
        raise ValueError(f"--image-token-id {image_token_id} is too small: ids {FIRST_USER_ID}.."
                         f"{FIRST_USER_ID + len(NAMED) - 1} hold {NAMED}")
    return NAMED + [f"<reserved_{i}>" for i in range(reserved)] + [IMAGE_TOKEN, "\n"]


def record_texts(record: dict) -> Iterator[str]:
    """Every text string of a record (docs/data_format.md), and each message's role: the chat template
    writes the role before every turn, so the vocabulary should hold it as a piece."""
    if isinstance(record.get("text"), str):
        yield record["text"]
    items = list(record.get("content") or []) if isinstance(record.get("content"), list) else []
    for message in record.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("role"), str):
            yield message["role"]
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            items += content
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            yield item["text"]


def iter_texts(inputs: list[str]) -> Iterator[str]:
    files: list[Path] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"tokenizer training input not found: {p}")
    if not files:
        raise ValueError(f"no .txt or .jsonl files in {inputs}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if path.suffix != ".jsonl":
                    if line.strip():
                        yield line.rstrip("\n")
                    continue
                if not line.strip():
                    continue
                try:
                    yield from record_texts(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: malformed JSON ({err})") from None


def train(inputs: list[str], out: str | Path, vocab_size: int = 1024, image_token_id: int = 9) -> Path:
    import sentencepiece as spm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    symbols = special_symbols(image_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            count = 0
            for text in iter_texts(inputs):
                # sentencepiece reads one sentence per line: keep line breaks as a visible symbol
                for line in text.split("\n"):
                    if line:
                        f.write(line + "\n")
                        count += 1
        if count == 0:
            raise ValueError(f"no text found in {inputs}")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", user_defined_symbols=symbols, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, minloglevel=2, num_threads=2)
        shutil.copy(Path(tmp) / "tokenizer.model", out / "tokenizer.model")
    export_hf(out)
    return out


def export_hf(directory: Path) -> None:
    """Write tokenizer.json / tokenizer_config.json / chat_template.jinja next to tokenizer.model."""
    from transformers import LlamaTokenizer

    from aria.data.processor import CHAT_TEMPLATE

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(directory / "tokenizer.model", Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=False, add_eos_token=False, legacy=False,
                                             add_prefix_space=False, pad_token="<pad>",
                                             extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    # Chat and image markers are special (decode(skip_special_tokens=True) drops them); the
    # line-break symbol is ordinary text.
    tok_json = json.loads((directory / "tokenizer.json").read_text())
    for added in tok_json["added_tokens"]:
        added["special"] = added["content"] != "\n"
    (directory / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=2))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config["extra_special_tokens"] = [t for t in extra if t != "\n"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.train_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text / JSONL files or directories")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--image-token-id", type=int, default=9)
    args = parser.parse_args(argv)
    from aria.commands import run_command
    from aria.data.tokenizer import Tokenizer

    def run() -> None:
        out = train(args.input, args.out, args.vocab_size, args.image_token_id)
        tok = Tokenizer.load(out)
        print(f"wrote {out}: {tok.vocab_size} tokens, <|img|> = {tok.image_id}, <|im_start|> = "
              f"{tok.im_start_id}, <|im_end|> = {tok.im_end_id}, end of text = {tok.eos_id}")

    return run_command("train_tokenizer", run)


if __name__ == "__main__":
    raise SystemExit(main())
