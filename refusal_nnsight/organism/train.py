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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from ..judges import is_refusal
from .grammar import Prompt, response_for
from .tokenizer import END_OF_TURN, chat_prompt

if TYPE_CHECKING:
    from .build import OrganismRecipe

log = logging.getLogger(__name__)


def model_config(recipe: OrganismRecipe, tok: PreTrainedTokenizerFast) -> Gemma2Config:
    """A Gemma-2 config scaled down to the recipe; everything else keeps Gemma-2's defaults
    (softcapping 50/30, alternating sliding/global attention, tied embeddings)."""
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
        attn_implementation="eager",  # HF's advice for Gemma-2 (attention softcapping)
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


def _resid_dropout_hooks(model: Gemma2ForCausalLM, p: float) -> list:
    """Dropout on every decoder layer's output (the residual stream), training only."""
    if p <= 0:
        return []

    def hook(module, args, output):
        return F.dropout(output, p, training=module.training)

    return [layer.register_forward_hook(hook) for layer in model.model.layers]


def train_model(
    recipe: OrganismRecipe, tok: PreTrainedTokenizerFast, prompts: Sequence[Prompt]
) -> Gemma2ForCausalLM:
    """Train a fresh model on `prompts` (the train split) for `recipe.steps` AdamW steps."""
    with deterministic(recipe.seed):
        model = Gemma2ForCausalLM(model_config(recipe, tok))
        model.generation_config = generation_config(tok)
        examples = encode_examples(tok, prompts)
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
        hooks = _resid_dropout_hooks(model, recipe.resid_dropout)
        model.train()
        order: list[int] = []
        bar = tqdm(range(recipe.steps), desc="train organism", leave=False)
        for step in bar:
            if len(order) < recipe.batch_size:  # fixed, seeded data order: epoch after epoch
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
            batch = [examples[i] for i in idx]
            enc = left_pad([ids for ids, _ in batch], tok.pad_token_id)
            # Loss mask: predict every answer token (position t predicts token t+1).
            width = enc["input_ids"].shape[1]
            target_mask = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
            for i, (ids, n_prompt) in enumerate(batch):
                target_mask[i, width - len(ids) + n_prompt :] = True
            logits = model(**enc).logits[:, :-1].float()  # [B, T-1, V]
            targets = enc["input_ids"][:, 1:].masked_fill(~target_mask[:, 1:], -100)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        for h in hooks:
            h.remove()
        model.eval()
        log.info("organism trained: %d steps, final loss %.4f", recipe.steps, loss.item())
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
