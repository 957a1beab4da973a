"""Check a dataset before training on it: every bad record with its line (or shard and key) and
reason, and per-kind statistics.

    python -m data_tools.validate DATASET --tokenizer DIR [--model tiny] [--split train]
           [--image-size 980] [--split-image] [--video-frames 8 | --video-fps F] [--timestamps]
           [--seq-len N] [--allow-outside-media]

DATASET: a ``.jsonl`` file, a directory with ``{split}.jsonl``, or webdataset shards. Every record is
parsed, its media decoded and processed, and it is tokenized exactly as training would, so what
passes here trains. With ``--seq-len`` samples that cannot fit a packed row are reported too.
Exits 1 if any record is bad.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from aria.config import load_model_config
from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import iterate_samples
from aria.data.packing import Packer
from aria.data.processor import Processor, VideoOptions
from aria.data.tokenizer import Tokenizer
from aria.model.loss import IGNORE_INDEX

COLUMNS = ("samples", "tokens", "supervised", "max_tokens", "images", "frames", "crops")


def kind_of(sample) -> str:
    if not sample.is_chat:
        return sample.kind
    kinds = {m.kind for m in sample.media}
    return "chat:" + ("+".join(sorted(kinds)) if kinds else "text")


def validate(dataset: str, processor: Processor, split: str = "train", seq_len: int | None = None,
             allow_outside_media: bool = False) -> tuple[dict, list[DataError]]:
    """Per-kind statistics and every bad record."""
    policy = BadInputPolicy(keep=True)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for sample, encoded in iterate_samples(dataset, processor, split, False, allow_outside_media, policy):
        n = len(encoded)
        if seq_len is not None:
            try:  # the packer's own rule: only text-only documents may be split
                Packer(seq_len).pieces(encoded, None)
            except DataError as err:
                policy.handle(err)
                continue
        row = stats[kind_of(sample)]
        row["samples"] += 1
        row["tokens"] += n
        row["supervised"] += int((encoded.targets != IGNORE_INDEX).sum())
        row["max_tokens"] = max(row["max_tokens"], n)
        row["images"] += encoded.num_images
        row["frames"] += encoded.num_frames
        row["crops"] += encoded.num_crops
    return dict(stats), policy.errors


def report(stats: dict, errors: list[DataError], dataset: str) -> str:
    lines = [f"{dataset}:", f"{'kind':<18}" + "".join(f"{c:>12}" for c in COLUMNS)]
    total = dict.fromkeys(COLUMNS, 0)
    for kind in sorted(stats):
        lines.append(f"{kind:<18}" + "".join(f"{stats[kind][c]:>12}" for c in COLUMNS))
        for c in COLUMNS:
            total[c] = max(total[c], stats[kind][c]) if c == "max_tokens" else total[c] + stats[kind][c]
    lines.append(f"{'total':<18}" + "".join(f"{total[c]:>12}" for c in COLUMNS))
    if errors:
        by_kind: dict[str, int] = defaultdict(int)
        for err in errors:
            by_kind[err.kind] += 1
        lines.append(f"\n{len(errors)} bad record(s): " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
        lines += [f"  {err}  [{err.kind}]" for err in errors]
    else:
        lines.append("\nno bad record")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    parser.add_argument("--model", default="tiny", help="model config (for image tokens per crop)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=980, choices=(490, 980))
    parser.add_argument("--split-image", action="store_true")
    parser.add_argument("--video-frames", type=int, default=8)
    parser.add_argument("--video-fps", type=float, default=None)
    parser.add_argument("--video-size", type=int, default=490, choices=(490, 980))
    parser.add_argument("--timestamps", action="store_true")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--allow-outside-media", action="store_true")
    args = parser.parse_args(argv)
    processor = Processor.for_model(
        Tokenizer.load(args.tokenizer), load_model_config(args.model), image_size=args.image_size,
        split_image=args.split_image,
        video=VideoOptions(num_frames=args.video_frames, fps=args.video_fps, image_size=args.video_size,
                           timestamps=args.timestamps))
    stats, errors = validate(args.dataset, processor, args.split, args.seq_len, args.allow_outside_media)
    print(report(stats, errors, args.dataset))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
