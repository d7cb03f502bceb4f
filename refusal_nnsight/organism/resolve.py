"""The organism as the core's loaders take it: a weights folder, an SAE folder and a prompt grammar.

The core (models, saes, data) never imports the organism. The edges that load a configured run
(the pipeline, the library API, the backends' check server) resolve it here: the recipe and seed
of `model.organism_*` become the build's folder (served from the shipped copy, the cache, or a
fresh build), and its grammar becomes the prompt source, split as that build was trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import ModelConfig
from .build import ensure_organism


def organism_root(model_cfg: ModelConfig) -> Path | None:
    """The organism's folder (model/, saes/, manifest.json) for model.source=organism, else None."""
    if model_cfg.source != "organism":
        return None
    return ensure_organism(model_cfg.organism_recipe, model_cfg.organism_seed)


def weights_path(model_cfg: ModelConfig) -> Path | None:
    """The folder `models.load_model` reads for model.source=organism (None for a hub model)."""
    root = organism_root(model_cfg)
    return None if root is None else root / "model"


def prompt_splits(organism_seed: int) -> Callable[[str], Sequence]:
    """split name → the grammar's prompts of that split, as the organism of that seed was split."""
    from .grammar import load_split

    return functools.partial(load_split, seed=organism_seed)
