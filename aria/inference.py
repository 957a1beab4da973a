"""Running a model on prompts: loading it with its tokenizer and processor (what every command-line
tool takes as MODEL and its inference flags), batching prepared prompts, greedy or sampled answers.

Letters: B prompts in a batch, T prompt length, N new tokens.

Design decisions:
- MODEL, its run config and its tokenizer are found as ``aria.rundir`` says; the media settings not
  given default to that run's ``data`` config, else to the directory's processor files
  (``preprocessor_config.json`` / ``processor_config.json``, as ``aria-convert`` writes them), else
  to the model's largest crop size (``hf_processor.image_settings``), 8 video frames at 490 px.
  Every cheap check (configs, tokenizer, media settings) comes before the weights are read.
- The inference flags (``--tokenizer --image-size --num-frames --device --dtype``) are declared
  once (``aria.commands.add_model_arguments``, importable without torch so that ``--help`` is
  quick) for every tool that loads a model; ``load_from_args`` reads them.
- Prompts are batched with left padding, so every row generates exactly what it would alone
  (``generate`` turns the padding into segment 0); a test holds batched against one-at-a-time.
  Crops of several sizes (980 px images beside 490 px video frames, in one prompt or across the
  batch) go to the model per size with ``image_feature_order``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from aria.config import VideoConfig, load_run_config
from aria.convert.store import DTYPES
from aria.data.errors import DataError
from aria.data.packing import to_device
from aria.data.processor import Processor, group_crops
from aria.data.records import Sample
from aria.model.generation import generate
from aria.model.layers import slow_bf16_warning
from aria.rundir import ModelSource, find_tokenizer, locate_model, no_tokenizer_message


# ---------------------------------------------------------------------------------------------
# Prompts and generation
# ---------------------------------------------------------------------------------------------


def prompt_inputs(processor: Processor, prompt: Sample) -> dict[str, Any]:
    """``processor.prompt_inputs`` with a generation header; media errors located at the record."""
    try:
        return processor.prompt_inputs(prompt, add_generation_prompt=True)
    except DataError as err:
        raise err.at(prompt.where) from None


def stop_ids(processor: Processor) -> list[int]:
    """The tokens that end an answer: ``<|im_end|>`` and the end-of-text token."""
    tok = processor.tokenizer
    return list(dict.fromkeys([tok.im_end_id, tok.eos_id]))


def batch_model_inputs(model: torch.nn.Module, processor: Processor, inputs: list[dict[str, Any]]
                       ) -> dict[str, Any]:
    """Left-padded ``input_ids`` (B, T) and ``attention_mask`` of prepared prompts plus their crops
    (in <|img|> order, grouped per size), on the model's device; float pixels in its dtype."""
    param = next(model.parameters())
    lengths = [item["input_ids"].shape[-1] for item in inputs]
    B, T = len(inputs), max(lengths)
    input_ids_BT = torch.full((B, T), processor.tokenizer.pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    for b, (item, n) in enumerate(zip(inputs, lengths)):
        input_ids_BT[b, T - n:] = item["input_ids"].reshape(-1)
        attention_mask_BT[b, T - n:] = 1
    # Crops in row order, each row's in its token order: the order of the <|img|> slots.
    pixels = group_crops([crop for item in inputs for crop in item["crops"]], processor.tokens_per_crop)

    return to_device({"input_ids": input_ids_BT, "attention_mask": attention_mask_BT, **pixels},
                     param.device, param.dtype)


@dataclass
class Generated:
    text: str
    """The answer decoded without special tokens, up to the first stop token."""
    token_ids: list[int]
    """The new tokens up to (not including) the first stop token."""
    stopped: bool
    """True if a stop token ended the answer, False if ``max_new_tokens`` did."""


@torch.no_grad()
def generate_batch(model: torch.nn.Module, processor: Processor, inputs: list[dict[str, Any]],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None,
                   on_token: Callable[[torch.Tensor], None] | None = None,
                   decode: str = "dynamic") -> list[Generated]:
    """Answers to prepared ``prompt_inputs`` (one left-padded batch), in input order. Greedy when
    ``temperature`` is 0; sampled rows draw from ``generator`` in turn, so a sampled answer depends
    on the seed and on the batch it is in. ``decode``: see ``aria.model.generate``."""
    tok = processor.tokenizer
    batch = batch_model_inputs(model, processor, inputs)
    stops = stop_ids(processor)
    new_BN = generate(model, batch["input_ids"], batch["pixel_values"], batch["pixel_mask"],
                      attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                      eos_token_ids=stops, pad_token_id=tok.pad_id, temperature=temperature,
                      top_p=top_p, generator=generator, on_token=on_token,
                      image_feature_order=batch["image_feature_order"], decode=decode)
    results = []
    for row in new_BN.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        ids = row if end is None else row[:end]
        results.append(Generated(tok.decode(ids, skip_special_tokens=True), ids, end is not None))
    return results


def generate_answers(model: torch.nn.Module, processor: Processor, inputs: list[dict[str, Any]],
                     max_new_tokens: int) -> list[str]:
    """Greedy answers (text) for prepared ``prompt_inputs``, in input order."""
    return [g.text for g in generate_batch(model, processor, inputs, max_new_tokens)]


def answer_batch(model: torch.nn.Module, processor: Processor, samples: list[Sample],
                 max_new_tokens: int) -> list[str]:
    """Greedy answers to prompt conversations (as ``split_prompt`` returns them), in order."""
    return generate_answers(model, processor, [prompt_inputs(processor, s) for s in samples],
                            max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Loading a model, its tokenizer and processor
# ---------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_weights(source: ModelSource, device: str | torch.device, dtype: torch.dtype | None):
    from aria.convert.checkpoint import load_hf_dir, load_model_dir

    load = load_hf_dir if source.hf else load_model_dir
    return load(source.directory, device=device, dtype=dtype)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Our model from a model / checkpoint / run directory, or from a Hugging Face directory."""
    return _load_weights(locate_model(path), device, dtype)


def load_inference(model_path: str | Path, tokenizer: str | Path | None = None,
                   image_size: int | None = None, num_frames: int | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """(model in eval mode, processor) for MODEL, as the module docstring says. ``dtype`` defaults
    to bf16 on a GPU and fp32 on the CPU."""
    from aria.convert.checkpoint import read_hf_config, read_model_config
    from aria.convert.hf_processor import image_settings
    from aria.data.tokenizer import Tokenizer

    device = torch.device(device or default_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = locate_model(model_path)
    model_cfg = read_hf_config(source.directory) if source.hf else read_model_config(source.directory)
    run = load_run_config(source.run_config) if source.run_config is not None else None
    found = find_tokenizer(source, tokenizer, run.data.tokenizer if run is not None else None)
    if found is None:
        raise FileNotFoundError(no_tokenizer_message(source))
    video = run.data.video if run is not None else VideoConfig()
    if num_frames is not None:
        video = replace(video, num_frames=num_frames, fps=None)
    images = image_settings(model_cfg, source.run_config, source.directory, run)
    processor = Processor.for_model(Tokenizer.load(found[0]), model_cfg, video=video,
                                    image_size=image_size if image_size is not None else images.image_size,
                                    min_image_size=images.min_image_size, split_image=images.split_image)
    slow = slow_bf16_warning(device, dtype, "fp32 (--dtype fp32, the CPU's default) runs much faster")
    if slow:
        print(slow, file=sys.stderr)
    model = _load_weights(source, device, dtype).eval()
    return model, processor


def load_from_args(args: argparse.Namespace):
    """``load_inference`` with the flags of ``aria.commands.add_model_arguments``."""
    if args.num_frames is not None and args.num_frames < 1:
        raise ValueError(f"--num-frames must be >= 1, got {args.num_frames}")
    return load_inference(args.model, args.tokenizer, args.image_size, args.num_frames, args.device,
                          DTYPES[args.dtype] if args.dtype else None)
