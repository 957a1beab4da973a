"""Stage 0: SigLIP's sigmoid loss between the images and the captions of a micro-batch, over all ranks.

Letters: B rows, T tokens per row, D width, S documents of this rank (an image and its caption
each), A documents of all ranks, Q image tokens of a document, K caption tokens of a document
(both padded to the longest), N positions taken, W ranks.

Design decisions:
- No weights of its own. The image side is the projector's output, the tokens the decoder reads;
  the caption side is the decoder's last hidden states over the caption alone
  (``Aria.forward(towers=True)``: the <|img|> slots are padding to it) at the positions that
  predict a supervised token (from the image's closing marker to the caption's last token: the
  last one has read the whole caption). Both are L2-normalised; the logits are ``scale * cosine + bias`` with
  SigLIP's initial values t = 10, b = -10, fixed (learnt, they moved to 11.6 and -10.0 in 600
  steps on the shapes world). A stage-0 checkpoint is an ordinary Aria checkpoint, which the next
  stage starts from (``init.from_checkpoint``).
- ``pooled`` similarity (SigLIP's, the default): the cosine of the mean image token with the
  caption's last hidden state. ``late`` (FILIP's late interaction): the mean over caption j's
  tokens of each token's best cosine with one of image i's tokens, which asks each image token to
  hold one region's object. The quickstart's measurements (docs/quickstart_findings.md) use pooled.
- All ranks take part: each rank scores its images against the captions of every rank (an
  all-gather whose backward all-reduces the gradient, so a caption's gradient from other ranks'
  images returns to its rank). The loss of the global micro-batch is the sum over its images of
  sum_j -log sigmoid(z_ij * logit_ij) (z = +1 for the image's own caption, -1 otherwise); the
  trainer divides by the step's images on all ranks, so the loss is the same for any number of
  ranks holding the same rows. The negatives are the global micro-batch: the micro-batches of a
  step are separate sets of them, so a layout with another number of rows per micro-batch on all
  ranks (e.g. a resume on fewer processes, which raises ``train.grad_accum``) trains on other
  pairs, unlike the language-model loss.
- Documents: each document (``segment_ids`` of a row) is taken as an image (or a video's frames)
  followed by its text: caption and video records. The loader skips and counts other samples
  (``aria.data.loader.check_image_caption``: no image, no supervised text, or text supervised
  before an image); a document without image tokens or supervised text in a batch the loader did
  not build is a ``ValueError`` naming where it came from, raised on every rank
  (the check travels with the sizes' all-gather, so no rank waits in a collective).
- Host reads per micro-batch: the document count, the longest document's image and caption
  tokens, the check above, and one all-gather of three sizes. The captions' gather moves S x D
  per rank for ``pooled`` (each caption's last position), S x K x D for ``late`` (at full size,
  16 documents of 128 caption tokens in bf16: 10 MB).
- Memory of ``late``: S x S_all x K x Q fp32 similarities (plus the gradient's index of the
  best token): about 5 MB for the shapes world's 1K rows on one rank; it grows with the square of
  the global micro-batch, so at full size a stage 0 keeps its micro-batches of documents small or
  uses ``pooled``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from aria.config import IGNORE_INDEX, ContrastiveConfig
from aria.model.aria import document_ids


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-shape tensors along a new first dimension; backward all-reduces the
    gradient and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad_WX: torch.Tensor):
        grad_WX = grad_WX.contiguous()
        dist.all_reduce(grad_WX, group=ctx.group)
        return grad_WX[dist.get_rank(ctx.group)], None


def documents(values_BTD: torch.Tensor, take_BT: torch.Tensor, doc_BT: torch.Tensor, S: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The taken positions of each document as (S, K, D) rows, in row order, and their (S, K)
    validity; K is the most positions any document has."""
    doc_N = doc_BT[take_BT]  # non-decreasing: documents follow each other along a row
    counts_S = torch.bincount(doc_N, minlength=S)
    slot_N = torch.arange(doc_N.numel(), device=doc_N.device) - (counts_S.cumsum(0) - counts_S)[doc_N]
    K = int(counts_S.max()) if S else 0
    out_SKD = values_BTD.new_zeros(S, K, values_BTD.shape[-1])
    out_SKD[doc_N, slot_N] = values_BTD[take_BT]
    valid_SK = torch.zeros(S, K, dtype=torch.bool, device=doc_N.device)
    valid_SK[doc_N, slot_N] = True
    return out_SKD, valid_SK


def similarities(image_SQD: torch.Tensor, image_valid_SQ: torch.Tensor, text_AKD: torch.Tensor,
                 text_valid_AK: torch.Tensor, similarity: str) -> torch.Tensor:
    """(S, A) fp32 similarity of each image with each caption (A captions, padded ones included)."""
    if similarity == "pooled":
        counts_S1 = image_valid_SQ.sum(1, keepdim=True).clamp(min=1)
        image_SD = (image_SQD.float() * image_valid_SQ[..., None]).sum(1) / counts_S1
        last_A = (text_valid_AK.sum(1) - 1).clamp(min=0)
        text_AD = text_AKD.float()[torch.arange(text_AKD.shape[0], device=text_AKD.device), last_A]
        return F.normalize(image_SD, dim=-1) @ F.normalize(text_AD, dim=-1).T
    image_SQD = F.normalize(image_SQD.float(), dim=-1)
    text_AKD = F.normalize(text_AKD.float(), dim=-1)
    cos_SAKQ = torch.einsum("sqd,akd->sakq", image_SQD, text_AKD)
    best_SAK = cos_SAKQ.masked_fill(~image_valid_SQ[:, None, None, :], float("-inf")).amax(-1)
    best_SAK = best_SAK.masked_fill(~text_valid_AK[None], 0.0)
    return best_SAK.sum(-1) / text_valid_AK.sum(-1).clamp(min=1)[None]


def contrastive_loss_sum(embeds_BTD: torch.Tensor, hidden_BTD: torch.Tensor, input_ids_BT: torch.Tensor,
                         segment_ids_BT: torch.Tensor, targets_BT: torch.Tensor, image_token_id: int,
                         cfg: ContrastiveConfig, where: list[str] | None = None, group=None
                         ) -> tuple[torch.Tensor, int]:
    """The summed sigmoid loss of this rank's images against the captions of all ranks, and this
    rank's number of images (documents). ``group``: the data-parallel process group (None: the
    default group when one exists, else this process alone)."""
    doc_BT, S = document_ids(segment_ids_BT)
    image_SQD, image_valid_SQ = documents(embeds_BTD, (input_ids_BT == image_token_id) & (doc_BT >= 0),
                                          doc_BT, S)
    text_SKD, text_valid_SK = documents(hidden_BTD, (targets_BT != IGNORE_INDEX) & (doc_BT >= 0),
                                        doc_BT, S)
    images_S, captions_S = image_valid_SQ.sum(1), text_valid_SK.sum(1)
    lacking_S = (images_S == 0) | (captions_S == 0)
    bad = int(lacking_S.nonzero()[0]) if S and bool(lacking_S.any()) else -1
    if cfg.similarity == "pooled" and bad < 0:  # only each caption's last position is scored: gather that alone
        last_S = (captions_S - 1).clamp(min=0)
        text_SKD = text_SKD[torch.arange(S, device=last_S.device), last_S][:, None]
        text_valid_SK = (captions_S > 0)[:, None]

    def refuse(rank: int = 0, world: int = 1) -> None:
        origin = f" ({where[bad]})" if where and bad < len(where) else ""
        ranked = f" on rank {rank}" if world > 1 else ""
        raise ValueError(f"train.objective=contrastive needs documents of an image and its caption "
                         f"(caption or video records); document {bad} of the micro-batch{ranked}"
                         f"{origin} has {int(images_S[bad])} image tokens and {int(captions_S[bad])} "
                         f"supervised text tokens")

    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        if bad >= 0:
            refuse()
        first, text_AKD, text_valid_AK = 0, text_SKD, text_valid_SK
    else:
        sizes_3 = torch.tensor([S, text_SKD.shape[1], bad], device=embeds_BTD.device)
        parts = [torch.empty_like(sizes_3) for _ in range(world)]
        dist.all_gather(parts, sizes_3, group=group)
        sizes_W3 = torch.stack(parts).tolist()
        rank = dist.get_rank(group)
        if bad >= 0:
            refuse(rank, world)
        flagged = [w for w, (_, _, b) in enumerate(sizes_W3) if b >= 0]
        if flagged:
            raise ValueError(f"train.objective=contrastive: rank {flagged[0]} holds a document that is "
                             "not an image and its caption (its own error names it)")
        first = sum(s for s, _, _ in sizes_W3[:rank])
        S_max, K_max = (max(v) for v in list(zip(*sizes_W3))[:2])
        padded_SKD = F.pad(text_SKD, (0, 0, 0, K_max - text_SKD.shape[1], 0, S_max - S))
        padded_valid_SK = F.pad(text_valid_SK, (0, K_max - text_SKD.shape[1], 0, S_max - S))
        all_WSKD = _GatherRows.apply(padded_SKD, group)
        valid_WSK = _GatherRows.apply(padded_valid_SK.to(padded_SKD.dtype), group).bool()
        keep_A = torch.cat([torch.arange(s) + w * S_max for w, (s, _, _) in enumerate(sizes_W3)])
        keep_A = keep_A.to(embeds_BTD.device)
        text_AKD, text_valid_AK = all_WSKD.flatten(0, 1)[keep_A], valid_WSK.flatten(0, 1)[keep_A]
    if S == 0:  # nothing to score here (an all-padding batch): still part of the gathers above
        return embeds_BTD.sum() * 0.0 + text_AKD.sum() * 0.0, 0
    sim_SA = similarities(image_SQD, image_valid_SQ, text_AKD, text_valid_AK, cfg.similarity)
    sign_SA = torch.full_like(sim_SA, -1.0)
    sign_SA[torch.arange(S), torch.arange(first, first + S)] = 1.0
    return -F.logsigmoid(sign_SA * (cfg.scale * sim_SA + cfg.bias)).sum(), S
