"""The DeepSpeed engine built from our config: ZeRO stage, precision, clipping, accumulation, a
client ``torch.optim.AdamW`` and our LR schedule, with expert parallelism wired in.

Design decisions:
- The optimizer is a client ``torch.optim.AdamW`` (DeepSpeed's own would JIT-compile FusedAdam on
  CPU). Weight decay skips 1-D parameters (norms, biases). ``optim.lr_scale`` gives module groups
  (e.g. the vision encoder) their own peak LR; the schedule multiplies every group's alike.
- Expert parameters of an expert-parallel model go to DeepSpeed's MoE parameter groups
  (``split_params_into_different_moe_groups_for_optimizer``), so ZeRO reduces their gradients over
  the expert-data-parallel group. DeepSpeed only turns its MoE handling on when the model contains
  one of its own ``MoE`` modules; ``ExpertParallelMarker`` is such a module with no parameters and no
  forward, carrying the expert counts DeepSpeed reads. Our checkpoints save expert weights
  themselves (``aria.train.checkpoint``), so DeepSpeed never needs its per-expert files.
- ZeRO-3 gathers a module's parameters through hooks that follow the order modules run in; a
  token-routed MoE block runs its experts in a data-dependent way, so each MoE block is a ZeRO-3
  "leaf": all its parameters are gathered when it starts.
- DeepSpeed's ``backward`` would divide the loss by the accumulation steps; the trainer already
  normalises by the global number of supervised tokens, so it passes ``scale_wrt_gas=False``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from aria.config import ModelConfig, RunConfig
from aria.model.aria import module_groups


def lr_scales(model: nn.Module, lr_scale: dict[str, float]) -> dict[int, float]:
    """id(parameter) -> its ``optim.lr_scale``: its module group's, the patch projection's own
    where ``patch_embed`` is named, else 1."""
    scale_of = {}
    for group, params in module_groups(model).items():
        for p in params:
            scale_of[id(p)] = lr_scale.get(group, 1.0)
    if "patch_embed" in lr_scale:
        for p in model.vision.patch_embed.parameters():
            scale_of[id(p)] = lr_scale["patch_embed"]
    return scale_of


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_scale: dict[str, float]) -> list[dict]:
    """Optimizer groups: decayed (>= 2-D) and not decayed parameters, split further by the module
    groups (and the patch projection) whose learning rate ``optim.lr_scale`` changes."""
    scale_of = lr_scales(model, lr_scale)
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter keeps its shape there
            buckets.setdefault((ndim >= 2, scale_of[id(p)]), []).append(p)
    groups = []
    # groups at the base LR first: the logged LR is the first group's
    for (decayed, scale), params in sorted(buckets.items(), key=lambda kv: (kv[0][1] != 1.0, not kv[0][0], kv[0][1])):
        name = ("decay" if decayed else "no_decay") + ("" if scale == 1.0 else f"_lr_x{scale:g}")
        groups.append({"name": name, "params": params, "lr": lr * scale,
                       "weight_decay": weight_decay if decayed else 0.0})
    return groups


def add_expert_parallel_marker(model: nn.Module, num_experts: int, ep_size: int, group_name: str) -> None:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelMarker(DeepSpeedMoE):
        """Makes DeepSpeed treat the model as MoE (see module docstring); holds nothing, runs never."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = 0  # no per-expert files for DeepSpeed to write or read

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # the groups exist already (aria.parallel.dist.expert_parallel_groups)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker is a marker, not a layer")

    model.add_module("expert_parallel_marker", ExpertParallelMarker())


def precision(cfg: RunConfig) -> torch.dtype:
    if cfg.parallel.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32


def moe_block_numel(model: ModelConfig) -> int:
    """Parameters of one MoE block: router, routed experts, shared experts."""
    D, moe = model.text.hidden_size, model.moe
    return moe.num_experts * (D + 3 * D * moe.intermediate_size) + 3 * D * moe.intermediate_size * moe.num_shared_experts


def deepspeed_config(cfg: RunConfig, dtype: torch.dtype) -> dict:
    """DeepSpeed's JSON config for ``cfg`` (also what ``aria.train.plan`` sizes buffers from)."""
    par = cfg.parallel
    if dtype == torch.bfloat16 and par.zero_stage == 0:
        # DeepSpeed's bf16 path without ZeRO accumulates gradients in bf16 and keeps a master copy
        # layout of its own; ZeRO-1 costs the same memory on one process and shards over more
        raise ValueError("config field 'parallel.zero_stage' = 0 is not supported with bf16 "
                         f"(parallel.precision={par.precision}): use parallel.zero_stage=1 (on one "
                         "process it holds the same as no ZeRO), or parallel.precision=fp32")
    bucket = par.bucket_size
    zero = {"stage": par.zero_stage, "overlap_comm": par.overlap_comm, "contiguous_gradients": True,
            "reduce_scatter": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if par.zero_stage == 3:
        # An MoE block is gathered whole (a ZeRO-3 leaf: ~820M parameters at Aria size): the next
        # one can only be prefetched while one is live if two fit under max_live_parameters and
        # the prefetch bucket holds one.
        block = moe_block_numel(cfg.model)
        zero.update({"stage3_prefetch_bucket_size": max(bucket, block),
                     "stage3_max_live_parameters": max(2 * bucket, 2 * block),
                     "stage3_max_reuse_distance": max(2 * bucket, 2 * block),
                     "stage3_gather_16bit_weights_on_model_save": False})
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16 and par.fp32_grad_accum:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def build_engine(model: nn.Module, cfg: RunConfig, lr_multiplier: Callable[[int], float],
                 ep_group_name: str | None = None):
    """(engine, optimizer, lr_scheduler); ``model`` already has its stage applied and experts sharded;
    ``lr_multiplier(step)`` scales every group's peak LR (``aria.train.schedule``)."""
    import deepspeed

    if cfg.parallel.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from aria.model.moe import MoE

        set_z3_leaf_modules(model, [MoE])
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.lr_scale)
    if ep_group_name is not None:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        add_expert_parallel_marker(model, cfg.model.moe.num_experts, cfg.parallel.ep_size, ep_group_name)
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        if cfg.parallel.zero_stage in (1, 2) and not any(group.get("moe") for group in groups):  # ZeRO asserts
            raise ValueError(f"config field 'parallel.ep_size' = {cfg.parallel.ep_size} with no trainable "
                             "expert weight (stage.trainable.experts=false): DeepSpeed's expert "
                             "parallelism trains the experts it shards; set parallel.ep_size=1 (ZeRO-3 "
                             "partitions the frozen experts) or train them")
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, precision(cfg)), dist_init_required=False)
    return engine, optimizer, scheduler
