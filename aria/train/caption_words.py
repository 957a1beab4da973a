"""Stage 0 by caption words: each image says which tokens its caption holds (CatLIP's idea:
image-text pretraining as multi-label classification over the captions' words).

Letters: B rows, T tokens per row, S documents of the micro-batch (an image or a video's frames and
its caption each), V vocabulary.

Design decisions:
- No weights of its own. The image side is the projector's output averaged over the document's
  image tokens, read by the decoder's final norm and LM head (``Aria.forward(words="mean")``): the
  LM head's row of a token is that token's class vector. ``caption_words.pool=lme`` reads each
  image token instead and takes the log-mean-exp of their logits (``words="lme"``): a word may be
  said by one token, as a detector would, rather than by the image's average. No decoder layer
  runs, so a step costs the vision encoder and projector alone; a stage-0 checkpoint is an
  ordinary Aria checkpoint whose vision encoder and projector the next stage starts from
  (``init.groups=[vision,projector]``).
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
  each at full size; pool lme adds the (N, V) logits of the N image tokens (64 images x 128 tokens
  x 100,352 = 3.3 GB in fp32 at full size, within a step that runs no decoder layer). Host reads
  per micro-batch: the document count (``document_ids``, in the forward) and the check below; per
  step the classes' all-reduce (V x 8 bytes: 0.8 MB at full size).
- Pairs (``caption_words.pairs`` = k, with pool lme): a bag of words cannot say which colour goes
  with which shape. For each two distinct tokens of a document's caption, "one image token says
  both" (log-mean-exp over its image tokens of the sum of their two logits) is a sigmoid against
  "they stand at most k tokens apart somewhere in the caption": in "A green square at the top
  left and a purple diamond at the bottom." (k = 2) green goes with square, and green with
  diamond or square with bottom must not share a token. The pairs are the caption's own, so the
  loss is per document and the same for any layout; averaged over the caption's pairs and added
  to its words' loss. Cost: the caption's distinct pairs x the document's image tokens (a 20-token
  caption: ~190 pairs x 16 tokens in the quickstart); host reads per micro-batch: the longest
  caption, the most image tokens of a document, the pairs' count.
- Clauses (``caption_words.pair_breaks``, words such as "," and "and"): a caption names several
  objects, and a window long enough to pair a shape with its place ("diamond at the top right": 4
  apart) also pairs words of two objects ("right, a blue": 3). With breaks, two tokens are near only
  within one clause (no break token after the first, up to and including the second), so the window
  can span the clause.
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


def break_ids(words: list[str], tokenizer) -> torch.Tensor:
    """The token ids of ``caption_words.pair_breaks``' words: every token of ``tokenizer`` that
    decodes to one of them (``Tokenizer.ids_of_word``); a word no token decodes to is an error."""
    ids = {word: tokenizer.ids_of_word(word) for word in words}
    missing = [word for word, found in ids.items() if not found]
    if missing:
        raise ValueError(f"config field 'caption_words.pair_breaks' = {list(words)!r} is invalid: no token of "
                         f"the tokenizer {tokenizer.source} decodes to {missing}")
    return torch.tensor(sorted({i for found in ids.values() for i in found}), dtype=torch.long)


def caption_pairs(targets_BT: torch.Tensor, doc_BT: torch.Tensor, S: int, vocab_size: int, window: int,
                  breaks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each document's distinct pairs of distinct tokens among its supervised targets (``doc_BT``,
    ``S``: ``document_ids``): (P,) their document, lower and higher token id, and 1.0 where the two
    stand at most ``window`` positions apart somewhere in it with none of the token ids ``breaks``
    after the first up to the second (one clause), else 0.0. Host reads: the longest distance
    between two targets of a document, and the pairs' count (``torch.unique``)."""
    V = vocab_size
    take_BT = (targets_BT != IGNORE_INDEX) & (doc_BT >= 0)
    clause_BT = (torch.isin(targets_BT, breaks.to(targets_BT.device)).long().cumsum(1)
                 if breaks is not None and breaks.numel() else torch.zeros_like(targets_BT))
    at_BT = torch.arange(targets_BT.shape[1], device=targets_BT.device).expand_as(targets_BT)
    doc_N, at_N = doc_BT[take_BT], at_BT[take_BT]
    first_S = at_N.new_full((S,), targets_BT.shape[1]).scatter_reduce(0, doc_N, at_N, "amin")
    last_S = at_N.new_full((S,), -1).scatter_reduce(0, doc_N, at_N, "amax")
    span = int((last_S - first_S).max()) if doc_N.numel() else 0
    codes, near = [targets_BT.new_zeros(0)], [torch.zeros(0, dtype=torch.bool, device=targets_BT.device)]
    for k in range(1, span + 1):
        a_BT, b_BT, doc_a = targets_BT[:, :-k], targets_BT[:, k:], doc_BT[:, :-k]
        both_BT = take_BT[:, :-k] & take_BT[:, k:] & (doc_a == doc_BT[:, k:]) & (a_BT != b_BT)
        low, high = torch.minimum(a_BT, b_BT)[both_BT], torch.maximum(a_BT, b_BT)[both_BT]
        codes.append((doc_a[both_BT] * V + low) * V + high)
        near.append((clause_BT[:, :-k] == clause_BT[:, k:])[both_BT] & (k <= window))
    pairs_P, of_M = torch.unique(torch.cat(codes), return_inverse=True)
    near_P = torch.zeros(pairs_P.shape, device=pairs_P.device).scatter_reduce(
        0, of_M, torch.cat(near).float(), "amax")
    return pairs_P // (V * V), pairs_P // V % V, pairs_P % V, near_P


def pair_losses(token_logits_NV: torch.Tensor, documents_N: torch.Tensor, S: int, targets_BT: torch.Tensor,
                segment_ids_BT: torch.Tensor, window: int, breaks: torch.Tensor | None = None) -> torch.Tensor:
    """(S,) fp32: each document's binary cross-entropy, averaged over the pairs of its caption
    (``caption_pairs``), of "one image token says both" (the log-mean-exp over its image tokens of
    the sum of the two tokens' logits) against "they stand at most ``window`` apart" (within a
    clause, given ``breaks``); 0 for a document whose caption holds fewer than two distinct tokens."""
    doc_BT, _ = document_ids(segment_ids_BT, S)
    docs_P, low_P, high_P, near_P = caption_pairs(targets_BT, doc_BT, S, token_logits_NV.shape[1], window,
                                                  breaks)
    counts_S = torch.zeros(S, dtype=torch.long, device=documents_N.device).index_add(
        0, documents_N, torch.ones_like(documents_N))
    starts_S = counts_S.cumsum(0) - counts_S  # a document's image tokens are consecutive (row order)
    K = int(counts_S.max()) if S else 0  # host read: the most image tokens of a document
    slot_SK = torch.arange(K, device=documents_N.device).expand(S, K)
    valid_PK = (slot_SK < counts_S[:, None])[docs_P]
    token_PK = (starts_S[:, None] + slot_SK).clamp(max=max(documents_N.numel() - 1, 0))[docs_P]
    logits_NV = token_logits_NV.float()
    both_PK = (logits_NV[token_PK, low_P[:, None]] + logits_NV[token_PK, high_P[:, None]]).masked_fill(
        ~valid_PK, float("-inf"))
    said_P = both_PK.logsumexp(1) - counts_S[docs_P].clamp(min=1).float().log()
    loss_P = F.binary_cross_entropy_with_logits(said_P, near_P, reduction="none")
    sums_S = loss_P.new_zeros(S).index_add(0, docs_P, loss_P)
    return sums_S / loss_P.new_zeros(S).index_add(0, docs_P, torch.ones_like(loss_P)).clamp(min=1)


def caption_words_loss_sum(word_logits_SV: torch.Tensor, input_ids_BT: torch.Tensor,
                           segment_ids_BT: torch.Tensor, targets_BT: torch.Tensor, image_token_id: int,
                           classes_V: torch.Tensor, where: list[str] | None = None,
                           token_logits_NV: torch.Tensor | None = None, documents_N: torch.Tensor | None = None,
                           pairs: int = 0, pair_breaks: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The summed (over documents) class-mean binary cross-entropy of the documents' word logits
    against the tokens their captions hold, and the number of documents. ``classes_V``: (V,) bool,
    the tokens scored (``step_classes``). With ``pairs`` (``caption_words.pairs``, the image tokens'
    own logits ``token_logits_NV`` and ``documents_N`` given) each document adds its
    ``pair_losses`` (clauses ended by the token ids ``pair_breaks``)."""
    loss_SV, _ = word_losses(word_logits_SV, input_ids_BT, segment_ids_BT, targets_BT, image_token_id, where)
    loss = (loss_SV * classes_V).sum() / classes_V.sum().clamp(min=1)
    if pairs:
        loss = loss + pair_losses(token_logits_NV, documents_N, loss_SV.shape[0], targets_BT, segment_ids_BT,
                                  pairs, pair_breaks).sum()
    return loss, loss_SV.shape[0]
