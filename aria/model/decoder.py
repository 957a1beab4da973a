"""The MoE language model: pre-norm decoder layers (RMSNorm, RoPE attention, MoE MLP) and a KV cache.

Letters: B batch, T new tokens, S keys (cache + new), H query heads, Hkv key/value heads, d head
width, D model width, L layers, E experts.

Design decisions:
- How a forward attends is decided once, by ``TextDecoder.attention_layout``, and the same layout
  serves every layer (``AttentionLayout``):
  - no ``segment_ids`` and no cache: "causal", SDPA's fused causal kernel, no mask tensor;
  - ``segment_ids`` (packed rows, padded batches) and no cache -- training and evaluation: a
    ``layers.DocumentLayout``, causal attention inside each document through a variable-length
    kernel (CUDA) or one causal SDPA per document (elsewhere); never a T x T mask (see
    ``aria.model.layers``);
  - with a KV cache (generation): "causal" for an unpadded prefill, "full" for an unpadded decode
    step (every cached key), else a boolean (B, 1, T, S) mask from ``layers.segment_causal_mask``
    over the cached segments (left-padded batches; T is a prompt or one token there).
  GQA uses SDPA's / varlen's ``enable_gqa`` (no repeated k/v copies; Aria itself is full MHA).
- ``Attention.attend`` is the attention core, apart from the projections, RoPE and the cache, so
  that sequence parallelism can wrap it (its contract is in its docstring).
- ``position_ids`` are an input: packed documents restart their positions.
- The KV cache is preallocated (L, B, Hkv, max_len, d), written in place, and its length is a host
  integer, so decoding never asks the device how long the sequence is. After the prefill it can be
  made *static* (``KVCache.make_static``): the write slot becomes a device counter, a step writes
  there with ``index_copy_`` and attends to all max_len slots through a (B, 1, 1, max_len) mask of
  the cached segments (unwritten slots hold segment 0, like padding, so they drop out). A decode
  step then has the same shapes and reads no host value from one token to the next, so it can be
  captured once as a CUDA graph and replayed (``aria.model.generation``); it attends over max_len
  keys instead of the ones written so far, which costs more only where attention is not negligible.
- Layers return router statistics; the decoder stacks them into (L,) / (L, E) tensors.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from aria.config import ModelConfig, TextConfig
from aria.model.layers import (DocumentLayout, Linear, RMSNorm, RotaryEmbedding, apply_rope,
                               document_attention, init_linear, segment_causal_mask)
from aria.model.moe import MoE, RouterStats

AttentionLayout = Union[str, torch.Tensor, DocumentLayout]
"""How every layer of one forward attends: "causal", "full", a boolean (B, 1, T, S) mask, or the
documents of packed rows (see the module docstring and ``TextDecoder.attention_layout``)."""


class KVCache:
    """Static key/value cache for all layers, plus the segment id of every cached position."""

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.segments_BS = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # host-side: tokens already cached
        self.padded = False  # host-side: some call passed segment ids (padding or packing)
        self.slot: torch.Tensor | None = None  # static mode: (1,) device index of the next write

    def make_static(self) -> None:
        """From now on one token per call, written at a device-side slot, and every call attends to
        all ``max_len`` slots (see the module docstring). ``length`` stops being kept: the caller
        sizes the cache for every token it will add (nothing checks overflow on the host)."""
        self.slot = torch.full((1,), self.length, dtype=torch.long, device=self.k.device)

    def update(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys/values of ``layer``; returns all keys/values so far (static: all
        ``max_len`` slots)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k_BHTd)
            self.v[layer].index_copy_(2, self.slot, v_BHTd)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k_BHTd.shape[2]
        self.k[layer, :, :, start:end] = k_BHTd
        self.v[layer, :, :, start:end] = v_BHTd
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reserve(self, segments_BT: torch.Tensor, padded: bool) -> torch.Tensor:
        """Records the segments of the T incoming tokens; returns the segments of all S keys."""
        self.padded |= padded
        if self.slot is not None:
            if segments_BT.shape[1] != 1:
                raise ValueError(f"a static KV cache takes one token per call, got {segments_BT.shape[1]}")
            return self.segments_BS.index_copy_(1, self.slot, segments_BT)
        start, end = self.length, self.length + segments_BT.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit its max_len={self.max_len}")
        self.segments_BS[:, start:end] = segments_BT
        return self.segments_BS[:, :end]

    def advance(self, num_tokens: int) -> None:
        if self.slot is not None:
            self.slot.add_(num_tokens)
        else:
            self.length += num_tokens


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(D, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, D, bias=bias)
        # Sequence parallelism (aria.parallel.sequence): x holds this rank's tokens of every row and
        # ``attend`` runs on all of them through its all-to-alls.
        self.sequence_parallel = None

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: AttentionLayout, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTd = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BHTd = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BHTd = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTd, k_BHTd = apply_rope(q_BHTd, *rope), apply_rope(k_BHTd, *rope)
        if cache is not None:
            k_BHTd, v_BHTd = cache.update(self.layer_idx, k_BHTd, v_BHTd)  # now all S keys
        if self.sequence_parallel is None or cache is not None:
            out_BHTd = self.attend(q_BHTd, k_BHTd, v_BHTd, layout)
        else:
            out_BHTd = self.sequence_parallel.attend(self.attend, q_BHTd, k_BHTd, v_BHTd, layout)
        return self.o_proj(out_BHTd.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q_BHTd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor,
               layout: AttentionLayout) -> torch.Tensor:
        """The attention core: q (B, H, T, d) and k/v (B, Hkv, S, d), after RoPE -> (B, H, T, d).

        Contract (sequence parallelism wraps this method with all-to-alls: tokens sharded before
        and after, heads sharded inside):
        - q/k/v hold heads on dim 1 and *all* tokens of the rows on dim 2 (S = T without a cache);
          any subset of the heads may come (H and Hkv are read from the tensors, not the config).
        - ``layout`` is built once per forward by ``TextDecoder.attention_layout`` from the full
          rows' ``segment_ids`` (B, T) -- nothing else but their device -- and serves every layer
          and every head subset unchanged. It is a string, a mask or a ``DocumentLayout`` (host
          integers + one small int32 tensor): cheap to pass through ``torch.utils.checkpoint``.
        - No host sync happens here: the layout already holds every length the kernels need.
        """
        gqa = k_BHSd.shape[1] != q_BHTd.shape[1]
        if isinstance(layout, DocumentLayout):
            return document_attention(q_BHTd, k_BHSd, v_BHSd, layout, enable_gqa=gqa)
        if isinstance(layout, str):
            return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, is_causal=layout == "causal",
                                                  enable_gqa=gqa)
        return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=layout, enable_gqa=gqa)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.text.hidden_size, cfg.text.rms_norm_eps)
        self.attn = Attention(cfg.text, layer_idx)
        self.mlp_norm = RMSNorm(cfg.text.hidden_size, cfg.text.rms_norm_eps)
        self.moe = MoE(cfg.text.hidden_size, cfg.moe)

    def init_weights(self, std: float) -> None:
        for linear in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj):
            init_linear(linear, std)
        nn.init.ones_(self.attn_norm.weight)
        nn.init.ones_(self.mlp_norm.weight)
        self.moe.init_weights(std)

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: AttentionLayout, valid_BT: torch.Tensor | None, cache: KVCache | None
                ) -> tuple[torch.Tensor, RouterStats | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, layout, cache)
        mlp_out, stats = self.moe(self.mlp_norm(x_BTD), valid_BT)
        return x_BTD + mlp_out, stats


class DecoderOutput(NamedTuple):
    """A named tuple (not a dataclass): DeepSpeed ZeRO-3 must see the tensors a module returns."""

    hidden_BTD: torch.Tensor
    """Final-norm hidden states (the LM head is applied by the caller)."""
    aux_loss_L: torch.Tensor | None = None
    z_loss_L: torch.Tensor | None = None
    tokens_per_expert_LE: torch.Tensor | None = None


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = cfg.text
        self.cfg = t
        self.embed = nn.Embedding(t.vocab_size, t.hidden_size, padding_idx=t.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rope = RotaryEmbedding(t.head_dim, t.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, embeds_BTD: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                segment_ids_BT: torch.Tensor | None = None, cache: KVCache | None = None,
                valid_BT: torch.Tensor | None = None) -> DecoderOutput:
        """``segment_ids_BT``: tokens attend only within their segment (0 = padding, 1, 2, ... =
        packed documents); None means one causal sequence per row. ``valid_BT``: non-padding
        tokens, for router statistics. Under sequence parallelism ``embeds_BTD``, ``position_ids_BT``
        and ``valid_BT`` hold this rank's tokens of every row and ``segment_ids_BT`` the whole rows
        (attention sees all their tokens)."""
        B, T, _ = embeds_BTD.shape
        past = 0 if cache is None else cache.length
        if position_ids_BT is None:
            if cache is not None and cache.slot is not None:
                raise ValueError("a static KV cache keeps no host-side length: pass position_ids")
            position_ids_BT = torch.arange(past, past + T, device=embeds_BTD.device).expand(B, T)
        rope = self.rope(position_ids_BT, embeds_BTD.dtype)

        layout = self.attention_layout(B, T, segment_ids_BT, cache, embeds_BTD.device)

        x_BTD = embeds_BTD
        stats: list[RouterStats] = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x_BTD, layer_stats = torch.utils.checkpoint.checkpoint(
                    layer, x_BTD, rope, layout, valid_BT, cache, use_reentrant=False)
            else:
                x_BTD, layer_stats = layer(x_BTD, rope, layout, valid_BT, cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        if cache is not None:
            cache.advance(T)

        if not stats:
            return DecoderOutput(self.norm(x_BTD))
        return DecoderOutput(self.norm(x_BTD), torch.stack([s.aux_loss for s in stats]),
                             torch.stack([s.z_loss for s in stats]),
                             torch.stack([s.tokens_per_expert for s in stats]))

    @staticmethod
    def attention_layout(B: int, T: int, segment_ids_BT: torch.Tensor | None, cache: KVCache | None,
                         device: torch.device) -> AttentionLayout:
        """The cheapest correct way to attend, for every layer of this forward: fused causal, the
        documents of packed rows (one host sync), no mask at all, or a segment mask (a KV cache)."""
        past = 0 if cache is None else cache.length
        if cache is None:
            return "causal" if segment_ids_BT is None else DocumentLayout.from_segments(segment_ids_BT)
        segments_BT = segment_ids_BT
        if segments_BT is None:
            segments_BT = torch.ones(B, T, dtype=torch.long, device=device)
        key_segments_BS = cache.reserve(segments_BT, padded=segment_ids_BT is not None)
        if cache.slot is not None:  # static: every slot, those of the query's segment (T = 1)
            return (key_segments_BS[:, None, None, :] == segments_BT[:, None, :, None])
        if not cache.padded:
            if past == 0:
                return "causal"
            if T == 1:
                return "full"
        return segment_causal_mask(segments_BT, key_segments_BS, past)

    def init_units(self, prefix: str = "decoder") -> list[tuple[str, nn.Module, Callable[[nn.Module], None]]]:
        """From-scratch initialisation as independent units (see ``Aria.init_units``): the embedding
        (normal, pad row zero), each layer, the final norm."""
        std, pad = self.cfg.initializer_range, self.cfg.pad_token_id

        def embedding(embed: nn.Embedding) -> None:
            nn.init.normal_(embed.weight, std=std)
            with torch.no_grad():
                embed.weight[pad].zero_()

        return [(f"{prefix}.embed", self.embed, embedding),
                *[(f"{prefix}.layers.{i}", layer, lambda m: m.init_weights(std)) for i, layer in enumerate(self.layers)],
                (f"{prefix}.norm", self.norm, lambda m: nn.init.ones_(m.weight))]
