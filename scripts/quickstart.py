"""Quickstart: the Aria model on the CPU in a few seconds.

1. parameter counts of model=aria / proxy / tiny (built on the meta device: no memory used);
2. model=tiny: a forward pass over a prompt with one 490 px image (a red square, partially padded);
3. greedy generation with the KV cache, checked against recomputing the whole sequence each step;
4. export to a Hugging Face directory and the same logits from transformers'
   AriaForConditionalGeneration.

Run through ``bash scripts/quickstart.sh`` (which sets up .venv first).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from aria.config import load_model_config
from aria.convert.checkpoint import convert, save_model_dir
from aria.model import build_model, generate
from aria.model.flops import count_parameters


def fmt(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def red_square_crop(size: int = 490, valid_rows: int = 420) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop as the image processor makes it: values in [-1, 1], padding at the bottom."""
    pixels = torch.ones(1, 3, size, size)  # white
    pixels[:, 1:, 100:300, 150:350] = -1.0  # green and blue off -> red square
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, :valid_rows] = True
    pixels[:, :, valid_rows:] = -1.0
    return pixels, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    print("== parameter counts (meta device) ==")
    print(f"{'model':8} {'total':>9} {'LM':>9} {'vision+proj':>12} {'active/text':>12} {'active/visual':>14}")
    for name in ("aria", "proxy", "tiny"):
        c = count_parameters(load_model_config(name))
        print(f"{name:8} {fmt(c.total):>9} {fmt(c.language_model):>9} "
              f"{fmt(c.vision_encoder + c.projector):>12} {fmt(c.active_per_text_token):>12} "
              f"{fmt(c.active_per_visual_token):>14}")

    cfg = load_model_config("tiny")
    model = build_model(cfg).eval()
    built = sum(p.numel() for p in model.parameters())
    print(f"\n== model=tiny: {built:,} parameters built ==")

    pixels, mask = red_square_crop()
    queries = model.projector.num_queries((490 // cfg.vision.patch_size) ** 2)
    prompt = [5, 17, 42] + [cfg.image_token_id] * queries + [101, 102, 103]
    input_ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids, pixels, mask)
    print(f"forward: {len(prompt)} tokens ({queries} image tokens from one 490 px crop) -> logits "
          f"{tuple(out.logits.shape)} in {1e3 * (time.perf_counter() - t0):.0f} ms")

    t0 = time.perf_counter()
    tokens = generate(model, input_ids, pixels, mask, max_new_tokens=args.new_tokens)[0].tolist()
    dt = time.perf_counter() - t0
    print(f"greedy generation with the KV cache: {tokens} ({len(tokens) / dt:.0f} tokens/s)")
    ids = input_ids
    with torch.no_grad():
        for _ in range(len(tokens)):  # no cache: recompute everything each step
            logits = model(ids, pixels, mask).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    recomputed = ids[0, len(prompt):].tolist()
    print(f"same tokens without the cache: {recomputed == tokens}")
    if recomputed != tokens:
        raise SystemExit("KV-cache generation disagrees with full recomputation")

    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model.state_dict(), cfg, f"{tmp}/ours")
        convert(f"{tmp}/ours", f"{tmp}/hf", "to-hf", log=lambda msg: print(f"aria-convert to-hf: {msg}"))
        from transformers import AriaForConditionalGeneration

        hf = AriaForConditionalGeneration.from_pretrained(f"{tmp}/hf").eval()
        with torch.no_grad():
            hf_logits = hf(input_ids=input_ids, pixel_values=pixels, pixel_mask=mask).logits
        delta = (hf_logits - out.logits).abs().max().item()
        print(f"transformers AriaForConditionalGeneration on the export: max |logits delta| = {delta:.2e}")
        if delta > 1e-4:
            raise SystemExit("exported model disagrees with ours")
    print("\nquickstart OK")


if __name__ == "__main__":
    main()
