"""Parameter and FLOP counts from a ModelConfig alone (no weights needed).

Conventions (the paper does not state its own; these are spelled out so numbers can be compared):
- *Active per text token*: the parameters a text token's forward multiplies by inside the decoder
  layers: attention, router, its top-k routed experts and the shared experts. Embedding table, LM
  head and norms are excluded (the usual non-embedding convention). Aria: 3.60B; the paper quotes
  3.5B without stating its convention.
- *Active per visual token*: the above plus the vision encoder and projector that produce it
  (438M, exactly the paper's visual-encoder size). Aria: 4.04B; the paper quotes 3.9B, i.e. its
  3.5B plus those 438M.
- FLOPs count a multiply-add as 2. Training FLOPs are 3x forward (forward + backward with both
  gradients). Matmul FLOPs per token are 2 x (active matmul parameters, LM head included);
  attention adds 4 * H * d FLOPs per attended key per layer (QK^T and AV); a causal token at
  position i of an s-token document attends to i + 1 keys, (s + 1) / 2 on average.
"""

from __future__ import annotations

from dataclasses import dataclass

from aria.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    vision_encoder: int
    projector: int
    language_model: int
    """Decoder layers + embedding + final norm + LM head (the paper's "MoE decoder")."""
    embedding: int
    lm_head: int
    active_per_text_token: int
    active_per_visual_token: int


def _attention_params(cfg: ModelConfig) -> int:
    t = cfg.text
    qo = 2 * t.hidden_size * t.num_heads * t.head_dim
    kv = 2 * t.hidden_size * t.num_kv_heads * t.head_dim
    bias = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.hidden_size if t.attention_bias else 0
    return qo + kv + bias


def _expert_params(cfg: ModelConfig, width: int, bias: bool) -> int:
    D = cfg.text.hidden_size
    return 3 * D * width + ((2 * width + D) if bias else 0)


def _vision_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    Dv, Iv = v.hidden_size, v.intermediate_size
    per_layer = 4 * (Dv * Dv + Dv) + 2 * Dv * Iv + Iv + Dv + 4 * Dv  # attn, mlp, 2 LayerNorms
    embeddings = v.num_channels * v.patch_size ** 2 * Dv + Dv + v.num_positions * Dv
    return embeddings + v.num_layers * per_layer


def _projector_params(cfg: ModelConfig) -> int:
    Dv, D = cfg.vision.hidden_size, cfg.text.hidden_size
    cross_attn = 3 * Dv * Dv + (3 * Dv * Dv + 3 * Dv) + 2 * (Dv * Dv + Dv) + 4 * Dv
    return cfg.projector.max_queries * Dv + cross_attn + 2 * Dv + Dv * D + D * D


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    t, m = cfg.text, cfg.moe
    D = t.hidden_size
    attn = _attention_params(cfg)
    routed = _expert_params(cfg, m.intermediate_size, bias=False)
    shared = _expert_params(cfg, m.intermediate_size * m.num_shared_experts, m.shared_bias) \
        if m.num_shared_experts else 0
    router = m.num_experts * D
    layer_total = attn + router + m.num_experts * routed + shared + 2 * D
    layer_active = attn + router + m.top_k * routed + shared
    embedding = t.vocab_size * D
    lm_head = 0 if t.tie_word_embeddings else t.vocab_size * D
    language_model = t.num_layers * layer_total + embedding + D + lm_head
    vision, projector = _vision_params(cfg), _projector_params(cfg)
    active_text = t.num_layers * layer_active
    return ParamCounts(
        total=language_model + vision + projector,
        vision_encoder=vision,
        projector=projector,
        language_model=language_model,
        embedding=embedding,
        lm_head=lm_head,
        active_per_text_token=active_text,
        active_per_visual_token=active_text + vision + projector,
    )


def text_flops_per_token(cfg: ModelConfig, doc_len: int, training: bool = True) -> float:
    """FLOPs per text token of a causal document of ``doc_len`` tokens (LM head included)."""
    t = cfg.text
    counts = count_parameters(cfg)
    matmul = 2 * (counts.active_per_text_token + t.vocab_size * t.hidden_size)
    attention = 4 * t.num_heads * t.head_dim * (doc_len + 1) / 2 * t.num_layers
    return (3 if training else 1) * (matmul + attention)


def vision_flops_per_crop(cfg: ModelConfig, num_patches: int, training: bool = True) -> float:
    """FLOPs to turn one crop of ``num_patches`` patches into its Q image tokens."""
    v, D = cfg.vision, cfg.text.hidden_size
    Dv, Iv, G = v.hidden_size, v.intermediate_size, num_patches
    Q = cfg.projector.patch_to_query.get(G, cfg.projector.max_queries)
    layers = v.layers_used * G * (2 * (4 * Dv * Dv + 2 * Dv * Iv) + 4 * Dv * G)
    patch_embed = G * 2 * v.num_channels * v.patch_size ** 2 * Dv
    projector = (Q * 2 * (2 * Dv * Dv)  # q_proj + in-projection of q
                 + G * 2 * (4 * Dv * Dv)  # k/v projections, twice each
                 + Q * 4 * Dv * G  # attention
                 + Q * 2 * (2 * Dv * Dv + Dv * D + D * D))  # out_proj, linear, FFN
    return (3 if training else 1) * (layers + patch_embed + projector)
