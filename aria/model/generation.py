"""Autoregressive generation with the static KV cache: greedy or temperature / top-p sampling.

Letters: B prompts, T prompt length, V vocabulary.

Design decisions:
- One prefill over the whole prompt (images included), then one token per step; only the last
  position's logits are computed.
- Batched prompts are left-padded with ``attention_mask`` 0: padding becomes segment 0 (no real
  token attends to it) and positions count real tokens only, so each row generates exactly what it
  would alone.
- Rows that finished keep emitting ``pad_token_id``; the loop stops when every row has finished
  (one host check per step, which streaming needs anyway). On CUDA the host must not wait for a
  step's tokens before it queues the next step, or the GPU idles while Python samples, checks and
  launches: the tokens and the stop flag are copied to pinned host buffers behind an event, the
  next decode step is queued, and only then does the host wait for the copies (``HostCopy``). When
  every row has finished, that queued step is one step of work thrown away. ``on_token`` gets
  each step's tokens on the host. Elsewhere the step runs after the check, as the code reads.
- ``decode="cuda_graph"``: at batch 1 a decode step is many small kernels, each far shorter than
  the host's time to launch it: a full-size step dispatches ~3,000 aten ops (about 100 per layer:
  norms, attention with RoPE and the cache, router, dispatch, grouped GEMMs, combine, shared
  experts; counted on fake tensors), 15-30 ms of host time at an eager op's 5-10 us,
  where the GPU needs ~2 ms to read the step's ~7 GB of active bf16 weights: eager decoding waits
  on Python, not on the GPU. So after the prefill the KV cache turns static
  (``KVCache.make_static``: fixed shapes, a device-side write slot), the first decode step runs
  eagerly on a side stream (warm-up), the second is captured as one CUDA graph, and every further
  token is a copy into the graph's input and one replay. It needs CUDA and bf16 (the fp32 expert
  loop reads group sizes on the host). ``decode="static"`` runs the same static steps without a
  graph, on any device: the tests hold its tokens to transformers' and its steps to the same ops
  on the same shapes, token after token, with no host read (what capture needs).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from aria.config import DECODE_MODES
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
             image_feature_order: torch.Tensor | None = None, decode: str = "dynamic") -> torch.Tensor:
    """Returns the new tokens (B, n <= max_new_tokens). ``temperature`` 0 means greedy. Crops of
    several sizes come as per-size lists plus ``image_feature_order`` (see ``Aria.embed``).
    ``decode``: how steps after the prefill run; ``on_token``: called with each step's tokens (B,),
    on the host (see the module docstring)."""
    B, T = input_ids.shape
    dtype = next(model.parameters()).dtype
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "cuda_graph" and (input_ids.device.type != "cuda" or dtype != torch.bfloat16):
        raise ValueError(f"decode='cuda_graph' needs a bf16 model on CUDA, got {dtype} on "
                         f"{input_ids.device.type}")
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
    step = decode_step(model, cache, next_pos_B1, padded=segments_BT is not None, mode=decode)

    logits_BV = out.logits[:, -1]
    finished_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    host = HostCopy(B, input_ids.device)
    new_tokens = []
    for i in range(max_new_tokens):
        token_B = sample_next(logits_BV, temperature, top_p, generator)
        token_B = torch.where(finished_B, pad, token_B)
        new_tokens.append(token_B)
        finished_B |= torch.isin(token_B, eos)
        host.start(token_B, finished_B.all())
        last = i == max_new_tokens - 1
        if host.ahead and not last:
            logits_BV = step(token_B)
        tokens_B, done = host.wait()
        if on_token is not None:
            on_token(tokens_B)
        if last or done:
            break
        if not host.ahead:
            logits_BV = step(token_B)
    return torch.stack(new_tokens, dim=1)


def queue_ahead(device: torch.device) -> bool:
    """Whether the next decode step is queued before the host reads this step's tokens."""
    return device.type == "cuda"


class HostCopy:
    """A step's tokens and stop flag on the host. With ``ahead`` (CUDA) ``start`` queues their
    copies into pinned buffers behind an event, and ``wait`` waits for that event only, not for
    work queued after it; otherwise ``wait`` reads them there and then."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.ahead = queue_ahead(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.tokens_B = torch.empty(batch, dtype=torch.long, pin_memory=True)
            self.done = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.copied = torch.cuda.Event()

    def start(self, tokens_B: torch.Tensor, done: torch.Tensor) -> None:
        if self.cuda:
            self.tokens_B.copy_(tokens_B, non_blocking=True)
            self.done.copy_(done, non_blocking=True)
            self.copied.record()
        else:
            self.pending = tokens_B, done

    def wait(self) -> tuple[torch.Tensor, bool]:
        if self.cuda:
            self.copied.synchronize()
            return self.tokens_B.clone(), bool(self.done)
        tokens_B, done = self.pending
        return tokens_B, bool(done)


def decode_step(model: Aria, cache: KVCache, next_pos_B1: torch.Tensor, padded: bool, mode: str
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function feeding one token per row (B,) after the prefill and returning the next logits
    (B, V), in ``mode`` (see the module docstring). Its result may be overwritten by the next call."""
    if mode != "dynamic":
        return StaticDecodeStep(model, cache, next_pos_B1, cuda_graph=mode == "cuda_graph")
    segments_B1 = torch.ones_like(next_pos_B1) if padded else None
    position_B1 = next_pos_B1

    def dynamic(token_B: torch.Tensor) -> torch.Tensor:
        nonlocal position_B1
        out = model(token_B[:, None], position_ids=position_B1, segment_ids=segments_B1, cache=cache,
                    logits_to_keep=1)
        position_B1 = position_B1 + 1
        return out.logits[:, -1]
    return dynamic


class StaticDecodeStep:
    """Decode steps over a static KV cache: the token, position and segment inputs live in fixed
    buffers updated in place, so every step runs the same ops on the same tensors. With
    ``cuda_graph`` the first call runs eagerly on a side stream (warm-up), the second records the
    step as a CUDA graph, and every later call replays it."""

    def __init__(self, model: Aria, cache: KVCache, next_pos_B1: torch.Tensor, cuda_graph: bool) -> None:
        cache.make_static()
        self.model, self.cache, self.cuda_graph = model, cache, cuda_graph
        self.token_B1 = torch.zeros_like(next_pos_B1)
        self.position_B1 = next_pos_B1.clone()
        self.segments_B1 = torch.ones_like(next_pos_B1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_BV: torch.Tensor | None = None  # the graph's output
        self.calls = 0

    def step(self) -> torch.Tensor:
        out = self.model(self.token_B1, position_ids=self.position_B1, segment_ids=self.segments_B1,
                         cache=self.cache, logits_to_keep=1)
        self.position_B1.add_(1)
        return out.logits[:, -1]

    def __call__(self, token_B: torch.Tensor) -> torch.Tensor:
        self.token_B1.copy_(token_B[:, None])
        self.calls += 1
        if not self.cuda_graph:
            return self.step()
        if self.graph is not None:
            self.graph.replay()
            return self.logits_BV
        device = self.token_B1.device
        if self.calls == 1:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                logits_BV = self.step()
            torch.cuda.current_stream(device).wait_stream(side)
            return logits_BV
        # Capturing records the kernels without running them: replay once for this token.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = self.step()
        self.graph.replay()
        return self.logits_BV
