"""Projector: learned queries cross-attend to the ViT patches, then LayerNorm + GELU FFN.

Letters: N crops, G patches per crop, Q queries per crop, Dv vision width, D text width.

Design decisions (each one is the reference's, kept so HF weights load unchanged):
- The number of queries is looked up from the number of patches per crop (the crop size), using
  the first Q rows of one shared query table.
- q/k/v are projected twice: bias-free q/k/v projections, then the packed in-projection of a
  standard multi-head attention (``in_proj``, rows q | k | v, with bias), then its out-projection,
  then one more linear. No residual. Both LayerNorms use eps 1e-5.
- The FFN goes Dv -> D -> D with a tanh-GELU and no biases.
- LoRA on the packed in-projection (``add_in_proj_adapter``) is one adapter on the whole (3 Dv, Dv)
  weight, A (R, Dv) and B (3 Dv, R), as ``nn.MultiheadAttention`` adapters are elsewhere (PEFT): q,
  k and v share A, and each of the three slices uses its rows of B. It is added in the slices' own
  matmuls, x w_i^T + b_i + s * drop(x) A^T B_i^T, so dropout applies to the adapter path only.
- ``valid_NG`` None means every patch is valid: the cross-attention then runs without a mask. The
  vision encoder returns None whenever every patch of every crop is valid (its one host check),
  so the projector adds no check of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aria.config import ModelConfig
from aria.model.layers import init_linears_and_norms, key_padding_mask

LN_EPS = 1e-5  # the reference's nn.LayerNorm / nn.MultiheadAttention defaults


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LN_EPS)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        # the packed in-projection as direct parameters: it is applied functionally (three slices),
        # and ZeRO-3 gathers a module's own parameters when that module runs
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.linear = nn.Linear(dim, dim)
        self.lora_scale: float | None = None  # set by add_in_proj_adapter
        self.lora_dropout = 0.0

    def add_in_proj_adapter(self, rank: int, scale: float, dropout: float) -> None:
        """A LoRA adapter A (R, Dv), B (3 Dv, R) on the packed in-projection, on its device and
        dtype, uninitialised (``aria.model.lora.init_adapters``)."""
        w = self.in_proj_weight
        M, N = getattr(w, "ds_shape", w.shape)  # a ZeRO-3 parameter keeps its shape there
        like = dict(device=w.device, dtype=w.dtype)
        self.lora_in_proj_A = nn.Parameter(torch.empty(rank, N, **like))
        self.lora_in_proj_B = nn.Parameter(torch.empty(M, rank, **like))
        self.lora_scale, self.lora_dropout = scale, dropout

    def in_proj(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Slice i (0 q, 1 k, 2 v) of the packed in-projection, with its adapter if there is one."""
        D = x.shape[-1]
        rows = slice(i * D, (i + 1) * D)
        out = F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])
        if self.lora_scale is None:
            return out
        dropped = F.dropout(x, self.lora_dropout, self.training)
        low = F.linear(dropped, self.lora_in_proj_A)
        return out + self.lora_scale * F.linear(low, self.lora_in_proj_B[rows])

    def heads(self, queries_NQD: torch.Tensor, patches_NGD: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, H, Q, d), k and v (N, H, G, d): the attention's inputs, split into heads."""
        N, Q, D = queries_NQD.shape
        G = patches_NGD.shape[1]
        kv_NGD = self.norm_kv(patches_NGD)
        q = self.in_proj(self.q_proj(self.norm_q(queries_NQD)), 0)
        k = self.in_proj(self.k_proj(kv_NGD), 1)
        v = self.in_proj(self.v_proj(kv_NGD), 2)
        d = D // self.num_heads
        return (q.view(N, Q, self.num_heads, d).transpose(1, 2),
                k.view(N, G, self.num_heads, d).transpose(1, 2),
                v.view(N, G, self.num_heads, d).transpose(1, 2))

    def forward(self, queries_NQD: torch.Tensor, patches_NGD: torch.Tensor,
                valid_NG: torch.Tensor | None) -> torch.Tensor:
        N, Q, D = queries_NQD.shape
        q, k, v = self.heads(queries_NQD, patches_NGD)
        mask = None if valid_NG is None else key_padding_mask(valid_NG)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(N, Q, D))
        return self.linear(out)

    def attention_weights(self, queries_NQD: torch.Tensor, patches_NGD: torch.Tensor,
                          valid_NG: torch.Tensor | None) -> torch.Tensor:
        """(N, H, Q, G): the weights ``forward``'s attention gives each patch, for diagnostics
        (``data_tools.probe_shapes``); forward itself never materialises them."""
        q, k, _ = self.heads(queries_NQD, patches_NGD)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if valid_NG is not None:
            logits = logits.masked_fill(~valid_NG[:, None, None, :], float("-inf"))
        return logits.softmax(-1)


class Projector(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        Dv, D = cfg.vision.hidden_size, cfg.text.hidden_size
        self.patch_to_query = dict(cfg.projector.patch_to_query)
        self.patch_size = cfg.vision.patch_size
        self.query = nn.Parameter(torch.zeros(cfg.projector.max_queries, Dv))
        self.cross_attn = CrossAttention(Dv, cfg.vision.num_heads)
        self.norm_ffn = nn.LayerNorm(Dv, eps=LN_EPS)
        self.ffn_in = nn.Linear(Dv, D, bias=False)
        self.ffn_out = nn.Linear(D, D, bias=False)

    def num_queries(self, num_patches: int) -> int:
        """Image tokens per crop for a crop of ``num_patches`` patches; a clear error otherwise."""
        if num_patches not in self.patch_to_query:
            sizes = {k: f"{round(k ** 0.5) * self.patch_size} px" for k in self.patch_to_query}
            raise ValueError(f"a crop of {num_patches} patches has no entry in "
                             f"model.projector.patch_to_query {self.patch_to_query} (crop sizes "
                             f"{sizes}); resize crops to one of those sizes or add an entry")
        return self.patch_to_query[num_patches]

    def queries(self, patches_NGD: torch.Tensor) -> torch.Tensor:
        """(N, Q, Dv): the first Q rows of the query table for each crop of G patches."""
        N, G, _ = patches_NGD.shape
        return self.query[: self.num_queries(G)].unsqueeze(0).expand(N, -1, -1)

    def forward(self, patches_NGD: torch.Tensor, valid_NG: torch.Tensor | None) -> torch.Tensor:
        out_NQD = self.cross_attn(self.queries(patches_NGD), patches_NGD, valid_NG)
        return self.ffn_out(F.gelu(self.ffn_in(self.norm_ffn(out_NQD)), approximate="tanh"))

    def init_weights(self, std: float) -> None:
        init_linears_and_norms(self, std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=std)
        nn.init.zeros_(self.cross_attn.in_proj_bias)
        nn.init.trunc_normal_(self.query, std=std)
