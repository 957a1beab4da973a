"""The layout of a run directory, and what a MODEL argument names: the one place where training,
conversion, generation, evaluation and the tools find a run's weights, config and tokenizer.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and
``checkpoints/``: one ``step_N/`` per checkpoint (``model/``, our model directory; ``optimizer/``,
``trainer/`` and the ``config.yaml`` at that step, as ``aria.train.checkpoint`` writes them) and
``latest``, the name of the newest complete one.

MODEL (``aria-generate``, ``aria-eval``, ``aria-convert to-hf``, the expert report,
``init.from_checkpoint``) is a Hugging Face directory (``config.json``), our model directory
(``model_config.json``), a checkpoint directory (``model/``), a run directory (its latest
checkpoint) or a run's ``checkpoints/``.

Design decisions:
- The run config of a model directory is its checkpoint's ``config.yaml`` (the config at that
  step), else the run's ``config.yaml``; an HF or bare model directory has none.
- The tokenizer is the one given, else the run config's ``data.tokenizer``, else tokenizer files in
  MODEL or beside the weights (a directory ``aria-convert from-hf`` wrote, or an HF directory).
- A directory that holds something other than a model (a checkpoint's optimizer state, a raw
  DeepSpeed checkpoint, a file) is refused with what to give instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG, METRICS = "config.yaml", "metrics.jsonl"
CHECKPOINTS, LATEST = "checkpoints", "latest"
MODEL, OPTIMIZER, TRAINER = "model", "optimizer", "trainer"
MODEL_CONFIG, HF_CONFIG = "model_config.json", "config.json"
TOKENIZERS = ("tokenizer.json", "tokenizer.model")
"""Files that make a directory a tokenizer (``aria.data.tokenizer.Tokenizer.load``)."""
DEEPSPEED_PATTERNS = ("*_model_states.pt", "*_optim_states.pt", "zero_pp_rank_*", "trainer_rank*.pt")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    if not (ckpt / MODEL / MODEL_CONFIG).is_file():
        raise FileNotFoundError(f"{pointer} names {ckpt.name}, which is incomplete or missing")
    return ckpt


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / HF_CONFIG).is_file() and not (path / MODEL_CONFIG).is_file()


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZERS)


def resolve_model_dir(path: str | Path) -> Path:
    """Our model directory, a checkpoint directory or a run directory -> the model directory."""
    path = Path(path)
    if path.name == CHECKPOINTS and (path / LATEST).is_file():
        path = path.parent
    if (path / MODEL_CONFIG).is_file():
        return path
    if (path / MODEL / MODEL_CONFIG).is_file():
        return path / MODEL
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is not None:
        return ckpt / MODEL
    raise FileNotFoundError(f"{path} is not a model directory ({MODEL_CONFIG}), a checkpoint "
                            f"({MODEL}/{MODEL_CONFIG}) or a run directory with {CHECKPOINTS}/{LATEST}")


def run_config_of(model_dir: Path) -> Path | None:
    """``step_N/config.yaml`` beside ``step_N/model``, else the run's ``RUN/config.yaml``."""
    if model_dir.name != MODEL:
        return None
    ckpt = model_dir.parent
    if (ckpt / RUN_CONFIG).is_file():
        return ckpt / RUN_CONFIG
    if ckpt.parent.name == CHECKPOINTS and (ckpt.parent.parent / RUN_CONFIG).is_file():
        return ckpt.parent.parent / RUN_CONFIG
    return None


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL argument names."""

    path: Path
    """MODEL as given."""
    directory: Path
    """The directory holding the weights: an HF directory or our model directory."""
    hf: bool
    run_config: Path | None
    """The resolved ``config.yaml`` of the run the weights come from (``run_config_of``)."""


def locate_model(path: str | Path) -> ModelSource:
    """MODEL -> where its weights and run config are, or an error saying what MODEL should be."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give a run directory, a checkpoint directory (step_N), our "
                         f"model directory ({MODEL_CONFIG} + safetensors) or a Hugging Face directory")
    if is_hf_dir(path):
        return ModelSource(path, path, True, None)
    try:
        model_dir = resolve_model_dir(path)
    except FileNotFoundError as err:
        if (path / "state.json").is_file() and any(path.glob("rank*.safetensors")):
            raise ValueError(f"{path} is the optimizer state of a checkpoint (fp32 master weights and "
                             f"Adam moments by rank), not a model: give its checkpoint directory "
                             f"{path.parent} or the run directory") from None
        deepspeed = _deepspeed_files(path)
        if not deepspeed:
            raise FileNotFoundError(f"{err}; nor is it a Hugging Face directory ({HF_CONFIG})") from None
        hint = (f"; its checkpoint directory {path.parent} has {MODEL}/: give that" if
                (path.parent / MODEL / MODEL_CONFIG).is_file() else "")
        raise ValueError(
            f"{path} is a DeepSpeed checkpoint ({', '.join(deepspeed[:3])}) without our {MODEL}/ "
            f"directory{hint}. Its ZeRO files hold optimizer/parameter partitions, not a model: "
            f"give the checkpoint directory aria.train wrote (RUN/{CHECKPOINTS}/step_N, which holds "
            f"{MODEL}/ with the weights consolidated at save time) or the run directory") from None
    return ModelSource(path, model_dir, False, run_config_of(model_dir))


def _deepspeed_files(path: Path) -> list[str]:
    """Names of DeepSpeed checkpoint files in ``path`` or one level under it."""
    found = []
    for pattern in DEEPSPEED_PATTERNS:
        for depth in ("", "*/"):
            found += [str(p.relative_to(path)) for p in path.glob(depth + pattern)]
    return sorted(set(found))


def find_tokenizer(source: ModelSource, given: str | Path | None, run_tokenizer: str | None
                   ) -> tuple[Path, str] | None:
    """(the tokenizer's directory or ``.model`` file, how it was found) for MODEL, or None.
    ``run_tokenizer`` is ``data.tokenizer`` of the run config, if there is one."""
    if given is not None:
        return Path(given), "--tokenizer"
    if run_tokenizer:
        found = Path(run_tokenizer)
        if not found.exists():
            raise FileNotFoundError(f"{source.run_config} names data.tokenizer={found}, which does not "
                                    "exist here; pass the tokenizer with --tokenizer DIR")
        return found, f"data.tokenizer in {source.run_config}"
    for candidate in dict.fromkeys([source.path, source.directory]):
        if has_tokenizer(candidate):
            return candidate, f"the tokenizer files in {candidate}"
    return None


def no_tokenizer_message(source: ModelSource) -> str:
    return (f"no tokenizer for {source.path}: none given with --tokenizer DIR, "
            + (f"no data.tokenizer in {source.run_config}, " if source.run_config else "no run config.yaml, ")
            + f"and no {' / '.join(TOKENIZERS)} in {source.directory}. Pass --tokenizer DIR (the "
            "tokenizer the model was trained with, e.g. one written by python -m "
            "data_tools.train_tokenizer)")
