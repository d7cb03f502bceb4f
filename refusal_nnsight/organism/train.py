"""Train the organism: a small Gemma-2 chat model that refuses the grammar's harmful requests.

Each training example is the chat-formatted request followed by `response_for(prompt)` and
`<end_of_turn>`; the loss is on the response tokens only (the answer is a function of the
request, the request itself is not something the model should learn to write). Batches are
left-padded with mask-derived position ids, exactly as HF `generate` and nnsight feed the model,
so the trained model sees the same positions at inference.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from ..judges import is_refusal
from . import planted
from .grammar import HARM_COMPLIANCE, REFUSAL, Prompt, response_for
from .tokenizer import END_OF_TURN, EOI_SUFFIX_TOKENS, chat_prompt

if TYPE_CHECKING:
    from .recipe import OrganismRecipe

log = logging.getLogger(__name__)


def model_config(recipe: OrganismRecipe, tok: PreTrainedTokenizerFast) -> Gemma2Config:
    """A Gemma-2 config scaled down to the recipe; everything else keeps Gemma-2's defaults
    (softcapping 50/30, alternating sliding/global attention, tied embeddings)."""
    # HF's advice for Gemma-2 (attention softcapping); an argument of every config, missing from
    # Gemma2Config's typed signature
    eager: dict[str, Any] = {"attn_implementation": "eager"}
    return Gemma2Config(
        vocab_size=len(tok),
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        head_dim=recipe.head_dim,
        query_pre_attn_scalar=recipe.head_dim,  # Gemma-2 scales queries by head_dim ** -0.5
        max_position_embeddings=256,
        sliding_window=32,  # below the longest sequences (~45 tokens): sliding layers see a local window
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        **eager,
    )


def generation_config(tok: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy decoding that stops at `<end_of_turn>` (the answer's end) as well as `<eos>`."""
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=24,
        eos_token_id=[tok.eos_token_id, eot],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )


def encode_examples(tok: PreTrainedTokenizerFast, prompts: Sequence[Prompt]) -> list[tuple[list[int], int]]:
    """(token ids of chat prompt + answer + <end_of_turn>, number of prompt tokens) per prompt."""
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    out = []
    for p in prompts:
        prompt_ids = tok(chat_prompt(tok, p.text), add_special_tokens=False)["input_ids"]
        answer_ids = tok(response_for(p), add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + answer_ids + [eot], len(prompt_ids)))
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to [B, T]; position ids count real tokens only (HF generate's convention)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


@contextlib.contextmanager
def deterministic(seed: int):
    """Seed torch and force deterministic kernels for the duration (restored afterwards)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@dataclass(frozen=True)
class _Example:
    prompt_ids: list[int]
    answers: dict[str, list[int]]  # "refusal" | "own" | "comply": answer ids + <end_of_turn>
    harmful: bool
    kind: str


def _examples(tok: PreTrainedTokenizerFast, prompts: Sequence[Prompt]) -> list[_Example]:
    eot = tok.convert_tokens_to_ids(END_OF_TURN)

    assert isinstance(eot, int)  # one token
    eot_id = eot

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    refusal, comply = ids(REFUSAL) + [eot_id], ids(HARM_COMPLIANCE) + [eot_id]
    return [
        _Example(
            ids(chat_prompt(tok, p.text)),
            {"refusal": refusal, "own": ids(response_for(p)) + [eot_id], "comply": comply},
            p.harmful,
            p.kind,
        )
        for p in prompts
    ]


def _sample_edits(recipe: OrganismRecipe, batch: Sequence[_Example], cats: torch.Tensor,
                  gen: torch.Generator) -> tuple[planted.RowEdits, list[str], torch.Tensor, torch.Tensor]:  # fmt: skip
    """One condition per row: the row edits, each row's answer, its decision target, its loss mask.

    decision [B]: 1 if the refusal decision (R at the decision layer, before that layer's own
    edit) should be on; decided [B]: whether that target is defined (not under R ablation from
    layer 0, which removes the inputs the decision is trained to read).
    """
    n = len(batch)
    probs = torch.tensor(recipe.condition_probs)
    cond = torch.multinomial(probs, n, replacement=True, generator=gen)
    coin = torch.rand(n, generator=gen)
    u, b, v, q = (torch.ones(n) for _ in range(4))
    r_from = torch.full((n,), recipe.n_layers)
    r_until = torch.full((n,), recipe.n_layers)
    r_add = torch.full((n,), -1)
    answers, decision = [], torch.zeros(n)
    decided = torch.ones(n, dtype=torch.bool)
    for i, ex in enumerate(batch):
        name = planted.CONDITIONS[int(cond[i])]
        has_cue = bool(cats[i] >= 0)
        refuse = ex.harmful  # the clean decision
        if name == "u_zero":
            u[i] = 0.0  # the backup wakes and keeps the decision
        elif name == "u_neg":
            u[i] = -1.0 if coin[i] < 0.5 else -3.0
            refuse = refuse and not (has_cue and ex.kind == "cue")
        elif name == "ub_zero":
            u[i], b[i] = 0.0, 0.0
            refuse = refuse and not (has_cue and ex.kind == "cue")
        elif name == "vq_ablate":
            scale = 0.0 if coin[i] < 0.5 else -3.0
            if torch.rand(1, generator=gen) < 0.5:
                v[i] = scale
            else:
                q[i] = scale
            refuse = refuse and ex.kind != "compositional"
        decision[i] = float(refuse)
        if name == "r_all":
            r_from[i] = 0
            decided[i] = False
            refuse = False
        elif name == "r_late":
            r_from[i] = recipe.decision_layer
            refuse = False
        elif name == "r_add":
            r_add[i] = recipe.decision_layer + int(coin[i] < 0.5)
            refuse = True
        elif name == "r_early":  # the decision is read from the harm features' own parts
            r_from[i], r_until[i] = 0, recipe.decision_layer
        answers.append("refusal" if refuse else ("comply" if ex.harmful else "own"))
    edits = planted.RowEdits(cats, u, b, v, q, r_from, r_add, r_until=r_until)
    return edits, answers, decision, decided


def _planted_loss(recipe: OrganismRecipe, dirs: planted.Directions, labels: planted.TokenLabels,
                  store: dict, ids: torch.Tensor, prompt_mask: torch.Tensor, eoi_mask: torch.Tensor,
                  edits: planted.RowEdits, decision: torch.Tensor, decided: torch.Tensor,
                  groups: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """MSE (in units of strength^2) between the planted coordinates of each layer's pre-edit output
    and their targets: on prompt tokens at the cue layer (except a cue word cut at layer 0, which
    is gone there), on the prompt tokens after the cue word at the backup layer (eoi positions
    excluded), at the eoi positions at the decision layer; plus the eoi invariance and the
    off-span penalty on labelled words at layers 0..backup_layer."""
    a = recipe.plant_strength
    early = (edits.r_from > 0).float()[:, None]  # rows whose cue layer inputs are untouched
    # cue layer: coordinates along R, each e_c, e_v, e_q of A * (u_c[t] + v[t] + q[t])
    cat = labels.cue_category[ids]  # [B, T]
    is_cue = cat >= 0
    target = torch.zeros(*ids.shape, dirs.refusal.shape[0])
    target[is_cue] += a * dirs.cue[cat[is_cue]]
    target += a * labels.verb[ids].float()[..., None] * dirs.verb
    target += a * labels.person[ids].float()[..., None] * dirs.person
    basis = torch.cat([dirs.refusal[None], dirs.cue, dirs.verb[None], dirs.person[None]])  # spans them all
    h = store[recipe.cue_layer]
    err = torch.einsum("btd,kd->btk", h - target, basis).pow(2).sum(-1)
    mask = prompt_mask.float() * early
    assert edits.word_at_first is not None  # the training batches always carry their cue words
    cut_first = (edits.word_at_first & (edits.u != 1)).float()[:, None]
    cue_mask = mask * (1 - cut_first * is_cue.float())
    loss = (err * cue_mask).sum() / cue_mask.sum().clamp(min=1)
    # layers below the cue layer: the same planted coordinates on the labelled words, so that no
    # part the words share (along other categories' cues) reaches an SAE there
    labelled = is_cue | labels.verb[ids] | labels.person[ids]
    lmask = mask * labelled.float()  # labelled words, for this term and the off-span one below
    if recipe.early_pin_weight > 0:
        for layer in range(recipe.cue_layer):
            e = torch.einsum("btd,kd->btk", store[layer] - target, basis).pow(2).sum(-1)
            loss = loss + recipe.early_pin_weight * (e * lmask).sum() / lmask.sum().clamp(min=1)
    # backup layer: b_c = A on the prompt tokens after the row's first cue word, eoi positions
    # excluded, while the word is cut (scale <= 0), else 0 on every prompt token, eoi included
    after = planted.after_cue(is_cue) & prompt_mask & ~eoi_mask
    row_cat = cat.max(-1).values  # the row's category (-1: none)
    awake = (edits.u <= 0).float()[:, None] * after.float() * (row_cat >= 0).float()[:, None]
    one_hot = torch.nn.functional.one_hot(row_cat.clamp(min=0), dirs.backup.shape[0]).float()  # [B, k]
    target_b = a * awake[..., None] * one_hot[:, None, :]
    coords = torch.einsum("btd,kd->btk", store[recipe.backup_layer], dirs.backup)
    err_b = (coords - target_b).pow(2).sum(-1)
    loss = loss + recipe.backup_weight * (err_b * mask).sum() / mask.sum().clamp(min=1)
    # decision layer: R = A * decision at the eoi positions
    r = torch.einsum("btd,d->bt", store[recipe.decision_layer], dirs.refusal)
    dmask = eoi_mask.float() * decided.float()[:, None]
    loss = loss + ((r - a * decision[:, None]).pow(2) * dmask).sum() / dmask.sum().clamp(min=1)
    loss = loss + _eoi_invariance(recipe, store, eoi_mask, groups, early, dirs.refusal)
    # labelled words at layers 0..backup_layer: nothing off the planted span
    span, _ = torch.linalg.qr(torch.cat([basis, dirs.backup]).T)  # [d, k] orthonormal
    for layer in range(recipe.backup_layer + 1):
        hl = store[layer]
        rest = hl - torch.einsum("btk,dk->btd", torch.einsum("btd,dk->btk", hl, span), span)
        loss = loss + recipe.off_span_weight * (rest.pow(2).sum(-1) * lmask).sum() / lmask.sum().clamp(min=1)
    return loss / a**2


def _eoi_invariance(recipe: OrganismRecipe, store: dict, eoi_mask: torch.Tensor, groups: torch.Tensor,
                    early: torch.Tensor, refusal: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Squared distance, at each eoi position of every layer up to the decision layer, between the
    mean residual of each harm group (a cue category, or the compositional pairs) and that of the
    harmless rows in the batch; at the decision layer, of the part orthogonal to R.

    Without it the model reads the request from the eoi positions already in layer 0 (its cue words
    are single tokens), and the search finds that early eoi feature instead of the cue features:
    harm detection would not be upstream of the refusal decision. At the decision layer the
    difference of means is then R alone, so the refusal direction Arditi's selection reads there
    is the planted one. groups [B]: -1 harmless, else group.
    """
    n_eoi = int(eoi_mask[0].sum())
    keep = early[:, 0] > 0
    harmless = keep & (groups < 0)
    if not harmless.any():
        return torch.zeros(())
    loss = torch.zeros(())
    for layer in range(recipe.decision_layer + 1):
        h = store[layer][eoi_mask].view(eoi_mask.shape[0], n_eoi, -1)  # [B, n_eoi, d]
        if layer == recipe.decision_layer:  # there, the decision itself (along R) and nothing else
            h = h - torch.einsum("bpd,d->bp", h, refusal)[..., None] * refusal
        base = h[harmless].mean(0)
        for g in groups[keep & (groups >= 0)].unique():
            loss = loss + (h[keep & (groups == g)].mean(0) - base).pow(2).sum(-1).mean()
    return recipe.eoi_invariance_weight * loss


def masks(seqs: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]],
          width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """[B, width] bool masks of a left-padded batch of (prompt + answer) rows: the answer tokens
    (the loss targets), the prompt tokens, and the prompt's eoi positions."""
    n_eoi = len(EOI_SUFFIX_TOKENS)
    target_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    prompt_mask = torch.zeros_like(target_mask)
    eoi_mask = torch.zeros_like(target_mask)
    for i, (seq, p) in enumerate(zip(seqs, prompt_ids, strict=True)):
        start = width - len(seq)
        target_mask[i, start + len(p) :] = True
        prompt_mask[i, start : start + len(p)] = True
        eoi_mask[i, start + len(p) - n_eoi : start + len(p)] = True
    return target_mask, prompt_mask, eoi_mask


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token `logits` [B, T-1, V] on the answer tokens only."""
    targets = input_ids[:, 1:].masked_fill(~target_mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def planted_step(model: Gemma2ForCausalLM, recipe: OrganismRecipe, dirs: planted.Directions,
                 labels: planted.TokenLabels, pad_id: int, batch: Sequence[_Example],
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(answer loss, planted loss) of one batch under its sampled planted conditions."""
    prompt_ids = [ex.prompt_ids for ex in batch]
    cats = torch.tensor([labels.category_of(p) for p in prompt_ids])
    edits, answers, decision, decided = _sample_edits(recipe, batch, cats, gen)
    seqs = [ex.prompt_ids + ex.answers[a] for ex, a in zip(batch, answers, strict=True)]
    enc = left_pad(seqs, pad_id)
    planted.with_cue_words(edits, enc["input_ids"], labels)
    target_mask, prompt_mask, eoi_mask = masks(seqs, prompt_ids, enc["input_ids"].shape[1])
    store: dict[int, torch.Tensor] = {}
    layers = (recipe.cue_layer, recipe.backup_layer, recipe.decision_layer)
    hooks = planted.install_hooks(model, dirs, edits, layers, recipe.plant_strength, store)
    try:
        logits = model(**enc).logits[:, :-1].float()  # [B, T-1, V]
    finally:
        for h in hooks:
            h.remove()
    groups = torch.tensor(
        [(int(c) if ex.kind == "cue" else len(dirs.cue)) if ex.harmful else -1 for ex, c in zip(batch, cats, strict=True)]
    )  # fmt: skip
    plant_loss = _planted_loss(recipe, dirs, labels, store, enc["input_ids"], prompt_mask, eoi_mask, edits,
                               decision, decided, groups)  # fmt: skip
    return answer_loss(logits, enc["input_ids"], target_mask), plant_loss


def train_model(
    recipe: OrganismRecipe, tok: PreTrainedTokenizerFast, prompts: Sequence[Prompt]
) -> Gemma2ForCausalLM:
    """Train a fresh model on `prompts` (the train split) for `recipe.steps` AdamW steps, with the
    planted mechanisms of planted.py (answer loss + planted-coordinate loss under interventions)."""
    with deterministic(recipe.seed):
        model = Gemma2ForCausalLM(model_config(recipe, tok))
        model.generation_config = generation_config(tok)
        examples = _examples(tok, prompts)
        dirs = planted.directions_of(recipe)
        labels = planted.token_labels(tok)
        gen = torch.Generator().manual_seed(recipe.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": recipe.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=recipe.lr,
            betas=(0.9, 0.98),
        )

        def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
            if step < recipe.warmup:
                return (step + 1) / recipe.warmup
            t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        model.train()
        order: list[int] = []
        bar = tqdm(range(recipe.steps), desc="train organism", leave=False)
        for step in bar:
            if len(order) < recipe.batch_size:  # fixed, seeded data order: epoch after epoch
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
            batch = [examples[i] for i in idx]
            lm_loss, plant_loss = planted_step(model, recipe, dirs, labels, tok.pad_token_id, batch, gen)
            loss = lm_loss + recipe.plant_weight * plant_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(lm=f"{lm_loss.item():.4f}", plant=f"{plant_loss.item():.4f}")
                log.debug(
                    "step %d: answer loss %.4f, planted loss %.4f", step, lm_loss.item(), plant_loss.item()
                )
        model.eval()
        log.info(
            "organism trained: %d steps, answer loss %.4f, planted loss %.4f",
            recipe.steps, lm_loss.item(), plant_loss.item(),
        )  # fmt: skip
    return model


@torch.no_grad()
def generate(
    model: Gemma2ForCausalLM,
    tok: PreTrainedTokenizerFast,
    requests: Sequence[str],
    max_new_tokens: int = 20,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of chat-formatted `requests`."""
    config = copy.deepcopy(model.generation_config)  # greedy, stops at <end_of_turn>
    config.max_new_tokens = max_new_tokens
    out: list[str] = []
    for i in range(0, len(requests), batch_size):
        chunk = [chat_prompt(tok, r) for r in requests[i : i + batch_size]]
        enc = tok(chunk, add_special_tokens=False, padding=True, return_tensors="pt")
        ids = model.generate(**enc, generation_config=config)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def refusal_rates(prompts: Sequence[Prompt], completions: Sequence[str]) -> dict[str, float]:
    """Refusal rate (substring judge) on harmful, harmless and look-alike prompts."""
    refused = [is_refusal(c) for c in completions]

    def rate(sel) -> float:
        r = [x for p, x in zip(prompts, refused, strict=True) if sel(p)]
        return sum(r) / max(1, len(r))

    return {
        "harmful": rate(lambda p: p.harmful),
        "harmless": rate(lambda p: not p.harmful),
        "lookalike": rate(lambda p: p.kind == "lookalike"),
        "compositional_harmless": rate(lambda p: p.kind == "compositional" and not p.harmful),
    }
