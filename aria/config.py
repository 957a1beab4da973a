"""Typed configuration of the Aria model.

One dataclass per config node, mirrored by the Hydra YAML files in ``configs/model/``. Every field
is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field (with its path
in the tree, e.g. ``model.text.num_heads``) and the value, so that a typo in a YAML file or on the
command line fails before any tensor is allocated.

Design decisions:
- Fields are Aria's own names, not Hugging Face's; ``aria.convert.hf_config`` maps both ways.
- ``MoEConfig`` holds both the architecture (experts, top-k, widths) and the router losses and
  balancing options, because the layer that routes is the layer that computes them.
- The projector's query table is keyed by *patches per crop* (as in HF), so one model serves
  several image sizes: 490 px -> 1225 patches -> 128 queries, 980 px -> 4900 -> 256.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

# Names accepted for the activations the reference uses (shared experts and vision MLP).
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")
BALANCE_SCOPES = ("micro_batch", "global_batch")
PATCH_INITS = ("normal", "dct")


def _check(ok: bool, path: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"config field '{path}' = {value!r} is invalid: expected {expected}")


def _positive_int(path: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, path, value,
           "a positive integer")


def _non_negative_float(path: str, value: Any) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, path,
           value, "a non-negative number")


def _from_mapping(cls, data: Mapping[str, Any], path: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config node '{path}' must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.name != "_path"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config node '{path}' has unknown field(s) {unknown}; "
                         f"known fields: {sorted(names)}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"config node '{path}' is missing required field(s) {missing}")
    return cls(**dict(data), _path=path)


@dataclass
class TextConfig:
    """The decoder-only language model (attention, norms, embeddings; the MLP is in ``MoEConfig``)."""

    vocab_size: int
    """Rows of the token embedding and of the LM head (Aria: 100352)."""
    hidden_size: int
    """Model width D."""
    num_layers: int
    """Decoder layers; every one is an MoE layer."""
    num_heads: int
    """Query heads H."""
    num_kv_heads: int
    """Key/value heads (GQA when < num_heads; Aria uses full MHA)."""
    head_dim: int
    """Per-head width d; may differ from hidden_size / num_heads."""
    rope_theta: float = 5_000_000.0
    """RoPE base: 1e5 in pretraining stages 1-2, 5e6 from the long-context stage on."""
    max_position_embeddings: int = 65536
    """Longest context the model is configured for (informational for RoPE; exported to HF)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm in the decoder."""
    attention_bias: bool = False
    """Bias on q/k/v/o projections."""
    tie_word_embeddings: bool = False
    """Share the LM head with the token embedding (Aria: False)."""
    pad_token_id: int = 2
    """Padding id; its embedding row gets no gradient (as in the reference)."""
    bos_token_id: int = 1
    """Beginning-of-sequence id (written to the exported config)."""
    eos_token_id: int = 2
    """End-of-sequence id (written to the exported config)."""
    initializer_range: float = 0.02
    """Std of the normal init of linear layers, embeddings, experts and router."""
    _path: str = field(default="model.text", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            _positive_int(f"{p}.{name}", getattr(self, name))
        _check(self.num_heads % self.num_kv_heads == 0, f"{p}.num_kv_heads", self.num_kv_heads,
               f"a divisor of num_heads={self.num_heads}")
        _check(self.head_dim % 2 == 0, f"{p}.head_dim", self.head_dim, "an even number (RoPE)")
        _check(self.hidden_size % self.num_heads == 0, f"{p}.num_heads", self.num_heads,
               f"a divisor of hidden_size={self.hidden_size} (the Hugging Face format requires it, "
               "even when head_dim differs from hidden_size / num_heads)")
        _check(self.hidden_size % 8 == 0, f"{p}.hidden_size", self.hidden_size,
               "a multiple of 8 (grouped_mm needs 16-byte aligned expert rows)")
        _check(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0,
               f"{p}.rope_theta", self.rope_theta, "a positive number")
        _check(isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1,
               f"{p}.rms_norm_eps", self.rms_norm_eps, "a number in (0, 1)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            _check(isinstance(value, int) and 0 <= value < self.vocab_size, f"{p}.{name}", value,
                   f"a token id in [0, vocab_size={self.vocab_size})")
        _non_negative_float(f"{p}.initializer_range", self.initializer_range)


@dataclass
class MoEConfig:
    """The MoE MLP of every decoder layer: router, routed experts, shared experts, router losses."""

    num_experts: int
    """Routed experts E (Aria: 64)."""
    top_k: int
    """Experts chosen per token k (Aria: 6)."""
    intermediate_size: int
    """Width I of one routed expert's SwiGLU (Aria: 1664)."""
    num_shared_experts: int
    """Shared experts S, run on every token as one SwiGLU MLP of width S * I (Aria: 2)."""
    shared_act: str = "silu"
    """Activation of the shared experts' gate (routed experts always use SiLU, as the reference)."""
    shared_bias: bool = False
    """Bias on the shared experts' linear layers."""
    aux_loss_coeff: float = 1e-3
    """Switch load-balancing loss coefficient (fine-tuning recipes use 1e-4)."""
    z_loss_coeff: float = 1e-5
    """Router z-loss coefficient."""
    balance_scope: str = "micro_batch"
    """Where the load-balancing loss takes its expert-load statistics: this rank's micro-batch, or
    all data-parallel ranks ('global_batch', one all-reduce of E numbers per layer)."""
    bias_balancing: bool = False
    """Auxiliary-loss-free balancing: a per-expert bias added to the router logits for selection
    only, nudged towards balance between backward and the optimizer step."""
    bias_update_rate: float = 1e-3
    """Step of the bias update (bias += rate * sign(mean load - expert load))."""
    token_chunk: int = 0
    """Run the routed experts over this many tokens at a time (0 = all at once): bounds the
    dispatch and expert activations of long rows to one chunk (each chunk is recomputed in
    backward). The result is the same as unchunked. Not part of the HF config."""
    _path: str = field(default="model.moe", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for name in ("num_experts", "top_k", "intermediate_size"):
            _positive_int(f"{p}.{name}", getattr(self, name))
        _check(self.top_k <= self.num_experts, f"{p}.top_k", self.top_k,
               f"at most num_experts={self.num_experts}")
        _check(self.intermediate_size % 8 == 0, f"{p}.intermediate_size", self.intermediate_size,
               "a multiple of 8 (grouped_mm needs 16-byte aligned expert rows)")
        _check(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
               f"{p}.num_shared_experts", self.num_shared_experts, "an integer >= 0")
        _check(self.shared_act in ACTIVATIONS, f"{p}.shared_act", self.shared_act,
               f"one of {ACTIVATIONS}")
        _check(not (self.shared_bias and self.num_shared_experts == 0), f"{p}.shared_bias",
               self.shared_bias, "false when num_shared_experts is 0")
        _non_negative_float(f"{p}.aux_loss_coeff", self.aux_loss_coeff)
        _non_negative_float(f"{p}.z_loss_coeff", self.z_loss_coeff)
        _non_negative_float(f"{p}.bias_update_rate", self.bias_update_rate)
        _check(isinstance(self.token_chunk, int) and not isinstance(self.token_chunk, bool)
               and self.token_chunk >= 0, f"{p}.token_chunk", self.token_chunk, "an integer >= 0 (0 = off)")
        _check(self.balance_scope in BALANCE_SCOPES, f"{p}.balance_scope", self.balance_scope,
               f"one of {BALANCE_SCOPES}")


@dataclass
class VisionConfig:
    """The SigLIP-style ViT with NaViT position bucketing (variable aspect ratio via a pixel mask)."""

    hidden_size: int
    """ViT width Dv (Aria: 1152)."""
    intermediate_size: int
    """ViT MLP width (Aria: 4304)."""
    num_layers: int
    """Encoder layers (Aria: 27)."""
    num_heads: int
    """Attention heads; also the heads of the projector's cross-attention."""
    patch_size: int
    """Square patch side in pixels (Aria: 14)."""
    image_size: int
    """Side of the position table's image: (image_size // patch_size)^2 positions (Aria: 980)."""
    num_channels: int = 3
    """Input channels."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the encoder's LayerNorms."""
    hidden_act: str = "gelu_pytorch_tanh"
    """MLP activation."""
    feature_layer: int = -1
    """Which hidden state feeds the projector: 0 = embeddings, -1 = last layer (no post-norm)."""
    position_init_std: float | None = None
    """From-scratch init of the position table; null = SigLIP's 1/sqrt(hidden_size). Not part of the
    HF config (weights carry it)."""
    patch_init: str = "normal"
    """From-scratch init of the patch projection: "normal" (SigLIP's LeCun normal) or "dct" (each
    channel's lowest-frequency 2-D cosines, ``aria.model.vision.dct_patch_basis``). Not part of the
    HF config (weights carry it)."""
    crop_chunk: int = 0
    """In training, run the vision encoder and projector over this many crops at a time, each chunk
    recomputed in backward (0 = all at once): a long video row keeps only its pixels and image
    features instead of every crop's activations. The result is the same. Not part of the HF
    config."""
    _path: str = field(default="model.vision", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
                     "image_size", "num_channels"):
            _positive_int(f"{p}.{name}", getattr(self, name))
        _check(self.hidden_size % self.num_heads == 0, f"{p}.num_heads", self.num_heads,
               f"a divisor of hidden_size={self.hidden_size}")
        _check(self.image_size % self.patch_size == 0, f"{p}.image_size", self.image_size,
               f"a multiple of patch_size={self.patch_size}")
        _check(self.hidden_act in ACTIVATIONS, f"{p}.hidden_act", self.hidden_act,
               f"one of {ACTIVATIONS}")
        _check(isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1,
               f"{p}.layer_norm_eps", self.layer_norm_eps, "a number in (0, 1)")
        _check(isinstance(self.feature_layer, int)
               and -(self.num_layers + 1) <= self.feature_layer <= self.num_layers,
               f"{p}.feature_layer", self.feature_layer,
               f"an index into the {self.num_layers + 1} hidden states (embeddings + layers)")
        if self.position_init_std is not None:
            _non_negative_float(f"{p}.position_init_std", self.position_init_std)
        _check(self.patch_init in PATCH_INITS, f"{p}.patch_init", self.patch_init, f"one of {PATCH_INITS}")
        _check(self.patch_init != "dct" or self.hidden_size <= self.num_channels * self.patch_size ** 2,
               f"{p}.hidden_size", self.hidden_size,
               f"at most the {self.num_channels * self.patch_size ** 2} values of a patch with patch_init=dct")
        _check(isinstance(self.crop_chunk, int) and not isinstance(self.crop_chunk, bool) and self.crop_chunk >= 0,
               f"{p}.crop_chunk", self.crop_chunk, "an integer >= 0 (0 = off)")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers that run: the ones up to ``feature_layer``."""
        return self.feature_layer % (self.num_layers + 1)


@dataclass
class ProjectorConfig:
    """Cross-attention from learned queries to the ViT patches, then LayerNorm + GELU FFN."""

    patch_to_query: dict
    """Patches per crop -> learned queries (= <|img|> tokens) per crop, e.g. {1225: 128, 4900: 256}."""
    _path: str = field(default="model.projector", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _check(isinstance(self.patch_to_query, Mapping) and len(self.patch_to_query) > 0,
               f"{p}.patch_to_query", self.patch_to_query, "a non-empty mapping patches -> queries")
        table = {}
        for k, v in dict(self.patch_to_query).items():
            try:
                k_int, v_int = int(k), int(v)
            except (TypeError, ValueError):
                raise ValueError(f"config field '{p}.patch_to_query' has entry {k!r}: {v!r}; "
                                 "expected integer patches -> integer queries") from None
            _check(k_int > 0 and v_int > 0, f"{p}.patch_to_query", self.patch_to_query,
                   "positive patch counts and query counts")
            table[k_int] = v_int
        self.patch_to_query = table

    @property
    def max_queries(self) -> int:
        return max(self.patch_to_query.values())


@dataclass
class ModelConfig:
    """The whole Aria model: vision encoder -> projector -> MoE decoder."""

    text: TextConfig
    moe: MoEConfig
    vision: VisionConfig
    projector: ProjectorConfig
    image_token_id: int = 9
    """Id of <|img|>; projector outputs replace these embeddings in order."""
    name: str = "custom"
    """A label for logs (aria / proxy / tiny / custom)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.image_token_id, int)
               and 0 <= self.image_token_id < self.text.vocab_size, "model.image_token_id",
               self.image_token_id, f"a token id in [0, text.vocab_size={self.text.vocab_size})")
        grid = self.vision.image_size // self.vision.patch_size
        for patches in self.projector.patch_to_query:
            side = round(patches ** 0.5)
            _check(side * side == patches and side <= grid, "model.projector.patch_to_query",
                   self.projector.patch_to_query,
                   f"square patch counts of at most {grid}x{grid} (image_size/patch_size); "
                   f"{patches} is not")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a plain mapping (a Hydra/OmegaConf node converted to a container)."""
        if hasattr(data, "_metadata"):  # an OmegaConf node
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(data, resolve=True)
        data = dict(data)
        for key in ("text", "moe", "vision", "projector"):
            if key not in data:
                raise ValueError(f"config node 'model' is missing required field '{key}'")
        nodes = {
            "text": _from_mapping(TextConfig, data.pop("text"), "model.text"),
            "moe": _from_mapping(MoEConfig, data.pop("moe"), "model.moe"),
            "vision": _from_mapping(VisionConfig, data.pop("vision"), "model.vision"),
            "projector": _from_mapping(ProjectorConfig, data.pop("projector"), "model.projector"),
        }
        unknown = sorted(set(data) - {"image_token_id", "name"})
        if unknown:
            raise ValueError(f"config node 'model' has unknown field(s) {unknown}")
        return cls(**nodes, **data)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON friendly) that ``from_dict`` reads back."""

        def node(obj) -> dict:
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "_path"}

        out = {key: node(getattr(self, key)) for key in ("text", "moe", "vision", "projector")}
        out["projector"]["patch_to_query"] = dict(self.projector.patch_to_query)
        out["image_token_id"] = self.image_token_id
        out["name"] = self.name
        return out


@dataclass
class VideoConfig:
    """How videos are sampled and laid out (a record's own num_frames / fps win over these)."""

    num_frames: int = 8
    """Frames sampled uniformly (the official rule) when neither the record nor ``fps`` says."""
    fps: float | None = None
    """Sample this many frames per second instead, capped by ``max_frames``."""
    max_frames: int = 128
    """Most frames taken from one video in fps mode."""
    image_size: int = 490
    """Crop size of frames: 490 -> 128 tokens per frame for Aria."""
    timestamps: bool = False
    """Write '[MM:SS]' before each frame (and a line break after it)."""
    _path: str = field(default="data.video", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _positive_int(f"{p}.num_frames", self.num_frames)
        _positive_int(f"{p}.max_frames", self.max_frames)
        _check(self.fps is None or (isinstance(self.fps, (int, float)) and self.fps > 0), f"{p}.fps",
               self.fps, "null or a positive number")
        _check(self.image_size in IMAGE_SIZES, f"{p}.image_size", self.image_size, f"one of {IMAGE_SIZES}")


IMAGE_SIZES = (490, 980)
"""Crop sides Aria's processor makes (``data.image_size``, ``data.video.image_size``)."""
IGNORE_INDEX = -100
"""Target of a position that takes no loss (padding, prompts, image slots, document ends): the
convention of PyTorch's cross-entropy and of transformers."""

DECODE_MODES = ("dynamic", "static", "cuda_graph")
"""How ``aria.model.generate`` runs the steps after the prefill (see ``aria.model.generation``)."""


@dataclass
class DataConfig:
    """Datasets, tokenizer and media processing of a run."""

    train: Any = None
    """A dataset path (JSONL or JSON file, a directory with train.jsonl / train.json, webdataset
    shards, or a local Hugging Face dataset: parquet / arrow files or ``save_to_disk`` output), or a
    list of paths or of {path, weight, columns} mappings mixed by weight (``columns``: {record field:
    the dataset's column}, see docs/data_format.md)."""
    eval: Any = None
    """Held-out dataset(s), same forms; the test split of a dataset directory."""
    tokenizer: str | None = None
    """Tokenizer directory (tokenizer.json) or sentencepiece .model file."""
    image_size: int = 980
    """Crop size of images: 490 (128 tokens per crop for Aria) or 980 (256)."""
    min_image_size: int = 336
    """Shortest side after resizing (the reference processor's rule)."""
    split_image: bool = False
    """Cut large images into several crops (up to 8 tiles) instead of one."""
    video: VideoConfig = field(default_factory=VideoConfig)
    num_workers: int = 2
    """Loader worker processes per rank (0 = in the training process)."""
    streams: int | None = None
    """Independent data streams (each mixes, reads and packs its own rows) that the global batch
    is drawn from in a fixed order; null = processes x max(1, num_workers) when the run starts. A
    resumed run keeps the value it started with, so the rows of every step, hence the losses, do
    not depend on the number of processes: a run can resume on any number of processes that
    divides it."""
    strict: bool = False
    """Raise on the first bad sample instead of skipping and counting it."""
    allow_outside_media: bool = False
    """Allow media paths that resolve outside the dataset directory."""
    split_long_text: bool = True
    """Cut text-only documents longer than a row into row-sized pieces (others are skipped)."""
    prefetch_factor: int = 2
    """Batches each loader worker prepares ahead (memory: workers x prefetch x batch pixels)."""
    loader_timeout: float = 600.0
    """Seconds to wait for a worker's batch before failing (a hung decode must not hang training)."""
    shuffle_buffer: int = 1000
    """Records of a webdataset source held per data stream, the next one drawn at random (seeded),
    since shards can only be read in order (0 or 1 = none). Memory: this many records with their
    media bytes per stream and shard dataset. Other formats are read in a fresh random order every
    epoch and need none."""
    _path: str = field(default="data", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        if isinstance(self.video, Mapping):
            self.video = _from_mapping(VideoConfig, self.video, f"{p}.video")
        _check(self.image_size in IMAGE_SIZES, f"{p}.image_size", self.image_size, f"one of {IMAGE_SIZES}")
        _positive_int(f"{p}.min_image_size", self.min_image_size)
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, f"{p}.num_workers",
               self.num_workers, "an integer >= 0")
        _positive_int(f"{p}.prefetch_factor", self.prefetch_factor)
        if self.streams is not None:
            _positive_int(f"{p}.streams", self.streams)
        _check(isinstance(self.loader_timeout, (int, float)) and self.loader_timeout > 0,
               f"{p}.loader_timeout", self.loader_timeout, "a positive number of seconds")
        _check(isinstance(self.shuffle_buffer, int) and not isinstance(self.shuffle_buffer, bool)
               and self.shuffle_buffer >= 0, f"{p}.shuffle_buffer", self.shuffle_buffer, "an integer >= 0")
        for name in ("train", "eval"):
            parse_mixture(getattr(self, name), f"{p}.{name}")


RECORD_FIELDS = ("messages", "conversations", "system", "kind", "text", "content", "images", "image",
                 "video", "videos")
"""The record fields ``aria.data.records`` reads: what a dataset's column mapping may name."""


class DatasetEntry(NamedTuple):
    """One dataset of ``data.train`` / ``data.eval``."""

    path: str
    weight: float = 1.0
    columns: dict[str, str] | None = None
    """{record field: the dataset's column (or JSON key) holding it}; None = the fields' own names."""


def parse_mixture(value: Any, path: str = "data.train") -> list[DatasetEntry]:
    """A dataset field -> its entries: a path, a list of paths, or a list of {path, weight, columns}."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item:
            out.append(DatasetEntry(item))
        elif isinstance(item, Mapping) and isinstance(item.get("path"), str):
            unknown = sorted(set(item) - {"path", "weight", "columns"})
            _check(not unknown, f"{path}[{i}]", dict(item), "only 'path', 'weight' and 'columns' keys")
            weight = item.get("weight", 1.0)
            _check(isinstance(weight, (int, float)) and weight > 0, f"{path}[{i}].weight", weight,
                   "a positive number")
            out.append(DatasetEntry(item["path"], float(weight),
                                    parse_columns(item.get("columns"), f"{path}[{i}].columns")))
        else:
            raise ValueError(f"config field '{path}' entry {item!r} is invalid: expected a dataset "
                             "path or a mapping {path: ..., weight: ..., columns: ...}")
    return out


def parse_columns(value: Any, path: str) -> dict[str, str] | None:
    """A dataset's column mapping {record field: column}, checked (``path`` names it in errors)."""
    if value is None:
        return None
    _check(isinstance(value, Mapping), path, value, "a mapping {record field: column name}")
    columns = {str(k): v for k, v in value.items()}
    unknown = sorted(set(columns) - set(RECORD_FIELDS))
    _check(not unknown, path, columns, f"record fields among {RECORD_FIELDS} as keys (unknown: {unknown})")
    _check(all(isinstance(v, str) and v for v in columns.values()), path, columns,
           "column names (non-empty strings) as values")
    _check(len(set(columns.values())) == len(columns), path, columns, "a different column for each field")
    return columns


SCHEDULES = ("cosine", "linear", "constant", "anneal")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("disabled", "offline", "online")
MODULE_GROUPS = ("vision", "projector", "language_model", "experts", "router")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Where decaying schedules end, as a fraction of ``lr``."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases, embeddings' padding... see engine)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    schedule: str = "cosine"
    """cosine | linear (decay to min after warmup) | constant | anneal (constant, then a linear decay
    over the last ``decay_ratio`` of the steps: the post-training annealing)."""
    warmup_steps: int = 0
    """Linear warmup steps; when 0, ``warmup_ratio`` of the run is used."""
    warmup_ratio: float = 0.01
    decay_ratio: float = 0.2
    """Fraction of the steps the 'anneal' schedule spends decaying."""
    lr_scale: dict = field(default_factory=dict)
    """Module group (vision / projector / language_model / experts / router) -> multiplier of
    ``lr`` for its parameters; groups not named keep ``lr``. ``patch_embed`` names the vision
    encoder's patch projection alone (default: the vision scale): Adam moves each of its weights
    by about lr per step, so its output moves by up to lr x fan-in (3 x patch^2), which at a large
    patch outgrows the position embedding within a few hundred steps. A scale of 0 freezes (no
    gradient is computed: ``aria.train.stages.apply_stage``)."""
    _path: str = field(default="optim", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for name in ("lr", "weight_decay", "eps", "grad_clip"):
            _non_negative_float(f"{p}.{name}", getattr(self, name))
        for name in ("min_lr_ratio", "beta1", "beta2", "warmup_ratio", "decay_ratio"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and 0 <= value <= 1, f"{p}.{name}", value, "a number in [0, 1]")
        _check(self.schedule in SCHEDULES, f"{p}.schedule", self.schedule, f"one of {SCHEDULES}")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, f"{p}.warmup_steps",
               self.warmup_steps, "an integer >= 0")
        keys = MODULE_GROUPS + ("patch_embed",)
        _check(isinstance(self.lr_scale, Mapping) and set(self.lr_scale) <= set(keys),
               f"{p}.lr_scale", self.lr_scale, f"a mapping with keys among {keys}")
        for group, scale in self.lr_scale.items():
            _non_negative_float(f"{p}.lr_scale.{group}", scale)
        self.lr_scale = {g: float(v) for g, v in self.lr_scale.items()}


@dataclass
class ParallelConfig:
    """How the run is spread over processes: DeepSpeed ZeRO, expert parallelism, precision."""

    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 (the paper trains with ZeRO-1 + expert parallelism)."""
    ep_size: int | str = 1
    """Expert-parallel group size: each rank of a group holds num_experts / ep_size experts. 'node':
    the processes of one node (the fastest links), i.e. the largest divisor of num_experts that is
    at most the processes per node (``resolved``)."""
    sp_size: int | str = 1
    """Sequence parallelism (DeepSpeed-Ulysses): the tokens of every row are split over this many
    consecutive ranks, which exchange tokens for heads around attention (aria.parallel.sequence).
    Must divide the processes, model.text.num_heads and num_kv_heads, and train.seq_len. 'node':
    the largest such group of a node's processes (4 for Aria on 8-GPU nodes, 1 on one process)."""
    precision: str = "auto"
    """bf16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."""
    checkpoint_decoder: bool = False
    """Activation checkpointing of every decoder layer."""
    checkpoint_vision: bool = False
    """Activation checkpointing of every ViT layer."""
    fp32_grad_accum: bool = True
    """With bf16 weights: accumulate gradients over micro-batches and reduce them across ranks in
    fp32 (DeepSpeed's data_types.grad_accum_dtype and communication_data_type); bf16 sums lose the
    low bits of small gradients. No effect in fp32."""
    overlap_comm: bool = True
    """Overlap ZeRO's gradient reduction (and ZeRO-3's parameter gathering) with backward/forward
    compute (DeepSpeed's overlap_comm; costs a second bucket buffer)."""
    bucket_size: int = 100_000_000
    """Elements per gradient-reduction bucket and per parameter all-gather bucket (DeepSpeed's
    reduce_bucket_size / allgather_bucket_size, ZeRO-3's prefetch bucket): larger buckets send fewer,
    bigger messages and hold more memory (bucket_size x 4 bytes per fp32 buffer)."""
    memory_check: bool = True
    """Before loading any weight, refuse a layout that the memory plan (``aria.train.plan``; images
    filling half of each row in stages that see images) says cannot fit the GPU, printing the plan and
    a layout that fits. Runs on GPUs, or anywhere when ``gpu_memory_gb`` is set."""
    gpu_memory_gb: float | None = None
    """GiB of one GPU the run must fit in (null = the device's own)."""
    _path: str = field(default="parallel", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _positive_int(f"{p}.bucket_size", self.bucket_size)
        for name in ("ep_size", "sp_size"):
            value = getattr(self, name)
            _check(value == "node" or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
                   f"{p}.{name}", value, "a positive integer or 'node'")
        for name in ("checkpoint_decoder", "checkpoint_vision", "fp32_grad_accum", "overlap_comm",
                     "memory_check"):
            _check(isinstance(getattr(self, name), bool), f"{p}.{name}", getattr(self, name), "true or false")
        _check(self.gpu_memory_gb is None or (isinstance(self.gpu_memory_gb, (int, float))
                                              and not isinstance(self.gpu_memory_gb, bool)
                                              and self.gpu_memory_gb > 0),
               f"{p}.gpu_memory_gb", self.gpu_memory_gb, "null or a positive number of GB")
        _check(not (self.ep_size != 1 and self.zero_stage == 3), f"{p}.zero_stage", self.zero_stage,
               f"0, 1 or 2 with expert parallelism (parallel.ep_size={self.ep_size}; ZeRO-3 needs "
               "parallel.ep_size=1)")
        _check(self.precision in PRECISIONS, f"{p}.precision", self.precision, f"one of {PRECISIONS}")


    def resolved(self, processes_per_node: int, model: "ModelConfig", seq_len: int) -> "ParallelConfig":
        """This config with ``ep_size`` and ``sp_size`` numbers: 'node' becomes the largest group of
        a node's processes that divides what it splits (the experts; the heads, key/value heads and
        tokens of a row)."""

        def largest(*counts: int) -> int:  # groups tile the node: d divides its process count too
            per_node = max(1, processes_per_node)
            return max(d for d in range(1, per_node + 1) if all(c % d == 0 for c in (per_node, *counts)))

        ep, sp = self.ep_size, self.sp_size
        if ep == "node":
            ep = largest(model.moe.num_experts)
        if sp == "node":
            sp = largest(model.text.num_heads, model.text.num_kv_heads, seq_len)
        return dataclasses.replace(self, ep_size=ep, sp_size=sp)


@dataclass
class StageConfig:
    """A training stage as data: which parts train (everything else is frozen) and its RoPE base."""

    name: str = "full"
    trainable: dict = field(default_factory=lambda: dict.fromkeys(MODULE_GROUPS, True))
    """vision / projector / language_model (embeddings, attention, norms, LM head) / experts
    (routed and shared) / router -> true or false."""
    rope_theta: float | None = None
    """Set the model's RoPE base for this stage (1e5 in stages 1-2, 5e6 from the long-context stage)."""
    image_token_cache_gb: float = 0.0
    """Keep each image's and video frame's image tokens after their first pass, up to this many GB
    per process (on the model's device), and skip decoding and encoding them when they are read
    again (0 = off). For stages whose vision encoder and projector are frozen; with the patch
    projection frozen and the rest of the encoder or the projector training
    (``optim.lr_scale.patch_embed=0``, or ``trainable.vision=false``), each crop's patch embeddings
    are kept instead and the encoder's layers run on them (one crop size: ``data.image_size`` =
    ``data.video.image_size``; ``image_cache_level``). With ``data.num_workers=0`` (the loader asks
    the model's cache) and ZeRO stage 0-2; media from files only (webdataset members are always
    decoded), keyed by path: a file rewritten during the run keeps its first tokens.
    ``aria.model.aria.ImageTokenCache``."""
    _path: str = field(default="stage", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _check(isinstance(self.trainable, Mapping), f"{p}.trainable", self.trainable, "a mapping")
        unknown = sorted(set(self.trainable) - set(MODULE_GROUPS))
        _check(not unknown, f"{p}.trainable", dict(self.trainable), f"keys among {MODULE_GROUPS}")
        self.trainable = {g: bool(self.trainable.get(g, False)) for g in MODULE_GROUPS}
        _check(any(self.trainable.values()), f"{p}.trainable", self.trainable, "at least one group true")
        _check(self.rope_theta is None or (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0),
               f"{p}.rope_theta", self.rope_theta, "null or a positive number")
        _check(isinstance(self.image_token_cache_gb, (int, float)) and not isinstance(self.image_token_cache_gb, bool)
               and self.image_token_cache_gb >= 0, f"{p}.image_token_cache_gb", self.image_token_cache_gb,
               "a number of GB >= 0")


OBJECTIVES = ("lm", "contrastive", "caption_words")
SIMILARITIES = ("pooled", "late")
WORD_POOLS = ("mean", "lme")  # caption_words.pool, Aria.forward(words=...)


@dataclass
class TrainConfig:
    """The loop: steps, batch geometry, seed, evaluation."""

    objective: str = "lm"
    """lm: next-token cross-entropy on the supervised tokens; contrastive: stage 0, the sigmoid
    image-caption loss of ``aria.train.contrastive`` (see the ``contrastive`` node); caption_words:
    stage 0, each image predicts which tokens its caption holds (``aria.train.caption_words``)."""
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 2048
    """Tokens per packed row."""
    seed: int = 0
    eval_every: int = 0
    """Held-out loss every N steps (0 = only at the end, if data.eval is set)."""
    eval_batches: int = 0
    """Micro-batches per evaluation (0 = the whole held-out set)."""
    _path: str = field(default="train", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        for name in ("max_steps", "micro_batch_size", "grad_accum", "seq_len"):
            _positive_int(f"{p}.{name}", getattr(self, name))
        for name in ("seed", "eval_every", "eval_batches"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, f"{p}.{name}",
                   getattr(self, name), "an integer >= 0")
        _check(self.objective in OBJECTIVES, f"{p}.objective", self.objective, f"one of {OBJECTIVES}")


@dataclass
class ContrastiveConfig:
    """Stage 0 (``train.objective=contrastive``): SigLIP's sigmoid loss between each image and each
    caption of the global micro-batch, the model's decoder as the text tower."""

    similarity: str = "pooled"
    """pooled: the mean image token against the caption's last token (one vector per side, as
    SigLIP); late: each caption token's best-matching image token, averaged over the caption
    (FILIP's late interaction)."""
    scale: float = 10.0
    """The logits are scale * cosine similarity + bias (SigLIP's initial values, kept fixed)."""
    bias: float = -10.0
    """See ``scale``: -10 starts every pair near "not a match", as there are far more negatives."""
    _path: str = field(default="contrastive", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _check(self.similarity in SIMILARITIES, f"{p}.similarity", self.similarity, f"one of {SIMILARITIES}")
        _check(isinstance(self.scale, (int, float)) and self.scale > 0, f"{p}.scale", self.scale,
               "a positive number")
        _check(isinstance(self.bias, (int, float)), f"{p}.bias", self.bias, "a number")


@dataclass
class CaptionWordsConfig:
    """Stage 0 (``train.objective=caption_words``): each image says which tokens its caption holds
    (``aria.train.caption_words``)."""

    pool: str = "mean"
    """How an image's tokens give its logits: mean, the LM head over their mean; lme, the LM head over
    each of them and the log-mean-exp over them (a soft maximum: one image token may say a word)."""
    pairs: int = 0
    """With pool lme: also, for each two distinct tokens of a caption, one image token must say both
    when they stand at most this many tokens apart in the caption and none may when they never do
    ("A red circle at the top and a blue star": red with circle, never red with star). 0: off."""
    pair_breaks: list = field(default_factory=list)
    """With pairs: words that begin a caption's next clause (e.g. [",", "and"]); two tokens are near
    only if none of them stands after the first, up to and including the second, so the window may
    span a clause without reaching the next object. Each word stands for every token of the
    tokenizer that decodes to it. []: none."""
    _path: str = field(default="caption_words", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _check(self.pool in WORD_POOLS, f"{p}.pool", self.pool, f"one of {WORD_POOLS}")
        _check(isinstance(self.pairs, int) and not isinstance(self.pairs, bool) and self.pairs >= 0,
               f"{p}.pairs", self.pairs, "an integer >= 0")
        _check(not self.pairs or self.pool == "lme", f"{p}.pairs", self.pairs,
               f"0 with {p}.pool={self.pool} (pairs are scored on single image tokens: set pool=lme)")
        _check(isinstance(self.pair_breaks, (list, tuple)) and all(isinstance(w, str) and w.strip()
                                                                   for w in self.pair_breaks),
               f"{p}.pair_breaks", self.pair_breaks, 'a list of words, e.g. [",", "and"]')
        _check(not self.pair_breaks or self.pairs, f"{p}.pair_breaks", self.pair_breaks,
               f"[] with {p}.pairs=0 (breaks end the clauses of the caption pairs)")
        self.pair_breaks = [w.strip() for w in self.pair_breaks]


@dataclass
class InitConfig:
    """Where the weights start: an HF directory, a previous run or checkpoint, or random init."""

    from_hf: str | None = None
    """A Hugging Face Aria directory (e.g. the released weights)."""
    from_checkpoint: str | None = None
    """A run directory (its latest checkpoint), a checkpoint directory or a model directory."""
    groups: list[str] | None = None
    """Module groups (``MODULE_GROUPS``) read from that source; the others start from the seeded
    initialisation, as from scratch (e.g. [vision, projector] after stage 0). None: all."""
    _path: str = field(default="init", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(not (self.from_hf and self.from_checkpoint), f"{self._path}", "both set",
               "at most one of from_hf and from_checkpoint")
        if self.groups is not None:
            _check(isinstance(self.groups, (list, tuple)), f"{self._path}.groups", self.groups,
                   "null or a list, e.g. [vision,projector]")
            self.groups = list(self.groups)
            _check(bool(self.groups) and set(self.groups) <= set(MODULE_GROUPS), f"{self._path}.groups",
                   self.groups, f"null or a non-empty list of {MODULE_GROUPS}")
            _check(bool(self.from_hf or self.from_checkpoint), f"{self._path}.groups", self.groups,
                   "null unless init.from_hf or init.from_checkpoint is set")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    _path: str = field(default="checkpoint", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.every_steps, int) and self.every_steps >= 0, f"{self._path}.every_steps",
               self.every_steps, "an integer >= 0")
        _positive_int(f"{self._path}.keep_last", self.keep_last)


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    """disabled | offline | online."""
    project: str = "aria"
    log_every: int = 1
    """Write metrics every N steps."""
    progress: bool = True
    """Rich progress bar on rank 0."""
    _path: str = field(default="logging", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self.wandb in WANDB_MODES, f"{self._path}.wandb", self.wandb, f"one of {WANDB_MODES}")
        _positive_int(f"{self._path}.log_every", self.log_every)


# LoRA targets -> the stage group (``StageConfig.trainable``) whose modules they adapt.
LORA_TARGET_GROUPS = {"q_proj": "language_model", "k_proj": "language_model", "v_proj": "language_model",
                      "o_proj": "language_model", "experts": "experts", "shared_experts": "experts",
                      "vision": "vision", "projector": "projector", "projector_in_proj": "projector",
                      "lm_head": "language_model"}


@dataclass
class LoRAConfig:
    """Low-rank adapters: every base weight frozen, a rank-r update W + (alpha / r) * A @ B trains
    on each target. Defaults are the official Aria LoRA recipe's (r 8, alpha 32, dropout 0.05)."""

    enabled: bool = False
    """Train adapters instead of weights. The stage still says where adapters may go: every target
    must lie in a group the stage trains."""
    rank: int = 8
    """Rank r of every adapter (a multiple of 8 when the routed experts are a target: their
    grouped GEMM needs 16-byte aligned rows)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / rank) * A @ B."""
    dropout: float = 0.05
    """Dropout on the adapters' input while training (the base path never drops)."""
    targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "experts",
                                                   "shared_experts"])
    """Among: q_proj / k_proj / v_proj / o_proj (decoder attention), experts (the routed experts'
    stacked fc1 and fc2, per expert), shared_experts (gate / up / down), vision (every ViT linear),
    projector (every projector linear), projector_in_proj (the projector cross-attention's packed
    q/k/v in-projection), lm_head."""
    _path: str = field(default="lora", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._path
        _check(isinstance(self.enabled, bool), f"{p}.enabled", self.enabled, "true or false")
        _positive_int(f"{p}.rank", self.rank)
        _check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
               f"{p}.alpha", self.alpha, "a positive number")
        _check(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
               and 0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "a number in [0, 1)")
        _check(isinstance(self.targets, (list, tuple)) and len(self.targets) > 0
               and all(isinstance(t, str) for t in self.targets), f"{p}.targets", self.targets,
               f"a non-empty list among {list(LORA_TARGET_GROUPS)}")
        unknown = [t for t in self.targets if t not in LORA_TARGET_GROUPS]
        _check(not unknown, f"{p}.targets", self.targets,
               f"names among {list(LORA_TARGET_GROUPS)} ({unknown} unknown)")
        _check(len(set(self.targets)) == len(self.targets), f"{p}.targets", self.targets,
               "each target at most once")
        self.targets = list(self.targets)
        _check("experts" not in self.targets or self.rank % 8 == 0, f"{p}.rank", self.rank,
               "a multiple of 8 when 'experts' is a target (grouped_mm needs 16-byte aligned rows)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


RUN_NODES = {"data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig, "stage": StageConfig,
             "train": TrainConfig, "contrastive": ContrastiveConfig,
             "caption_words": CaptionWordsConfig, "init": InitConfig,
             "checkpoint": CheckpointConfig, "logging": LoggingConfig, "lora": LoRAConfig}


def image_cache_level(cfg: "RunConfig") -> str | None:
    """What ``stage.image_token_cache_gb`` keeps in this run (``aria.model.aria.ImageTokenCache``):
    "tokens" with the vision encoder and projector frozen, "patches" with the patch projection
    frozen and the rest of the encoder or the projector training, else None. A group is frozen by
    ``stage.trainable`` or an ``optim.lr_scale`` of 0 (``aria.train.stages``); the patch projection
    by its group's, its own ``optim.lr_scale.patch_embed`` of 0, or LoRA (which adapts linear
    layers alone, on their frozen base weights)."""
    scale, trainable = cfg.optim.lr_scale, cfg.stage.trainable
    patches_frozen = (cfg.lora.enabled or not trainable["vision"]
                      or scale.get("patch_embed", scale.get("vision", 1.0)) == 0)
    vision_frozen = not trainable["vision"] or (scale.get("vision", 1.0) == 0 and patches_frozen)
    if vision_frozen and (not trainable["projector"] or scale.get("projector", 1.0) == 0):
        return "tokens"
    return "patches" if patches_frozen else None


def check_image_token_cache(cfg: "RunConfig") -> None:
    """``stage.image_token_cache_gb`` needs a frozen image path (at least the patch projection; with
    it alone, one crop size), the loader in the training process and vision weights every rank holds
    whole: a ``ValueError`` naming the field otherwise."""
    level = image_cache_level(cfg)
    problem = None
    if level is None:
        problem = ("the patch projection training (stage.trainable.vision=true, optim.lr_scale.patch_embed "
                   "not 0): kept tokens or patch embeddings would go stale as the weights move; freeze "
                   "the vision encoder and projector (kept image tokens) or the patch projection "
                   "(optim.lr_scale.patch_embed=0: kept patch embeddings), or set stage.image_token_cache_gb=0")
    elif level == "patches" and cfg.data.image_size != cfg.data.video.image_size:
        problem = (f"kept patch embeddings (the patch projection frozen, the encoder or projector "
                   f"training) and data.image_size={cfg.data.image_size} but data.video.image_size="
                   f"{cfg.data.video.image_size}: the encoder takes the kept crops and new ones in one "
                   "batch, which needs one crop size; set them equal")
    elif cfg.data.num_workers:
        problem = (f"data.num_workers={cfg.data.num_workers}: the loader leaves out the pixels of media "
                   "the model's cache holds, which it sees only in the training process; set "
                   "data.num_workers=0")
    elif cfg.parallel.zero_stage == 3:
        problem = ("parallel.zero_stage=3: a micro-batch whose media are all cached skips part of the "
                   "vision encoder (all of it, or its patch projection), and with it the parameter "
                   "gathers the other ranks wait in; use zero_stage 0-2")
    if problem is not None:
        raise ValueError(f"config field 'stage.image_token_cache_gb' = {cfg.stage.image_token_cache_gb} "
                         f"with {problem}")


@dataclass
class RunConfig:
    """Everything a training run needs; ``configs/`` + a recipe + overrides compose into it."""

    run_dir: str
    """Where the run writes config, metrics, checkpoints and logs (re-use it to resume)."""
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    parallel: ParallelConfig
    stage: StageConfig
    train: TrainConfig
    contrastive: ContrastiveConfig
    caption_words: CaptionWordsConfig
    init: InitConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    recipe: str = "custom"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        data = dict(data)
        if not data.get("run_dir"):
            raise ValueError("config field 'run_dir' is required: where the run writes its outputs "
                             "(e.g. run_dir=runs/my_run)")
        unknown = sorted(set(data) - set(RUN_NODES) - {"run_dir", "model", "recipe"})
        if unknown:
            raise ValueError(f"config has unknown top-level field(s) {unknown}")
        nodes = {name: _from_mapping(cls_, data.get(name) or {}, name) for name, cls_ in RUN_NODES.items()}
        if "model" not in data:
            raise ValueError("config node 'model' is missing (pick one: model=tiny|proxy|aria)")
        model = ModelConfig.from_dict(data["model"])
        cfg = cls(run_dir=str(data["run_dir"]), model=model, recipe=str(data.get("recipe", "custom")), **nodes)
        sp = cfg.parallel.sp_size
        for field, value in (("model.text.num_heads", model.text.num_heads),
                             ("model.text.num_kv_heads", model.text.num_kv_heads),
                             ("train.seq_len", cfg.train.seq_len)):
            if sp != "node" and value % sp:
                raise ValueError(f"config field 'parallel.sp_size' = {sp} must divide {field} = {value} "
                                 "(sequence parallelism splits the tokens of a row, and the heads inside "
                                 "attention, over its ranks)")
        if cfg.train.objective != "lm" and sp != 1:
            raise ValueError(f"config field 'parallel.sp_size' = {sp} with train.objective="
                             f"{cfg.train.objective}: stage 0 scores whole documents on one rank; set "
                             "parallel.sp_size=1")
        if cfg.parallel.ep_size != "node" and model.moe.num_experts % cfg.parallel.ep_size:
            raise ValueError(f"config field 'parallel.ep_size' = {cfg.parallel.ep_size} must divide "
                             f"model.moe.num_experts = {model.moe.num_experts}")
        if cfg.stage.image_token_cache_gb:
            check_image_token_cache(cfg)
        if cfg.lora.enabled and cfg.init.groups is not None:
            raise ValueError(f"config field 'init.groups' = {cfg.init.groups} with lora.enabled: a LoRA "
                             "run's base is its source as a whole; set init.groups=null")
        if cfg.lora.enabled:
            frozen = [t for t in cfg.lora.targets if not cfg.stage.trainable[LORA_TARGET_GROUPS[t]]]
            if frozen:
                groups = sorted({LORA_TARGET_GROUPS[t] for t in frozen})
                raise ValueError(
                    f"config field 'lora.targets' = {cfg.lora.targets} is invalid: {frozen} adapt "
                    f"group(s) {groups} that stage '{cfg.stage.name}' freezes "
                    f"({', '.join(f'stage.trainable.{g}=false' for g in groups)}). With LoRA only "
                    f"adapters train and the stage says where they may go: drop {frozen} from "
                    f"lora.targets or set {', '.join(f'stage.trainable.{g}=true' for g in groups)}")
            if model.moe.bias_balancing:
                raise ValueError(
                    "config fields 'lora.enabled' and 'model.moe.bias_balancing' are both true: the router "
                    "bias moves during training but is not an adapter, and a LoRA checkpoint holds the "
                    "adapters only, so the bias would be lost; set model.moe.bias_balancing=false (the "
                    "base's bias, if any, is kept) or lora.enabled=false")
        return cfg

    def to_dict(self) -> dict:
        def node(obj) -> dict:
            out = {}
            for f in dataclasses.fields(obj):
                if f.name == "_path":
                    continue
                value = getattr(obj, f.name)
                out[f.name] = node(value) if dataclasses.is_dataclass(value) else value
            return out

        out = {"run_dir": self.run_dir, "recipe": self.recipe, "model": self.model.to_dict()}
        out.update({name: node(getattr(self, name)) for name in RUN_NODES})
        return out


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_run_config(path: str | Path) -> RunConfig:
    """The ``RunConfig`` of a resolved run config file (a run's or a checkpoint's ``config.yaml``);
    a file that cannot be read or checked is named in the error."""
    from omegaconf import OmegaConf

    try:
        return RunConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except FileNotFoundError:
        raise
    except Exception as err:  # YAML syntax, unknown keys, bad values: all the file's fault
        raise ValueError(f"{path} is not a readable run config: {err}") from None


def load_model_config(name_or_path: str, overrides: list[str] | None = None) -> ModelConfig:
    """Compose the Hydra group ``configs/model/<name>.yaml`` (or load a YAML file) into a ModelConfig.

    ``overrides`` are dotted ``key=value`` strings relative to the model node, e.g.
    ``text.num_layers=2``, exactly as ``model.text.num_layers=2`` would be on a training command.
    """
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        node = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
        return ModelConfig.from_dict(OmegaConf.to_container(node, resolve=True))

    available = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    if name_or_path not in available:
        raise FileNotFoundError(f"model config '{name_or_path}' not found in "
                                f"{CONFIG_DIR / 'model'}; available: {available}")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name_or_path}"] + [f"model.{o}" for o in overrides])
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
