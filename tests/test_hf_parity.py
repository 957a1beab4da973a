"""Our model against transformers' AriaForConditionalGeneration (the reference), fp32 on CPU.

Each config differs from the others in vision vs text width, heads vs kv heads, head_dim vs
width/heads, experts, top-k, shared experts, activations, biases, tying, feature layer and patch
counts; inputs hold several images per row, a row without images, partially masked crops, two crop
sizes (two query counts) and right padding. Norm weights are randomised so ones/zeros hide nothing.
"""

from __future__ import annotations

import pytest
import torch

from aria.model import build_model, generate
from helpers import hf_twin, make_config, perturb

TOL = 1e-5

CONFIGS = {
    # GQA, head_dim 12 != 32/4, vision narrower than text, two crop sizes
    "gqa": make_config(text=dict(head_dim=12), vision=dict(hidden_size=24),
                       patch_to_query={16: 6, 4: 3}),
    # MHA, vision wider than text, top-1, one shared expert with GELU, all optional biases
    "mha_bias": make_config(
        text=dict(vocab_size=120, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=6,
                  head_dim=8, attention_bias=True, rms_norm_eps=1e-5, rope_theta=500.0),
        moe=dict(num_experts=6, top_k=1, intermediate_size=8, num_shared_experts=1,
                 shared_act="gelu", shared_bias=True),
        vision=dict(hidden_size=64, intermediate_size=32, num_layers=1, num_heads=2, patch_size=7,
                    image_size=28, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5),
        patch_to_query={16: 5, 9: 2}),
    # MQA, head_dim 16 != 64/8, 8 experts top-3, 3 shared, tied embeddings, features from layer -2
    "mqa_tied": make_config(
        text=dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=1,
                  head_dim=16, tie_word_embeddings=True, pad_token_id=0),
        moe=dict(num_experts=8, top_k=3, intermediate_size=24, num_shared_experts=3),
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, patch_size=5,
                    image_size=30, feature_layer=-2),
        patch_to_query={36: 8, 16: 4}),
}


def crop_side(cfg, queries_rank: int) -> int:
    """Pixel side of the crops that map to the largest (0) or smallest (1) query count."""
    patches = sorted(cfg.projector.patch_to_query, reverse=True)[queries_rank]
    return round(patches ** 0.5) * cfg.vision.patch_size


def make_batch(cfg, side: int, seed: int):
    """Three right-padded rows holding 2, 0 and 1 images; crops 1 and 2 partially masked."""
    g = torch.Generator().manual_seed(seed)
    Q = cfg.projector.patch_to_query[(side // cfg.vision.patch_size) ** 2]
    img, pad = cfg.image_token_id, cfg.text.pad_token_id

    def text(n):
        ids = torch.randint(10, cfg.text.vocab_size, (n,), generator=g)
        return torch.where((ids == img) | (ids == pad), 11, ids).tolist()

    rows = [text(3) + [img] * Q + text(2) + [img] * Q + text(4),
            text(7),
            text(5) + [img] * Q + text(1)]
    T = max(map(len, rows))
    input_ids = torch.full((3, T), pad)
    attention_mask = torch.zeros(3, T, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    pixels = torch.randn(3, 3, side, side, generator=g)
    mask = torch.ones(3, side, side, dtype=torch.bool)
    mask[1, side * 2 // 3:, :] = False  # partial rows and columns, not on patch boundaries
    mask[1, :, side - 3:] = False
    mask[2, :, side // 2:] = False  # whole patch columns at every crop size
    pixels[~mask.unsqueeze(1).expand_as(pixels)] = -1.0
    return input_ids, attention_mask, pixels, mask


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    torch.manual_seed(0)
    model = build_model(CONFIGS[request.param]).eval()
    perturb(model)
    return model, hf_twin(model)


@pytest.mark.parametrize("size_rank", [0, 1], ids=["large_crops", "small_crops"])
def test_logits_match_transformers(pair, size_rank):
    model, hf = pair
    cfg = model.cfg
    input_ids, attention_mask, pixels, mask = make_batch(cfg, crop_side(cfg, size_rank), seed=size_rank)
    with torch.no_grad():
        ours = model(input_ids, pixels, mask, segment_ids=attention_mask).logits
        ref = hf(input_ids=input_ids, pixel_values=pixels, pixel_mask=mask,
                 attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    delta = (ours[valid] - ref[valid]).abs().max().item()
    assert delta <= TOL, f"max |delta logits| = {delta:.3e}"
    # The comparison is not vacuous: the images reach the logits.
    with torch.no_grad():
        blind = model(input_ids, torch.zeros_like(pixels), mask, segment_ids=attention_mask).logits
    assert (blind[valid] - ours[valid]).abs().max() > 1e-2


def test_text_only_matches_transformers(pair):
    model, hf = pair
    ids = torch.randint(10, model.cfg.text.vocab_size, (2, 13))
    ids[ids == model.cfg.image_token_id] = 11
    with torch.no_grad():
        delta = (model(ids).logits - hf(input_ids=ids).logits).abs().max().item()
    assert delta <= TOL


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_greedy_generation_matches_transformers(pair, decode):
    """Both decode paths: the growing cache, and the static one a CUDA graph replays."""
    model, hf = pair
    cfg = model.cfg
    input_ids, _, pixels, mask = make_batch(cfg, crop_side(cfg, 0), seed=3)
    row = input_ids[2:3, : int((input_ids[2] != cfg.text.pad_token_id).sum())]  # one image
    ours = generate(model, row, pixels[2:3], mask[2:3], max_new_tokens=12, eos_token_ids=[], decode=decode)
    # eos_token_id=None: transformers neither stops at the end-of-text token nor (as min_new_tokens
    # would) masks it out of the argmax, so both sides take the same plain greedy argmax
    ref = hf.generate(input_ids=row, pixel_values=pixels[2:3], pixel_mask=mask[2:3],
                      max_new_tokens=12, eos_token_id=None, do_sample=False,
                      pad_token_id=cfg.text.pad_token_id)
    assert ours[0].tolist() == ref[0, row.shape[1]:].tolist()


def test_decode_modes_are_checked(pair):
    model, _ = pair
    ids = torch.randint(10, model.cfg.text.vocab_size, (1, 5))
    ids[ids == model.cfg.image_token_id] = 11
    with pytest.raises(ValueError, match="decode='cuda_graph' needs a bf16 model on CUDA, got torch.float32 on cpu"):
        generate(model, ids, max_new_tokens=2, decode="cuda_graph")
    with pytest.raises(ValueError, match="decode='graph': expected one of dynamic, static, cuda_graph"):
        generate(model, ids, max_new_tokens=2, decode="graph")


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_left_padded_batch_generation_matches_transformers_and_single_rows(pair, decode):
    model, hf = pair
    cfg = model.cfg
    side = crop_side(cfg, 0)
    input_ids, attention_mask, pixels, mask = make_batch(cfg, side, seed=4)
    lengths = attention_mask.sum(1).tolist()
    T = input_ids.shape[1]
    left_ids = torch.full_like(input_ids, cfg.text.pad_token_id)
    left_mask = torch.zeros_like(attention_mask)
    for i, n in enumerate(lengths):
        left_ids[i, T - n:] = input_ids[i, :n]
        left_mask[i, T - n:] = 1
    ours = generate(model, left_ids, pixels, mask, attention_mask=left_mask, max_new_tokens=8, decode=decode)
    ref = hf.generate(input_ids=left_ids, pixel_values=pixels, pixel_mask=mask,
                      attention_mask=left_mask, max_new_tokens=8, eos_token_id=None,
                      do_sample=False, pad_token_id=cfg.text.pad_token_id)
    assert ours.tolist() == ref[:, T:].tolist()
    crops_of_row = [(0, 2), (2, 2), (2, 3)]  # rows hold 2, 0 and 1 images
    for i, (a, b) in enumerate(crops_of_row):
        alone = generate(model, input_ids[i:i + 1, : lengths[i]], pixels[a:b] if b > a else None,
                         mask[a:b] if b > a else None, max_new_tokens=8, decode=decode)
        assert alone[0].tolist() == ours[i].tolist()
