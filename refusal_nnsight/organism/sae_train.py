"""JumpReLU SAEs on the organism's residual stream, trained with sae-lens.

Activations are `blocks.{L}.hook_resid_post` = the output of HF `model.layers[L]`, read through
nnsight exactly as the toolkit reads them later, on chat prompt + answer tokens, pad positions
dropped, float32. One SAE per layer is trained with `sae_lens.SAETrainer` on an iterator of
those activations and saved in sae-lens's own format, so `SAE.load_from_disk` gives back a
JumpReLU SAE that takes raw residuals (`apply_b_dec_to_input=False`, the Gemma Scope convention;
any input scaling used for training is folded into the weights before saving).

sae_lens is imported inside functions: the import alone takes seconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nnsight
import torch
from transformers import Gemma2ForCausalLM, PreTrainedTokenizerFast

from ..judges import is_refusal
from .grammar import Prompt
from .train import encode_examples, generate, left_pad

if TYPE_CHECKING:
    from .recipe import OrganismRecipe

log = logging.getLogger(__name__)

MODEL_NAME = "refusal-organism"


def hook_names(layer: int) -> tuple[str, str]:
    """(sae-lens hook name, HF module path) of the residual after decoder layer `layer`."""
    return f"blocks.{layer}.hook_resid_post", f"model.layers.{layer}"


@torch.no_grad()
def collect_activations(
    model: Gemma2ForCausalLM, tok: PreTrainedTokenizerFast, prompts: Sequence[Prompt], batch_size: int = 256
) -> dict[int, torch.Tensor]:
    """Residuals after every decoder layer on prompt + answer tokens: {layer: [n_tokens, d_model]}.

    Read through nnsight (left padding, mask-derived position ids); pad positions are dropped.
    """
    from nnsight import TransformersModel

    lm = TransformersModel(model, tokenizer=tok)
    n_layers = model.config.num_hidden_layers
    seqs = [ids for ids, _ in encode_examples(tok, prompts)]
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(n_layers)}
    for i in range(0, len(seqs), batch_size):
        enc = left_pad(seqs[i : i + batch_size], tok.pad_token_id)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with lm.trace(batch):
            saved = nnsight.save([])  # nnsight 0.8: only saved objects leave the trace
            for layer in range(n_layers):
                saved.append(lm.model.layers[layer].output)
        keep = enc["attention_mask"].bool()  # [B, T]
        for layer, h in enumerate(saved):
            out[layer].append(h[keep].float())  # [n_real_tokens, d]
    return {layer: torch.cat(hs) for layer, hs in out.items()}


@torch.no_grad()
def collect_ablated_activations(
    model: Gemma2ForCausalLM,
    tok: PreTrainedTokenizerFast,
    prompts: Sequence[Prompt],
    recipe: OrganismRecipe,
    batch_size: int = 256,
) -> dict[int, torch.Tensor]:
    """Residuals after the layers above the cue layer with each prompt's cue word cut (the planted
    cue condition, scale 0 on half the prompts, -3 on the other half): {layer: [n_tokens, d_model]}.

    An SAE trained on clean activations alone has no latent for the dormant backup detectors, which
    never fire there; an SAE trained on a large corpus meets such features in other contexts. These
    activations stand in for those contexts.
    """
    from . import planted

    dirs = planted.directions_of(recipe)
    labels = planted.token_labels(tok)
    layers = (recipe.cue_layer, recipe.backup_layer, recipe.decision_layer)
    seqs = [ids for ids, _ in encode_examples(tok, prompts)]
    keep_layers = range(recipe.cue_layer + 1, recipe.n_layers)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in keep_layers}
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        n = len(chunk)
        enc = left_pad(chunk, tok.pad_token_id)
        cats = torch.tensor([labels.category_of(ids) for ids in chunk])
        edits = planted.RowEdits.uniform(cats, recipe.n_layers)
        edits.u = torch.where(torch.arange(i, i + n) % 2 == 0, 0.0, -3.0)  # zero-ablate half, steer half
        planted.with_cue_words(edits, enc["input_ids"], labels)
        store: dict[int, torch.Tensor] = {}
        captured: dict[int, torch.Tensor] = {}
        hooks = planted.install_hooks(model, dirs, edits, layers, recipe.plant_strength, store)
        hooks += [
            model.model.layers[layer].register_forward_hook(
                lambda m, a, o, layer=layer, captured=captured: captured.__setitem__(layer, o)
            )
            for layer in keep_layers
        ]
        try:
            model(**enc)
        finally:
            for h in hooks:
                h.remove()
        keep = enc["attention_mask"].bool()
        for layer in keep_layers:
            out[layer].append(captured[layer][keep].float())
    return {layer: torch.cat(hs) for layer, hs in out.items()}


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded shuffles of `acts` ([N, d]) in [batch_size, d] chunks (a sae-lens DataProvider)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(acts), generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield acts[idx]


def train_sae(acts: torch.Tensor, layer: int, recipe: OrganismRecipe):
    """Train one SAE (d_sae = sae_expansion * d_model) on raw residuals [N, d_model]: BatchTopK at
    layers 0..cue_layer when the recipe sets `sae_early_k` (`train_batchtopk`), else JumpReLU.

    The trainer sees z = (x - mean) * s with E||z||^2 = d_model, so the sparsity coefficient and
    the threshold init mean the same at every layer and the encoder need not first learn to
    cancel the residual stream's large mean. The affine map is folded into the weights
    afterwards (sae-lens `fold_activation_whitening`), so the saved SAE reads raw residuals.
    """
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    if recipe.sae_batchtopk_at(layer):
        return train_batchtopk(
            acts, layer, k=recipe.sae_early_k, expansion=recipe.sae_expansion, steps=recipe.sae_steps,
            batch_size=recipe.sae_batch_size, lr=recipe.sae_topk_lr, seed=recipe.seed,
        )  # fmt: skip
    d_in = acts.shape[1]
    mean, scale = _whitening(acts)
    z = (acts - mean) * scale
    torch.manual_seed(recipe.seed + 1000 + layer)
    cfg = JumpReLUTrainingSAEConfig(
        d_in=d_in,
        d_sae=recipe.sae_expansion * d_in,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=False,
        normalize_activations="none",
        # Gemma Scope 2's quadratic penalty around a target L0; DeepMind's STE (threshold only).
        l0_coefficient=recipe.sae_l0_coefficient,
        jumprelu_sparsity_loss_mode="quadratic",
        target_l0=recipe.sae_target_l0_at(layer),
        jumprelu_init_threshold=recipe.sae_init_threshold,
        jumprelu_bandwidth=recipe.sae_bandwidth,
        decoder_init_norm=recipe.sae_decoder_init_norm,
        l0_warm_up_steps=recipe.sae_steps // 5,
    )
    cfg.metadata.hook_name, cfg.metadata.hf_hook_name = hook_names(layer)
    cfg.metadata.model_name = MODEL_NAME
    tcfg = SAETrainerConfig(
        total_training_samples=recipe.sae_steps * recipe.sae_batch_size,
        train_batch_size_samples=recipe.sae_batch_size,
        lr=recipe.sae_lr,
        lr_end=recipe.sae_lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=recipe.sae_steps // 20,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = _batches(z, recipe.sae_batch_size, recipe.seed + layer)
    sae = SAETrainer(cfg=tcfg, sae=JumpReLUTrainingSAE(cfg), data_provider=data).fit()
    eye = torch.eye(d_in)
    sae.fold_activation_whitening(mean, eye * scale, eye / scale)  # raw residuals in and out
    return sae


def _whitening(acts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(mean, s) with E||(x - mean) * s||^2 = d for residuals [N, d]."""
    mean = acts.mean(0)
    return mean, math.sqrt(acts.shape[1] / ((acts - mean) ** 2).sum(-1).mean().item())


def train_batchtopk(
    acts: torch.Tensor, layer: int, k: int, expansion: int, steps: int, batch_size: int, lr: float, seed: int
):
    """A BatchTopK SAE (Bussmann et al. 2024, arXiv 2412.06410; k active latents per token on
    average over a batch) on raw residuals [N, d], trained on the whitened copy as `train_sae` and
    folded back. sae-lens saves it as a JumpReLU SAE whose threshold is the one learned in training,
    so every reader loads it as any other JumpReLU SAE."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    d = acts.shape[1]
    mean, scale = _whitening(acts)
    torch.manual_seed(seed + 1000 + layer)
    cfg = BatchTopKTrainingSAEConfig(
        d_in=d, d_sae=expansion * d, k=k, dtype="float32", device="cpu", apply_b_dec_to_input=False,
        normalize_activations="none", rescale_acts_by_decoder_norm=False, decoder_init_norm=0.1,
    )  # fmt: skip
    cfg.metadata.hook_name, cfg.metadata.hf_hook_name = hook_names(layer)
    cfg.metadata.model_name = MODEL_NAME
    tcfg = SAETrainerConfig(
        total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
        lr=lr, lr_end=lr / 10, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=steps // 20, device="cpu", logger=LoggingConfig(log_to_wandb=False),
        dead_feature_window=50,  # sae-lens's default (1000) is never reached in this short run
    )  # fmt: skip
    data = _batches((acts - mean) * scale, batch_size, seed + layer)
    sae = SAETrainer(cfg=tcfg, sae=BatchTopKTrainingSAE(cfg), data_provider=data).fit()
    eye = torch.eye(d)
    sae.fold_activation_whitening(mean, eye * scale, eye / scale)
    return sae


@torch.no_grad()
def sae_stats(sae, acts: torch.Tensor) -> dict[str, float]:
    """FVU = sum||x - x_hat||^2 / sum||x - mean||^2 and mean L0 of `sae` on raw residuals [N, d]."""
    f = sae.encode(acts)
    x_hat = sae.decode(f)
    fvu = ((acts - x_hat) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    return {
        "fvu": fvu.item(),
        "l0": (f > 0).float().sum(-1).mean().item(),
        "dead_frac": ((f > 0).sum(0) == 0).float().mean().item(),
    }


def save_sae(sae, directory: Path) -> None:
    """sae-lens inference format: cfg.json + sae_weights.safetensors. cfg.json is rewritten with
    sorted keys: sae-lens's key order changes from one process to the next, and two builds of one
    recipe should be byte-identical files."""
    from .store import canonical_json

    # a training SAE saves its inference form; a loaded (inference) one saves itself
    (sae.save_inference_model if hasattr(sae, "save_inference_model") else sae.save_model)(str(directory))
    cfg = Path(directory) / "cfg.json"
    cfg.write_bytes(canonical_json(cfg.read_bytes()))


def load_sae(directory: Path):
    """The saved SAE as a sae-lens inference `JumpReLUSAE` (float32, CPU)."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(directory), device="cpu")


@torch.no_grad()
def splice_agreement(
    model: Gemma2ForCausalLM,
    tok: PreTrainedTokenizerFast,
    saes: dict[int, object],
    prompts: Sequence[Prompt],
    clean: Sequence[str] | None = None,
) -> dict[int, float]:
    """Per layer: fraction of prompts whose refuse/comply verdict (greedy generation, substring
    judge) is unchanged when that layer's residual is replaced by its SAE reconstruction at every
    position. `clean` are the unspliced completions, if already computed."""
    texts = [p.text for p in prompts]
    clean = clean if clean is not None else generate(model, tok, texts)
    base = [is_refusal(c) for c in clean]
    out = {}
    from ..interventions import Reconstruction
    from ..saes import SlicedSAE

    for layer, sae in saes.items():
        # the toolkit's own operator: x -> D(E(x)), the error term dropped, at every position
        splice = Reconstruction(SlicedSAE.from_sae(sae, layer))
        handle = model.model.layers[layer].register_forward_hook(
            lambda m, a, o, splice=splice: splice.edit(o.float(), None).to(o.dtype)
        )
        try:
            spliced = generate(model, tok, texts)
        finally:
            handle.remove()
        out[layer] = sum(b == is_refusal(s) for b, s in zip(base, spliced, strict=True)) / len(base)
    return out
