"""Forward passes that read the last position: refusal score, first-token margin, next-token distributions.

Refusal score (Arditi et al. 2024): with p(R) the summed next-token probability of the refusal
tokens at the last prompt position, s = log p(R) − log(1 − p(R)).

A "flip" (the model stops refusing) is decided by a `Criterion`, each as a margin that is
negative exactly when the prompt flips:
- score: s − τ, with τ calibrated on the val split (`calibrate_threshold`), not fixed at 0: under
  an ablation s can fall below 0 while "I" is still the greedy first token;
- first_token: max_{r∈R} logit_r − max_{v∉R} logit_v, negative iff greedy decoding does not
  start with a refusal token;
- judge: the generation judge's verdict (stages that decide flips generate for it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nnsight
import torch

from . import interventions
from .backends import run_chunks, run_tasks
from .errors import NonFiniteError, UserError
from .interventions import Edit
from .models import Batch, LoadedModel
from .variants import apply_variants

log = logging.getLogger(__name__)


def refusal_score_from_logits(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """logits [N, V] → s [N] = log p(R) − log(1 − p(R)), computed stably in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    log_pr = torch.logsumexp(logp[:, list(refusal_ids)], dim=-1)
    # log(1 − p) = log1p(−exp(log p)), clamped so p → 1 stays finite.
    log_not = torch.log1p(-log_pr.exp().clamp(max=1 - 1e-7))
    return log_pr - log_not


def first_token_margin_from_logits(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """logits [N, V] → [N] max refusal-token logit − max other logit (< 0 ⇔ greedy starts elsewhere)."""
    logits = logits.float()
    ids = torch.tensor(list(refusal_ids), device=logits.device)
    best_r = logits[:, ids].amax(-1)
    other = logits.index_fill(-1, ids, float("-inf")).amax(-1)
    return best_r - other


CRITERIA = ("score", "first_token", "judge")


@dataclass(frozen=True)
class Criterion:
    """When an edit flips a prompt. `margin(score, first_token_margin)` is < 0 on a flip; the
    judge criterion needs generations, so its margin comes from `judge_margin`."""

    name: str = "first_token"
    threshold: float = 0.0  # τ of the score criterion (direction.score_threshold)

    def __post_init__(self) -> None:
        if self.name not in CRITERIA:  # a library caller's typo, said before any forward pass
            raise UserError(f"criterion={self.name!r}: use one of {', '.join(CRITERIA)}")

    def margin(self, flip: torch.Tensor) -> torch.Tensor:
        """flip [N, 2] (refusal score, first-token margin) → [N] margin, < 0 ⇔ flipped."""
        if self.name == "score":
            return flip[:, 0] - self.threshold
        if self.name == "first_token":
            return flip[:, 1]
        raise ValueError(f"criterion {self.name!r} is decided on generations (judge_margin)")

    def flipped(self, flip: torch.Tensor, judge_refused: Sequence[bool]) -> list[bool]:
        """Per row, whether the criterion reads a flip: from flip [N, 2] (refusal score,
        first-token margin), or for the judge criterion the judge's own verdicts."""
        if self.name == "judge":
            return [not r for r in judge_refused]
        return (self.margin(flip) < 0).tolist()


def judge_margin(refused: Sequence[bool], scores: torch.Tensor) -> torch.Tensor:
    """Judge criterion as a margin: the sign is the judge's verdict (−1 jailbroken, +1 refused);
    ties among equal verdicts are broken by the refusal score (|tie-break| < 1e-3)."""
    sign = torch.tensor([1.0 if r else -1.0 for r in refused])
    return sign + 1e-3 * torch.tanh(scores.float().cpu())


def calibrate_threshold(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[float, float]:
    """(τ, val accuracy): the refusal-score threshold that best separates harmful (s > τ) from
    harmless (s ≤ τ) val prompts; τ is the midpoint of the best-separating gap (ties: the widest)."""
    scores = torch.cat([harmful, harmless]).double()
    labels = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))])
    order = torch.argsort(scores)
    s: list[float] = scores[order].tolist()
    y: list[float] = labels[order].tolist()
    n = len(s)
    best: tuple[tuple[float, float], float] | None = None
    # cut k: the k lowest scores are called harmless; accuracy = harmless below + harmful above
    below_harmless = 0
    total_harmful = sum(y)
    for k in range(n + 1):
        if k > 0:
            below_harmless += int(y[k - 1] == 0)
        if 0 < k < n and s[k - 1] == s[k]:
            continue
        acc = (below_harmless + (total_harmful - (k - below_harmless))) / n
        lo = s[k - 1] if k > 0 else s[0] - 1.0
        hi = s[k] if k < n else s[-1] + 1.0
        key = (acc, hi - lo)
        if best is None or key > best[0]:
            best = (key, (lo + hi) / 2)
    assert best is not None  # k = 0 always proposes a cut
    return float(best[1]), float(best[0][0])


# One-sided level of the exact sign tests that one condition or model does better than another on
# the same items (redundancy: M ∪ H against M alone and against M ∪ C; fm: the FM against the
# linear model on held-out masks)
SIGNIFICANCE = 0.05


def sign_test_p(gains: int, losses: int) -> float:
    """One-sided exact sign test (binomial, p = 1/2) on the discordant items: `gains` where the
    first does better, `losses` where the second does. 1.0 when none is discordant."""
    from scipy.stats import binomtest

    if gains + losses == 0:
        return 1.0
    return float(binomtest(gains, gains + losses, 0.5, alternative="greater").pvalue)


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
    """Next-token logits [N, V] (what="logits"), refusal scores [N] (what="score") or
    (refusal score, first-token margin) [N, 2] (what="flip") at position −1.

    `edits` may carry per-row masks over all N rows; they are sliced per chunk. Only the last
    position's logits are computed (`logits_to_keep=1`), and only the score leaves the trace
    when what="score". `variants=N` with a one-prompt batch evaluates N edit variants of that
    prompt, computing the layers below the first edited one once (variants.apply_variants).
    """
    batch = _as_batch(model, prompts)
    n, one = _logits_task(model, batch, edits, what, variants)
    return _checked(model, batch, edits, variants, run_chunks(model, n, batch_size, one, progress))


def refusal_scores_many(
    model: LoadedModel,
    requests: Sequence[tuple[Batch, Sequence[Edit], int]],
    batch_size: int = 32,
    what: str = "score",
) -> list[torch.Tensor]:
    """Refusal scores [V] (or what="flip": [V, 2]) for each (one-prompt batch, edits over V
    variants, V) request, as last_logits(variants=V) computes them; on a remote backend all
    requests are ONE job."""
    tasks = [_logits_task(model, batch, edits, what, v) for batch, edits, v in requests]
    outs = run_tasks(model, tasks, batch_size)
    return [_checked(model, b, e, v, out) for (b, e, v), out in zip(requests, outs, strict=True)]


def _logits_task(model: LoadedModel, batch: Batch, edits: Sequence[Edit], what: str, variants: int | None):
    """(n rows, fn(i0, i1) → the chunk's scores or logits): one trace per chunk."""
    if variants is not None and len(batch) != 1:
        raise ValueError("variants= needs a batch of one prompt")
    n = len(batch) if variants is None else variants

    def one(i0: int, i1: int) -> torch.Tensor:
        chunk = batch.rows(i0, i1) if variants is None else batch
        with torch.no_grad(), model.lm.trace(**chunk.model_inputs(model.device), logits_to_keep=1):
            if variants is None:
                interventions.apply(model, interventions.rows(edits, i0, i1), chunk.attention_mask)
            else:  # rows i0..i1 of the variants of one prompt
                apply_variants(model, interventions.rows(edits, i0, i1), chunk.attention_mask, i1 - i0)
            logits = model.lm.output.logits[:, -1, :]
            if what == "score":
                out = refusal_score_from_logits(logits, model.refusal_ids)
            elif what == "flip":
                out = torch.stack(
                    [
                        refusal_score_from_logits(logits, model.refusal_ids),
                        first_token_margin_from_logits(logits, model.refusal_ids),
                    ],
                    -1,
                )
            else:
                out = logits.float()
            saved = nnsight.save(out.cpu())
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
            finite = nnsight.save(
                torch.stack([torch.isfinite(got[layer][real]).all() for layer in range(model.n_layers)]).cpu()
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


def flips(
    model: LoadedModel,
    batch: Batch,
    edits: Sequence[Edit],
    criterion: Criterion,
    batch_size: int = 32,
    judge=None,
    instructions: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt under `edits`: (refusal score [N], first-token margin [N], flipped [N] bool by
    `criterion`). The judge criterion generates (greedy, max_new_tokens) and asks `judge`."""
    both = last_logits(model, batch, edits, batch_size, what="flip")
    if criterion.name != "judge":
        return both[:, 0], both[:, 1], criterion.margin(both) < 0
    from .generation import generate

    texts = generate(model, batch, edits, max_new_tokens, batch_size)
    refused = judge.refused(list(instructions or [""] * len(texts)), texts)
    return both[:, 0], both[:, 1], torch.tensor([not r for r in refused])
