"""Whole directories both ways: a training run, checkpoint or model directory -> a complete Hugging
Face directory (``to_hf``), and a Hugging Face directory -> our model directory (``from_hf``).

``to_hf`` finds the weights, the run's resolved ``config.yaml`` and the tokenizer as every tool does
(``aria.rundir``: a run directory means its latest checkpoint; expert-parallel files are consolidated
on the fly), and the image settings (crop size, minimum side, split) as ``hf_processor.image_settings``
does: the run config's ``data.*``, else HF processor files beside the weights, else 980 px crops if
the model has queries for them (490 if only those).

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

from pathlib import Path
from typing import Callable

import torch

from aria.config import load_run_config
from aria.convert import hf_processor as hfp
from aria.convert.checkpoint import Transform, convert, read_hf_config, read_model_config
from aria.convert.store import DEFAULT_SHARD_BYTES
from aria.rundir import (HF_CONFIG, MODEL_CONFIG, find_tokenizer, has_tokenizer, locate_model,
                         no_tokenizer_message)


def to_hf(source: str | Path, out: str | Path, dtype: torch.dtype | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | Path | None = None,
          weights_only: bool = False, transform: Transform | None = None, merge_lora: bool = False,
          adapters_only: bool = False, log: Callable[[str], None] = print) -> Path:
    """Writes the complete HF directory of a run / checkpoint / model directory; returns ``out``.
    A LoRA run's adapters are merged into the weights with ``merge_lora``; without it such a
    source is refused rather than exported as its frozen base. ``adapters_only`` writes its adapters
    as a PEFT adapter directory instead (``aria.convert.peft``), for the base exported without them."""
    from aria.convert.lora_base import merge_transform
    from aria.model.lora import ADAPTERS_FILE

    src = locate_model(source)
    if src.hf:
        raise ValueError(f"{src.path} is a Hugging Face directory ({HF_CONFIG}, no {MODEL_CONFIG}): it is "
                         "already in the HF format; aria-convert from-hf imports it")
    if adapters_only:
        if merge_lora or weights_only or tokenizer is not None or transform is not None:
            raise ValueError("--adapters-only writes the PEFT adapters alone: drop --merge-lora, "
                             "--weights-only and --tokenizer")
        from aria.convert.peft import write_peft_adapters

        return write_peft_adapters(src.directory, out, dtype=dtype, log=log)
    has_adapters = (src.directory / ADAPTERS_FILE).is_file()
    if merge_lora:
        if transform is not None:
            raise ValueError("merge_lora and transform cannot be combined")
        transform = merge_transform(src.directory)  # FileNotFoundError when there are no adapters
    elif has_adapters:
        raise ValueError(f"{src.directory} holds LoRA adapters ({ADAPTERS_FILE}): pass --merge-lora to "
                         "export the fine-tuned model (base weights + adapters merged), or --adapters-only "
                         "for a PEFT adapter directory")
    out = Path(out)
    cfg = read_model_config(src.directory)
    run = load_run_config(src.run_config) if src.run_config is not None else None
    processor, tokenizer_dir, stop_ids = None, None, ()
    if weights_only:
        if tokenizer is not None:
            raise ValueError("--weights-only writes no tokenizer; drop --tokenizer or --weights-only")
    else:
        found = find_tokenizer(src, tokenizer, run.data.tokenizer if run is not None else None)
        if found is None:
            raise FileNotFoundError(f"{no_tokenizer_message(src)}, or --weights-only to write the model "
                                    "without tokenizer and processor files")
        tokenizer_dir, origin = found
        if not tokenizer_dir.is_dir():  # a sentencepiece .model file: its directory is copied
            tokenizer_dir = tokenizer_dir.parent
        tok = hfp.load_tokenizer(tokenizer_dir, origin)
        hfp.check_tokenizer(tok, cfg, origin)
        hfp.check_hf_tokenizer_files(tokenizer_dir, origin)
        settings = hfp.image_settings(cfg, src.run_config, src.directory, run)
        processor = hfp.hf_processor(tok, cfg, settings)
        stop_ids = (tok.im_end_id,)

    convert(src.directory, out, "to-hf", dtype=dtype, max_shard_bytes=max_shard_bytes, log=log,
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
    tokenizer_found = has_tokenizer(source)
    if tokenizer_found:  # refuse a tokenizer the model cannot use before writing anything
        origin = f"the Hugging Face directory {source}"
        hfp.check_tokenizer(hfp.load_tokenizer(source, origin), cfg, origin)
    convert(source, out, "from-hf", dtype=dtype, max_shard_bytes=max_shard_bytes, log=log, transform=transform)
    if not tokenizer_found:
        log(f"warning: {source} has no tokenizer (tokenizer.json / tokenizer.model); training from {out} "
            "needs data.tokenizer=DIR, and aria-convert to-hf needs --tokenizer DIR")
        return out
    copied = hfp.copy_processor_files(source, out)
    log(f"copied {', '.join(copied)} to {out}")
    return out
