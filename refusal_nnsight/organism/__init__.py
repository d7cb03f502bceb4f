"""The offline model organism: a small Gemma-2 chat model trained on a generated instruction
grammar with planted harm cues, plus JumpReLU SAEs (sae-lens) on its residual stream.

Nothing heavy is imported here; use `store.ensure_organism(recipe)` / `store.load_model(recipe)`.
"""

from .store import ensure_organism, is_built, organism_dir

__all__ = ["ensure_organism", "is_built", "organism_dir"]
