"""Whole directories both ways: a training run, checkpoint or model directory -> a complete Hugging
Face directory (``to_hf``), and a Hugging Face directory -> our model directory (``from_hf``).

``to_hf`` finds, in order:
- the weights: ``SOURCE`` itself (``model_config.json``), ``SOURCE/model`` (a checkpoint ``step_N``) or
  the latest checkpoint of a run directory (``checkpoints/latest``), expert-parallel files
  consolidated on the fly;
- the run's resolved ``config.yaml``: in the checkpoint directory, else in the run directory;
- the tokenizer: ``--tokenizer``, else the run config's ``data.tokenizer``, else tokenizer files
  beside the weights (a directory ``from_hf`` wrote);
- the image settings (crop size, minimum side, split): the run config's ``data.*``, else HF
  processor files beside the weights, else 980 px crops if the model has queries for them (490 if
  only those).

Design decisions:
- No tokenizer means an error that says how to give one (or to pass ``--weights-only``): an HF
  directory without a tokenizer loads as a model but not as a processor, which a user finds out
  only when serving it. ``--weights-only`` writes weights, ``config.json`` and
  ``generation_config.json``.
- Everything that can be checked is checked before the first file is written: source layout, run
  config, tokenizer (special tokens, ``<|img|>`` id, vocabulary size), crop size against the
  projector table, every weight key and shape (from the safetensors headers).
- A checkpoint's ``optimizer/`` directory, or a raw DeepSpeed checkpoint (ZeRO partitions without
  our ``model/``), is refused with an explanation: both hold optimizer partitions; training writes
  the weights into ``model/``, which is what conversion reads.
- Memory: see ``aria.convert.checkpoint`` (one output shard plus the tensor in flight).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aria.convert import hf_processor as hfp
from aria.convert.checkpoint import (DEFAULT_SHARD_BYTES, MODEL_CONFIG, Transform, convert,
                                     read_hf_config, read_model_config)

RUN_CONFIG = "config.yaml"
CHECKPOINTS, LATEST = "checkpoints", "latest"
DEEPSPEED_PATTERNS = ("*_model_states.pt", "*_optim_states.pt", "zero_pp_rank_*", "trainer_rank*.pt")


@dataclass
class Source:
    """Where a ``to-hf`` export reads from."""

    model_dir: Path
    """Our model directory (``model_config.json`` + weights)."""
    run_config: Path | None
    """The resolved ``config.yaml`` of the run that wrote it, if it came from a run."""


def locate_source(path: str | Path) -> Source:
    """A run, checkpoint or model directory -> its model directory and run config."""
    from aria.train.checkpoint import resolve_model_dir

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give a run directory, a checkpoint directory (step_N) or a "
                         f"model directory ({MODEL_CONFIG} + safetensors)")
    if path.name == CHECKPOINTS and (path / LATEST).is_file():
        path = path.parent  # RUN/checkpoints: the run
    if (path / "config.json").is_file() and not (path / MODEL_CONFIG).is_file():
        raise ValueError(f"{path} is a Hugging Face directory (config.json, no {MODEL_CONFIG}): it is "
                         "already in the HF format; aria-convert from-hf imports it")
    try:
        model_dir = resolve_model_dir(path)
    except FileNotFoundError:
        if (path / "state.json").is_file() and any(path.glob("rank*.safetensors")):
            raise ValueError(f"{path} is the optimizer state of a checkpoint (fp32 master weights and "
                             f"Adam moments by rank), not a model: give its checkpoint directory "
                             f"{path.parent} or the run directory") from None
        deepspeed = _deepspeed_files(path)
        if not deepspeed:
            raise
        hint = (f"; its checkpoint directory {path.parent} has model/: export that" if
                (path.parent / "model" / MODEL_CONFIG).is_file() else "")
        raise ValueError(
            f"{path} is a DeepSpeed checkpoint ({', '.join(deepspeed[:3])}) without our model/ "
            f"directory{hint}. Its ZeRO files hold optimizer/parameter partitions, not a model: "
            f"give the checkpoint directory aria.train wrote (RUN/checkpoints/step_N, which holds "
            f"model/ with the weights consolidated at save time) or the run directory") from None
    return Source(model_dir, _run_config(model_dir))


def _deepspeed_files(path: Path) -> list[str]:
    """Names of DeepSpeed checkpoint files in ``path`` or one level under it."""
    found = []
    for pattern in DEEPSPEED_PATTERNS:
        for depth in ("", "*/"):
            found += [str(p.relative_to(path)) for p in path.glob(depth + pattern)]
    return sorted(set(found))


def _run_config(model_dir: Path) -> Path | None:
    """``step_N/config.yaml`` beside ``step_N/model``, else the run's ``RUN/config.yaml``."""
    ckpt = model_dir.parent
    if model_dir.name == "model" and (ckpt / RUN_CONFIG).is_file():
        return ckpt / RUN_CONFIG
    if model_dir.name == "model" and ckpt.parent.name == CHECKPOINTS and (ckpt.parent.parent / RUN_CONFIG).is_file():
        return ckpt.parent.parent / RUN_CONFIG
    return None


def _load_run_config(path: Path):
    from aria.train.compose import load_resolved

    try:
        return load_resolved(path)
    except Exception as err:  # YAML errors, unknown or bad fields: all name the problem
        raise ValueError(f"{path} (the run config of the checkpoint) cannot be read: {err}") from None


def _find_tokenizer(given: str | Path | None, source: Source, run) -> tuple[Path, str] | None:
    """(tokenizer directory, how it was found), or None."""
    if given is not None:
        return Path(given), "--tokenizer"
    if run is not None and run.data.tokenizer:
        tok = Path(run.data.tokenizer)
        if not tok.exists():
            raise FileNotFoundError(f"{source.run_config} names data.tokenizer={run.data.tokenizer}, which "
                                    "does not exist here; pass the tokenizer with --tokenizer DIR")
        return (tok if tok.is_dir() else tok.parent), f"data.tokenizer in {source.run_config}"
    if hfp.has_tokenizer(source.model_dir):
        return source.model_dir, f"the files beside the weights in {source.model_dir}"
    return None


def to_hf(source: str | Path, out: str | Path, dtype: torch.dtype | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | Path | None = None,
          weights_only: bool = False, transform: Transform | None = None, merge_lora: bool = False,
          log: Callable[[str], None] = print) -> Path:
    """Writes the complete HF directory of a run / checkpoint / model directory; returns ``out``.
    A LoRA run's adapters are merged into the weights with ``merge_lora``; without it such a
    source is refused rather than exported as its frozen base."""
    from aria.model.lora import ADAPTERS_FILE, merge_transform

    src = locate_source(source)
    has_adapters = (src.model_dir / ADAPTERS_FILE).is_file()
    if merge_lora:
        if transform is not None:
            raise ValueError("merge_lora and transform cannot be combined")
        transform = merge_transform(src.model_dir)  # FileNotFoundError when there are no adapters
    elif has_adapters:
        raise ValueError(f"{src.model_dir} holds LoRA adapters ({ADAPTERS_FILE}): pass --merge-lora to "
                         "export the fine-tuned model (base weights + adapters merged)")
    out = Path(out)
    cfg = read_model_config(src.model_dir)
    run = _load_run_config(src.run_config) if src.run_config is not None else None
    processor, tokenizer_dir, stop_ids = None, None, ()
    if weights_only:
        if tokenizer is not None:
            raise ValueError("--weights-only writes no tokenizer; drop --tokenizer or --weights-only")
    else:
        found = _find_tokenizer(tokenizer, src, run)
        if found is None:
            raise FileNotFoundError(
                f"no tokenizer for {source}: none given with --tokenizer DIR, "
                + (f"no data.tokenizer in {src.run_config}, " if src.run_config else "no run config.yaml, ")
                + f"and no tokenizer.json / tokenizer.model beside the weights in {src.model_dir}. Pass "
                "--tokenizer DIR (the tokenizer the model was trained with, e.g. one written by "
                "python -m data_tools.train_tokenizer), or --weights-only to write the model without "
                "tokenizer and processor files")
        tokenizer_dir, origin = found
        tok = hfp.load_tokenizer(tokenizer_dir, origin)
        hfp.check_tokenizer(tok, cfg, origin)
        hfp.check_hf_tokenizer_files(tokenizer_dir, origin)
        if run is not None:
            settings = hfp.ImageSettings(run.data.image_size, run.data.min_image_size, run.data.split_image,
                                         f"data.* in {src.run_config}")
        else:
            settings = hfp.image_settings_from_files(src.model_dir) or hfp.default_image_settings(cfg)
        processor = hfp.hf_processor(tok, cfg, settings)
        stop_ids = (tok.im_end_id,)

    convert(src.model_dir, out, "to-hf", dtype=dtype, max_shard_bytes=max_shard_bytes, log=log,
            transform=transform, stop_token_ids=stop_ids)
    if processor is None:
        log(f"warning: {out} holds the model only (--weights-only): AutoProcessor.from_pretrained will "
            "not load it until tokenizer and processor files are added")
        return out
    hfp.write_processor_files(out, tokenizer_dir, processor)
    log(f"wrote tokenizer ({origin}) and processor ({processor.images.max_image_size} px crops, "
        f"split_image={processor.images.split_image}, from {settings.origin}) files to {out}")
    return out


def from_hf(source: str | Path, out: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, transform: Transform | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Our model directory (weights + tokenizer and processor files) from an HF directory."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory (expected a Hugging Face Aria directory with "
                                "config.json and safetensors)")
    cfg = read_hf_config(source)
    has_tokenizer = hfp.has_tokenizer(source)
    if has_tokenizer:  # refuse a tokenizer the model cannot use before writing anything
        origin = f"the Hugging Face directory {source}"
        hfp.check_tokenizer(hfp.load_tokenizer(source, origin), cfg, origin)
    convert(source, out, "from-hf", dtype=dtype, max_shard_bytes=max_shard_bytes, log=log, transform=transform)
    if not has_tokenizer:
        log(f"warning: {source} has no tokenizer (tokenizer.json / tokenizer.model); training from {out} "
            "needs data.tokenizer=DIR, and aria-convert to-hf needs --tokenizer DIR")
        return out
    copied = hfp.copy_processor_files(source, out)
    log(f"copied {', '.join(copied)} to {out}")
    return out
