"""The tokenizer and processor files of a Hugging Face Aria directory: what
``AutoProcessor.from_pretrained(DIR)`` reads (transformers 5.x; no ``trust_remote_code``).

Written by ``aria-convert to-hf`` beside the weights:

    tokenizer.json, tokenizer_config.json   the fast tokenizer (+ tokenizer.model,
                                            special_tokens_map.json, added_tokens.json when present)
    processor_config.json                   AriaProcessor: size_conversion (crop side -> image
                                            tokens) and the nested image processor (5.x layout)
    preprocessor_config.json                the same image processor alone (the 4.x layout)
    chat_template.jinja                     Aria's chat template (``aria.data.processor``)

Design decisions:
- The tokenizer is checked through our own processor before anything is written
  (``Processor.for_model``): Aria's special tokens present, ``<|img|>`` id = the model's
  ``image_token_id``, vocabulary no larger than the model's, crop size in the model's projector
  table. ``size_conversion`` and the image-processor settings are read off that processor, so the
  export uses the same crop table and image rules as training.
- ``AriaProcessor`` has class-level call defaults (``max_image_size=980``, ``split_image=False``)
  that override the image processor's own settings; among the files, only the tokenizer's init
  arguments rank above them (``ProcessorMixin._merge_kwargs``). So ``tokenizer_config.json`` carries
  ``max_image_size`` and ``split_image`` too: ``processor(text=..., images=...)`` then makes the crops
  the model was trained on without call-time arguments (arguments given at the call still win).
- ``tokenizer_config.json`` gets ``image_token`` (``AriaProcessor`` needs it) and
  ``processor_class``, and loses ``auto_map`` (custom code of an original checkpoint: none is needed).
- With torchvision installed, transformers picks its torchvision image backend, whose resize differs
  slightly from PIL's; ``AutoProcessor.from_pretrained(DIR, backend="pil")`` gives our pixels.
- Importing (``from-hf``) copies the tokenizer and processor files verbatim into our model
  directory, so a recipe can use that directory as ``data.tokenizer`` and a later ``to-hf`` finds
  the image settings there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from aria.config import ModelConfig, VideoConfig
from aria.convert.hf_config import read_json
from aria.data.processor import CHAT_TEMPLATE, Processor, tokenizer_mismatch
from aria.data.tokenizer import SPECIAL_TOKENS, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# What transformers' fast tokenizer and AriaProcessor need from a tokenizer directory.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(directory: Path, origin: str) -> Tokenizer:
    """Our tokenizer from ``directory`` (found via ``origin``, e.g. '--tokenizer'), errors naming both."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} ({origin}) "
                                + ("is not a directory" if directory.exists() else "does not exist"))
    try:
        return Tokenizer.load(directory)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{err} (tokenizer from {origin})") from None


def check_tokenizer(tok: Tokenizer, cfg: ModelConfig, origin: str) -> None:
    """The tokenizer fits the model: same ``<|img|>`` id, no id beyond the embedding table."""
    problem = tokenizer_mismatch(tok, cfg)
    if problem is not None:
        raise ValueError(f"tokenizer {tok.source} ({origin}) {problem}")


@dataclass
class ImageSettings:
    """How images become crops: the data fields of the same names, and where they came from."""

    image_size: int
    min_image_size: int = 336
    split_image: bool = False
    origin: str = "the default"


def image_settings_from_files(directory: Path) -> ImageSettings | None:
    """The settings in the HF processor files of ``directory`` (5.x nested or 4.x layout, as
    ``from-hf`` copies them into our model directory); None without such files."""
    for name in PROCESSOR_FILES:
        path = Path(directory) / name
        if not path.is_file():
            continue
        data = read_json(path)
        data = data.get("image_processor", data)
        if isinstance(data, dict) and "max_image_size" in data:
            return ImageSettings(data["max_image_size"], data.get("min_image_size", 336),
                                 bool(data.get("split_image", False)), str(path))
    return None


def default_image_settings(cfg: ModelConfig) -> ImageSettings:
    """980 px crops when the model has queries for them (transformers' default), else 490."""
    sides = {round(patches ** 0.5) * cfg.vision.patch_size for patches in cfg.projector.patch_to_query}
    for side in (980, 490):
        if side in sides:
            return ImageSettings(side, origin="the largest crop size of the model's projector table")
    raise ValueError(f"the model's projector table {cfg.projector.patch_to_query} (patches per crop -> "
                     f"queries, patch size {cfg.vision.patch_size}) has no 490 or 980 px crop, the only "
                     "sizes transformers' AriaImageProcessor makes, so no image can be prepared for it "
                     "(aria-convert to-hf --weights-only exports its weights alone)")


def image_settings(cfg: ModelConfig, run_config: Path | None, directory: Path, run=None) -> ImageSettings:
    """How MODEL's images become crops: the ``data.*`` of its run config (``run``, read from
    ``run_config``), else the HF processor files in ``directory``, else ``default_image_settings``."""
    if run is not None:
        return ImageSettings(run.data.image_size, run.data.min_image_size, run.data.split_image,
                             f"data.* in {run_config}")
    return image_settings_from_files(directory) or default_image_settings(cfg)


def hf_processor(tokenizer: Tokenizer, cfg: ModelConfig, settings: ImageSettings) -> Processor:
    """Our processor for the export, checking the tokenizer and crop size against the model."""
    try:
        return Processor.for_model(tokenizer, cfg, image_size=settings.image_size,
                                   min_image_size=settings.min_image_size, split_image=settings.split_image,
                                   video=VideoConfig(image_size=settings.image_size))
    except ValueError as err:
        raise ValueError(f"cannot export a processor for this model (tokenizer {tokenizer.source}, image "
                         f"settings from {settings.origin}): {err}") from None


def check_hf_tokenizer_files(directory: Path, origin: str) -> None:
    """The files transformers needs are there and ``tokenizer_config.json`` parses."""
    absent = [name for name in HF_TOKENIZER_FILES if not (Path(directory) / name).is_file()]
    if absent:
        raise FileNotFoundError(f"tokenizer directory {directory} ({origin}) lacks {absent}, which "
                                "transformers' AriaProcessor loads; python -m data_tools.train_tokenizer "
                                "writes them next to tokenizer.model")
    read_json(Path(directory) / "tokenizer_config.json")


def write_processor_files(out: Path, tokenizer_dir: Path, processor: Processor) -> list[str]:
    """Tokenizer files (config patched), processor configs and chat template into ``out``."""
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    written = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file() and name != "tokenizer_config.json":
            shutil.copyfile(tokenizer_dir / name, out / name)
            written.append(name)
    config = read_json(tokenizer_dir / "tokenizer_config.json")
    images = processor.images
    config.pop("auto_map", None)
    config.update(image_token=SPECIAL_TOKENS["image"], processor_class="AriaProcessor",
                  max_image_size=images.max_image_size, split_image=images.split_image)
    if "chat_template" in config:
        config["chat_template"] = CHAT_TEMPLATE
    _write_json(out / "tokenizer_config.json", config)
    image_processor = images.to_hf_dict()
    size_conversion = {str(side): q for side, q in sorted(processor.tokens_per_crop.items())}
    _write_json(out / "processor_config.json", {"processor_class": "AriaProcessor",
                                                 "size_conversion": size_conversion,
                                                 "image_processor": image_processor})
    _write_json(out / "preprocessor_config.json", {**image_processor, "processor_class": "AriaProcessor"})
    (out / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
    return written + ["tokenizer_config.json", *PROCESSOR_FILES, CHAT_TEMPLATE_FILE]


def copy_processor_files(source: Path, out: Path) -> list[str]:
    """The tokenizer and processor files of an HF directory, copied verbatim (import)."""
    copied = []
    for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(out) / name)
            copied.append(name)
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
