"""Aria: vision encoder -> projector -> image features scattered into the <|img|> slots -> MoE decoder.

Letters: B batch, T tokens, N image crops, Q queries (image tokens) per crop, D text width,
V vocabulary, L layers, E experts.

Design decisions:
- Crops of one size share one (N, C, H, W) tensor, so the projector picks one query count Q for
  it; the crops' features fill the <|img|> slots in row-major order of ``input_ids``, crop after
  crop. Crops of several sizes come as one tensor per size plus the slot order of their features.
  A count mismatch raises with both counts (one host sync per forward, never per layer).
- Pixels may arrive normalised (float, as the HF processor makes them) or as raw uint8 (what the
  data loader ships: 4x less memory to move between processes and to the device); uint8 is
  normalised on the device with Aria's mean = std = 0.5, i.e. x * 2/255 - 1, folded into the
  vision encoder's patch projection.
- ``segment_ids`` (B, T) replaces an attention mask: 0 = padding, 1, 2, ... = documents packed into
  the row. An HF-style 0/1 ``attention_mask`` is a valid ``segment_ids``.
- With ``targets`` the forward returns the *summed* chunked cross-entropy and the number of
  supervised tokens instead of logits (see ``loss.py``), plus the weighted router loss.
- ``towers=True`` (stage 0, ``aria.train.contrastive``) returns the two towers of an
  image-caption loss instead of a loss: the embeddings (image features in their slots) and the
  decoder's last hidden states over the text alone: the <|img|> slots are padding (segment 0) and
  each run of text between them a document of its own (``text_runs``), so no text token sees an
  image.
- ``words="mean"`` or ``"lme"`` (stage 0's caption-word objective, ``aria.train.caption_words``)
  runs no decoder layer and looks up no text embedding: (S, V) logits of "which tokens does the
  caption hold" for the S documents of the micro-batch, in row order, from each document's image
  tokens (the projector's outputs in its <|img|> slots). "mean": the final norm and the LM head over
  their mean; "lme": over each of them, the (N, V) logits of the N image tokens returned too, and a
  document's logit of a token is their log-mean-exp over its image tokens (a soft maximum: one image
  token may say it).
- Kept image tokens (``ImageTokenCache``, ``stage.image_token_cache_gb``): with the vision encoder
  and projector frozen, a media block's tokens are the same every time, so the first pass's are
  kept on the device under the block's key and later batches carry the key alone (``image_blocks``),
  neither decoded by the loader nor encoded here. Cached and fresh rows are put in slot order by one
  Python loop over the micro-batch's blocks (tens of them), no host sync. With only the patch
  projection frozen (an encoder training from it, as in the quickstart's stage 0), the cache
  keeps each block's patch embeddings instead (level "patches"): the encoder's layers and the
  projector run on every block, the decode and the patch projection on new blocks alone.
- Sequence parallelism (``aria.parallel.sequence``): embeddings, image features in their slots
  included, are made for whole rows; each rank of the group then keeps its tokens (and their
  positions and targets) while ``segment_ids`` stay whole, for attention over all of a row.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, NamedTuple

import torch
from torch import nn

from aria.config import IGNORE_INDEX, MODULE_GROUPS, WORD_POOLS, ModelConfig
from aria.model.decoder import KVCache, TextDecoder
from aria.model.layers import holds_no_data, linear
from aria.model.loss import chunked_cross_entropy
from aria.model.moe import MoE
from aria.model.projector import Projector
from aria.model.vision import VisionEncoder


class AriaOutput(NamedTuple):
    """A named tuple so that DeepSpeed (ZeRO-3 hooks) sees every tensor the model returns."""

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
    embeds_BTD: torch.Tensor | None = None
    """With ``towers=True``: the input embeddings, image features in their <|img|> slots."""
    hidden_BTD: torch.Tensor | None = None
    """With ``towers=True``: the decoder's last hidden states over the text alone."""
    word_logits_SV: torch.Tensor | None = None
    """With ``words``: each document's logits of the tokens its caption may hold."""
    token_logits_NV: torch.Tensor | None = None
    """With ``words="lme"``: the LM head over each of the micro-batch's N image tokens, in row order."""
    image_documents_N: torch.Tensor | None = None
    """With ``words="lme"``: the document (0..S-1) of each image token."""


def merge_image_features(embeds_BTD: torch.Tensor, slots_BT: torch.Tensor, num_slots: int,
                         features_RD: torch.Tensor, described: str = "") -> torch.Tensor:
    """Replace the embeddings at the ``num_slots`` <|img|> positions with the R feature rows, in order."""
    if num_slots != features_RD.shape[0]:
        raise ValueError(f"image features and <|img|> tokens do not match: input_ids hold "
                         f"{num_slots} <|img|> tokens but {features_RD.shape[0]} image features were "
                         f"computed{described}")
    return embeds_BTD.masked_scatter(slots_BT.unsqueeze(-1), features_RD.to(embeds_BTD.dtype))


def text_runs(segment_ids_BT: torch.Tensor, image_BT: torch.Tensor) -> torch.Tensor:
    """Segment ids that make each run of text tokens between images (and document ends) its own
    document, numbered 1, 2, ... along the row; the image slots become padding (0)."""
    text_BT = (segment_ids_BT > 0) & ~image_BT
    continues_BT = torch.zeros_like(text_BT)
    continues_BT[:, 1:] = text_BT[:, :-1] & (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1])
    return torch.where(text_BT, (text_BT & ~continues_BT).cumsum(1), 0)


def document_ids(segment_ids_BT: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, int]:
    """(B, T) index of each token's document among all the rows' documents, in row order (-1 on
    padding), and their number S (a host read unless ``count`` gives it; on tensors without values,
    one document per row)."""
    if holds_no_data(segment_ids_BT):
        rows_B1 = torch.arange(segment_ids_BT.shape[0], device=segment_ids_BT.device)[:, None]
        return torch.where(segment_ids_BT > 0, rows_B1, -1), segment_ids_BT.shape[0]
    per_row_B = segment_ids_BT.amax(1)
    offsets_B = per_row_B.cumsum(0) - per_row_B
    doc_BT = torch.where(segment_ids_BT > 0, offsets_B[:, None] + segment_ids_BT - 1, -1)
    return doc_BT, int(per_row_B.sum()) if count is None else count


def document_counts(doc_BT: torch.Tensor, S: int, take_BT: torch.Tensor) -> torch.Tensor:
    """(S,) fp32 count of each document's taken positions (``doc_BT``, ``S``: ``document_ids``); an
    index_add over all positions, the others weighted 0: no host read."""
    weight_N = (take_BT & (doc_BT >= 0)).flatten().float()
    return weight_N.new_zeros(S).index_add(0, doc_BT.clamp(min=0).flatten(), weight_N)


def document_means(values_BTD: torch.Tensor, take_BT: torch.Tensor, segment_ids_BT: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D) fp32 mean of each document's taken positions (zero where it has none) and (S,) their
    counts; no host read beyond ``document_ids``'."""
    doc_BT, S = document_ids(segment_ids_BT)
    weight_N = (take_BT & (doc_BT >= 0)).flatten().float()
    sums_SD = values_BTD.new_zeros(S, values_BTD.shape[-1], dtype=torch.float32).index_add(
        0, doc_BT.clamp(min=0).flatten(), values_BTD.flatten(0, 1).float() * weight_N[:, None])
    counts_S = document_counts(doc_BT, S, take_BT)
    return sums_SD / counts_S.clamp(min=1)[:, None], counts_S


def document_log_mean_exp(values_NC: torch.Tensor, documents_N: torch.Tensor, S: int) -> torch.Tensor:
    """(S, C) fp32: over each document's rows of ``values_NC`` (``documents_N`` in 0..S-1), the log of
    the mean of their exponentials; the maximum subtracted first (outside the gradient, which it does
    not change); -inf for a document without rows. No host read."""
    values_NC = values_NC.float()
    index_NC = documents_N[:, None].expand_as(values_NC)
    top_SC = values_NC.new_full((S, values_NC.shape[1]), float("-inf")).scatter_reduce(
        0, index_NC, values_NC.detach(), "amax")
    sums_SC = torch.zeros_like(top_SC).index_add(0, documents_N, (values_NC - top_SC[documents_N]).exp())
    counts_S = torch.zeros(S, device=values_NC.device).index_add(0, documents_N, torch.ones_like(values_NC[:, 0]))
    return top_SC + sums_SC.log() - counts_S.clamp(min=1).log()[:, None]


def unit_seed(seed: int, name: str) -> int:
    """The RNG seed of initialisation unit ``name`` in a run seeded with ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int | None, name: str, module: nn.Module):
    """Draw from the RNG of (seed, unit ``name``) inside, restoring the global RNG after; a no-op
    when ``seed`` is None."""
    if seed is None:
        yield
        return
    device = next(module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(unit_seed(seed, name))
        yield


class LMHead(nn.Module):
    """The output projection; with targets it returns the chunked loss instead of logits, so the
    full logits never exist (and ZeRO-3 gathers the weight because this module runs)."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, hidden_BTD: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        if targets_BT is None:
            return linear(hidden_BTD, self.weight)
        return chunked_cross_entropy(hidden_BTD.reshape(-1, hidden_BTD.shape[-1]), self.weight,
                                     targets_BT.reshape(-1))


class ImageTokenCache:
    """What the image path makes of media blocks already seen (``stage.image_token_cache_gb``): a
    block's key (an image file, or one frame of a video file: ``Processor``) -> its tensors, kept
    after the block's first pass through frozen weights, which give the same every time. Level
    "tokens" (vision encoder and projector frozen): the block's (rows, D) projector outputs. Level
    "patches" (the patch projection frozen): its crops' (n, G, Dv) patch embeddings and their
    (n, h, w) patch mask, which the trained layers then encode. The training loader's processor asks
    ``key in cache`` and leaves the pixels of a held block out of the batch. Nothing is ever
    evicted, so a block the loader found here is still here when its batch reaches the model; once
    ``max_bytes`` are held, new blocks are not kept (they are decoded and encoded every time, as
    without a cache)."""

    LEVELS = ("tokens", "patches")

    def __init__(self, max_bytes: int, level: str = "tokens") -> None:
        if level not in self.LEVELS:
            raise ValueError(f"image-token cache level must be one of {self.LEVELS}, got {level!r}")
        self.max_bytes, self.bytes, self.level = max_bytes, 0, level
        self.kept: dict[str, tuple[torch.Tensor, ...]] = {}
        self.reads = self.passes = 0
        """Blocks taken from the cache, and blocks that went through the image path."""

    def __contains__(self, key: str) -> bool:
        return key in self.kept

    def __len__(self) -> int:
        return len(self.kept)

    def take(self, key: str) -> tuple[torch.Tensor, ...]:
        if key not in self.kept:
            raise KeyError(f"image block {key!r} came without pixels but is not in the image-token cache "
                           "(a batch made for another process's cache?)")
        self.reads += 1
        return self.kept[key]

    def keep(self, key: str, *tensors: torch.Tensor) -> None:
        self.passes += 1
        size = sum(t.numel() * t.element_size() for t in tensors)
        if key not in self.kept and self.bytes + size <= self.max_bytes:
            # not views that would hold the batch's tensors
            self.kept[key] = tuple(t.detach().clone() for t in tensors)
            self.bytes += size

    def stats(self) -> dict[str, int]:
        """Blocks kept, and blocks read from the cache and through the image path so far."""
        return {"image_cache_blocks": len(self), "image_cache_reads": self.reads,
                "image_cache_passes": self.passes}

    def summary(self) -> str:
        kept = "image tokens" if self.level == "tokens" else "patch embeddings"
        return (f"image-token cache: {kept} of {len(self)} blocks kept ({self.bytes / 2**20:.1f} MiB), "
                f"{self.reads} read from it, {self.passes} through the image path")


class Aria(nn.Module):
    image_token_cache: ImageTokenCache | None = None
    """Set by the trainer with ``stage.image_token_cache_gb``; ``embed`` then fills the <|img|>
    slots of blocks given without pixels (``image_blocks``) from it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg)
        self.decoder = TextDecoder(cfg)
        self.lm_head = LMHead(cfg.text.hidden_size, cfg.text.vocab_size)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed.weight
        self.sequence_parallel = None  # set by aria.parallel.sequence.enable_sequence_parallel

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.moe for layer in self.decoder.layers]

    def init_units(self) -> list[tuple[str, nn.Module, Callable[[nn.Module], None]]]:
        """From-scratch initialisation as (name, module, init) units: normal(0, initializer_range),
        norms to one, pad embedding row zero, SigLIP's fan-in scaled init for the vision encoder
        (see ``aria.model.vision``). A unit's init draws only its own module's tensors, and each
        unit can be run on a full-size copy of its module alone: a training run initialises unit by
        unit and keeps its part of each tensor, whatever its layout (``aria.train.weights``)."""
        std = self.cfg.text.initializer_range
        units = [("vision", self.vision, lambda m: m.init_weights()),
                 ("projector", self.projector, lambda m: m.init_weights(std)),
                 *self.decoder.init_units("decoder")]
        if not self.cfg.text.tie_word_embeddings:
            units.append(("lm_head", self.lm_head, lambda m: nn.init.normal_(m.weight, std=std)))
        return units

    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every unit in place. With ``seed``, each unit draws from its own generator
        seeded by (seed, unit name) (``unit_seed``): a layer's initial weights do not depend on how
        many other tensors were drawn before it, so any layout reproduces them. Without, the units
        draw from the global RNG in order."""
        for name, module, init in self.init_units():
            with seeded(seed, name, module):
                init(module)

    def set_gradient_checkpointing(self, vision: bool, decoder: bool) -> None:
        self.vision.gradient_checkpointing = vision
        self.decoder.gradient_checkpointing = decoder

    def image_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(N, C, H, W) crops [+ (N, H, W) pixel mask] -> (N, Q, D) image-token embeddings; in
        training, ``vision.crop_chunk`` crops at a time, each chunk recomputed in backward."""
        return self._crop_chunks(self._crop_features, pixel_values, pixel_mask)

    def _crop_chunks(self, features: Callable, crops: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """``features(crops, masks)``, in training ``vision.crop_chunk`` crops at a time, each chunk
        recomputed in backward."""
        C = self.cfg.vision.crop_chunk
        if C and crops.shape[0] > C and self.training and torch.is_grad_enabled():
            return torch.cat([torch.utils.checkpoint.checkpoint(
                features, crops[start:start + C], None if masks is None else masks[start:start + C],
                use_reentrant=False) for start in range(0, crops.shape[0], C)])
        return features(crops, masks)

    def _crop_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        patches_NGD, valid_NG = self.vision(pixel_values, pixel_mask)
        return self.projector(patches_NGD, valid_NG)

    def _patch_features(self, x_NGD: torch.Tensor, patch_mask_Nhw: torch.Tensor) -> torch.Tensor:
        return self.projector(*self.vision.encode(x_NGD, patch_mask_Nhw))

    def embed(self, input_ids_BT: torch.Tensor, pixel_values=None, pixel_mask=None,
              image_feature_order: torch.Tensor | None = None, text: bool = True,
              image_blocks: list[tuple[str | None, int, bool]] | None = None) -> torch.Tensor:
        """Token embeddings with image features in the <|img|> slots (``text=False``: zeros outside
        them, with no embedding lookup, and so no gradient for the embedding table).

        ``pixel_values`` is one (N, C, H, W) tensor, or a list of them (one per crop size, e.g. 980 px
        images and 490 px video frames) with ``image_feature_order`` giving, for each <|img|> slot,
        its row among the per-size features flattened to (N_s * Q_s, D) and concatenated.

        ``image_blocks`` (a loader with the image-token cache, ``ImageTokenCache``): every media block
        in slot order as (key, slots, cached). A cached block has no pixels and takes its rows from
        the cache; the others take theirs, in turn, from the features of ``pixel_values`` and are
        kept under their key.
        """
        slots_BT = input_ids_BT == self.cfg.image_token_id
        num_slots = None  # unknown for shape-only inputs: the checks below are skipped
        # Fake tensors (aria.train.plan) hold no values. A decode step (one token per row, no
        # pixels) skips the check: its tokens come from the model's own vocabulary, and a host sync
        # per generated token would stall the GPU's queue.
        if not holds_no_data(input_ids_BT) and (pixel_values is not None or input_ids_BT.shape[1] > 1):
            # The one host sync of a forward: token ids in range, and the <|img|> count.
            lowest, highest, num_slots = torch.stack([input_ids_BT.min(), input_ids_BT.max(),
                                                      slots_BT.sum()]).tolist()
            if lowest < 0 or highest >= self.cfg.text.vocab_size:
                raise ValueError(f"input_ids hold ids in [{lowest}, {highest}] but the vocabulary has "
                                 f"{self.cfg.text.vocab_size} tokens (model.text.vocab_size)")
        if text:
            embeds_BTD = self.decoder.embed(input_ids_BT)
        else:
            embeds_BTD = self.decoder.embed.weight.new_zeros(*input_ids_BT.shape, self.cfg.text.hidden_size)
        if pixel_values is None and not image_blocks:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} <|img|> tokens (id "
                                 f"{self.cfg.image_token_id}) but no pixel_values were given")
            return embeds_BTD
        cache = self.image_token_cache
        if image_blocks is not None and cache is not None and cache.level == "patches":
            rows_RD, described = self._patch_block_rows(pixel_values, pixel_mask, image_blocks)
        else:
            rows_RD, described = self._pixel_rows(pixel_values, pixel_mask, image_feature_order)
            if image_blocks is not None:
                rows_RD = self._block_rows(rows_RD, image_blocks)
        if image_blocks is not None:
            described += f" ({sum(cached for _, _, cached in image_blocks)} blocks from the image-token cache)"
        if num_slots is None:  # shape-only inputs: every feature row is taken to have its slot
            num_slots = rows_RD.shape[0]
        return merge_image_features(embeds_BTD, slots_BT, num_slots, rows_RD, described)

    def _pixel_rows(self, pixel_values, pixel_mask, image_feature_order) -> tuple[torch.Tensor | None, str]:
        """The (R, D) image features of ``pixel_values`` in slot order (None without pixels), and a
        description of their crops for messages."""
        if pixel_values is None:
            return None, ""
        if isinstance(pixel_values, torch.Tensor):
            features_NQD = self.image_features(pixel_values, pixel_mask)
            rows_RD = features_NQD.flatten(0, 1)
            described = f" ({features_NQD.shape[0]} crops x {features_NQD.shape[1]} queries)"
        else:
            masks = pixel_mask if pixel_mask is not None else [None] * len(pixel_values)
            if len(masks) != len(pixel_values) or image_feature_order is None:
                raise ValueError("pixel_values given per crop size need a pixel_mask list of the same "
                                 "length (or None) and image_feature_order")
            groups = [self.image_features(pv, pm) for pv, pm in zip(pixel_values, masks)]
            rows_RD = torch.cat([g.flatten(0, 1) for g in groups])
            if image_feature_order.numel() != rows_RD.shape[0]:
                raise ValueError(f"image_feature_order has {image_feature_order.numel()} entries for "
                                 f"{rows_RD.shape[0]} image features")
            rows_RD = rows_RD[image_feature_order]
            described = " (" + " + ".join(f"{g.shape[0]} crops x {g.shape[1]} queries" for g in groups) + ")"
        return rows_RD, described

    def _block_rows(self, rows_RD: torch.Tensor | None, image_blocks: list[tuple[str | None, int, bool]]
                    ) -> torch.Tensor:
        """Every block's rows in slot order: a cached block's from the image-token cache, the others'
        from ``rows_RD`` in turn (each kept in the cache under its key)."""
        cache, pieces, at = self.image_token_cache, [], 0
        fresh = 0 if rows_RD is None else rows_RD.shape[0]
        for key, slots, cached in image_blocks:
            if cached:
                if cache is None:
                    raise ValueError(f"image block {key!r} came without pixels, but the model has no "
                                     "image-token cache")
                pieces += cache.take(key)
                continue
            if at + slots > fresh:
                raise ValueError(f"image_blocks name more uncached slots than the {fresh} image features "
                                 "of pixel_values")
            pieces.append(rows_RD[at: at + slots])
            if cache is not None and key is not None:
                cache.keep(key, pieces[-1])
            at += slots
        if at != fresh:
            raise ValueError(f"pixel_values give {fresh} image features but image_blocks take {at}")
        return torch.cat(pieces) if pieces else rows_RD

    def _patch_block_rows(self, pixel_values, pixel_mask, image_blocks: list[tuple[str | None, int, bool]]
                          ) -> tuple[torch.Tensor, str]:
        """Every block's rows in slot order with kept patch embeddings (level "patches"): a cached
        block's patch embeddings from the cache, the others' from the patch projection of
        ``pixel_values`` in turn (each kept under its key), then the vision layers and the
        projector over all of them at once. Every crop has one size
        (``aria.config.check_image_token_cache``)."""
        if isinstance(pixel_values, (list, tuple)):
            raise ValueError("kept patch embeddings need every crop of one size, but pixel_values come "
                             f"in {len(pixel_values)} sizes (data.image_size and the video frames' "
                             "image_size differ)")
        cache, pieces, masks, at = self.image_token_cache, [], [], 0
        fresh = 0
        if pixel_values is not None:
            fresh_NGD, fresh_Nhw = self.vision.embed_patches(pixel_values, pixel_mask)
            fresh = fresh_NGD.shape[0]
            per_crop = self.projector.num_queries(fresh_NGD.shape[1])
        for key, slots, cached in image_blocks:
            if cached:
                x_nGD, mask_nhw = cache.take(key)
            else:
                if not fresh or slots % per_crop or at + slots // per_crop > fresh:
                    raise ValueError(f"image_blocks name an uncached block of {slots} slots that is not "
                                     f"whole crops of {per_crop if fresh else '?'} queries among the "
                                     f"{fresh} crops of pixel_values")
                n = slots // per_crop
                x_nGD, mask_nhw = fresh_NGD[at: at + n], fresh_Nhw[at: at + n]
                if key is not None:
                    cache.keep(key, x_nGD, mask_nhw)
                at += n
            pieces.append(x_nGD)
            masks.append(mask_nhw)
        if at != fresh:
            raise ValueError(f"pixel_values give {fresh} crops but image_blocks take {at}")
        features_NQD = self._crop_chunks(self._patch_features, torch.cat(pieces), torch.cat(masks))
        return features_NQD.flatten(0, 1), f" ({features_NQD.shape[0]} crops x {features_NQD.shape[1]} queries)"

    def forward(self, input_ids: torch.Tensor, pixel_values=None, pixel_mask=None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int | None = None, image_feature_order: torch.Tensor | None = None,
                towers: bool = False, words: str | None = None,
                image_blocks: list[tuple[str | None, int, bool]] | None = None) -> AriaOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        for name, value in (("position_ids", position_ids), ("segment_ids", segment_ids),
                            ("targets", targets)):
            if value is not None and value.shape != input_ids.shape:
                raise ValueError(f"{name} of shape {tuple(value.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
        if words:
            if words not in WORD_POOLS:
                raise ValueError(f"words must be one of {WORD_POOLS}, got {words!r}")
            if segment_ids is None or self.sequence_parallel is not None or cache is not None:
                raise ValueError("words needs segment_ids, no KV cache and no sequence parallelism")
            images_BTD = self.embed(input_ids, pixel_values, pixel_mask, image_feature_order, text=False,
                                    image_blocks=image_blocks)
            slots_BT = input_ids == self.cfg.image_token_id
            if words == "mean":
                image_SD, _ = document_means(images_BTD, slots_BT, segment_ids)
                return AriaOutput(word_logits_SV=self.lm_head(self.decoder.norm(image_SD.to(images_BTD.dtype))))
            doc_BT, S = document_ids(segment_ids)
            if holds_no_data(slots_BT):  # shapes only (aria.train.plan): every position, an upper bound
                images_ND, documents_N = images_BTD.flatten(0, 1), doc_BT.flatten().clamp(min=0)
            else:
                images_ND, documents_N = images_BTD[slots_BT], doc_BT[slots_BT]
            token_logits_NV = self.lm_head(self.decoder.norm(images_ND))
            return AriaOutput(word_logits_SV=document_log_mean_exp(token_logits_NV, documents_N, S),
                              token_logits_NV=token_logits_NV, image_documents_N=documents_N)
        embeds_BTD = self.embed(input_ids, pixel_values, pixel_mask, image_feature_order,
                                image_blocks=image_blocks)
        if towers:
            if segment_ids is None or self.sequence_parallel is not None or cache is not None:
                raise ValueError("towers=True needs segment_ids, no KV cache and no sequence parallelism")
            text_segments_BT = text_runs(segment_ids, input_ids == self.cfg.image_token_id)
            dec = self.decoder(embeds_BTD, position_ids, text_segments_BT, None, text_segments_BT > 0)
            return AriaOutput(embeds_BTD=embeds_BTD, hidden_BTD=dec.hidden_BTD, **self._routing(dec))
        valid_BT = None if segment_ids is None else segment_ids > 0
        sp = self.sequence_parallel
        if sp is not None and cache is None:  # this rank's tokens of every row (aria.parallel.sequence)
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            embeds_BTD, position_ids = sp.shard(embeds_BTD), sp.shard(position_ids)
            valid_BT = None if valid_BT is None else sp.shard(valid_BT)
            targets = None if targets is None else sp.shard(targets)
        # segment_ids stay whole: attention sees every token of a row (see TextDecoder.forward)
        dec = self.decoder(embeds_BTD, position_ids, segment_ids, cache, valid_BT)
        routing = self._routing(dec)
        hidden_BTD = dec.hidden_BTD
        if targets is None:
            if logits_to_keep:
                hidden_BTD = hidden_BTD[:, -logits_to_keep:]
            return AriaOutput(logits=self.lm_head(hidden_BTD), **routing)
        return AriaOutput(loss_sum=self.lm_head(hidden_BTD, targets),
                          num_targets=(targets != IGNORE_INDEX).sum(), **routing)

    def _routing(self, dec) -> dict:
        """The decoder output's router statistics and weighted router loss (training mode only)."""
        router_loss = None
        if dec.aux_loss_L is not None:
            moe = self.cfg.moe
            router_loss = moe.aux_loss_coeff * dec.aux_loss_L.sum() + moe.z_loss_coeff * dec.z_loss_L.sum()
        return dict(router_loss=router_loss, aux_loss_L=dec.aux_loss_L, z_loss_L=dec.z_loss_L,
                    tokens_per_expert_LE=dec.tokens_per_expert_LE)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, init: bool = True) -> Aria:
    """Build Aria on ``device`` (``"meta"`` for shapes only) and initialise it from scratch."""
    with torch.device(device or "cpu"):
        model = Aria(cfg)
    if init and str(device) != "meta":
        model.init_weights()
    return model.to(dtype)


def module_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of ``model`` (an ``Aria``) in exactly one of the five groups."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in MODULE_GROUPS}
    groups["vision"] += list(model.vision.parameters())
    groups["projector"] += list(model.projector.parameters())
    decoder = model.decoder
    for layer in decoder.layers:
        groups["router"] += list(layer.moe.router.parameters())
        groups["experts"] += list(layer.moe.experts.parameters())
        if layer.moe.shared is not None:
            groups["experts"] += list(layer.moe.shared.parameters())
        for module in (layer.attn_norm, layer.attn, layer.mlp_norm):
            groups["language_model"] += list(module.parameters())
    groups["language_model"] += list(decoder.embed.parameters()) + list(decoder.norm.parameters())
    if model.lm_head.weight is not decoder.embed.weight:
        groups["language_model"] += list(model.lm_head.parameters())
    seen = {id(p) for ps in groups.values() for p in ps}
    stray = [n for n, p in model.named_parameters() if id(p) not in seen]
    assert not stray and len(seen) == sum(map(len, groups.values())), f"ungrouped parameters {stray}"
    return groups
