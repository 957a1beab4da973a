"""Aria: vision encoder -> projector -> image features scattered into the <|img|> slots -> MoE decoder.

Letters: B batch, T tokens, N image crops, Q queries (image tokens) per crop, D text width,
V vocabulary, L layers, E experts.

Design decisions:
- Every crop of one call has the same size (``pixel_values`` is one (N, C, H, W) tensor), so the
  projector picks one query count Q for the call; the crops' features fill the <|img|> slots in
  row-major order of ``input_ids``, crop after crop. A count mismatch raises with both counts
  (one host sync per forward, never per layer).
- ``segment_ids`` (B, T) replaces an attention mask: 0 = padding, 1, 2, ... = documents packed into
  the row. An HF-style 0/1 ``attention_mask`` is a valid ``segment_ids``.
- With ``targets`` the forward returns the *summed* chunked cross-entropy and the number of
  supervised tokens instead of logits (see ``loss.py``), plus the weighted router loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aria.config import ModelConfig
from aria.model.decoder import KVCache, TextDecoder
from aria.model.layers import init_linear
from aria.model.loss import IGNORE_INDEX, chunked_cross_entropy
from aria.model.moe import MoE
from aria.model.projector import Projector
from aria.model.vision import VisionEncoder


@dataclass
class AriaOutput:
    logits: torch.Tensor | None = None
    """(B, T or logits_to_keep, V) when no targets are given."""
    loss_sum: torch.Tensor | None = None
    """Summed fp32 cross-entropy over supervised tokens (targets != -100)."""
    num_targets: torch.Tensor | None = None
    """Number of supervised tokens in this micro-batch."""
    router_loss: torch.Tensor | None = None
    """sum over layers of aux_loss_coeff * aux + z_loss_coeff * z (training mode only)."""
    aux_loss_L: torch.Tensor | None = None
    z_loss_L: torch.Tensor | None = None
    tokens_per_expert_LE: torch.Tensor | None = None


def merge_image_features(embeds_BTD: torch.Tensor, input_ids_BT: torch.Tensor,
                         features_NQD: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Replace the embeddings of <|img|> tokens with image features, in order."""
    slots_BT = input_ids_BT == image_token_id
    num_slots = int(slots_BT.sum())
    N, Q, _ = features_NQD.shape
    if num_slots != N * Q:
        raise ValueError(f"image features and <|img|> tokens do not match: input_ids hold "
                         f"{num_slots} <|img|> tokens (id {image_token_id}) but {N} crops x {Q} "
                         f"queries = {N * Q} image features were computed")
    return embeds_BTD.masked_scatter(slots_BT.unsqueeze(-1), features_NQD.to(embeds_BTD.dtype))


class Aria(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg)
        self.decoder = TextDecoder(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed.weight

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.decoder.layers]

    def init_weights(self) -> None:
        """From-scratch init (normal(0, initializer_range); norms to one; pad embedding row zero)."""
        std = self.cfg.text.initializer_range
        self.vision.init_weights(std)
        self.projector.init_weights(std)
        self.decoder.init_weights()
        if not self.cfg.text.tie_word_embeddings:
            init_linear(self.lm_head, std)

    def set_gradient_checkpointing(self, vision: bool, decoder: bool) -> None:
        self.vision.gradient_checkpointing = vision
        self.decoder.gradient_checkpointing = decoder

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(N, C, H, W) crops [+ (N, H, W) pixel mask] -> (N, Q, D) image-token embeddings."""
        patches_NGD, valid_NG = self.vision(pixel_values, pixel_mask)
        return self.projector(patches_NGD, valid_NG)

    def embed(self, input_ids_BT: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        embeds_BTD = self.decoder.embed(input_ids_BT)
        if pixel_values is None:
            return embeds_BTD
        features_NQD = self.image_features(pixel_values.to(embeds_BTD.dtype), pixel_mask)
        return merge_image_features(embeds_BTD, input_ids_BT, features_NQD, self.cfg.image_token_id)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                pixel_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int | None = None) -> AriaOutput:
        embeds_BTD = self.embed(input_ids, pixel_values, pixel_mask)
        valid_BT = None if segment_ids is None else segment_ids > 0
        dec = self.decoder(embeds_BTD, position_ids, segment_ids, cache, valid_BT)

        out = AriaOutput(aux_loss_L=dec.aux_loss_L, z_loss_L=dec.z_loss_L,
                         tokens_per_expert_LE=dec.tokens_per_expert_LE)
        if dec.aux_loss_L is not None:
            moe = self.cfg.moe
            out.router_loss = moe.aux_loss_coeff * dec.aux_loss_L.sum() + moe.z_loss_coeff * dec.z_loss_L.sum()
        hidden_BTD = dec.hidden_BTD
        if targets is None:
            if logits_to_keep:
                hidden_BTD = hidden_BTD[:, -logits_to_keep:]
            out.logits = self.lm_head(hidden_BTD)
        else:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets of shape {tuple(targets.shape)} do not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            targets_N = targets.reshape(-1)
            out.loss_sum = chunked_cross_entropy(hidden_BTD.reshape(-1, hidden_BTD.shape[-1]),
                                                 self.lm_head.weight, targets_N)
            out.num_targets = (targets_N != IGNORE_INDEX).sum()
        return out


def build_model(cfg: ModelConfig, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, init: bool = True) -> Aria:
    """Build Aria on ``device`` (``"meta"`` for shapes only) and initialise it from scratch."""
    with torch.device(device or "cpu"):
        model = Aria(cfg)
    if init and str(device) != "meta":
        model.init_weights()
    model = model.to(dtype)
    for moe in model.moe_layers:  # the balancing bias stays fp32 whatever the weights' dtype
        if moe.router.expert_bias is not None:
            moe.router.expert_bias = moe.router.expert_bias.float()
    return model
