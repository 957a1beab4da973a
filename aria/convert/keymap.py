"""Our parameter names <-> Hugging Face Aria checkpoint names, as one table.

Every tensor has the same shape on both sides (experts are stored (E, in, out) = [gate | up] in both;
the projector's packed in-projection is kept packed), so conversion is renaming only, plus:
- ``vision_tower.post_layernorm.*``: a dead LayerNorm the HF model carries but never applies; it is
  written as zeros (as the HF converter does) and ignored on reading.
- a tied LM head is written once (as the embedding) and read back from it.

We *write* the layout ``save_pretrained`` writes by default in transformers 5.x (the 4.48-era
"legacy" names). We *read* any of the four layouts transformers accepts (legacy or new prefixes,
``fc1.weight``/``fc2.weight`` or ``gate_up_proj``/``down_proj``) and the original custom-code
checkpoint names of rhymes-ai/Aria (``vision_tower.vision_model.``, ``ln_ffn``, ``ffn``, ``ln_kv``):
``normalize_hf_key`` maps all of them onto the written layout first.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Iterator, Sequence

import torch

# (ours, HF on-disk). {i} = vision layer, {l} = decoder layer.
KEY_TABLE: list[tuple[str, str]] = [
    ("vision.patch_embed.weight", "vision_tower.embeddings.patch_embedding.weight"),
    ("vision.patch_embed.bias", "vision_tower.embeddings.patch_embedding.bias"),
    ("vision.pos_embed.weight", "vision_tower.embeddings.position_embedding.weight"),
    *[(f"vision.layers.{{i}}.attn.{p}.{t}", f"vision_tower.encoder.layers.{{i}}.self_attn.{p}.{t}")
      for p in ("q_proj", "k_proj", "v_proj", "out_proj") for t in ("weight", "bias")],
    *[(f"vision.layers.{{i}}.norm{n}.{t}", f"vision_tower.encoder.layers.{{i}}.layer_norm{n}.{t}")
      for n in (1, 2) for t in ("weight", "bias")],
    *[(f"vision.layers.{{i}}.mlp.{fc}.{t}", f"vision_tower.encoder.layers.{{i}}.mlp.{fc}.{t}")
      for fc in ("fc1", "fc2") for t in ("weight", "bias")],
    ("projector.query", "multi_modal_projector.query"),
    *[(f"projector.cross_attn.{p}.weight", f"multi_modal_projector.cross_attn.{p}.weight")
      for p in ("q_proj", "k_proj", "v_proj")],
    ("projector.cross_attn.in_proj_weight", "multi_modal_projector.cross_attn.multihead_attn.in_proj_weight"),
    ("projector.cross_attn.in_proj_bias", "multi_modal_projector.cross_attn.multihead_attn.in_proj_bias"),
    *[(f"projector.cross_attn.out_proj.{t}", f"multi_modal_projector.cross_attn.multihead_attn.out_proj.{t}")
      for t in ("weight", "bias")],
    *[(f"projector.cross_attn.linear.{t}", f"multi_modal_projector.cross_attn.linear.{t}")
      for t in ("weight", "bias")],
    *[(f"projector.cross_attn.norm_q.{t}", f"multi_modal_projector.cross_attn.layer_norm.{t}")
      for t in ("weight", "bias")],
    *[(f"projector.cross_attn.norm_kv.{t}", f"multi_modal_projector.cross_attn.layer_norm_kv.{t}")
      for t in ("weight", "bias")],
    *[(f"projector.norm_ffn.{t}", f"multi_modal_projector.layer_norm.{t}") for t in ("weight", "bias")],
    ("projector.ffn_in.weight", "multi_modal_projector.feed_forward.linear_in.weight"),
    ("projector.ffn_out.weight", "multi_modal_projector.feed_forward.linear_out.weight"),
    ("decoder.embed.weight", "language_model.model.embed_tokens.weight"),
    ("decoder.layers.{l}.attn_norm.weight", "language_model.model.layers.{l}.input_layernorm.weight"),
    ("decoder.layers.{l}.mlp_norm.weight", "language_model.model.layers.{l}.post_attention_layernorm.weight"),
    *[(f"decoder.layers.{{l}}.attn.{p}.{t}", f"language_model.model.layers.{{l}}.self_attn.{p}.{t}")
      for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("weight", "bias")],
    ("decoder.layers.{l}.moe.router.weight", "language_model.model.layers.{l}.mlp.router.weight"),
    ("decoder.layers.{l}.moe.experts.w_fc1", "language_model.model.layers.{l}.mlp.experts.fc1.weight"),
    ("decoder.layers.{l}.moe.experts.w_fc2", "language_model.model.layers.{l}.mlp.experts.fc2.weight"),
    *[(f"decoder.layers.{{l}}.moe.shared.{p}.{t}", f"language_model.model.layers.{{l}}.mlp.shared_experts.{p}.{t}")
      for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")],
    ("decoder.norm.weight", "language_model.model.norm.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
]

# HF tensors the model does not use: written as zeros, ignored when read.
HF_DEAD_KEYS = ("vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias")

# Other layouts -> the written one (applied in order; prefix rules are anchored).
_NORMALIZE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\.weight$"), "language_model.lm_head.weight"),
    (re.compile(r"\.mlp\.experts\.gate_up_proj$"), ".mlp.experts.fc1.weight"),
    (re.compile(r"\.mlp\.experts\.down_proj$"), ".mlp.experts.fc2.weight"),
    # original rhymes-ai custom-code checkpoint
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^multi_modal_projector\.ln_ffn\."), "multi_modal_projector.layer_norm."),
    (re.compile(r"^multi_modal_projector\.ffn\."), "multi_modal_projector.feed_forward."),
    (re.compile(r"\.cross_attn\.ln_kv\."), ".cross_attn.layer_norm_kv."),
]


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{l\}", r"(?P<l>\d+)")
    return re.compile(f"^{pattern}$")


_OURS_TO_HF = [(_compile(ours), hf) for ours, hf in KEY_TABLE]
_HF_TO_OURS = [(_compile(hf), ours) for ours, hf in KEY_TABLE]


def _translate(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def normalize_hf_key(key: str) -> str:
    for pattern, replacement in _NORMALIZE:
        key = pattern.sub(replacement, key)
    return key


def ours_to_hf(key: str) -> str:
    hf = _translate(key, _OURS_TO_HF)
    if hf is None:
        raise ValueError(f"parameter '{key}' has no Hugging Face equivalent (HF Aria has no such "
                       "tensor, e.g. a router balancing bias or a LoRA adapter)")
    return hf


def hf_to_ours(key: str) -> str | None:
    """Our name for an HF key in any accepted layout; None for tensors we drop (dead / buffers)."""
    key = normalize_hf_key(key)
    if key in HF_DEAD_KEYS or key.endswith(".inv_freq"):
        return None
    ours = _translate(key, _HF_TO_OURS)
    if ours is None:
        raise ValueError(f"unexpected tensor '{key}' in the Hugging Face checkpoint: it is not part of "
                       "the Aria architecture")
    return ours


def check_shape(source: str, key: str, found: Sequence[int], expected: Sequence[int]) -> None:
    """Raise naming ``source``, ``key`` and both shapes unless they agree."""
    if tuple(found) != tuple(expected):
        raise ValueError(f"{source}: tensor '{key}' has shape {tuple(found)} but the model config "
                         f"expects {tuple(expected)}")


def check_keys(found: Iterable[str], expected: Iterable[str], source: str, tied_lm_head: bool) -> None:
    """Raise one error listing every missing and unexpected key (our names)."""
    found, expected = set(found), set(expected)
    if tied_lm_head:
        found.add("lm_head.weight")
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        lines = [f"{source} does not match the model config:"]
        if missing:
            lines.append(f"  missing {len(missing)} tensor(s): {missing[:20]}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} tensor(s): {unexpected[:20]}"
                         + (" ..." if len(unexpected) > 20 else ""))
        raise ValueError("\n".join(lines))


def rename_hf(items: Iterable[tuple[str, object]], source: str,
              size: Callable[[object], int] | None = None) -> Iterator[tuple[str, object]]:
    """(HF key, value) -> (our key, value), dropping dead tensors; every key that is not Aria's is
    collected into one error raised at the end. ``size`` gives a value's element count (default: a
    tensor's, or the product of a shape)."""
    unexpected = []
    for key, value in items:
        try:
            ours = hf_to_ours(key)
        except ValueError:
            unexpected.append(key)
            continue
        if ours is None:
            continue
        numel = size(value) if size else value.numel() if isinstance(value, torch.Tensor) else math.prod(value)
        if numel == 0 and ".moe.shared." in ours:  # HF keeps zero-size shared experts when S = 0
            continue
        yield ours, value
    if unexpected:
        raise ValueError(f"{source} holds {len(unexpected)} tensor(s) that are not part of Aria: "
                         f"{sorted(unexpected)[:20]}")
