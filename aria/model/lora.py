"""LoRA: low-rank adapters on the decoder's attention, the routed experts (one adapter per expert),
the shared experts and, optionally, the vision encoder, the projector and the LM head; the adapter
files of a model directory; and the merge of adapters into base weights.

Letters: B batch, T tokens, N in-width, M out-width, E experts, R rank, D model width, V vocabulary.

Design decisions:
- An adapter is a pair of parameters of the module that runs it, never a separate module whose
  parameters another module uses: ZeRO-3 gathers a module's own parameters when it runs (an MoE
  block is a ZeRO-3 leaf, gathered whole), so adapters are gathered with their base weight, for the
  forward and for saving. That is how a ZeRO-3 checkpoint gets non-empty adapters.
- A targeted ``nn.Linear`` becomes a ``LoRALinear``, a subclass holding the *same* weight and bias
  parameter objects (so base names, init, grouping into stages and conversion are unchanged) plus
  ``lora_A`` (R, N) and ``lora_B`` (M, R): the update B @ A has the Linear's (out, in) layout. The
  routed experts get ``lora_fc{1,2}_A`` (E, N, R) and ``lora_fc{1,2}_B`` (E, R, M) on ``Experts``:
  the update A @ B has the stacked (E, in, out) layout and runs as grouped GEMMs on the experts'
  offsets (``aria.model.moe``). Their first dimension is the expert, so expert parallelism shards
  and tags them exactly like the weights.
- Targets are chosen by module (the same modules the stage groups are made of), never by
  parameter-name substrings. ``projector`` adapts the projector's Linears (q/k/v/out/linear and the
  FFN); its packed in-projection, a raw (3 Dv, Dv) parameter applied in three slices, is the target
  ``projector_in_proj``: ``lora_in_proj_A`` (R, Dv) and ``lora_in_proj_B`` (3 Dv, R) on the
  cross-attention (``aria.model.projector``), one adapter for the packed weight, merged like a
  Linear's.
- B starts at zero, so a fresh adapter adds exactly nothing: the model starts as the base model.
  A is uniform(+-1/sqrt(N)) (nn.Linear's own init scale) from a generator seeded by the run's
  seed, drawn for all E experts and then sliced to the local ones, so expert parallelism does not
  change the init.
- The LM head's loss path never materialises logits (``chunked_cross_entropy`` takes hidden states
  and a weight); its adapter joins as R more input features, [h, s * drop(h) A^T] @ [W, B]^T =
  h W^T + s * drop(h) A^T B^T, which costs one copy of W per forward.
- With LoRA every base weight is frozen and the stage says where adapters may go
  (``aria.train.stages``); a checkpoint with adapters starts another run as base + adapters
  (``aria.train.checkpoint``).
- Files: a model directory of a LoRA run holds ``adapters.safetensors`` (every adapter, expert
  adapters of all E experts) and ``lora.json`` (rank, alpha, dropout, targets), beside either a
  reference to its base (``base.json``, ``aria.convert.lora_base``: a run from weights on disk) or
  the base weights themselves (a run from random weights). ``merge_lora`` streams base tensors
  and adds scale * update to the adapted ones, for export and for runs that continue from the
  merged weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aria.config import LoRAConfig
from aria.model.aria import Aria, LMHead
from aria.model.loss import chunked_cross_entropy
from aria.model.moe import Experts
from aria.model.projector import CrossAttention

ADAPTERS_FILE, LORA_JSON = "adapters.safetensors", "lora.json"
ADAPTER_KEY = re.compile(r"(^|\.)lora_(fc[12]_|in_proj_)?[AB]$")
EXPERT_ADAPTER_KEY = re.compile(r"\.moe\.experts\.lora_fc[12]_[AB]$")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_adapter(key: str) -> bool:
    return ADAPTER_KEY.search(key) is not None


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * dropout(x) A^T B^T, with W and b the wrapped Linear's parameters."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.training = base.training
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **like))
        self.scale, self.dropout = scale, dropout

    def forward(self, x_BTN: torch.Tensor) -> torch.Tensor:
        low_BTR = F.linear(F.dropout(x_BTN, self.dropout, self.training), self.lora_A)
        return F.linear(x_BTN, self.weight, self.bias) + self.scale * F.linear(low_BTR, self.lora_B)


class LoRALMHead(LMHead):
    """The LM head with an adapter; the loss path stays chunked (see the module docstring)."""

    def __init__(self, base: LMHead, rank: int, scale: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.training = base.training
        self.weight = base.weight
        V, D = getattr(base.weight, "ds_shape", base.weight.shape)  # ZeRO-3 keeps the shape there
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, D, **like))
        self.lora_B = nn.Parameter(torch.empty(V, rank, **like))
        self.scale, self.dropout = scale, dropout

    def forward(self, hidden_BTD: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        low_BTR = self.scale * F.linear(F.dropout(hidden_BTD, self.dropout, self.training), self.lora_A)
        if targets_BT is None:
            return F.linear(hidden_BTD, self.weight) + F.linear(low_BTR, self.lora_B)
        features_BTX = torch.cat([hidden_BTD, low_BTR.to(hidden_BTD.dtype)], dim=-1)
        weight_VX = torch.cat([self.weight, self.lora_B], dim=-1)
        return chunked_cross_entropy(features_BTX.reshape(-1, features_BTX.shape[-1]), weight_VX,
                                     targets_BT.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Adding adapters to a model, initialising them, loading them
# ---------------------------------------------------------------------------------------------


def _linear_slots(model: Aria, target: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear a target names; picked by module, not by name."""
    layers = model.decoder.layers
    if target in ATTENTION_TARGETS:
        return [(layer.attn, target) for layer in layers]
    if target == "shared_experts":
        if model.cfg.moe.num_shared_experts == 0:
            raise ValueError("config field 'lora.targets' names 'shared_experts' but the model has none "
                             "(model.moe.num_shared_experts = 0)")
        return [(layer.moe.shared, name) for layer in layers
                for name in ("gate_proj", "up_proj", "down_proj")]
    if target in ("vision", "projector"):
        root = getattr(model, target)
        return [(parent, name) for parent in root.modules() for name, child in parent.named_children()
                if isinstance(child, nn.Linear)]
    raise AssertionError(target)


def add_adapters(model: Aria, cfg: LoRAConfig) -> None:
    """Give every target of ``cfg`` its (uninitialised) adapter, on the weights' device and dtype;
    works on the meta device, before expert sharding (``shard_experts`` slices the adapters too).
    The model keeps ``cfg`` as ``model.lora_config``: checkpoints save it beside the adapters."""
    assert getattr(model, "lora_config", None) is None, "adapters added twice"
    for target in cfg.targets:
        if target == "experts":
            for layer in model.moe_layers:
                layer.experts.add_adapters(cfg.rank, cfg.scale, cfg.dropout)
        elif target == "projector_in_proj":
            model.projector.cross_attn.add_in_proj_adapter(cfg.rank, cfg.scale, cfg.dropout)
        elif target == "lm_head":
            if model.cfg.text.tie_word_embeddings:
                raise ValueError("config field 'lora.targets' names 'lm_head' but the LM head is tied to "
                                 "the embedding (model.text.tie_word_embeddings = true): an adapter on one "
                                 "cannot be merged into both")
            model.lm_head = LoRALMHead(model.lm_head, cfg.rank, cfg.scale, cfg.dropout)
        else:
            for parent, name in _linear_slots(model, target):
                setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.scale, cfg.dropout))
    model.lora_config = cfg


@torch.no_grad()
def init_adapters(model: Aria, seed: int) -> None:
    """B = 0 (the model starts as the base model), A uniform(+-1/sqrt(in)) from a seeded generator;
    expert adapters are drawn for all experts and sliced, so every EP layout starts alike."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (LoRALinear, LoRALMHead)):
            pairs = [(module.lora_A, module.lora_B, module.lora_A.shape[1], None)]
        elif isinstance(module, CrossAttention) and module.lora_scale is not None:
            pairs = [(module.lora_in_proj_A, module.lora_in_proj_B, module.lora_in_proj_A.shape[1], None)]
        elif isinstance(module, Experts) and module.lora_scale is not None:
            local = module.lora_fc1_A.shape[0]  # this rank's experts (adapters are not partitioned yet)
            rows = slice(module.ep_rank * local, (module.ep_rank + 1) * local)
            pairs = [(module.lora_fc1_A, module.lora_fc1_B, module.lora_fc1_A.shape[1], rows),
                     (module.lora_fc2_A, module.lora_fc2_B, module.lora_fc2_A.shape[1], rows)]
        else:
            continue
        for a, b, fan_in, rows in pairs:
            shape = a.shape if rows is None else (a.shape[0] * module.ep_size, *a.shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            drawn = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
            a.copy_(drawn if rows is None else drawn[rows])
            b.zero_()


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if is_adapter(name)}


# ---------------------------------------------------------------------------------------------
# Files and merging
# ---------------------------------------------------------------------------------------------


def lora_json(cfg: LoRAConfig) -> str:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("_path", "enabled")}
    return json.dumps(values, indent=2) + "\n"


def read_adapters(directory: str | Path) -> tuple[dict[str, torch.Tensor], LoRAConfig] | None:
    """(adapters, their LoRAConfig) of a model directory, or None when it holds no adapters."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta, weights = directory / LORA_JSON, directory / ADAPTERS_FILE
    if not meta.is_file() and not weights.is_file():
        return None
    for path in (meta, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds LoRA adapters but lacks {path.name} "
                                    f"({LORA_JSON} and {ADAPTERS_FILE} go together)")
    try:
        cfg = LoRAConfig(enabled=True, **json.loads(meta.read_text()), _path=str(meta))
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta} is not a LoRA description: {err}") from None
    return load_file(weights), cfg


def required_adapters(directory: str | Path, flag: str) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """``read_adapters``, or ``FileNotFoundError`` saying that ``flag`` needs a LoRA run's checkpoint."""
    saved = read_adapters(directory)
    if saved is None:
        raise FileNotFoundError(f"{directory} holds no LoRA adapters ({ADAPTERS_FILE} + {LORA_JSON}): "
                                f"{flag} needs a checkpoint of a run with lora.enabled=true")
    return saved


class AdapterPair(NamedTuple):
    a_key: str
    b_key: str
    stacked: bool
    """True: experts (E, in, out), update A @ B. False: a Linear / LM head (out, in), update B @ A."""


def adapter_pairs(keys: Iterable[str]) -> dict[str, AdapterPair]:
    """Base tensor name -> its adapter pair, e.g. 'decoder.layers.0.attn.q_proj.weight' ->
    ('...q_proj.lora_A', '...q_proj.lora_B'), '...moe.experts.w_fc1' -> ('...lora_fc1_A', ...),
    'projector.cross_attn.in_proj_weight' -> ('...lora_in_proj_A', ...)."""
    keys = set(keys)
    pairs = {}
    for key in sorted(keys):
        match = ADAPTER_KEY.search(key)
        if match is None:
            raise ValueError(f"'{key}' is not a LoRA adapter name (expected ...lora_A / lora_B or "
                             "...experts.lora_fc1_A ...)")
        if not key.endswith("A"):
            continue
        b_key = key[:-1] + "B"
        if b_key not in keys:
            raise ValueError(f"adapter '{key}' has no '{b_key}'")
        module = key[: match.start()]
        kind = match.group(2)
        if kind == "in_proj_":
            base = f"{module}.in_proj_weight"
        else:
            base = f"{module}.w_{kind[:-1]}" if kind else (f"{module}.weight" if module else "weight")
        pairs[base] = AdapterPair(key, b_key, stacked=kind is not None and kind.startswith("fc"))
    orphans = sorted(k for k in keys if k.endswith("B") and k[:-1] + "A" not in keys)
    if orphans:
        raise ValueError(f"adapter(s) {orphans[:10]} have no matching A")
    return pairs


def adapter_update(a: torch.Tensor, b: torch.Tensor, stacked: bool, scale: float) -> torch.Tensor:
    """scale * the low-rank update, fp32, in the base tensor's layout."""
    a, b = a.float(), b.float()
    return scale * (torch.bmm(a, b) if stacked else b @ a)


class LoRAMerger:
    """Base weights -> W + (alpha / rank) * update for every weight ``adapters`` adapt (computed in
    fp32, cast back to W's dtype), a whole tensor or any flat range of one at a time (a rank merges
    only the part it keeps: the update rows covering it); ``check_complete`` raises if an adapter
    found no base tensor."""

    def __init__(self, adapters: dict[str, torch.Tensor], cfg: LoRAConfig) -> None:
        self.adapters, self.cfg = adapters, cfg
        self.pairs = adapter_pairs(adapters)
        self.merged: set[str] = set()

    def adapts(self, key: str) -> bool:
        return key in self.pairs

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in self.pairs:
            return tensor
        return self.merge_range(key, tensor.reshape(-1), tuple(tensor.shape), 0, tensor.numel()).view(tensor.shape)

    def merge_range(self, key: str, values: torch.Tensor, shape: tuple[int, ...], start: int, end: int
                    ) -> torch.Tensor:
        """Elements [start, end) of merged tensor ``key`` (of ``shape``) from the same elements of
        the base (``values``, 1-D)."""
        pair = self.pairs.get(key)
        if pair is None:
            return values
        a, b = self.adapters[pair.a_key], self.adapters[pair.b_key]
        rank = a.shape[-1] if pair.stacked else a.shape[0]
        if rank != self.cfg.rank:
            raise ValueError(f"adapter '{pair.a_key}' has rank {rank} but its lora.json says "
                             f"rank {self.cfg.rank}")
        row = math.prod(shape[1:])
        r0, r1 = start // row, -(-end // row)  # the update rows covering the range
        # experts (E, in, out): row e is expert e's A_e @ B_e; a Linear (out, in): row o is B[o] @ A
        update = (adapter_update(a[r0:r1], b[r0:r1], True, self.cfg.scale) if pair.stacked else
                  adapter_update(a, b[r0:r1], False, self.cfg.scale))
        if tuple(update.shape) != (r1 - r0, *shape[1:]):
            raise ValueError(f"adapter '{pair.a_key}' gives an update of rows {tuple(update.shape)} for "
                             f"'{key}' of shape {shape}")
        self.merged.add(key)
        update = update.reshape(-1)[start - r0 * row:end - r0 * row]
        return (values.float() + update).to(values.dtype)

    def check_complete(self) -> None:
        unmatched = sorted(set(self.pairs) - self.merged)
        if unmatched:
            raise ValueError(f"{len(unmatched)} adapter(s) found no base tensor to merge into: "
                             f"{unmatched[:10]}")


def merge_lora(tensors: Iterable[tuple[str, torch.Tensor]], adapters: dict[str, torch.Tensor],
               cfg: LoRAConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of base weights (our names) -> the same with every adapted weight merged
    (``LoRAMerger``). Streams: one tensor at a time. Raises (after the stream) if an adapter found
    no base tensor."""
    merger = LoRAMerger(adapters, cfg)
    for key, tensor in tensors:
        yield key, merger(key, tensor)
    merger.check_complete()
