"""Where organisms live on disk, and the one place that builds their paths.

The seed-0 organisms of the 'default' and 'small' recipes ship inside the package (`shipped/`), so
every machine dissects the same weights: training on another CPU sums floats in another order and
ends in another network. Any other recipe or seed is built on first use into
`organism_dir(recipe, seed)` = $REFUSAL_NNSIGHT_HOME/organism/<recipe>-seed<N>-<recipe hash>
(default home ~/.cache/refusal_nnsight). Layout of an organism folder:

    model/              HF save_pretrained: config.json, model.safetensors, generation_config.json,
                        tokenizer.json, tokenizer_config.json, chat_template.jinja
    saes/layer_{L}/     sae-lens inference format: cfg.json, sae_weights.safetensors
    planted.safetensors the planted directions (planted.py): the mechanisms' ground truth
    manifest.json       recipe, its hash, build time, SAE stats, package versions

A directory counts as built only when its manifest names the current recipe hash, so changing a
recipe (or the build code's version) builds a new folder instead of silently serving a stale one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .recipe import recipe_hash

log = logging.getLogger(__name__)

HOME_ENV = "REFUSAL_NNSIGHT_HOME"
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """$REFUSAL_NNSIGHT_HOME if set, else ~/.cache/refusal_nnsight."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_nnsight"


def shipped_dir(recipe: str = "default") -> Path:
    """The seed-0 organism of `recipe` as shipped inside the package (read-only): 'default' for
    every run, 'small' for the test suite."""
    return Path(__file__).parent / "shipped" / recipe


def organism_dir(recipe: str = "default", seed: int = 0) -> Path:
    """The cache folder of one build: <root>/organism/<recipe>-seed<N>-<recipe hash>.

    Keyed by the recipe hash, so a build of another recipe, seed or build version never lands on
    (or is served from) the folder of this one.
    """
    return cache_root() / "organism" / f"{recipe}-seed{seed}-{recipe_hash(recipe, seed)}"


def model_path(root: Path) -> Path:
    return root / "model"


def saes_path(root: Path) -> Path:
    return root / "saes"


def sae_path(root: Path, layer: int) -> Path:
    return saes_path(root) / f"layer_{layer}"


def planted_path(root: Path) -> Path:
    """The planted directions (R, u_c, b_c, v, q) as safetensors: the ground truth of the mechanisms."""
    return root / "planted.safetensors"


def manifest_path(root: Path) -> Path:
    return root / MANIFEST


def read_manifest(root: Path) -> dict:
    """The manifest of an organism folder (raises UserError if there is none)."""
    path = manifest_path(root)
    if not path.is_file():
        from ..errors import UserError

        raise UserError(f"no organism at {root}; build it with `refusal-nnsight-organism build`")
    return json.loads(path.read_text())


def _hash_of(root: Path) -> str | None:
    try:
        return json.loads(manifest_path(root).read_text()).get("recipe_hash")
    except (OSError, json.JSONDecodeError):
        return None


def is_built(recipe: str = "default", seed: int = 0) -> bool:
    """True if the cache holds a finished build of `recipe` at `seed` with the current build code."""
    return _hash_of(organism_dir(recipe, seed)) == recipe_hash(recipe, seed)


def is_shipped(recipe: str = "default", seed: int = 0) -> bool:
    """True if the package ships this exact organism (same recipe hash)."""
    return _hash_of(shipped_dir(recipe)) == recipe_hash(recipe, seed)


def content_hash(root: Path) -> str:
    """sha256 (16 hex) of every weight and tokenizer file of an organism: equal iff the builds are.

    A JSON file counts by its content, not its key order: sae-lens writes an SAE's cfg.json keys
    in an order that changes from one process to the next (string hashing is randomised per
    process), so two builds with identical weights would otherwise hash apart.
    """
    import hashlib

    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            h.update(str(path.relative_to(root)).encode())
            h.update(canonical_json(path.read_bytes()) if path.suffix == ".json" else path.read_bytes())
    return h.hexdigest()[:16]


def canonical_json(raw: bytes) -> bytes:
    """A JSON document with sorted keys and fixed separators (its bytes depend on its content only)."""
    return json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
