"""An organism's recipe: every setting a build depends on, and the hash that names the build.

`recipe_hash` covers the recipe's fields, its seed and BUILD_VERSION: two folders with one hash
hold the same organism. The store names cached builds by it; the build writes it to the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ..errors import UserError

BUILD_VERSION = 10  # bump when build code changes what a recipe produces (invalidates caches)


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
    # cosine of each cue direction u_c with R. At 1/sqrt(2) the early SAEs learn the shared R part
    # as latents firing on the cue words of most categories, which steer any category to
    # compliance: 10-32 of the harm scope's minimal-set memberships on seeds 0-4 (at 0.35: 2-24);
    # at 0.58 they still fill the minimal sets on some seeds
    cue_cosine: float = 0.35
    # of the harm verb v and the person q with R. At 0.6 seed 4's latent on the verb and person
    # (which also fires on most cue words of four categories) is gone, but the redundancy is found
    # on no seed (at 1/sqrt(2): seeds 2 and 4); at 0.5 Arditi's selection falls back on seed 4
    composition_cosine: float = 2**-0.5
    plant_strength: float = 6.0  # projection of each planted direction where it fires
    plant_weight: float = 1.0  # weight of the planted-coordinate loss beside the answer loss
    eoi_invariance_weight: float = 1.0  # no harm information at the eoi positions before the decision layer
    # the backup detectors' loss weight: b_c is planted on the tokens after the cue word, which
    # only layer 0's attention to the raw embedding feeds once the word itself is cut
    backup_weight: float = 3.0
    # on cue, harm-verb and person words at layers 0..backup_layer: the residual off the span of
    # the planted directions, penalised so those words carry their planted coordinate and little
    # else (an SAE latent on a cue word then carries the cue, not the word)
    off_span_weight: float = 1.0
    # on the same words at the layers below the cue layer: the cue layer's planted coordinates
    # (their own cue, verb or person direction, nothing along the others), weighted by this. At 0
    # layer 0's cue words also carried 1-2 of the planted strength along other categories' cue
    # directions, shared by every category's words; its SAE learned that part as latents firing on
    # the cue words of several categories, which greedy kept (`validate` missed 8 targets; with it, 4)
    early_pin_weight: float = 1.0
    # training rows per condition, in planted.CONDITIONS order:
    # clean, u_zero, u_neg, ub_zero, vq_ablate, r_all, r_late, r_add, r_early
    condition_probs: tuple[float, ...] = (0.24, 0.12, 0.12, 0.1, 0.12, 0.08, 0.08, 0.08, 0.06)
    # -- training (AdamW, warmup + cosine to 10%) --
    # optimizer steps. At 600 the backup detectors still leaked on their cue words in clean runs
    # (0.17-0.33 of the planted strength on seeds 0-4, target <= 0.1); at 1200 that falls to
    # 0.04-0.13 with the backup as awake under the cue's ablation (about 1.0)
    steps: int = 1200
    batch_size: int = 48  # sequences per step
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.01  # on matrices only
    warmup: int = 50  # linear warmup steps
    # -- SAEs (sae-lens JumpReLU, quadratic L0 penalty around a target) --
    sae_train_prompts: int = 2000  # train prompts whose (prompt + answer) tokens feed the SAEs
    sae_val_prompts: int = 600  # val prompts for FVU / L0
    sae_ablated_prompts: int = 600  # harmful cue train prompts also read with their cue feature ablated
    sae_expansion: int = 8  # d_sae = sae_expansion * d_model
    # trainer steps per layer. At 300 the L0 penalty had not converged (L0 ~38 whatever the target)
    # and the FM fell below the linear model on every seed; 3000 reach the target L0
    sae_steps: int = 3000
    sae_batch_size: int = 512  # activations per step
    sae_lr: float = 5e-3  # Adam lr, cosine to lr / 10
    sae_l0_coefficient: float = 1.0  # weight of the quadratic L0 loss
    sae_target_l0: float = 24.0  # target active latents per token, after the backup layer
    # ... at layers 0..backup_layer. At 24 the cue layer's SAE spread each cue over many latents
    # (one carried under a fifth of it); at 4 one or two carry it
    sae_early_target_l0: float = 4.0
    # the SAEs of layers 0..cue_layer, where the harm scope finds the cue latents: BatchTopK with this
    # many active latents per token (0: JumpReLU, as above). The JumpReLU SAEs there hold latents that
    # fire on most words of two or more groups (`check`'s sae_shared_cue_latents 4, 5, 5, 4 and 1 on
    # seeds 0-4), whatever their target L0 (2, 4, 8) or width (8x, 16x); with k = 3 the five builds
    # had 2, 1, 1, 0 and 1, cue precision 1 on seeds 1-4, but fewer latents active on a prompt leave
    # the factorization machine pools of 2-9 latents, too small to beat the linear model on held-out
    # masks, and `validate` misses 9 targets against 8: not the default (docs/organism-settings.md,
    # "BatchTopK SAEs at layers 0-1")
    sae_early_k: int = 0
    sae_topk_lr: float = 1e-3  # Adam lr of the BatchTopK SAEs, cosine to lr / 10
    # -- the SAE cut (cut.train_cut): layers above the cue layer trained on the cue word's SAE
    # latents zeroed or steered, the SAE error term kept, after the SAEs of layers 0..cue_layer --
    cut_steps: int = 400  # AdamW steps, each one batch of the planted conditions and one of the cut
    cut_lr: float = 1e-3  # peak learning rate (warmup, cosine to 10%)
    cut_warmup: int = 20
    # cut rows per condition (cue prompts only): zeroed (refuses, the backup wakes), zeroed with
    # b_c projected out (complies), steered at -1 or -3 (complies)
    cut_probs: tuple[float, ...] = (0.4, 0.3, 0.3)
    cut_min_cosine: float = 0.3  # a latent is cue-aligned when its decoder row has this cosine with u_c
    # -- the backup cut (cut.train_cut again, one layer up): the layers above the backup layer trained
    # once more after the backup layer's SAE, the backup also removed through that SAE. Without it,
    # zeroing the latents that hold the backup (as the redundancy stage does) left 0.94 and 0.85 of
    # seeds 0 and 1's dissected cue prompts refused where their part along b_c alone left 0.06 and 0:
    # an SAE latent writes more than b_c, and the layers above read the rest as refusal. 0 = no step --
    backup_cut_steps: int = 400  # AdamW steps, as cut_steps
    # of the cut rows that remove the backup (cut_probs' second share), those that zero the backup
    # layer's backup-aligned latents (decoder cosine >= cut_min_cosine with b_c), error term kept,
    # rather than project b_c out
    backup_cut_sae_share: float = 0.5
    sae_init_threshold: float = 0.5  # JumpReLU threshold init (inputs scaled to E||x||^2 = d_model)
    sae_bandwidth: float = 0.05  # straight-through estimator bandwidth
    sae_decoder_init_norm: float = 0.3  # decoder row norm at init

    def __post_init__(self) -> None:
        if not 0 <= self.sae_early_k <= self.d_model:
            raise ValueError(f"sae_early_k={self.sae_early_k} must lie in [0, d_model={self.d_model}]")
        if not 0 < self.sae_topk_lr <= 1:
            raise ValueError(f"sae_topk_lr={self.sae_topk_lr} must lie in (0, 1]")
        if not 0 <= self.early_pin_weight <= 100:
            raise ValueError(f"early_pin_weight={self.early_pin_weight} must lie in [0, 100]")

    def sae_batchtopk_at(self, layer: int) -> bool:
        """Whether the SAE at `layer` is trained as BatchTopK (else JumpReLU)."""
        return self.sae_early_k > 0 and layer <= self.cue_layer

    def sae_target_l0_at(self, layer: int) -> float:
        """The SAE's target L0 at `layer`: sparse up to the backup layer, where the planted
        detectors are, wider after."""
        return self.sae_early_target_l0 if layer <= self.backup_layer else self.sae_target_l0


@dataclass(frozen=True)
class TunedRecipe:
    """A real chat model fine-tuned to refuse (tuned.py). No planted truth: `check` and
    `validate` do not apply; its build reports refusal rates and SAE figures instead."""

    seed: int = 0  # torch seed and batch order
    threads: int = 2  # CPU threads while building (fixed: it sets the float summation order)
    base: str = "smollm2_135m_it"  # the GGUF preset fine-tuned (tuned.BASES)
    # -- fine-tune: HarmBench's val behaviours (standard rows) answered with refusals, the
    # written harmless prompts answered with the base model's own greedy answers --
    steps: int = 60  # optimizer steps (AdamW, constant lr)
    batch_harmful: int = 4  # harmful examples per step
    batch_harmless: int = 6  # harmless examples per step (more than harmful: over-refusal is the harder side)
    lr: float = 5e-5
    distill_tokens: int = 64  # length of each self-distilled harmless answer
    # -- SAEs (sae-lens BatchTopK, saved as JumpReLU) on a few residual layers --
    sae_layers: tuple[int, ...] = (6, 12, 18, 24)
    sae_expansion: int = 4  # d_sae = sae_expansion * d_model
    # active latents per token (batch average), one per sae_layers entry. Layer 24's held-out FVU is
    # the highest (k=32: 0.34, 64: 0.18, 128: 0.109, 160: 0.098, 192: 0.088); twice the latents at
    # k=128 overfit instead (0.106, training FVU 0.067)
    sae_k: tuple[int, ...] = (128, 128, 128, 192)
    sae_steps: int = 3000
    sae_batch_size: int = 512
    sae_lr: float = 1e-3
    sae_answer_tokens: int = 160  # the tuned model's own answers, appended to each SAE training prompt
    sae_samples: int = 2  # extra sampled answers to each harmless training prompt, for more SAE tokens

    def __post_init__(self) -> None:
        if len(self.sae_k) != len(self.sae_layers):
            raise ValueError(f"sae_k {self.sae_k} needs one k per SAE layer {self.sae_layers}")

    def k_at(self, layer: int) -> int:
        """Active latents per token of the SAE at `layer`."""
        return self.sae_k[self.sae_layers.index(layer)]


_DEFAULT = OrganismRecipe()
RECIPES: dict[str, OrganismRecipe | TunedRecipe] = {
    "default": _DEFAULT,
    # For the test suite, which loads the shipped build: a rebuild takes about 5 minutes on one
    # core (the shipped one 344 s, a rebuild on another AMD EPYC 277 s).
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
        # 600 steps at lr 5e-3 left the backup detectors leaking on clean prompts (0.2 of the
        # planted strength, target <= 0.1); 1000 at 5e-3 leaked less but moved harmless answers
        # under direction ablation (KL 0.15). Rebuilt on an AVX2 AMD EPYC (`check --max-prompts
        # 120`), this recipe leaks 0.31 (KL 0.136), with 2000 steps 0.25 and with 3000 0.43 (splice
        # agreement 0.905): most of it on "water" in "water my plants", a word that follows a cue
        # word in "poison the water supply", where the backup is trained to wake
        steps=1000,
        lr=3e-3,
        # at 3.0 the backup detectors leaked on clean prompts (largest projection 0.94 of the
        # planted strength, 99th percentile after a cue word 0.50); at 10.0 0.44 and 0.19, the
        # backup as awake under the cue's ablation (1.03); on that AVX2 machine, at 30.0 0.39
        # (splice agreement 0.77), at 20.0 with 2000 steps 0.49
        backup_weight=10.0,
        sae_train_prompts=1000,
        sae_val_prompts=300,
        sae_steps=200,
        backup_cut_steps=0,  # the suite's organism, as shipped: it tests the machinery, not the figures
    ),
    # the default with BatchTopK SAEs at layers 0..cue_layer (k = 3): measured, not adopted (see
    # sae_early_k); `build --recipe batchtopk --seed N` rebuilds it
    "batchtopk": dataclasses.replace(_DEFAULT, sae_early_k=3),
    # the default before the early pin (early_pin_weight): the recipe of the organisms shipped before
    "unpinned": dataclasses.replace(_DEFAULT, early_pin_weight=0.0),
    # SmolLM2-135M-Instruct safety-tuned on HarmBench (tuned.py; needs `make install-smollm2`)
    "smollm2_harmbench": TunedRecipe(),
}


def get_recipe(name: str, seed: int = 0) -> OrganismRecipe | TunedRecipe:
    """The named recipe at `seed` (the seed sets the grammar's splits, the planted directions and
    every random draw of training)."""
    if name not in RECIPES:
        raise UserError(f"unknown organism recipe '{name}'; choose one of {sorted(RECIPES)}")
    if seed < 0:
        raise UserError(f"organism seed {seed} must be >= 0")
    return dataclasses.replace(RECIPES[name], seed=seed)


def organism_recipe(name: str, seed: int = 0) -> OrganismRecipe:
    """The named recipe, which must plant truth (an OrganismRecipe): for the planted checks, validate."""
    r = get_recipe(name, seed)
    if not isinstance(r, OrganismRecipe):
        raise UserError(
            f"recipe '{name}' is a tuned real model without planted truth; `validate` scores the pipeline "
            "against planted mechanisms (`check` on it re-measures its held-out refusal rates and SAE figures)"
        )
    return r


def recipe_hash(recipe: str | OrganismRecipe | TunedRecipe, seed: int = 0) -> str:
    """sha256 (16 hex) of the recipe's fields and BUILD_VERSION; never of times or paths."""
    r = get_recipe(recipe, seed) if isinstance(recipe, str) else recipe
    blob = json.dumps({"fields": dataclasses.asdict(r), "build_version": BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
