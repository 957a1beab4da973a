"""Stage 0 by caption words: each image says which tokens its caption holds (CatLIP's idea:
image-text pretraining as multi-label classification over the captions' words).

Letters: B rows, T tokens per row, S documents of the micro-batch (an image or a video's frames and
its caption each), V vocabulary.

Design decisions:
- No weights of its own. The image side is the projector's output averaged over the document's
  image tokens, read by the decoder's final norm and LM head (``Aria.forward(words=True)``): the
  LM head's row of a token is that token's class vector. No decoder layer runs, so a step costs
  the vision encoder and projector alone; a stage-0 checkpoint is an ordinary Aria checkpoint whose
  vision encoder and projector the next stage starts from (``init.groups=[vision,projector]``).
- Labels: the set of token ids among the document's supervised targets (its caption, end-of-text
  included): no word list to build, nothing named.
- Classes: the tokens some caption of the step's global batch holds (``step_classes``; their union
  over micro-batches and ranks rides on the trainer's one all-reduce before backward, V floats).
  The rest of the vocabulary, in no caption of the step, would add terms that only push logits
  down: with the LM head over all 1,024 ids of ``model=tiny``'s vocabulary (27 of them in the
  shapes world's captions), a shape probe on the mean image token read 37 / 49 / 55 / 63% after 225 / 450 / 675
  / 900 steps of 64 images; over the batch's caption tokens 57 / 69 / 79 / 72%
  (docs/quickstart_findings.md). The global batch is the same for any layout, so are its classes.
- Loss: binary cross-entropy of every (document, class), averaged over the classes and summed over
  the documents; the trainer divides by the step's documents on all ranks: the mean over the
  global batch's images. Each document's loss depends on it and the classes alone, so 2 ranks
  give what 1 gives. The held-out loss takes the classes of the whole held-out set
  (``word_losses`` summed per token, reduced over ranks at the end).
- Memory and bytes: (S, V) fp32 logits and losses, e.g. 64 documents x 100,352 tokens = 26 MB
  each at full size. Host reads per micro-batch: the document count (``document_ids``, in the
  forward) and the check below; per step the classes' all-reduce (V x 8 bytes: 0.8 MB at full size).
- A document without image tokens or supervised text is a ``ValueError`` naming where it came from
  (the loader skips such samples, ``aria.data.loader.check_image_caption``, so only a batch the
  loader did not build can hold one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aria.config import IGNORE_INDEX
from aria.model.aria import document_counts, document_ids


def caption_words(targets_BT: torch.Tensor, doc_BT: torch.Tensor, S: int, vocab_size: int) -> torch.Tensor:
    """(S, V) multi-hot of the token ids each document's supervised targets hold (``doc_BT``, ``S``:
    ``document_ids``); a scatter over all positions, the others adding 0 (no host read)."""
    take_N = ((targets_BT != IGNORE_INDEX) & (doc_BT >= 0)).flatten().float()
    cell_N = (doc_BT.clamp(min=0) * vocab_size + targets_BT.clamp(min=0)).flatten()
    words = torch.zeros(S * vocab_size, dtype=torch.float32, device=targets_BT.device)
    return words.scatter_reduce(0, cell_N, take_N, "amax").view(S, vocab_size)


def step_classes(targets: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(V,) float64: 1 for each token some of the ``targets`` (a step's micro-batches, on the host)
    supervise, else 0; summed over ranks, the positive entries are the step's classes."""
    present_V = torch.zeros(vocab_size, dtype=torch.float64)
    for targets_BT in targets:
        present_V[targets_BT[targets_BT != IGNORE_INDEX]] = 1.0
    return present_V


def word_losses(word_logits_SV: torch.Tensor, input_ids_BT: torch.Tensor, segment_ids_BT: torch.Tensor,
                targets_BT: torch.Tensor, image_token_id: int, where: list[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, V) fp32 binary cross-entropy of every (document, token) against "its caption holds the
    token", and the (S, V) multi-hot of the caption tokens."""
    doc_BT, S = document_ids(segment_ids_BT, word_logits_SV.shape[0])  # the forward read the count
    words_SV = caption_words(targets_BT, doc_BT, S, word_logits_SV.shape[-1])
    images_S = document_counts(doc_BT, S, input_ids_BT == image_token_id)
    captions_S = document_counts(doc_BT, S, targets_BT != IGNORE_INDEX)
    lacking_S = (images_S == 0) | (captions_S == 0)
    if S and bool(lacking_S.any()):  # the loss's one host read
        bad = int(lacking_S.nonzero()[0])
        origin = f" ({where[bad]})" if where and bad < len(where) else ""
        raise ValueError(f"train.objective=caption_words needs documents of an image and its caption "
                         f"(caption or video records); document {bad} of the micro-batch{origin} has "
                         f"{int(images_S[bad])} image tokens and {int(captions_S[bad])} supervised text tokens")
    loss_SV = F.binary_cross_entropy_with_logits(word_logits_SV.float(), words_SV, reduction="none")
    return loss_SV, words_SV


def caption_words_loss_sum(word_logits_SV: torch.Tensor, input_ids_BT: torch.Tensor,
                           segment_ids_BT: torch.Tensor, targets_BT: torch.Tensor, image_token_id: int,
                           classes_V: torch.Tensor, where: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """The summed (over documents) class-mean binary cross-entropy of the documents' word logits
    against the tokens their captions hold, and the number of documents. ``classes_V``: (V,) bool,
    the tokens scored (``step_classes``)."""
    loss_SV, _ = word_losses(word_logits_SV, input_ids_BT, segment_ids_BT, targets_BT, image_token_id, where)
    return (loss_SV * classes_V).sum() / classes_V.sum().clamp(min=1), loss_SV.shape[0]
