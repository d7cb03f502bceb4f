"""Where organisms live on disk, and the one place that builds their paths.

The organisms of seeds 0-4 of the 'default' recipe (the ones `validate` reports) and seed 0 of
'small' (the test suite's) ship inside the package (`shipped/<recipe>-seed<N>/`), so every machine
dissects the same weights: training on another CPU sums floats in another order and ends in another
network. Any other recipe or seed is built on first use into
`organism_dir(recipe, seed)` = $REFUSAL_NNSIGHT_HOME/organism/<recipe>-seed<N>-<recipe hash>
(default home ~/.cache/refusal_nnsight). Layout of an organism folder:

    model/              HF save_pretrained: config.json, model.safetensors, generation_config.json,
                        tokenizer.json, tokenizer_config.json, chat_template.jinja
    saes/layer_{L}/     sae-lens inference format: cfg.json, sae_weights.safetensors
    planted.safetensors the planted directions (planted.py): the mechanisms' ground truth
    manifest.json       recipe, its hash, build time, SAE stats, package versions, the machine;
                        `continued` where the last steps ran on another machine than the first
                        (the build they continued, by content hash, and that machine)

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


def shipped_dir(recipe: str = "default", seed: int = 0) -> Path:
    """Where the package ships the organism of `recipe` at `seed` (read-only), if it ships it
    (`is_shipped`): 'default' seeds 0-4 for runs and `validate`, 'small' seed 0 for the test suite."""
    return Path(__file__).parent / "shipped" / f"{recipe}-seed{seed}"


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
    return _hash_of(shipped_dir(recipe, seed)) == recipe_hash(recipe, seed)


def rebuild_equals_shipped(recipe: str = "default", seed: int = 0) -> bool | None:
    """Whether the cache's build of `recipe` at `seed` is the shipped one, file for file
    (`content_hash`); None unless the package ships it and the cache holds a rebuild."""
    if not (is_shipped(recipe, seed) and is_built(recipe, seed)):
        return None
    return content_hash(organism_dir(recipe, seed)) == content_hash(shipped_dir(recipe, seed))


# Keys naming the library release that wrote a file (transformers in config.json and
# generation_config.json, sae-lens in an SAE's cfg.json): provenance, kept in the manifest's
# `versions`, not content. Another release writing the same weights must not make another build.
VERSION_STAMPS = frozenset({"transformers_version", "sae_lens_version", "sae_lens_training_version"})


def content_hash(root: Path) -> str:
    """sha256 (16 hex) of every weight and tokenizer file of an organism: equal iff the builds are.

    A JSON file counts by its content, not its key order: sae-lens writes an SAE's cfg.json keys
    in an order that changes from one process to the next (string hashing is randomised per
    process), so two builds with identical weights would otherwise hash apart. Nor do the library
    versions stamped into those files count (`VERSION_STAMPS`).
    """
    import hashlib

    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            h.update(str(path.relative_to(root)).encode())
            raw = path.read_bytes()
            h.update(canonical_json(raw, drop=VERSION_STAMPS) if path.suffix == ".json" else raw)
    return h.hexdigest()[:16]


def canonical_json(raw: bytes, drop: frozenset[str] = frozenset()) -> bytes:
    """A JSON document with sorted keys and fixed separators (its bytes depend on its content only),
    without the object keys named in `drop`, at any depth."""

    def without(x):
        if isinstance(x, dict):
            return {k: without(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [without(v) for v in x]
        return x

    return json.dumps(without(json.loads(raw)), sort_keys=True, separators=(",", ":")).encode()
