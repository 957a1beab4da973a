"""Check a dataset before training on it: every bad record with its line (or shard and key) and
reason, and per-kind statistics.

    python -m data_tools.validate DATASET --tokenizer DIR [--model tiny] [--split train]
           [--image-size 980] [--min-image-size 336] [--split-image]
           [--num-frames 8 | --video-fps F] [--max-frames 128] [--video-size 490] [--timestamps]
           [--seq-len N] [--allow-outside-media] [--columns FIELD=COLUMN ...] [--image-caption]
    python -m data_tools.validate DATASET --config RUN_DIR/config.yaml [--split train] [--seq-len N]

DATASET: anything ``data.train`` takes (docs/data_format.md): a ``.jsonl`` file, a ``.json`` list
(LLaVA / ShareGPT records), a directory with ``{split}.jsonl`` or ``{split}.json``, webdataset
shards, or a local Hugging Face dataset (parquet / arrow files, a directory of them, or
``save_to_disk`` output: its ``{split}``). ``--columns`` is the dataset's column mapping (record
field = its column), as in a ``data.train`` entry. Every record is parsed, its media decoded and
processed, and it is tokenized exactly as training would, so what passes here trains. With
``--seq-len`` samples that cannot fit a packed row are reported too. ``--config`` takes the
tokenizer, the model (its crop table) and every image/video setting from a run's resolved config
(and ``--seq-len`` from ``train.seq_len`` unless given, the column mapping from the config's
dataset entry with this path unless ``--columns`` is given); the processing flags are then not
allowed. ``--image-caption`` checks a stage-0 dataset (``train.objective`` contrastive or
caption_words, implied by such a ``--config``): a sample that is not an image or a video followed by
its text is bad (``not_image_caption``). Exits 1 if any record is bad, 2 if the dataset cannot be
read at all.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from aria.config import (IGNORE_INDEX, VideoConfig, load_model_config, load_run_config, parse_columns,
                         parse_mixture)
from aria.data.errors import BadInputPolicy, DataError
from aria.data.loader import iterate_samples
from aria.data.processor import Processor
from aria.data.tokenizer import Tokenizer

COLUMNS = ("samples", "tokens", "supervised", "max_tokens", "images", "frames", "crops")


def kind_of(sample) -> str:
    if not sample.is_chat:
        return sample.kind
    kinds = {m.kind for m in sample.media}
    return "chat:" + ("+".join(sorted(kinds)) if kinds else "text")


def validate(dataset: str, processor: Processor, split: str = "train", seq_len: int | None = None,
             allow_outside_media: bool = False, columns: dict[str, str] | None = None,
             image_caption: bool = False) -> tuple[dict, list[DataError]]:
    """Per-kind statistics and every bad record (``image_caption``: as stage 0 reads the data)."""
    policy = BadInputPolicy(keep=True)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for sample, encoded in iterate_samples(dataset, processor, split, False, allow_outside_media, policy,
                                           seq_len, columns, image_caption):
        n = len(encoded)
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


PROCESSING_FLAGS = {"model": "tiny", "image_size": 980, "min_image_size": 336, "split_image": False,
                    "num_frames": 8, "video_fps": None, "max_frames": 128, "video_size": 490,
                    "timestamps": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--config", default=None,
                        help="a run's resolved config (RUN_DIR/config.yaml): tokenizer, model and "
                             "image/video settings from it")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or .model file (required without --config)")
    parser.add_argument("--model", default=None,
                        help="model config name or YAML, for the image tokens per crop (its projector "
                             "table) and the <|img|> id (default: tiny)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=None, choices=(490, 980),
                        help="crop size of images (default: 980)")
    parser.add_argument("--min-image-size", type=int, default=None,
                        help="shortest side after resizing (default: 336)")
    parser.add_argument("--split-image", action="store_true", default=None)
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames sampled uniformly when a record gives none (default: 8)")
    parser.add_argument("--video-fps", type=float, default=None,
                        help="sample this many frames per second instead")
    parser.add_argument("--max-frames", type=int, default=None, help="most frames per video (default: 128)")
    parser.add_argument("--video-size", type=int, default=None, choices=(490, 980),
                        help="crop size of video frames (default: 490)")
    parser.add_argument("--timestamps", action="store_true", default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--allow-outside-media", action="store_true")
    parser.add_argument("--columns", nargs="+", default=None, metavar="FIELD=COLUMN",
                        help="the dataset's column mapping, e.g. conversations=dialog image=picture")
    parser.add_argument("--image-caption", action="store_true",
                        help="as stage 0 (train.objective=contrastive or caption_words) reads it: only an "
                             "image or a video followed by its text")
    args = parser.parse_args(argv)
    given = sorted(f"--{k.replace('_', '-')}" for k in PROCESSING_FLAGS if getattr(args, k) is not None)
    allow_outside, image_caption = args.allow_outside_media, args.image_caption
    try:
        columns = None
        if args.columns is not None:
            pairs = [c.partition("=") for c in args.columns]
            if not all(field and column for field, _, column in pairs):
                parser.error(f"--columns takes FIELD=COLUMN pairs, got {args.columns}")
            columns = parse_columns({f: c for f, _, c in pairs}, "--columns")
        if args.config:
            if given:
                parser.error(f"{', '.join(given)} cannot be combined with --config (it sets them)")
            cfg = load_run_config(args.config)
            tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
            processor = Processor.from_config(cfg.data, cfg.model, tokenizer)
            seq_len = args.seq_len if args.seq_len is not None else cfg.train.seq_len
            allow_outside = allow_outside or cfg.data.allow_outside_media
            image_caption = image_caption or cfg.train.objective != "lm"
            if columns is None:
                entries = parse_mixture(cfg.data.train) + parse_mixture(cfg.data.eval, "data.eval")
                columns = next((e.columns for e in entries if e.path == args.dataset), None)
        else:
            if not args.tokenizer:
                parser.error("give --tokenizer (or --config)")
            opt = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in PROCESSING_FLAGS.items()}
            video = VideoConfig(num_frames=opt["num_frames"], fps=opt["video_fps"],
                                max_frames=opt["max_frames"], image_size=opt["video_size"],
                                timestamps=opt["timestamps"])
            processor = Processor.for_model(
                Tokenizer.load(args.tokenizer), load_model_config(opt["model"]), image_size=opt["image_size"],
                min_image_size=opt["min_image_size"], split_image=opt["split_image"], video=video)
            seq_len = args.seq_len
        stats, errors = validate(args.dataset, processor, args.split, seq_len, allow_outside, columns,
                                 image_caption)
    except (ValueError, FileNotFoundError) as err:
        print(f"validate: error: {err}", file=sys.stderr)
        return 2
    print(report(stats, errors, args.dataset))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
