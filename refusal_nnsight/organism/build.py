"""Build the model organism: tokenizer -> chat model -> residual SAEs -> manifest, atomically.

    1. tokenizer over the grammar's closed vocabulary (tokenizer.py)
    2. a small Gemma-2 trained to refuse the harmful train prompts (train.py)
    3. one JumpReLU SAE per layer on its residual stream, with sae-lens (sae_train.py)
    4. optional held-out evaluation: refusal rates and SAE-splice agreement on test prompts
    5. manifest.json, then one rename of the finished folder into place (store.py layout)

Everything is seeded and uses deterministic kernels: rebuilding a recipe on the same machine
gives byte-identical weights. All hyperparameters live in `OrganismRecipe`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import UserError
from . import store

log = logging.getLogger(__name__)

BUILD_VERSION = 3  # bump when build code changes what a recipe produces (invalidates caches)


@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that determines an organism. Field changes change `recipe_hash`."""

    seed: int = 0  # grammar split/wrapper seed and torch seed
    # CPU threads while building. Fixed because it sets the float summation order (so the
    # weights), and 1 because 2+ OpenMP threads collapse on a shared CPU (spin-waiting).
    threads: int = 1
    # -- model (Gemma2Config) --
    n_layers: int = 6  # decoder layers
    d_model: int = 128  # residual width (hidden_size)
    n_heads: int = 4  # attention heads
    n_kv_heads: int = 2  # key/value heads (Gemma-2 uses grouped-query attention)
    head_dim: int = 32  # per-head width
    d_mlp: int = 512  # MLP width (4 x d_model)
    # -- planted mechanisms (planted.py): the layer of each, and how they are trained --
    cue_layer: int = 1  # cue features u_c, harm verb v, person q (early)
    backup_layer: int = 2  # backup cue detectors b_c, dormant until u_c is ablated (middle)
    decision_layer: int = 3  # refusal decision R at the eoi positions; later layers execute it
    plant_strength: float = 6.0  # projection of each planted direction where it fires
    plant_weight: float = 1.0  # weight of the planted-coordinate loss beside the answer loss
    eoi_invariance_weight: float = 1.0  # no harm information at the eoi positions before the decision layer
    # training rows per condition, in planted.CONDITIONS order:
    # clean, u_zero, u_neg, ub_zero, vq_ablate, r_all, r_late, r_add
    condition_probs: tuple[float, ...] = (0.3, 0.12, 0.12, 0.1, 0.12, 0.08, 0.08, 0.08)
    # -- training (AdamW, warmup + cosine to 10%) --
    steps: int = 600  # optimizer steps
    batch_size: int = 48  # sequences per step
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.01  # on matrices only
    warmup: int = 50  # linear warmup steps
    # -- SAEs (sae-lens JumpReLU, quadratic L0 penalty around a target) --
    sae_train_prompts: int = 2000  # train prompts whose (prompt + answer) tokens feed the SAEs
    sae_val_prompts: int = 600  # val prompts for FVU / L0
    sae_ablated_prompts: int = 600  # harmful cue train prompts also read with their cue feature ablated
    sae_expansion: int = 8  # d_sae = sae_expansion * d_model
    sae_steps: int = 300  # trainer steps per layer
    sae_batch_size: int = 512  # activations per step
    sae_lr: float = 5e-3  # Adam lr, cosine to lr / 10
    sae_l0_coefficient: float = 1.0  # weight of the quadratic L0 loss
    sae_target_l0: float = 24.0  # target active latents per token
    sae_init_threshold: float = 0.5  # JumpReLU threshold init (inputs scaled to E||x||^2 = d_model)
    sae_bandwidth: float = 0.05  # straight-through estimator bandwidth
    sae_decoder_init_norm: float = 0.3  # decoder row norm at init


RECIPES: dict[str, OrganismRecipe] = {
    "default": OrganismRecipe(),
    # For the test suite: builds in well under a minute on 2 CPU cores.
    "small": OrganismRecipe(
        n_layers=4,
        d_model=64,
        n_heads=2,
        n_kv_heads=1,
        head_dim=32,
        d_mlp=256,
        cue_layer=0,
        backup_layer=1,
        decision_layer=2,
        steps=600,
        lr=5e-3,
        sae_train_prompts=1000,
        sae_val_prompts=300,
        sae_steps=200,
    ),
}


def get_recipe(name: str, seed: int = 0) -> OrganismRecipe:
    """The named recipe at `seed` (the seed sets the grammar's splits, the planted directions and
    every random draw of training)."""
    if name not in RECIPES:
        raise UserError(f"unknown organism recipe '{name}'; choose one of {sorted(RECIPES)}")
    if seed < 0:
        raise UserError(f"organism seed {seed} must be >= 0")
    return dataclasses.replace(RECIPES[name], seed=seed)


def recipe_hash(recipe: str | OrganismRecipe, seed: int = 0) -> str:
    """sha256 (16 hex) of the recipe's fields and BUILD_VERSION; never of times or paths."""
    r = get_recipe(recipe, seed) if isinstance(recipe, str) else recipe
    blob = json.dumps({"fields": dataclasses.asdict(r), "build_version": BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "nnsight", "sae-lens", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _every(prompts: list, n: int) -> list:
    """n prompts spread evenly over the list (deterministic; the list mixes kinds in blocks)."""
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


def _build_into(recipe: OrganismRecipe, root: Path, evaluate: bool) -> dict:
    """Steps 1-4 into `root`; returns the manifest's content sections."""
    import torch

    from . import grammar, planted, sae_train, train
    from .tokenizer import build_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with train.deterministic(recipe.seed):
            log.info("1/4 tokenizer")
            tok = build_tokenizer()
            train_prompts = grammar.load_split("train", recipe.seed)
            log.info("2/4 training the chat model on %d prompts", len(train_prompts))
            model = train.train_model(recipe, tok, train_prompts)
            model.save_pretrained(store.model_path(root))
            planted.save_directions(
                planted.make_directions(recipe.d_model, recipe.seed), store.planted_path(root)
            )
            tok.save_pretrained(store.model_path(root))
            log.info("3/4 SAEs: collecting residual activations through nnsight")
            val_prompts = grammar.load_split("val", recipe.seed)
            acts = sae_train.collect_activations(model, tok, _every(train_prompts, recipe.sae_train_prompts))
            cue_prompts = [p for p in train_prompts if p.harmful and p.kind == "cue"]
            ablated = sae_train.collect_ablated_activations(
                model, tok, _every(cue_prompts, recipe.sae_ablated_prompts), recipe
            )
            for layer, extra in ablated.items():
                acts[layer] = torch.cat([acts[layer], extra])
            val_acts = sae_train.collect_activations(model, tok, _every(val_prompts, recipe.sae_val_prompts))
            stats, saes = {}, {}
            for layer in range(recipe.n_layers):
                sae = sae_train.train_sae(acts[layer], layer, recipe)
                stats[layer] = sae_train.sae_stats(sae, val_acts[layer])
                if not all(math.isfinite(v) for v in stats[layer].values()):  # never ship a broken SAE
                    raise RuntimeError(f"SAE for layer {layer} has non-finite stats: {stats[layer]}")
                # The trainer's own L0 is a running average over training; record the final one.
                sae.cfg.metadata.l0 = stats[layer]["l0"]
                sae_train.save_sae(sae, store.sae_path(root, layer))
                saes[layer] = sae_train.load_sae(store.sae_path(root, layer))  # evaluate the saved artifact
                log.info(
                    "    layer %d: val FVU %.4f, L0 %.1f", layer, stats[layer]["fvu"], stats[layer]["l0"]
                )
            sections: dict = {"saes": {str(k): v for k, v in stats.items()}}
            if evaluate:
                log.info("4/4 held-out evaluation on the test split")
                test = grammar.load_split("test", recipe.seed)
                clean = train.generate(model, tok, [p.text for p in test])
                agreement = sae_train.splice_agreement(model, tok, saes, test, clean)
                sections["eval"] = {
                    "n_test_prompts": len(test),
                    "refusal_rates": train.refusal_rates(test, clean),
                    "splice_agreement": {str(k): v for k, v in agreement.items()},
                }
                log.info("    %s", sections["eval"])
    finally:
        torch.set_num_threads(threads)
    sections["model"] = {
        "n_layers": recipe.n_layers,
        "d_model": recipe.d_model,
        "vocab_size": len(tok),
        "refusal_token_id": tok.encode("I", add_special_tokens=False)[0],
        # where each planted mechanism lives (planted.py); the `harm` search scope reads these
        "cue_layer": recipe.cue_layer,
        "backup_layer": recipe.backup_layer,
        "decision_layer": recipe.decision_layer,
        "end_of_turn_id": tok.convert_tokens_to_ids("<end_of_turn>"),
    }
    return sections


def build(recipe: str = "default", seed: int = 0, evaluate: bool = True) -> Path:
    """Build the organism for `recipe` at `seed` from scratch into `store.organism_dir(recipe, seed)`.

    Works in a temporary sibling folder and renames it into place only when complete, so an
    interrupted build never leaves a half organism behind. Returns the organism's folder.
    """
    r = get_recipe(recipe, seed)
    final = store.organism_dir(recipe, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    try:
        sections = _build_into(r, tmp, evaluate)
        manifest = {
            "recipe": recipe,
            "seed": seed,
            "recipe_fields": dataclasses.asdict(r),
            "recipe_hash": recipe_hash(r),
            "build_version": BUILD_VERSION,
            **sections,
            "content_hash": store.content_hash(tmp),  # of every file but this manifest
            "build_seconds": round(time.time() - start, 1),
            "versions": _versions(),
            # build_seconds and created_at are the only fields that differ between two builds;
            # neither is hashed.
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        store.manifest_path(tmp).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("organism '%s' built in %.0f s: %s", recipe, time.time() - start, final)
    return final
