"""ModelConfig <-> Hugging Face ``config.json`` (``AriaConfig`` with ``aria_text`` and
``idefics3_vision`` sub-configs), written without importing transformers.

Mapping notes:
- HF ``text_config.intermediate_size`` is the *per-expert* width (our ``moe.intermediate_size``);
  shared experts are ``moe_num_shared_experts`` x that width. The original custom-code config
  (``model_type: aria_moe_lm``) kept the per-expert width in ``moe_intermediate_size``.
- HF ``text_config.hidden_act`` / ``mlp_bias`` only concern the shared experts.
- RoPE: written as ``rope_parameters``; the legacy ``rope_theta`` key is read too.
- Training-only options (router loss coefficients, balancing) are not part of the HF format; they
  take our defaults on import.
- ``generation_config.json`` ends generation at the end-of-text id and, when the export knows the
  tokenizer, at ``<|im_end|>`` too (the end of an assistant turn, where our evaluation stops).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from aria.config import ModelConfig, MoEConfig, ProjectorConfig, TextConfig, VisionConfig

def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    t, m, v = cfg.text, cfg.moe, cfg.vision
    text_config = {
        "model_type": "aria_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": m.shared_act,
        "max_position_embeddings": t.max_position_embeddings,
        "initializer_range": t.initializer_range,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(t.rope_theta)},
        "attention_bias": t.attention_bias,
        "mlp_bias": m.shared_bias,
        "moe_num_experts": m.num_experts,
        "moe_topk": m.top_k,
        "moe_num_shared_experts": m.num_shared_experts,
        "pad_token_id": t.pad_token_id,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    vision_config = {
        "model_type": "idefics3_vision",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    }
    return {
        "architectures": ["AriaForConditionalGeneration"],
        "model_type": "aria",
        "text_config": text_config,
        "vision_config": vision_config,
        "vision_feature_layer": v.feature_layer,
        "projector_patch_to_query_dict": {str(k): q for k, q in cfg.projector.patch_to_query.items()},
        "image_token_index": cfg.image_token_id,
        "pad_token_id": t.pad_token_id,
        "initializer_range": t.initializer_range,
        "tie_word_embeddings": t.tie_word_embeddings,
        "dtype": dtype,
    }


def generation_config(cfg: ModelConfig, stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """``generation_config.json``; ``stop_token_ids`` (e.g. ``<|im_end|>``, which ends an assistant
    turn) join the end-of-text id in ``eos_token_id``."""
    eos = [cfg.text.eos_token_id, *(i for i in stop_token_ids if i != cfg.text.eos_token_id)]
    return {"bos_token_id": cfg.text.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": cfg.text.pad_token_id}


def _get(d: dict, key: str, source: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise ValueError(f"{source} lacks '{key}', which an Aria config must have")
    return default


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed HF ``config.json`` (native or original custom-code)."""
    if hf.get("model_type") not in ("aria", None):
        raise ValueError(f"{source} has model_type {hf.get('model_type')!r}; expected 'aria'")
    text = _get(hf, "text_config", source)
    vision = _get(hf, "vision_config", source)
    ts, vs = f"{source} text_config", f"{source} vision_config"

    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{ts} uses rope_type {rope.get('rope_type')!r}; only 'default' RoPE is "
                         "supported")
    rope_theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    expert_width = _get(text, "intermediate_size", ts)
    if text.get("model_type") == "aria_moe_lm" and "moe_intermediate_size" in text:
        expert_width = text["moe_intermediate_size"]
    hidden = _get(text, "hidden_size", ts)
    heads = _get(text, "num_attention_heads", ts)
    tie = bool(hf.get("tie_word_embeddings", False))
    eos = text.get("eos_token_id", 2)

    text_cfg = TextConfig(
        vocab_size=_get(text, "vocab_size", ts), hidden_size=hidden,
        num_layers=_get(text, "num_hidden_layers", ts), num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        rope_theta=float(rope_theta),
        max_position_embeddings=text.get("max_position_embeddings", 2048),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        attention_bias=bool(text.get("attention_bias", False)),
        tie_word_embeddings=tie,
        pad_token_id=text.get("pad_token_id", hf.get("pad_token_id", 2)),
        bos_token_id=text.get("bos_token_id", 1),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        initializer_range=text.get("initializer_range", 0.02),
    )
    moe_cfg = MoEConfig(
        num_experts=_get(text, "moe_num_experts", ts), top_k=_get(text, "moe_topk", ts),
        intermediate_size=expert_width,
        num_shared_experts=text.get("moe_num_shared_experts", 2),
        shared_act=text.get("hidden_act", "silu"), shared_bias=bool(text.get("mlp_bias", False)),
    )
    vision_cfg = VisionConfig(
        hidden_size=_get(vision, "hidden_size", vs),
        intermediate_size=_get(vision, "intermediate_size", vs),
        num_layers=_get(vision, "num_hidden_layers", vs),
        num_heads=_get(vision, "num_attention_heads", vs),
        patch_size=_get(vision, "patch_size", vs), image_size=_get(vision, "image_size", vs),
        num_channels=vision.get("num_channels", 3),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
        feature_layer=hf.get("vision_feature_layer", -1),
    )
    table = hf.get("projector_patch_to_query_dict") or {1225: 128, 4900: 256}
    return ModelConfig(text=text_cfg, moe=moe_cfg, vision=vision_cfg,
                       projector=ProjectorConfig(patch_to_query=dict(table)),
                       image_token_id=hf.get("image_token_index", hf.get("image_token_id", 9)),
                       name="hf")


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data
