"""The offline model organism: a small Gemma-2 chat model trained on a generated instruction
grammar with planted harm cues, plus JumpReLU SAEs (sae-lens) on its residual stream.

Nothing heavy is imported here. `ensure_organism(recipe, seed)` serves a build's folder (the
shipped copy, the cache, or a fresh build); `resolve` turns a ModelConfig into what the core's
loaders take. Modules, bottom up: grammar, tokenizer, recipe, store (the folder layout), planted,
train, sae_train, build, check, validate, cli.
"""

from .build import ensure_organism
from .store import is_built, organism_dir

__all__ = ["ensure_organism", "is_built", "organism_dir"]
