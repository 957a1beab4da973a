"""SigLIP-style vision encoder with NaViT position bucketing.

Letters: N crops, C channels, P patch side, G patches per crop (h x w grid), K values per patch
(C x P x P), Dv width.

Design decisions:
- A crop is a square tensor (the processor pads bottom/right) plus a pixel mask. A patch is valid iff
  any of its pixels is; padded patches are masked out as attention keys. When every patch of every
  crop is valid (most crops: the loader sends a mask regardless) the encoder drops the mask (one
  host check per forward) and returns no patch validity, so its layers and the projector's
  cross-attention run SDPA without a mask, which lets it pick the flash kernel. On fake tensors
  (``aria.train.plan``) the check cannot run and the mask is kept.
- Positions use fractional bucketing: the valid h x w grid is spread over the whole
  (image_size / P)^2 table, so 490 px and 980 px crops (and any aspect ratio) share one table.
  The arithmetic (``i * (1 / h)``, then bucketize) is the reference's, so bucket edges agree bit for
  bit.
- Random initialisation follows SigLIP (fan-in scaled: LeCun-normal patch embedding, position
  table at std 1/sqrt(width), Xavier linears), not the language model's single std: with a large
  patch (e.g. the tiny config's 70 px, fan-in 14,700) one global std makes the patch projection
  ~100x the position embedding, and the encoder can no longer tell where anything is. Even
  SigLIP's table is ~1/sqrt(width) of the content per channel (the LeCun patch projection puts
  out about the pixels' RMS, ~1); ``position_init_std`` raises it for small models trained briefly
  from scratch, whose table barely moves from its initial values (the quickstart's).
- ``patch_init: dct`` starts the patch projection at the lowest-frequency cosines of each
  channel instead of random weights: a frozen random projection of a large patch (70 px: 14,700
  values into 128) mixes where an outline falls with its colour, the cosines keep the patch's
  coarse picture (docs/quickstart_findings.md).
- Raw uint8 pixels (what the data loader ships) are normalised inside the patch projection: Aria's
  x * 2/255 - 1 is folded into its weights and bias, so the pixels are read once (the float cast)
  instead of three times; padding (a zero pixel) becomes -1, as in the reference processor.
- The patch projection is a linear map of each flattened patch (the pixels gathered into (N, G, K)
  and cast in one copy), not ``conv2d``: the same products as one GEMM. On the CPU (oneDNN),
  fwd+bwd of 51 crops of 490 px at P = 70, width 64 took 262 ms as a convolution and 164 ms as the
  GEMM in fp32, 761 ms against 85 ms in bf16; 8 crops of 980 px at Aria's P = 14, width 1152, in
  bf16: 1225 against 464 ms. The weight keeps the Conv2d layout of the checkpoint and of
  transformers.
- The features handed to the projector are the hidden state after ``feature_layer`` layers. There
  is no post-LayerNorm: Aria never used one (the HF checkpoint carries a dead one, which the
  converter writes as zeros).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aria.config import VisionConfig
from aria.model.layers import ACT_FNS, holds_no_data, key_padding_mask


def patch_mask_from_pixels(pixel_mask_NHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) pixel mask -> (N, h, w) patch mask; a patch is valid if any pixel in it is.

    The max of the mask's bytes, first down each patch's rows (contiguous runs of W), then across its
    columns: on the CPU ~10x faster than ``any`` over the (N, h, P, w, P) view (1 against 11 ms for
    45 crops of 490 px)."""
    N, H, W = pixel_mask_NHW.shape
    P = patch_size
    rows_NhW = pixel_mask_NHW.view(torch.uint8).reshape(N, H // P, P, W).amax(dim=2)
    return rows_NhW.view(N, H // P, W // P, P).amax(dim=3).bool()


def bucketed_position_ids(patch_mask_Nhw: torch.Tensor, grid: int) -> torch.Tensor:
    """NaViT position ids (N, h*w) into a grid x grid table; invalid patches get position 0."""
    N, h, w = patch_mask_Nhw.shape
    device = patch_mask_Nhw.device
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=device)
    rows_N = patch_mask_Nhw[:, :, 0].sum(dim=1)  # valid rows, counted down the first column
    cols_N = patch_mask_Nhw[:, 0, :].sum(dim=1)
    frac_h_Nh = torch.arange(h, device=device, dtype=torch.float32)[None] * (1.0 / rows_N)[:, None]
    frac_w_Nw = torch.arange(w, device=device, dtype=torch.float32)[None] * (1.0 / cols_N)[:, None]
    bucket_h = torch.bucketize(frac_h_Nh.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w_Nw.clamp(max=1.0 - 1e-6), boundaries, right=True)
    pos_Nhw = bucket_h[:, :, None] * grid + bucket_w[:, None, :]
    return torch.where(patch_mask_Nhw, pos_Nhw, 0).reshape(N, h * w)


def dct_patch_basis(cfg: VisionConfig) -> torch.Tensor:
    """``vision.patch_init: dct``: a (Dv, C, P, P) patch projection whose outputs are the 2-D DCT-II
    coefficients of each channel, lowest frequencies first (by u + v, then u), output k reading
    channel k % C; orthogonal filters, scaled so that the outputs carry the energy a LeCun-normal
    projection gives on average (sqrt(Dv / K) of the pixels' norm)."""
    Dv, C, P = cfg.hidden_size, cfg.num_channels, cfg.patch_size
    x = torch.arange(P, dtype=torch.float64)
    u = torch.arange(P, dtype=torch.float64)[:, None]
    cos_UX = torch.cos(math.pi * (2 * x + 1) * u / (2 * P)) * math.sqrt(2 / P)
    cos_UX[0] /= math.sqrt(2)  # orthonormal rows
    frequencies = sorted(((a, b) for a in range(P) for b in range(P)), key=lambda f: (f[0] + f[1], f[0]))
    weight = torch.zeros(Dv, C, P, P, dtype=torch.float64)
    for k in range(Dv):
        a, b = frequencies[k // C]
        weight[k, k % C] = cos_UX[a][:, None] * cos_UX[b][None, :]
    return (weight * math.sqrt(Dv / (C * P * P))).float()


class PatchEmbed(nn.Module):
    """(N, C, H, W) crops, normalised floats or raw uint8 -> (N, G, Dv) patch embeddings."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        P = cfg.patch_size
        self.patch_size = P
        self.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.num_channels, P, P))  # Conv2d layout
        self.bias = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if pixels_NCHW.dtype == torch.uint8:  # conv(x * 2/255 - 1) = conv'(x) with these weights
            weight, bias = weight * (2.0 / 255.0), bias - weight.sum(dim=(1, 2, 3))
        # the stride-P convolution as one GEMM over the patches, each flattened (C, P, P) like the
        # weight: the same sums, in the layout the checkpoint keeps (module doc)
        N, C, H, W = pixels_NCHW.shape
        P = self.patch_size
        patches = pixels_NCHW.view(N, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)
        # one pass: the gather into patch order and the cast to the weight's dtype (reshape, then
        # ``to``, would copy the pixels twice)
        patches_NGK = torch.empty(patches.shape, dtype=weight.dtype, device=patches.device).copy_(patches)
        return F.linear(patches_NGK.view(N, (H // P) * (W // P), C * P * P), weight.flatten(1), bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x_NGD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        N, G, D = x_NGD.shape
        shape = (N, G, self.num_heads, D // self.num_heads)
        q = self.q_proj(x_NGD).view(shape).transpose(1, 2)
        k = self.k_proj(x_NGD).view(shape).transpose(1, 2)
        v = self.v_proj(x_NGD).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(N, G, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT_FNS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x_NGD: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x_NGD = x_NGD + self.attn(self.norm1(x_NGD), mask)
        return x_NGD + self.mlp(self.norm2(x_NGD))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False

    def forward(self, pixels_NCHW: torch.Tensor, pixel_mask_NHW: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Crops as normalised floats or raw uint8 (normalised here). Returns features (N, G, Dv) and
        the patch validity (N, G), or None when every patch is valid (no pixel mask, or one that
        covers every patch)."""
        x_NGD, patch_mask_Nhw = self.embed_patches(pixels_NCHW, pixel_mask_NHW)
        return self.encode(x_NGD, patch_mask_Nhw, masked=pixel_mask_NHW is not None)

    def embed_patches(self, pixels_NCHW: torch.Tensor, pixel_mask_NHW: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch projection of the crops (N, G, Dv), before positions, and which patches hold
        pixels (N, H / P, W / P) (all of them without a pixel mask)."""
        P = self.cfg.patch_size
        N, C, H, W = pixels_NCHW.shape
        if C != self.cfg.num_channels or H % P or W % P:
            raise ValueError(f"pixel_values of shape {tuple(pixels_NCHW.shape)} do not fit the vision "
                             f"encoder: expected {self.cfg.num_channels} channels and sides that "
                             f"are multiples of patch_size={P}")
        if H // P > self.grid or W // P > self.grid:
            raise ValueError(f"pixel_values of {H}x{W} px exceed the position table "
                             f"({self.grid}x{self.grid} patches of {P} px = vision.image_size "
                             f"{self.cfg.image_size})")
        x_NGD = self.patch_embed(pixels_NCHW)
        if pixel_mask_NHW is None:
            return x_NGD, torch.ones(N, H // P, W // P, dtype=torch.bool, device=x_NGD.device)
        if pixel_mask_NHW.shape != (N, H, W):
            raise ValueError(f"pixel_mask of shape {tuple(pixel_mask_NHW.shape)} does not match "
                             f"pixel_values {tuple(pixels_NCHW.shape)}: expected {(N, H, W)}")
        return x_NGD, patch_mask_from_pixels(pixel_mask_NHW.bool(), P)

    def encode(self, x_NGD: torch.Tensor, patch_mask_Nhw: torch.Tensor, masked: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions and the layers over patch embeddings (``embed_patches``). ``masked=False``:
        every patch is known to be valid (no pixel mask was given), and so is not checked."""
        x_NGD = x_NGD + self.pos_embed(bucketed_position_ids(patch_mask_Nhw, self.grid))
        valid_NG = patch_mask_Nhw.flatten(1) if masked else None
        if valid_NG is not None and not holds_no_data(valid_NG) and bool(valid_NG.all()):
            valid_NG = None  # every patch valid: attention without a mask (the flash kernel)
        mask = None if valid_NG is None else key_padding_mask(valid_NG)
        for layer in self.layers[: self.cfg.layers_used]:
            if self.gradient_checkpointing and self.training:
                x_NGD = torch.utils.checkpoint.checkpoint(layer, x_NGD, mask, use_reentrant=False)
            else:
                x_NGD = layer(x_NGD, mask)
        return x_NGD, valid_NG

    def init_weights(self) -> None:
        """SigLIP's initialisation, scaled by fan-in rather than one global std (see module doc)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        fan_in = self.cfg.num_channels * self.cfg.patch_size ** 2
        if self.cfg.patch_init == "dct":
            with torch.no_grad():
                self.patch_embed.weight.copy_(dct_patch_basis(self.cfg))
        else:
            nn.init.normal_(self.patch_embed.weight, std=fan_in ** -0.5)
        nn.init.zeros_(self.patch_embed.bias)
        std = self.cfg.position_init_std
        nn.init.normal_(self.pos_embed.weight, std=self.cfg.hidden_size ** -0.5 if std is None else std)
