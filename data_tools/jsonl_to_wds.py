"""Pack a JSONL or JSON-list dataset and its media into webdataset tar shards (docs/data_format.md).

    python -m data_tools.jsonl_to_wds DATASET --out DIR [--prefix NAME] [--split train]
                                      [--samples-per-shard 1000] [--strict] [--allow-outside-media]

DATASET is a ``.jsonl`` file, a ``.json`` list, or a directory holding ``{split}.jsonl`` /
``{split}.json``, of Aria or LLaVA / ShareGPT records. Every record is validated first; bad ones
are skipped and reported with file and line (``--strict`` stops at the first). Sample ``K`` becomes
``K.json`` plus ``K.<i>.<ext>`` for its media, and the record (in its own schema) names its media
by those suffixes in ``images`` and ``videos``, which both schemas read. Shards are
``DIR/NAME-000000.tar``, ``NAME-000001.tar``, ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aria.commands import run_command
from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import read_record
from aria.data.sources import FileSource, open_source


def _rename_media(record: dict, sample, where: str) -> tuple[dict, dict[str, bytes]]:
    """The record with media renamed to member suffixes, and the member bytes."""
    record = dict(record)
    members: dict[str, bytes] = {}
    images, videos = [], []
    for i, ref in enumerate(sample.media):
        try:
            data = ref.path.read_bytes()
        except OSError as err:
            kind = "missing_file" if isinstance(err, FileNotFoundError) else "bad_media"
            raise DataError(f"cannot read {ref.kind} file {str(ref.path)!r} ({err.strerror or err})",
                            kind, where) from None
        suffix = f"{i}{ref.path.suffix.lower() or '.bin'}"
        members[suffix] = data
        if ref.kind == "image":
            images.append(suffix)
        else:
            spec = {"path": suffix}
            for key in ("num_frames", "fps", "max_frames"):
                if getattr(ref, key) is not None:
                    spec[key] = getattr(ref, key)
            videos.append(spec)
    for key in ("image", "images", "video", "videos"):  # Aria's and LLaVA's media fields
        record.pop(key, None)
    if images:
        record["images"] = images
    if videos:
        record["videos"] = videos  # a list of video objects: both schemas read it
    return record, members


def convert(dataset: str | Path, out: str | Path, prefix: str | None = None, split: str = "train",
            samples_per_shard: int = 1000, strict: bool = False, allow_outside_media: bool = False,
            log=print) -> dict:
    """Writes the shards; returns {"shards": [...], "samples": n, "skipped": {reason: count}}."""
    import webdataset as wds

    source = open_source(dataset, split, allow_outside_media)
    if not isinstance(source, FileSource):
        raise ValueError(f"{dataset} is not a JSONL or JSON-list file ({type(source).__name__}): shards "
                         "are written from those; webdataset shards and Hugging Face datasets are read "
                         "by data.train as they are")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or source.path.stem
    policy = BadInputPolicy(strict)
    written = 0
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0) as sink:
        for raw in source.iterate_once():
            loaded = policy.attempt(read_record, raw)
            renamed = policy.attempt(_rename_media, raw.record, loaded.sample, raw.where) if loaded else None
            if renamed is None:
                continue
            record, members = renamed
            sink.write({"__key__": f"{written:09d}", "json": json.dumps(record).encode(),
                        **members})
            written += 1
    shards = sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))
    if written == 0:
        raise ValueError(f"{dataset}: no valid record to write (skipped: {dict(policy.counts)})")
    log(f"wrote {written} samples to {len(shards)} shard(s) {pattern.replace('%06d', '*')}"
        + (f"; skipped {dict(policy.counts)}" if policy.counts else ""))
    return {"shards": shards, "samples": written, "skipped": dict(policy.counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.jsonl_to_wds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help=".jsonl file or directory with {split}.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the JSONL name)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--allow-outside-media", action="store_true")
    args = parser.parse_args(argv)

    def run() -> None:
        convert(args.dataset, args.out, args.prefix, args.split, args.samples_per_shard, args.strict,
                args.allow_outside_media)

    return run_command("jsonl_to_wds", run)


if __name__ == "__main__":
    raise SystemExit(main())
