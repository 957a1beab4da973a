"""Compose a run's config: a recipe (``recipes/NAME.yaml``) over the groups of ``configs/``, plus
``key=value`` overrides, exactly as Hydra does on the command line; then validate it into a
``RunConfig``.

Design decisions:
- A recipe is the *primary* Hydra config: it starts from ``configs/config.yaml`` (``defaults: -
  config``), picks groups (``override /model: aria``) and sets values. ``configs/`` is on Hydra's
  search path, so every group is available to recipes and to command-line overrides
  (``model=proxy``, ``parallel.zero_stage=2``).
- ``recipe=NAME`` on the command line names the primary config; it is not a Hydra group.
- The composed tree is checked by the dataclasses of ``aria.config`` (unknown keys, bad values
  and missing required fields name themselves). A recipe lists the fields a user must give in
  ``required:`` (Hydra's ``???`` cannot re-mark a field the base config already set).
- Planning a run (``aria.train.plan``) needs its shapes, not its inputs: with ``inputs=False`` the
  run's paths (``???`` fields such as ``data.train`` and the recipe's ``required:`` list) may stay
  unset; they become null (``run_dir`` a placeholder), everything else is composed and checked as
  for training.
"""

from __future__ import annotations

from aria.config import CONFIG_DIR, RunConfig

RECIPE_DIR = CONFIG_DIR.parent / "recipes"


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def split_recipe(args: list[str]) -> tuple[str, list[str]]:
    """(recipe name, the other overrides) from command-line arguments."""
    names = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    rest = [a for a in args if not a.startswith("recipe=")]
    if len(names) > 1:
        raise ValueError(f"recipe= given {len(names)} times")
    return (names[0] if names else "config"), rest


UNSET_RUN_DIR = "(not set)"
"""``run_dir`` of a config composed with ``inputs=False``."""


def compose_dict(recipe: str, overrides: list[str], inputs: bool = True) -> dict:
    """The composed, resolved config tree as plain containers; ``inputs=False`` lets the run's
    paths stay unset (see the module docstring)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if recipe != "config" and recipe not in recipes():
        raise ValueError(f"unknown recipe {recipe!r}; available: {recipes()}")
    config_dir = RECIPE_DIR if recipe != "config" else CONFIG_DIR
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=recipe,
                      overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", *overrides])
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing and inputs:
        raise ValueError(f"required config field(s) {missing} are not set; give them on the command "
                         f"line, e.g. {missing[0]}=...")
    for key in missing:
        OmegaConf.update(cfg, key, UNSET_RUN_DIR if key == "run_dir" else None)
    tree = OmegaConf.to_container(cfg, resolve=True)
    unset = [key for key in tree.pop("required", None) or [] if _lookup(tree, key) in (None, "", [])]
    if unset and inputs:
        raise ValueError(f"recipe {recipe!r} needs {unset}; give them on the command line, "
                         f"e.g. {unset[0]}=...")
    tree.setdefault("recipe", recipe)
    return tree


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def compose_run(recipe: str, overrides: list[str], inputs: bool = True) -> RunConfig:
    return RunConfig.from_dict(compose_dict(recipe, overrides, inputs))


def resolved_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
