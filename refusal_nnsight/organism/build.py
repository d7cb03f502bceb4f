"""Build the model organism: tokenizer -> chat model -> residual SAEs -> manifest, atomically.

    1. tokenizer over the grammar's closed vocabulary (tokenizer.py)
    2. a small Gemma-2 trained to refuse the harmful train prompts (train.py)
    3. one JumpReLU SAE per layer up to the cue layer, with sae-lens (sae_train.py)
    4. the layers above the cue layer trained on those SAEs' cut of the cue words (cut.py), then
       one SAE per layer above it; with the backup cut (recipe.backup_cut_steps), the SAE of the
       backup layer, the layers above it trained on that SAE's cut of the backup (cut.py), then
       their SAEs
    5. optional held-out evaluation: refusal rates and SAE-splice agreement on test prompts
then manifest.json, and one rename of the finished folder into place (store.py layout).

Everything is seeded and uses deterministic kernels: rebuilding a recipe on the same machine
gives byte-identical weights. All hyperparameters live in `OrganismRecipe`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from . import store
from .recipe import BUILD_VERSION, OrganismRecipe, get_recipe, recipe_hash

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "nnsight", "sae-lens", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


CPUINFO = Path("/proc/cpuinfo")  # Linux's processor table; absent elsewhere


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in CPUINFO ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in CPUINFO.read_text().splitlines():
            if not line.strip():
                break  # the first processor only
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def built_on() -> dict[str, str]:
    """The machine a build ran on, as far as it sets the weights: training on another CPU (other
    vector instructions, or another vendor's path through the BLAS library) sums floats in another
    order and ends in another network, so a seed's build is exact on one kind of machine only.

    `cpu` is the model name (elsewhere than Linux, what `platform` knows); `cpu_id`, where the
    processor table gives them, is vendor, family, model and stepping ('AuthenticAMD family 25
    model 17 stepping 1'), which tell apart generations a virtual machine's model name ("AMD
    EPYC") does not."""
    import torch

    info = _cpuinfo()
    machine = {"arch": platform.machine(), "cpu": info.get("model name") or platform.processor() or "unknown",
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    keys = ("vendor_id", "cpu family", "model", "stepping")
    if all(k in info for k in keys):
        machine["cpu_id"] = "{} family {} model {} stepping {}".format(*(info[k] for k in keys))
    return machine


def _every(prompts: list, n: int) -> list:
    """n prompts spread evenly over the list (deterministic; the list mixes kinds in blocks)."""
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


def _build_into(recipe: OrganismRecipe, root: Path, evaluate: bool) -> dict:
    """Steps 1-5 into `root`; returns the manifest's content sections."""
    import torch

    from ..saes import SlicedSAE
    from . import grammar, planted, sae_train, train
    from .cut import train_cut
    from .tokenizer import build_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    early = range(recipe.cue_layer + 1)  # frozen while the SAE cut is trained: their SAEs come first
    late = range(recipe.cue_layer + 1, recipe.n_layers)
    stats: dict[int, dict] = {}
    try:
        with train.deterministic(recipe.seed):
            log.info("1/5 tokenizer")
            tok = build_tokenizer()
            train_prompts = grammar.load_split("train", recipe.seed)
            val_prompts = grammar.load_split("val", recipe.seed)
            log.info("2/5 training the chat model on %d prompts", len(train_prompts))
            model = train.train_model(recipe, tok, train_prompts)
            model.save_pretrained(store.model_path(root))
            planted.save_directions(planted.directions_of(recipe), store.planted_path(root))
            tok.save_pretrained(store.model_path(root))
        # Each later step reads the saved model back, as every user of the organism does.
        with train.deterministic(recipe.seed):
            model, tok = _read_model(root)
            log.info("3/5 SAEs of layers %s: collecting residual activations through nnsight", list(early))
            acts = sae_train.collect_activations(model, tok, _every(train_prompts, recipe.sae_train_prompts))
            val_acts = sae_train.collect_activations(model, tok, _every(val_prompts, recipe.sae_val_prompts))
            for layer in early:
                stats[layer] = _train_and_save_sae(recipe, root, layer, acts[layer], val_acts[layer])
        with train.deterministic(recipe.seed):
            model, tok = _read_model(root)
            log.info("4/5 training layers %s on the SAE cut of the cue words", list(late))
            saes = {
                layer: SlicedSAE.from_sae(sae_train.load_sae(store.sae_path(root, layer)), layer)
                for layer in early
            }
            dirs = planted.load_directions(store.planted_path(root))
            model = train_cut(model, recipe, tok, train_prompts, dirs, saes)
            model.save_pretrained(store.model_path(root))
            # with the backup cut, only the backup layer's SAE now: the layers above it train again
            upper = range(recipe.cue_layer + 1, recipe.backup_layer + 1) if recipe.backup_cut_steps else late
            log.info("    the SAEs of layers %s", list(upper))
            stats.update(_upper_saes(recipe, root, model, tok, train_prompts, val_prompts, upper))
        if recipe.backup_cut_steps:
            stats.update(backup_cut_step(recipe, root, train_prompts, val_prompts))
        sections: dict = {"saes": {str(k): v for k, v in sorted(stats.items())}}
        if evaluate:
            log.info("5/5 held-out evaluation on the test split")
            model, tok = _read_model(root)
            saes_full = {
                layer: sae_train.load_sae(store.sae_path(root, layer)) for layer in range(recipe.n_layers)
            }
            test = grammar.load_split("test", recipe.seed)
            clean = train.generate(model, tok, [p.text for p in test])
            agreement = sae_train.splice_agreement(model, tok, saes_full, test, clean)
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


def _upper_saes(recipe: OrganismRecipe, root: Path, model, tok, train_prompts, val_prompts, layers) -> dict:
    """Train and save the SAEs of `layers` (above the cue layer) on clean activations and those of
    cue prompts with the cue cut (sae_train.collect_ablated_activations); {layer: stats}."""
    import torch

    from . import sae_train

    acts = sae_train.collect_activations(model, tok, _every(train_prompts, recipe.sae_train_prompts))
    cue_prompts = [p for p in train_prompts if p.harmful and p.kind == "cue"]
    ablated = sae_train.collect_ablated_activations(
        model, tok, _every(cue_prompts, recipe.sae_ablated_prompts), recipe
    )
    val_acts = sae_train.collect_activations(model, tok, _every(val_prompts, recipe.sae_val_prompts))
    return {
        layer: _train_and_save_sae(
            recipe, root, layer, torch.cat([acts[layer], ablated[layer]]), val_acts[layer]
        )
        for layer in layers
    }


def backup_cut_step(recipe: OrganismRecipe, root: Path, train_prompts, val_prompts) -> dict:
    """The backup cut (cut.py) on the organism in `root`, whose SAEs of layers 0..backup_layer are
    trained: the layers above the backup layer trained on it, saved, then their SAEs; {layer: stats}."""
    from ..saes import SlicedSAE
    from . import planted, sae_train, train
    from .cut import train_cut

    top = range(recipe.backup_layer + 1, recipe.n_layers)
    with train.deterministic(recipe.seed):
        model, tok = _read_model(root)
        log.info("    training layers %s on the SAE cut of the backup", list(top))
        saes = {
            layer: SlicedSAE.from_sae(sae_train.load_sae(store.sae_path(root, layer)), layer)
            for layer in range(recipe.backup_layer + 1)
        }
        dirs = planted.load_directions(store.planted_path(root))
        early = {layer: saes[layer] for layer in range(recipe.cue_layer + 1)}
        model = train_cut(
            model, recipe, tok, train_prompts, dirs, early, backup_sae=saes[recipe.backup_layer]
        )
        model.save_pretrained(store.model_path(root))
        log.info("    the SAEs of layers %s", list(top))
        return _upper_saes(recipe, root, model, tok, train_prompts, val_prompts, top)


def _read_model(root: Path):
    """(the saved model in eval mode, eager attention; its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = store.model_path(root)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def _train_and_save_sae(recipe: OrganismRecipe, root: Path, layer: int, acts, val_acts) -> dict:
    """Train the layer's SAE, save it, and return its held-out FVU, L0 and dead share."""
    from . import sae_train

    sae = sae_train.train_sae(acts, layer, recipe)
    path = store.sae_path(root, layer)
    if recipe.sae_batchtopk_at(layer):  # its training encode ranks over the batch: measure it as saved
        sae_train.save_sae(sae, path)
        sae = sae_train.load_sae(path)
    stats = sae_train.sae_stats(sae, val_acts)
    if not all(math.isfinite(v) for v in stats.values()):  # never ship a broken SAE
        raise RuntimeError(f"SAE for layer {layer} has non-finite stats: {stats}")
    # The trainer's own L0 is a running average over training; record the final one.
    sae.cfg.metadata.l0 = stats["l0"]
    sae_train.save_sae(sae, path)
    log.info("    layer %d: val FVU %.4f, L0 %.1f", layer, stats["fvu"], stats["l0"])
    return stats


def build(recipe: str = "default", seed: int = 0, evaluate: bool = True) -> Path:
    """Build the organism for `recipe` at `seed` from scratch into `store.organism_dir(recipe, seed)`
    (or, for a TunedRecipe, the safety-tuned real model: tuned.py).

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
        if isinstance(r, OrganismRecipe):
            sections = _build_into(r, tmp, evaluate)
        else:  # a real model, safety-tuned (tuned.py); its held-out figures are part of the build
            from .tuned import build_into

            sections = build_into(r, tmp)
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
            "built_on": built_on(),
            # build_seconds and created_at are the only fields that differ between two builds on
            # one machine (built_on between machines); none is hashed.
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


def ensure_organism(recipe: str = "default", seed: int = 0) -> Path:
    """The organism's folder: the shipped one if it is this recipe and seed, else the cache's,
    building it first (once; a few minutes on a laptop) if missing."""
    if store.is_shipped(recipe, seed):
        return store.shipped_dir(recipe, seed)
    root = store.organism_dir(recipe, seed)
    if not store.is_built(recipe, seed):
        log.info(
            "building the '%s' model organism (seed %d) into %s (once; it is cached)", recipe, seed, root
        )
        build(recipe, seed=seed, evaluate=False)  # `refusal-nnsight-organism check` evaluates
    return root


def load_model(recipe: str = "default", seed: int = 0):
    """(Gemma2ForCausalLM in eval mode, tokenizer) of the organism, building it if needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = store.model_path(ensure_organism(recipe, seed))
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_saes(recipe: str = "default", layers: list[int] | None = None, seed: int = 0) -> dict:
    """{layer: sae_lens JumpReLUSAE} for the organism (all layers by default)."""
    from sae_lens import SAE

    root = ensure_organism(recipe, seed)
    if layers is None:
        from ..saes import organism_sae_layers

        layers = organism_sae_layers(root)
    return {layer: SAE.load_from_disk(str(store.sae_path(root, layer)), device="cpu") for layer in layers}
