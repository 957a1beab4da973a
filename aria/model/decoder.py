"""The MoE language model: pre-norm decoder layers (RMSNorm, RoPE attention, MoE MLP) and a KV cache.

Letters: B batch, T new tokens, S keys (cache + new), H query heads, Hkv key/value heads, d head
width, D model width, L layers, E experts.

Design decisions:
- Attention is SDPA. Without segments it runs the fused causal kernel (no mask tensor), and a
  decode step of an unpadded batch needs no mask at all. Packed rows and padded batches pass ``segment_ids``; the
  mask then keeps every document to itself (see ``layers.segment_causal_mask``). The boolean
  (B, 1, T, T) mask is fine up to a few thousand tokens; long packed rows on GPU are the place for a
  varlen / flex kernel behind the same ``segment_ids`` interface. GQA uses SDPA's ``enable_gqa``
  (no repeated k/v copies; Aria itself is full MHA).
- ``position_ids`` are an input: packed documents restart their positions.
- The KV cache is preallocated (L, B, Hkv, max_len, d), written in place, and its length is a host
  integer, so decoding never asks the device how long the sequence is.
- Layers return router statistics; the decoder stacks them into (L,) / (L, E) tensors.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aria.config import ModelConfig, TextConfig
from aria.model.layers import RMSNorm, RotaryEmbedding, apply_rope, init_linear, segment_causal_mask
from aria.model.moe import MoE, RouterStats


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

    def update(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys/values of ``layer``; returns all keys/values so far."""
        start, end = self.length, self.length + k_BHTd.shape[2]
        self.k[layer, :, :, start:end] = k_BHTd
        self.v[layer, :, :, start:end] = v_BHTd
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reserve(self, segments_BT: torch.Tensor, padded: bool) -> torch.Tensor:
        """Records the segments of the T incoming tokens; returns the segments of all S keys."""
        self.padded |= padded
        start, end = self.length, self.length + segments_BT.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit its max_len={self.max_len}")
        self.segments_BS[:, start:end] = segments_BT
        return self.segments_BS[:, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, D, bias=bias)

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | str, cache: KVCache | None) -> torch.Tensor:
        """``mask``: "causal" (T == S, fused causal kernel), "full" (every cached key: one decode
        step without padding) or a boolean (B, 1, T, S) mask."""
        B, T, _ = x_BTD.shape
        q_BHTd = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BHTd = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BHTd = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTd, k_BHTd = apply_rope(q_BHTd, *rope), apply_rope(k_BHTd, *rope)
        if cache is not None:
            k_BHTd, v_BHTd = cache.update(self.layer_idx, k_BHTd, v_BHTd)  # now all S keys
        gqa = self.num_kv_heads != self.num_heads
        if isinstance(mask, str):
            out_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=mask == "causal",
                                                      enable_gqa=gqa)
        else:
            out_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, attn_mask=mask,
                                                      enable_gqa=gqa)
        return self.o_proj(out_BHTd.transpose(1, 2).reshape(B, T, -1))


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
                mask: torch.Tensor | str, valid_BT: torch.Tensor | None, cache: KVCache | None
                ) -> tuple[torch.Tensor, RouterStats | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, mask, cache)
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
        tokens, for router statistics."""
        B, T, _ = embeds_BTD.shape
        past = 0 if cache is None else cache.length
        if position_ids_BT is None:
            position_ids_BT = torch.arange(past, past + T, device=embeds_BTD.device).expand(B, T)
        rope = self.rope(position_ids_BT, embeds_BTD.dtype)

        mask = self.attention_mask(B, T, segment_ids_BT, cache, embeds_BTD.device)

        x_BTD = embeds_BTD
        stats: list[RouterStats] = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x_BTD, layer_stats = torch.utils.checkpoint.checkpoint(
                    layer, x_BTD, rope, mask, valid_BT, cache, use_reentrant=False)
            else:
                x_BTD, layer_stats = layer(x_BTD, rope, mask, valid_BT, cache)
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
    def attention_mask(B: int, T: int, segment_ids_BT: torch.Tensor | None, cache: KVCache | None,
                       device: torch.device) -> torch.Tensor | str:
        """The cheapest correct mask: fused causal, no mask at all, or a segment mask."""
        past = 0 if cache is None else cache.length
        if cache is None:
            return "causal" if segment_ids_BT is None else segment_causal_mask(segment_ids_BT, segment_ids_BT, 0)
        segments_BT = segment_ids_BT
        if segments_BT is None:
            segments_BT = torch.ones(B, T, dtype=torch.long, device=device)
        key_segments_BS = cache.reserve(segments_BT, padded=segment_ids_BT is not None)
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
