"""Autoregressive generation with the static KV cache: greedy or temperature / top-p sampling.

Letters: B prompts, T prompt length, V vocabulary.

Design decisions:
- One prefill over the whole prompt (images included), then one token per step; only the last
  position's logits are computed.
- Batched prompts are left-padded with ``attention_mask`` 0: padding becomes segment 0 (no real
  token attends to it) and positions count real tokens only, so each row generates exactly what it
  would alone.
- Rows that finished keep emitting ``pad_token_id``; the loop stops when every row has finished
  (one host check per step, which streaming needs anyway).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from aria.model.aria import Aria
from aria.model.decoder import KVCache


def left_padded_positions(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: real tokens count from 0, padding sits at 0."""
    return (attention_mask_BT.cumsum(dim=1) - 1).clamp(min=0)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_ids = probs_BV.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, sorted_ids, sorted_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Aria, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
             pixel_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, eos_token_ids: Sequence[int] = (),
             pad_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             image_feature_order: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the new tokens (B, n <= max_new_tokens). ``temperature`` 0 means greedy. Crops of
    several sizes come as per-size lists plus ``image_feature_order`` (see ``Aria.embed``)."""
    B, T = input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg.text, B, T + max_new_tokens, dtype, input_ids.device)
    pad = model.cfg.text.pad_token_id if pad_token_id is None else pad_token_id
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=input_ids.device)

    positions_BT = segments_BT = None
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask pads some prompt on the right; generation needs left padding "
                         "(every prompt's last token in the last column)")
    if attention_mask is not None and not bool(attention_mask.all()):
        segments_BT = attention_mask.long()
        positions_BT = left_padded_positions(segments_BT)
    out = model(input_ids, pixel_values, pixel_mask, position_ids=positions_BT,
                segment_ids=segments_BT, cache=cache, logits_to_keep=1,
                image_feature_order=image_feature_order)
    next_pos_B1 = (positions_BT[:, -1:] if positions_BT is not None
                   else torch.full((B, 1), T - 1, device=input_ids.device)) + 1

    finished_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token_B = sample_next(out.logits[:, -1], temperature, top_p, generator)
        token_B = torch.where(finished_B, pad, token_B)
        new_tokens.append(token_B)
        if on_token is not None:
            on_token(token_B)
        finished_B |= torch.isin(token_B, eos)
        if step == max_new_tokens - 1 or bool(finished_B.all()):
            break
        segments = None if segments_BT is None else torch.ones(B, 1, dtype=torch.long, device=input_ids.device)
        out = model(token_B[:, None], position_ids=next_pos_B1, segment_ids=segments, cache=cache,
                    logits_to_keep=1)
        next_pos_B1 = next_pos_B1 + 1
    return torch.stack(new_tokens, dim=1)
