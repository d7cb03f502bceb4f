"""Forward passes that read the last position: refusal score and next-token distributions.

Refusal score (Arditi et al. 2024; SPEC.md "Scores and judges"): with p(R) the summed
next-token probability of the refusal tokens at the last prompt position,
s = log p(R) − log(1 − p(R)); s > 0 means the model is about to refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import interventions
from .backends import run_chunks, run_tasks
from .errors import NonFiniteError
from .interventions import Edit
from .models import Batch, LoadedModel

log = logging.getLogger(__name__)


def refusal_score_from_logits(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """logits [N, V] → s [N] = log p(R) − log(1 − p(R)), computed stably in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    log_pr = torch.logsumexp(logp[:, list(refusal_ids)], dim=-1)
    # log(1 − p) = log1p(−exp(log p)), clamped so p → 1 stays finite.
    log_not = torch.log1p(-log_pr.exp().clamp(max=1 - 1e-7))
    return log_pr - log_not


def kl_divergence(clean_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ edited) of next-token distributions, [N, V] each → [N] (Arditi's side-effect check)."""
    p = torch.log_softmax(clean_logits.float(), -1)
    q = torch.log_softmax(edited_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def _as_batch(model: LoadedModel, prompts: Batch | Sequence[str]) -> Batch:
    return prompts if isinstance(prompts, Batch) else model.tokenize(list(prompts))


def last_logits(
    model: LoadedModel,
    prompts: Batch | Sequence[str],
    edits: Sequence[Edit] = (),
    batch_size: int = 32,
    what: str = "logits",
    progress: str | None = None,
    variants: int | None = None,
) -> torch.Tensor:
    """Next-token logits [N, V] (what="logits") or refusal scores [N] (what="score") at position −1.

    `edits` may carry per-row masks over all N rows; they are sliced per chunk. Only the last
    position's logits are computed (`logits_to_keep=1`), and only the score leaves the trace
    when what="score". `variants=N` with a one-prompt batch evaluates N edit variants of that
    prompt, computing the layers below the first edited one once (interventions.apply expand_to).
    """
    batch = _as_batch(model, prompts)
    n, one = _logits_task(model, batch, edits, what, variants)
    return _checked(model, batch, edits, variants, run_chunks(model, n, batch_size, one, progress))


def refusal_scores_many(
    model: LoadedModel, requests: Sequence[tuple[Batch, Sequence[Edit], int]], batch_size: int = 32
) -> list[torch.Tensor]:
    """Refusal scores [V] for each (one-prompt batch, edits over V variants, V) request, as
    last_logits(variants=V) computes them; on a remote backend all requests are ONE job."""
    tasks = [_logits_task(model, batch, edits, "score", v) for batch, edits, v in requests]
    outs = run_tasks(model, tasks, batch_size)
    return [_checked(model, b, e, v, out) for (b, e, v), out in zip(requests, outs, strict=True)]


def _logits_task(model: LoadedModel, batch: Batch, edits: Sequence[Edit], what: str, variants: int | None):
    """(n rows, fn(i0, i1) → the chunk's scores or logits): one trace per chunk."""
    if variants is not None and len(batch) != 1:
        raise ValueError("variants= needs a batch of one prompt")
    n = len(batch) if variants is None else variants

    def one(i0: int, i1: int) -> torch.Tensor:
        chunk = batch.rows(i0, i1) if variants is None else batch
        expand = None if variants is None else i1 - i0
        with torch.no_grad(), model.lm.trace(**chunk.model_inputs(model.device), logits_to_keep=1):
            interventions.apply(
                model, interventions.rows(edits, i0, i1), chunk.attention_mask, expand_to=expand
            )
            logits = model.lm.output.logits[:, -1, :]
            out = refusal_score_from_logits(logits, model.refusal_ids) if what == "score" else logits.float()
            saved = out.cpu().save()
        return saved

    return n, one


def _checked(model: LoadedModel, batch: Batch, edits, variants: int | None, outs: list) -> torch.Tensor:
    result = torch.cat(outs) if outs else torch.empty(0)
    if not torch.isfinite(result).all():
        rows = batch if variants is None else batch.repeat(variants)
        raise NonFiniteError(_where_nonfinite(model, rows, edits))
    return result


def _where_nonfinite(model: LoadedModel, batch: Batch, edits: Sequence[Edit]) -> str:
    """Name the first layer whose residual holds NaN/inf (the Gemma-2 failure of the reference
    code surfaced as a silent NaN refusal score)."""
    rows = batch.rows(0, min(len(batch), 8))

    def one(i0: int, i1: int) -> torch.Tensor:
        with torch.no_grad(), model.lm.trace(**rows.model_inputs(model.device)):
            got = interventions.apply(model, interventions.rows(edits, 0, len(rows)), rows.attention_mask,
                                      capture=range(model.n_layers))  # fmt: skip
            real = rows.attention_mask.bool().to(model.device)
            finite = (
                torch.stack([torch.isfinite(got[layer][real]).all() for layer in range(model.n_layers)])
                .cpu()
                .save()
            )
        return finite

    (finite,) = run_chunks(model, 1, 1, one)
    bad = [layer for layer, ok in enumerate(finite.tolist()) if not ok]
    where = (
        f"layer {bad[0]} ({model.cfg.residual_module}.{bad[0]} output)"
        if bad
        else "the final norm / unembedding"
    )
    return f"NaN or inf activations first appear at {where}; check model.dtype (float32 or bfloat16, not float16) and the weights"


def refusal_scores(
    model: LoadedModel,
    prompts: Batch | Sequence[str],
    edits: Sequence[Edit] = (),
    batch_size: int = 32,
    progress: str | None = None,
    variants: int | None = None,
) -> torch.Tensor:
    """Refusal score s [N] of each prompt under `edits` (s > 0 ⇒ refusal); see last_logits."""
    return last_logits(model, prompts, edits, batch_size, what="score", progress=progress, variants=variants)
