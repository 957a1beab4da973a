"""A LoRA run's adapters as a PEFT adapter directory (``aria-convert to-hf --adapters-only``):
``adapter_config.json`` + ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained``
applies to transformers' ``AriaForConditionalGeneration`` holding the frozen base (the base exported
with ``aria-convert to-hf``, or the released HF weights the run started from).

Letters: E experts, R rank, N in-width, M out-width.

Keys are PEFT's: ``base_model.model.<module of the HF model in memory>.lora_{A,B}.weight``, the module
names transformers 5 gives the loaded model (``model.language_model.layers.0.self_attn.q_proj``,
``lm_head``), not the on-disk checkpoint names ``aria.convert.keymap`` writes. What each of our
adapters becomes:

- a Linear (decoder attention, shared experts, vision, the projector's q/k/v/linear/FFN) and the
  LM head: a PEFT ``lora.Linear``, A (R, N) and B (M, R) unchanged (our layout is PEFT's).
- the routed experts: PEFT's ``target_parameters`` (``ParamWrapper``) on ``mlp.experts.gate_up_proj``
  and ``mlp.experts.down_proj``, which HF Aria stores (E, in, out) like us (``is_transposed``). PEFT
  stacks the experts: A (E * R, N) with row e * R + r, B (M, R * E) with column r * E + e. Two
  parameters of one module nest, the first listed inside: gate_up_proj is ``experts.base_layer``.
- the projector's packed in-projection (``projector_in_proj``): HF runs it inside an
  ``nn.MultiheadAttention``, which PEFT adapts as one module (its ``lora.MultiheadAttention``): the
  in-projection's A (R, Dv), B (3 Dv, R) are ours as they are, and the out_proj adapter PEFT always
  adds beside it (``multihead_attn.base_layer.out_proj``) is written as A = B = 0.
- not expressible: the out_proj of that attention (part of our ``projector`` target). PEFT reaches
  it only through ``lora.MultiheadAttention`` (``nn.MultiheadAttention`` reads ``out_proj.weight``
  without calling the Linear, so a Linear adapter there is silently skipped), and in peft 0.21.2
  that layer's forward adds the out_proj update twice (W + 2 s B A; its merge() adds it, then
  out_proj.merge() adds it again: huggingface/peft PR #3774). Such adapters are refused with that
  explanation rather than exported to give other logits; ``--merge-lora`` exports them merged.

PEFT's scale is lora_alpha / r (``use_rslora`` false), ours alpha / rank: the same numbers. PEFT's
``ParamWrapper`` refuses a nonzero ``lora_dropout``, so a config with expert adapters says 0 (dropout
only acts in training; the adapters load and infer the same).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from aria.convert import keymap

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# on-disk HF prefixes (what ``keymap`` writes) -> the module names of the model transformers loads
MEMORY_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                   ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector."))
# HF expert tensors on disk -> the parameter of the experts module in memory; PEFT nests the wrappers
# in this order (the first innermost, as ``experts.base_layer``)
EXPERT_PARAMS = (("fc1.weight", "gate_up_proj"), ("fc2.weight", "down_proj"))
MHA = ".multihead_attn"


def memory_name(hf_key: str) -> str:
    for disk, memory in MEMORY_PREFIXES:
        if hf_key.startswith(disk):
            return memory + hf_key[len(disk):]
    raise AssertionError(f"no in-memory name for '{hf_key}'")


def _pattern(names: set[str]) -> str:
    """One regex matching exactly the module names (layer numbers generalised to \\d+)."""
    shapes = sorted({r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))
                     for name in names})
    return f"^({'|'.join(shapes)})$"


def peft_tensors(adapters: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str], list[str]]:
    """Our adapters -> (PEFT key -> tensor, the modules PEFT wraps, the expert parameters it wraps)."""
    from aria.model.lora import adapter_pairs

    out: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    expert_params: list[str] = []
    attention: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for base_key, pair in adapter_pairs(adapters).items():
        a, b = adapters[pair.a_key], adapters[pair.b_key]
        hf = keymap.ours_to_hf(base_key)
        if pair.stacked:  # experts: ours A (E, N, R), B (E, R, M) -> PEFT's stacked layout
            E, N, R = a.shape
            module, tensor = hf.rsplit(".experts.", 1)
            param = dict(EXPERT_PARAMS)[tensor]
            inner = param == EXPERT_PARAMS[0][1]
            prefix = f"{PEFT_PREFIX}{memory_name(module)}.experts{'.base_layer' if inner else ''}"
            out[f"{prefix}.lora_A.weight"] = a.permute(0, 2, 1).reshape(E * R, N)
            out[f"{prefix}.lora_B.weight"] = b.permute(2, 1, 0).reshape(b.shape[2], R * E)
            if f"mlp.experts.{param}" not in expert_params:
                expert_params.append(f"mlp.experts.{param}")
        elif MHA in hf:  # the packed in-projection or the out_proj of the projector's attention
            module = memory_name(hf[: hf.index(MHA) + len(MHA)])
            part = "in" if hf.endswith(".in_proj_weight") else "out"
            attention.setdefault(module, {})[part] = (a, b)
        else:
            module = memory_name(hf.removesuffix(".weight"))
            modules.add(module)
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    for module, parts in attention.items():
        if "out" in parts:
            raise ValueError(
                f"the adapter of the projector's attention out_proj ({module}.out_proj, LoRA target "
                "'projector') has no faithful PEFT form: PEFT adapts nn.MultiheadAttention's out_proj "
                "only through its lora.MultiheadAttention layer, whose forward applies that update twice "
                "in peft 0.21.2 (huggingface/peft PR #3774). Export the merged model with --merge-lora "
                "instead, or train without the 'projector' target ('projector_in_proj' and the other "
                "targets export)")
        modules.add(module)
        a, b = parts["in"]
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        R, N = a.shape  # PEFT always adds an out_proj adapter beside the in-projection's: zero
        out[f"{PEFT_PREFIX}{module}.base_layer.out_proj.lora_A.weight"] = a.new_zeros(R, N)
        out[f"{PEFT_PREFIX}{module}.base_layer.out_proj.lora_B.weight"] = b.new_zeros(N, R)
    expert_params.sort(key=lambda p: [name for _, name in EXPERT_PARAMS].index(p.rsplit(".", 1)[1]))
    return out, modules, expert_params


def write_peft_adapters(model_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                        log: Callable[[str], None] = print) -> Path:
    """The PEFT adapter directory of the LoRA model directory ``model_dir`` (see the module
    docstring); reads the adapters only, never the base."""
    from aria.convert.lora_base import read_base
    from aria.model.lora import required_adapters

    model_dir, out = Path(model_dir), Path(out)
    adapters, lora = required_adapters(model_dir, "--adapters-only")
    tensors, modules, expert_params = peft_tensors(adapters)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    ref = read_base(model_dir)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": ref.path if ref is not None and ref.hf else None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0 if expert_params else lora.dropout,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": _pattern(modules) if modules else None,
        "target_parameters": expert_params or None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    log(f"wrote {out} (PEFT LoRA adapters, r={lora.rank}, alpha={lora.alpha}: {len(modules)} modules"
        + (f", {' and '.join(expert_params)} of every MoE layer" if expert_params else "") + ")")
    return out
