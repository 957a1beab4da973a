"""Small building blocks shared by the vision encoder, projector and decoder.

Letters: B batch, T query length, S key length, H heads, d head width, D model width.

Design decisions:
- RMSNorm normalises in fp32, casts back to the input dtype, *then* multiplies by the weight, as the
  reference does; the order matters in bf16.
- RoPE uses the rotate-half layout (HF checkpoints store q/k in that layout), cos/sin computed once
  per forward from ``position_ids`` and shared by all layers.
- Attention is SDPA. Packed rows carry ``segment_ids`` (B, S): a query attends to keys of the same
  segment at or before its own position, so documents in one row never see each other. Padding is
  just another segment (id 0 by convention), so a padded row needs no special case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, evaluated at arbitrary (per-document) positions.

    The frequencies are recomputed in fp32 at each forward (d/2 numbers) instead of living in a
    buffer, so casting the model to bf16 can never round them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids_BT.device)
        inv_freq = 1.0 / (self.theta ** (exponents.float() / self.head_dim))
        freqs_BTh = position_ids_BT[..., None].float() * inv_freq
        emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
        return emb_BTd.cos().to(dtype), emb_BTd.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos + rotated * sin


def segment_causal_mask(q_segments_BT: torch.Tensor, k_segments_BS: torch.Tensor,
                        q_offset: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, S), True = attend: same segment and key position <= query position.

    Query i sits at absolute position ``q_offset + i``; keys sit at 0..S-1 (a KV cache prefix plus
    the new tokens).
    """
    T, S = q_segments_BT.shape[1], k_segments_BS.shape[1]
    q_pos = torch.arange(q_offset, q_offset + T, device=q_segments_BT.device)
    k_pos = torch.arange(S, device=q_segments_BT.device)
    causal_TS = k_pos[None, :] <= q_pos[:, None]
    same_BTS = q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    return (same_BTS & causal_TS)[:, None]


def key_padding_mask(valid_BS: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, 1, S) for bidirectional attention over the valid keys."""
    return valid_BS[:, None, None, :]


def init_linear(module: nn.Linear, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_linears_and_norms(root: nn.Module, std: float) -> None:
    """Linear layers normal(0, std) with zero bias; LayerNorms to weight one, bias zero."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            init_linear(module, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
