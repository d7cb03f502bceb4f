"""Where organisms live on disk, and the one place that builds their paths.

Layout of `organism_dir(recipe)` (= $REFUSAL_NNSIGHT_HOME/organism/<recipe>, default home
~/.cache/refusal_nnsight):

    model/              HF save_pretrained: config.json, model.safetensors, generation_config.json,
                        tokenizer.json, tokenizer_config.json, chat_template.jinja
    saes/layer_{L}/     sae-lens inference format: cfg.json, sae_weights.safetensors
    manifest.json       recipe, its hash, build time, SAE stats, package versions

A directory counts as built only when its manifest names the current recipe hash, so changing a
recipe (or the build code's version) triggers a rebuild instead of silently serving a stale one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HOME_ENV = "REFUSAL_NNSIGHT_HOME"
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """$REFUSAL_NNSIGHT_HOME if set, else ~/.cache/refusal_nnsight."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_nnsight"


def organism_dir(recipe: str = "default") -> Path:
    """The folder of a built (or to-be-built) organism: <root>/organism/<recipe>."""
    return cache_root() / "organism" / recipe


def model_path(root: Path) -> Path:
    return root / "model"


def saes_path(root: Path) -> Path:
    return root / "saes"


def sae_path(root: Path, layer: int) -> Path:
    return saes_path(root) / f"layer_{layer}"


def manifest_path(root: Path) -> Path:
    return root / MANIFEST


def read_manifest(root: Path) -> dict:
    """The manifest of an organism folder (raises UserError if there is none)."""
    path = manifest_path(root)
    if not path.is_file():
        from ..errors import UserError

        raise UserError(f"no organism at {root}; build it with `refusal-nnsight-organism build`")
    return json.loads(path.read_text())


def is_built(recipe: str = "default") -> bool:
    """True if the organism for `recipe` exists and was built from the current recipe."""
    from .build import recipe_hash

    path = manifest_path(organism_dir(recipe))
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("recipe_hash") == recipe_hash(recipe)
    except (OSError, json.JSONDecodeError):
        return False


def ensure_organism(recipe: str = "default") -> Path:
    """The organism's folder, building it first (once; a few minutes on a laptop) if missing."""
    root = organism_dir(recipe)
    if not is_built(recipe):
        from .build import build

        log.info("building the '%s' model organism into %s (once; it is cached)", recipe, root)
        build(recipe, evaluate=False)  # `refusal-nnsight-organism check` evaluates
    return root


def load_model(recipe: str = "default"):
    """(Gemma2ForCausalLM in eval mode, tokenizer) of the organism, building it if needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(ensure_organism(recipe))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_saes(recipe: str = "default", layers: list[int] | None = None) -> dict:
    """{layer: sae_lens JumpReLUSAE} for the organism (all layers by default)."""
    from sae_lens import SAE

    root = ensure_organism(recipe)
    if layers is None:
        layers = sorted(int(p.name.split("_")[1]) for p in saes_path(root).glob("layer_*"))
    return {layer: SAE.load_from_disk(str(sae_path(root, layer)), device="cpu") for layer in layers}
