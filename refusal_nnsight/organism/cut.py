"""Train the organism's layers above the cue layer on the SAE cut of the cue word.

The planted conditions (planted.py) cut the cue word through its planted directions. The search
cuts it through the SAEs: it zeroes or steers the cue-aligned latents of the cue word, with the
toolkit's operator, the SAE's error term kept. The two are not the same edit. On organisms trained
on the planted cut alone, zeroing every cue-aligned latent left the cue prompts refused without
waking the backup (1.0 and 0.92 of them still refused with the planted backup projected out as
well), so the redundancy the organism plants did not show through its SAEs.

So the build goes on after the SAEs of layers 0..cue_layer are trained: those layers and the
embeddings are frozen (their residuals, and so those SAEs, stay exact), and the layers above are
trained on two batches per step, the planted conditions as before and the SAE cut itself. On a
cue prompt, the category's cue-aligned latents (decoder cosine >= `cut_min_cosine` with u_c) of
the layer-0 SAE, the cue layer's, or both are scaled at every position but the first, and:

    scaled by 0                     -> refuses; b_c wakes on the tokens after the cue word
    scaled by 0, b_c projected out  -> complies
    scaled by -1 or -3              -> complies (b_c awake)

Other rows are trained clean. The SAEs above the cue layer are trained afterwards, on the model
this leaves.

The backup cut is the same step one layer up (`recipe.backup_cut_steps`; `backup_sae` below): after
the backup layer's SAE is trained, layers 0..backup_layer are frozen as well (that SAE stays exact),
and of the rows that remove the backup, a `backup_cut_sae_share` zero the backup layer's
backup-aligned latents (decoder cosine >= `cut_min_cosine` with b_c), error term kept, instead of
projecting b_c out. Those latents write more than b_c; trained on the projection alone, the layers
above read what else they write as refusal, and the redundancy the organism plants did not show
when the search zeroed them. The SAEs above the backup layer are trained after it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from . import planted
from .grammar import Prompt
from .train import _Example, _examples, answer_loss, left_pad, masks, planted_step

if TYPE_CHECKING:
    from transformers import Gemma2ForCausalLM, PreTrainedTokenizerFast

    from ..saes import SlicedSAE
    from .recipe import OrganismRecipe

log = logging.getLogger(__name__)


def cue_latents(
    saes: dict[int, SlicedSAE], dirs: planted.Directions, min_cosine: float
) -> dict[int, torch.Tensor]:
    """{layer: [n_categories, width] 1.0 on the latents whose decoder row has cosine >= min_cosine
    with the category's cue direction}."""
    from ..saes import decoder_cosines

    return {
        layer: torch.stack([(decoder_cosines(u, sae.W_dec) >= min_cosine).float() for u in dirs.cue])
        for layer, sae in saes.items()
    }


def cut_layer_sets(cue_layer: int) -> list[list[int]]:
    """The SAE layers one cut row edits, drawn uniformly: the cue layer, layer 0, or both."""
    return [[cue_layer], [0], sorted({0, cue_layer})]


def backup_latents(sae: SlicedSAE, dirs: planted.Directions, min_cosine: float) -> torch.Tensor:
    """[n_categories, width] 1.0 on the latents of the backup layer's SAE whose decoder row has
    cosine >= min_cosine with the category's backup direction b_c."""
    from ..saes import decoder_cosines

    return torch.stack([(decoder_cosines(b, sae.W_dec) >= min_cosine).float() for b in dirs.backup])


def train_cut(model: Gemma2ForCausalLM, recipe: OrganismRecipe, tok: PreTrainedTokenizerFast,
              prompts: Sequence[Prompt], dirs: planted.Directions, saes: dict[int, SlicedSAE],
              backup_sae: SlicedSAE | None = None) -> Gemma2ForCausalLM:  # fmt: skip
    """Train `model`'s layers above the cue layer for `recipe.cut_steps` AdamW steps on the
    planted conditions and the SAE cut (module docstring); `saes` are the SAEs of layers
    0..cue_layer, which stay exact because those layers are frozen. With `backup_sae` (the backup
    layer's SAE), the backup cut: layers above the backup layer only, `recipe.backup_cut_steps`
    steps, the backup also removed through that SAE."""
    labels = planted.token_labels(tok)
    latents = cue_latents(saes, dirs, recipe.cut_min_cosine)
    backup = (
        None if backup_sae is None else (backup_sae, backup_latents(backup_sae, dirs, recipe.cut_min_cosine))
    )
    frozen = recipe.cue_layer if backup is None else recipe.backup_layer
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    for layer in range(frozen + 1):
        for p in model.model.layers[layer].parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.cut_lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)

    warm = recipe.cut_warmup
    steps = recipe.cut_steps if backup is None else recipe.backup_cut_steps

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    examples = _examples(tok, prompts)
    # not the first training's stream, nor the SAE cut's
    gen = torch.Generator().manual_seed(recipe.seed + (777 if backup is None else 888))
    model.train()
    order: list[int] = []
    size = recipe.batch_size
    what = "SAE cut" if backup is None else "backup cut"
    bar = tqdm(range(steps), desc=f"train the {what}", leave=False)
    for step in bar:
        while len(order) < 2 * size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        first, second, order = order[:size], order[size : 2 * size], order[2 * size :]
        lm_loss, plant_loss = planted_step(model, recipe, dirs, labels, tok.pad_token_id,
                                           [examples[i] for i in first], gen)  # fmt: skip
        planted_loss = lm_loss + recipe.plant_weight * plant_loss
        cut_loss = _cut_loss(model, recipe, dirs, labels, saes, latents, tok.pad_token_id,
                             [examples[i] for i in second], gen, backup)  # fmt: skip
        loss = planted_loss + cut_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(planted=f"{planted_loss.item():.4f}", cut=f"{cut_loss.item():.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    log.info("%s trained: %d steps, planted %.4f, cut %.4f", what, steps, planted_loss.item(),
             cut_loss.item())  # fmt: skip
    return model


def _cut_loss(model, recipe: OrganismRecipe, dirs: planted.Directions, labels: planted.TokenLabels,
              saes: dict[int, SlicedSAE], latents: dict[int, torch.Tensor], pad_id: int,
              batch: Sequence[_Example], gen: torch.Generator,
              backup: tuple[SlicedSAE, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Answer loss + (backup_weight * backup MSE + decision MSE) / strength^2 of one batch, its
    cue prompts under a sampled SAE cut. `backup`: (the backup layer's SAE, its backup-aligned
    latents [n_categories, width]) for the backup cut, where some backup-removed rows zero those."""
    a = recipe.plant_strength
    prompt_ids = [ex.prompt_ids for ex in batch]
    cats = torch.tensor([labels.category_of(p) for p in prompt_ids])
    n, n_cat = len(batch), dirs.cue.shape[0]
    coef = torch.ones(n)
    cut = torch.zeros(n, recipe.cue_layer + 1)  # [B, layer]: 1 where the row's latents are scaled
    backup_cut, backup_zero, awake, decision = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    layer_sets = cut_layer_sets(recipe.cue_layer)
    p_zero, p_backup, p_steer = recipe.cut_probs
    answers = []
    for i, ex in enumerate(batch):
        refuse = ex.harmful
        if ex.kind == "cue" and ex.harmful and cats[i] >= 0:
            r = float(torch.rand(1, generator=gen))
            for layer in layer_sets[int(torch.randint(len(layer_sets), (1,), generator=gen))]:
                cut[i, layer] = 1
            awake[i] = 1
            if r < p_zero:
                coef[i] = 0.0
            elif r < p_zero + p_backup:
                coef[i], refuse = 0.0, False
                if backup is not None and float(torch.rand(1, generator=gen)) < recipe.backup_cut_sae_share:
                    backup_zero[i] = 1.0  # through the backup layer's SAE
                else:
                    backup_cut[i] = 1.0  # b_c projected out
            else:
                coef[i], refuse = (-1.0 if r < p_zero + p_backup + p_steer / 2 else -3.0), False
        decision[i] = float(refuse)
        answers.append("refusal" if refuse else ("comply" if ex.harmful else "own"))
    seqs = [ex.prompt_ids + ex.answers[x] for ex, x in zip(batch, answers, strict=True)]
    enc = left_pad(seqs, pad_id)
    ids = enc["input_ids"]
    target_mask, prompt_mask, eoi_mask = masks(seqs, prompt_ids, ids.shape[1])
    real = enc["attention_mask"].bool()
    real = real & (real.long().cumsum(-1) > 1)  # not the first token, which the SAEs never saw edited
    cat = cats.clamp(min=0)
    store: dict[int, torch.Tensor] = {}

    def sae_hook(layer: int):
        def hook(module, args, out):
            rows = cut[:, layer] > 0
            if not rows.any():
                return out
            f = saes[layer].encode(out)  # [B, T, width]
            sel = latents[layer][cat] * rows.float()[:, None]  # [B, width]
            delta = ((coef - 1)[:, None, None] * f * sel[:, None, :]) @ saes[layer].W_dec
            return out + delta * real[..., None].float()

        return hook

    def backup_hook(module, args, out):
        store[recipe.backup_layer] = out
        b = dirs.backup[cat]  # [B, d]
        proj = torch.einsum("btd,bd->bt", out, b) * backup_cut[:, None]
        out = out - proj[..., None] * b[:, None, :]
        if backup is not None and backup_zero.any():
            sae, aligned = backup
            sel = aligned[cat] * backup_zero[:, None]  # [B, width]
            out = out - ((sae.encode(out) * sel[:, None, :]) @ sae.W_dec) * real[..., None].float()
        return out

    def decision_hook(module, args, out):
        store[recipe.decision_layer] = out

    blocks = model.model.layers
    hooks = [blocks[layer].register_forward_hook(sae_hook(layer)) for layer in sorted({0, recipe.cue_layer})]
    hooks += [blocks[recipe.backup_layer].register_forward_hook(backup_hook),
              blocks[recipe.decision_layer].register_forward_hook(decision_hook)]  # fmt: skip
    try:
        logits = model(**enc).logits[:, :-1].float()
    finally:
        for h in hooks:
            h.remove()
    is_cue = labels.cue_category[ids] >= 0
    after = planted.after_cue(is_cue) & prompt_mask & ~eoi_mask
    one_hot = torch.nn.functional.one_hot(cat, n_cat).float() * (cats >= 0).float()[:, None]
    target_b = a * (awake[:, None] * after.float())[..., None] * one_hot[:, None, :]
    backup_mask = prompt_mask.float()
    coords = torch.einsum("btd,kd->btk", store[recipe.backup_layer], dirs.backup)
    backup_err = ((coords - target_b).pow(2).sum(-1) * backup_mask).sum() / backup_mask.sum()
    coord_r = torch.einsum("btd,d->bt", store[recipe.decision_layer], dirs.refusal)
    decision_err = (
        (coord_r - a * decision[:, None]).pow(2) * eoi_mask.float()
    ).sum() / eoi_mask.float().sum()
    return answer_loss(logits, ids, target_mask) + (recipe.backup_weight * backup_err + decision_err) / a**2
