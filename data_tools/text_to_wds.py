"""Turn plain text files into webdataset shards of ``{"kind": "text"}`` documents (stage-1 data).

    python -m data_tools.text_to_wds FILE [FILE ...] --out DIR [--prefix text]
                                     [--documents lines|paragraphs|files] [--samples-per-shard 1000]
                                     [--min-chars 1]

``--documents``: one document per line (default), per blank-line-separated paragraph, or per file.
Documents shorter than ``--min-chars`` are dropped and counted. Files must be UTF-8; a file that is
not is reported with its name and skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from aria.commands import run_command


def documents(path: Path, mode: str) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    if mode == "files":
        yield text
    elif mode == "paragraphs":
        yield from (p.strip("\n") for p in text.split("\n\n"))
    else:
        yield from text.splitlines()


def convert(files: list[str | Path], out: str | Path, prefix: str = "text", mode: str = "lines",
            samples_per_shard: int = 1000, min_chars: int = 1, log=print) -> dict:
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, short, bad_files = 0, 0, []
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0) as sink:
        for name in files:
            path = Path(name)
            try:
                docs = list(documents(path, mode))
            except (OSError, UnicodeDecodeError) as err:
                bad_files.append(f"{path}: {err}")
                continue
            for doc in docs:
                if len(doc.strip()) < min_chars:
                    short += 1
                    continue
                record = {"kind": "text", "text": doc}
                sink.write({"__key__": f"{written:09d}", "json": json.dumps(record).encode()})
                written += 1
    for line in bad_files:
        log(f"skipped unreadable file {line}")
    if written == 0:
        raise ValueError(f"no document written from {files} ({short} too short, "
                         f"{len(bad_files)} unreadable files)")
    log(f"wrote {written} documents to {pattern.replace('%06d', '*')} ({short} shorter than "
        f"{min_chars} characters dropped)")
    return {"samples": written, "too_short": short, "bad_files": bad_files,
            "shards": sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.text_to_wds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefix", default="text")
    parser.add_argument("--documents", choices=("lines", "paragraphs", "files"), default="lines")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--min-chars", type=int, default=1)
    args = parser.parse_args(argv)

    def run() -> None:
        convert(args.files, args.out, args.prefix, args.documents, args.samples_per_shard, args.min_chars)

    return run_command("text_to_wds", run)


if __name__ == "__main__":
    raise SystemExit(main())
