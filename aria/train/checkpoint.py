"""Training checkpoints: written atomically, resumed exactly, pruned to the last k.

Layout of a run directory::

    config.yaml                      the resolved config of the run
    metrics.jsonl                    one JSON object per logged step
    checkpoints/
      step_00000100/
        deepspeed/state/...          DeepSpeed engine: ZeRO optimizer partitions, LR scheduler, module
        model/                       our weights (model_config.json + safetensors; expert-parallel
                                     runs add layout.json and one experts file per EP rank; LoRA
                                     runs add adapters.safetensors + lora.json), the directory
                                     conversion and the next stage read
        trainer_rank00000.pt ...     per rank: step, tokens seen, data-loader position, RNG states
        config.yaml                  the resolved config at that step
      latest                         the name of the newest complete checkpoint

Design decisions:
- A checkpoint is written into ``.tmp-step_N`` by every rank, then renamed to ``step_N`` by rank 0
  after a barrier, and only then does ``latest`` (replaced atomically) point at it. A crash or
  SIGKILL at any moment leaves the previous checkpoint complete and ``latest``.
- Weights are saved by us, not only by DeepSpeed: DeepSpeed's module file holds rank 0's expert
  slices only when experts are sharded, and our directory is what every other tool reads. On resume
  DeepSpeed restores optimizer, scheduler and module; an expert-parallel run then reloads its own
  expert slices from ours.
- LoRA adapters are saved apart from the base weights, which keep their ordinary layout: every
  rank walks the same gathered tensors (ZeRO-3 gathers are collective), expert adapters are
  all-gathered over the expert-parallel group into all E experts, and rank 0 writes one
  ``adapters.safetensors``. A model directory with adapters stands for base + adapters: a run that
  trains the same adapters loads them, a run without LoRA starts from the merged weights.
- Resume is exact: the loader position, step, token count and every RNG (python, numpy, torch,
  CUDA) come back per rank; the world size and EP layout must match the saved ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from aria.config import LoRAConfig, ModelConfig
from aria.convert.checkpoint import (EXPERT_PARAM, LAYOUT, MODEL_CONFIG, expert_file, iter_tensors,
                                     read_hf_config, read_model_config, rename_hf, write_sharded)
from aria.model.lora import (ADAPTERS_FILE, EXPERT_ADAPTER_KEY, LORA_JSON, is_adapter, load_adapters,
                             lora_json, merge_lora, read_adapters)
from aria.parallel.dist import DistInfo, barrier

CHECKPOINTS, LATEST = "checkpoints", "latest"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    if not (ckpt / "model" / MODEL_CONFIG).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt.name}, which is incomplete or missing")
    return ckpt


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, a checkpoint directory or a run directory -> the model directory."""
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return path
    if (path / "model" / MODEL_CONFIG).is_file():
        return path / "model"
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is not None:
        return ckpt / "model"
    raise FileNotFoundError(f"{path} is not a model directory ({MODEL_CONFIG}), a checkpoint "
                            f"(model/{MODEL_CONFIG}) or a run directory with {CHECKPOINTS}/{LATEST}")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _gathered(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) of every parameter and persistent buffer, gathering ZeRO-3 shards."""
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        param = params.get(name)
        if param is not None and hasattr(param, "ds_id"):  # ZeRO-3: partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.detach().cpu().clone()
        else:
            yield name, tensor.detach().cpu()


def _split_adapters(tensors: Iterator[tuple[str, torch.Tensor]], adapters: dict,
                    experts) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes base tensors on and collects adapters into ``adapters`` (expert adapters gathered
    into all experts over the expert-parallel group: every rank of it must walk the stream)."""
    for key, tensor in tensors:
        if not is_adapter(key):
            yield key, tensor
        elif experts.ep_size > 1 and EXPERT_ADAPTER_KEY.search(key):
            device = next(experts.parameters()).device  # NCCL gathers device tensors
            parts = [torch.empty_like(tensor, device=device) for _ in range(experts.ep_size)]
            torch.distributed.all_gather(parts, tensor.to(device).contiguous(), group=experts.ep_group)
            adapters[key] = torch.cat(parts).cpu()
        else:
            adapters[key] = tensor


def save_weights(model: torch.nn.Module, cfg: ModelConfig, directory: Path, info: DistInfo) -> None:
    """Our model directory from a (possibly expert-parallel, possibly LoRA) training model."""
    experts = model.moe_layers[0].experts
    P = experts.ep_size
    directory.mkdir(parents=True, exist_ok=True)
    adapters: dict[str, torch.Tensor] = {}
    if P == 1:
        tensors = _split_adapters(_gathered(model), adapters, experts)
        if info.is_main:
            write_sharded(tensors, directory)
        else:
            for _ in tensors:  # ZeRO-3 gathers are collective: every rank walks the same list
                pass
    else:
        from deepspeed.utils import groups

        name = experts.ep_group_name
        expert_writer = groups._get_expert_data_parallel_rank(name) == 0
        local, shared = {}, []
        for key, tensor in _split_adapters(_gathered(model), adapters, experts):
            (local.__setitem__(key, tensor) if EXPERT_PARAM.search(key) else shared.append((key, tensor)))
        if info.is_main:
            write_sharded(iter(shared), directory)
            (directory / LAYOUT).write_text(json.dumps({"ep_size": P}) + "\n")
        if expert_writer:
            save_file({k: v.contiguous() for k, v in local.items()},
                      expert_file(directory, experts.ep_rank, P), metadata={"format": "pt"})
    lora = getattr(model, "lora_config", None)
    if info.is_main and lora is not None:
        if not adapters or any(t.numel() == 0 for t in adapters.values()):
            raise RuntimeError(f"LoRA is enabled but the adapters gathered for {directory} are empty")
        save_file({k: v.contiguous() for k, v in adapters.items()}, directory / ADAPTERS_FILE,
                  metadata={"format": "pt"})
        (directory / LORA_JSON).write_text(lora_json(lora))
    if info.is_main:
        (directory / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


@torch.no_grad()
def load_weights(model: torch.nn.Module, source: Path, hf: bool = False) -> bool:
    """Copy weights from our model directory (any EP layout) or an HF directory into ``model``,
    taking this rank's slice of every expert tensor when experts are sharded.

    A directory with LoRA adapters: when ``model`` has the same adapters (rank, alpha, targets)
    they are loaded too; a model without adapters gets the base weights merged with them; other
    adapter settings are refused. Returns whether adapters were loaded.
    """
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_adapter(k)}
    tensors = iter_tensors(source)
    if hf:
        tensors = rename_hf(tensors, f"Hugging Face weights in {source}")
    saved = None if hf else read_adapters(source)
    lora = getattr(model, "lora_config", None)
    train_adapters = lora is not None
    if saved is not None:
        if train_adapters:
            _check_same_adapters(saved[1], lora, source)
        else:
            tensors = merge_lora(tensors, *saved)
    seen = set()
    experts = model.moe_layers[0].experts
    P, r = experts.ep_size, experts.ep_rank
    for key, tensor in tensors:
        if key not in params:
            raise ValueError(f"{source} holds '{key}', which the model does not have")
        if P > 1 and EXPERT_PARAM.search(key):
            local = tensor.shape[0] // P
            tensor = tensor[r * local:(r + 1) * local]
        target = params[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{source}: '{key}' has shape {tuple(tensor.shape)} but the model expects "
                             f"{tuple(target.shape)}")
        target.copy_(tensor.to(target.dtype))
        seen.add(key)
    if model.cfg.text.tie_word_embeddings:
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) the model needs: {missing[:20]}")
    if saved is not None and train_adapters:
        load_adapters(model, saved[0], str(source / ADAPTERS_FILE))
        return True
    return False


def _check_same_adapters(saved: LoRAConfig, lora: LoRAConfig, source: Path) -> None:
    for name in ("rank", "alpha", "targets"):
        ours, theirs = getattr(lora, name), getattr(saved, name)
        same = sorted(ours) == sorted(theirs) if name == "targets" else ours == theirs
        if not same:
            raise ValueError(f"config field 'lora.{name}' = {ours!r} differs from the adapters in "
                             f"{source} ({LORA_JSON}: {name} = {theirs!r}). Use the same lora.rank, "
                             f"lora.alpha and lora.targets to keep training those adapters, or "
                             f"lora.enabled=false to train the weights with the adapters merged in")


def source_model_config(path: str | Path, hf: bool) -> ModelConfig:
    return read_hf_config(path) if hf else read_model_config(resolve_model_dir(path))


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def save_checkpoint(engine, model, cfg, trainer_state: dict, info: DistInfo, config_yaml: str,
                    model_cfg: ModelConfig) -> Path:
    """Writes step ``trainer_state['step']``; returns its directory once it is complete and latest."""
    root = Path(cfg.run_dir) / CHECKPOINTS
    step = trainer_state["step"]
    tmp, final = root / f".tmp-{step_name(step)}", root / step_name(step)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    save_weights(model, model_cfg, tmp / "model", info)
    torch.save({**trainer_state, "rng": rng_state(), "world_size": info.world_size,
                "ep_size": cfg.parallel.ep_size}, tmp / f"trainer_rank{info.rank:05d}.pt")
    barrier()
    if info.is_main:
        (tmp / "config.yaml").write_text(config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / LATEST
        (root / f".{LATEST}.tmp").write_text(final.name + "\n")
        os.replace(root / f".{LATEST}.tmp", pointer)
        _prune(root, cfg.checkpoint.keep_last)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by an interrupted write
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine, model, ckpt: Path, cfg, info: DistInfo) -> dict:
    """Restores engine, weights and RNG from ``ckpt``; returns this rank's trainer state."""
    state_file = ckpt / f"trainer_rank{info.rank:05d}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: was {ckpt} written by a run with "
                                f"{info.world_size} processes?")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if state["world_size"] != info.world_size or state["ep_size"] != cfg.parallel.ep_size:
        raise ValueError(f"{ckpt} was written with {state['world_size']} processes and "
                         f"parallel.ep_size={state['ep_size']}; this run has {info.world_size} and "
                         f"{cfg.parallel.ep_size}. Resume with the same layout (or start a new run "
                         f"with init.from_checkpoint={ckpt})")
    engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    if cfg.parallel.ep_size > 1:  # DeepSpeed's module file holds rank 0's experts only
        load_weights(model, ckpt / "model")
    set_rng_state(state["rng"])
    return state
