"""Stages as data: which module groups train, and the RoPE base, applied by one function.

Design decisions:
- The model is cut into five named groups once, by module (``aria.model.aria.module_groups``),
  never by matching parameter-name substrings: ``vision`` (the ViT), ``projector``,
  ``language_model`` (embeddings, attention, norms, LM head), ``experts`` (routed and shared) and
  ``router``. Every parameter belongs to exactly one group (checked).
- A stage sets ``requires_grad`` per group; frozen parameters never reach the optimizer. The RoPE
  base is part of the model config, so a stage that changes it changes the config the model is
  built from (``stage_model_config``), and checkpoints record the new value.
- LoRA composes with the stage instead of replacing it: adapters belong to the group of the module
  they adapt, every base weight is frozen, and the adapters of the groups the stage trains train.
  The config refuses a LoRA target in a group the stage freezes (it would never train): the stage
  says what may change, LoRA says how.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from aria.config import LoRAConfig, ModelConfig, StageConfig
from aria.model.aria import module_groups
from aria.parallel.engine import lr_scales


def apply_stage(model: nn.Module, stage: StageConfig, lora: LoRAConfig | None = None,
                lr_scale: dict[str, float] | None = None) -> dict[str, int]:
    """Freeze / unfreeze the groups; returns the trainable parameter count per group. With LoRA
    enabled the base weights of every group are frozen and a group the stage trains trains its
    adapters only. A group (or the patch projection, ``patch_embed``) whose ``optim.lr_scale`` is 0
    is frozen too: no gradient is computed for it, where an optimizer group at LR 0 would still pay
    for its gradient."""
    adapters = None
    if lora is not None and lora.enabled:
        from aria.model.lora import adapter_parameters

        adapters = {id(p) for p in adapter_parameters(model).values()}
    scale_of = lr_scales(model, lr_scale or {})
    counts = {}
    for name, params in module_groups(model).items():
        train = stage.trainable[name]
        for p in params:
            p.requires_grad_(train and scale_of[id(p)] != 0 and (adapters is None or id(p) in adapters))
        counts[name] = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)  # ZeRO-3: whole
    return counts


def stage_model_config(model: ModelConfig, stage: StageConfig) -> ModelConfig:
    """The model config with the stage's RoPE base, if it sets one."""
    if stage.rope_theta is None or stage.rope_theta == model.text.rope_theta:
        return model
    return dataclasses.replace(model, text=dataclasses.replace(model.text, rope_theta=float(stage.rope_theta)))
