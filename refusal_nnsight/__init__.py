"""refusal_nnsight: dissect LLM refusal with SAE features on nnsight (arXiv 2509.09708).

The stage functions are importable from the package root (see refusal_nnsight.api); they load
lazily, so `import refusal_nnsight` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = (
    "load_model", "wrap_model", "load_saes", "load_prompts", "find_direction", "candidate_features",
    "greedy_minimal_set", "fit_interactions", "find_redundant", "evaluate", "feature_cards", "load_run", "Run",
)  # fmt: skip
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'refusal_nnsight' has no attribute {name!r}")
