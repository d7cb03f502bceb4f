"""Evaluate — judged greedy generations under every intervention (SPEC.md "Outputs of a run").

Harmful eval prompts (up to cfg.max_prompts) are generated and scored under: no intervention,
the refusal direction ablated (Arditi), all candidates C ablated, each prompt's minimal set M,
M plus the FM's top features, and cfg.n_random random same-size sets per prompt. Harmless eval
prompts are generated with no intervention and with the direction added (induced refusal); the
KL of the direction ablation on harmless prompts is the side-effect check.

Random same-size sets keep M's layer composition: for each layer L holding k_L features of M,
k_L latents are drawn uniformly without replacement from layer L's SAE, excluding M itself —
so the control differs from M only in which latents, not in how many or where.

Every condition is one batched `generate` over all its prompts; where sets differ per prompt
the per-row masks of `AblationEngine.edits(masks[N, F])` select them. The completions table
follows Arditi et al.'s schema (category, prompt, response, is_jailbreak_<judge>) plus
condition, prompt_idx, refusal_score, harmful, draw and n_features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import StageDir, read_json, read_parquet, write_json, write_parquet
from ..config import EvaluateConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature
from ..errors import NonFiniteError
from ..generation import generate
from ..models import LoadedModel
from ..saes import LoadedSAEs
from ..scoring import kl_divergence, last_logits, refusal_score_from_logits

log = logging.getLogger(__name__)


@dataclass
class Condition:
    """One generation batch: an intervention applied to a list of eval prompts."""

    name: str
    harmful: bool  # eval_harmful or eval_harmless prompts
    rows: list[int]  # prompt indices into that set
    edits: list = field(default_factory=list)  # per-row masks allowed, one row per prompt in `rows`
    draw: int | None = None  # which random same-size draw
    sizes: list[int] | None = None  # number of latents ablated per prompt


@dataclass
class EvaluateResult:
    completions: pl.DataFrame  # one row per (condition, draw, prompt); see the module docstring
    random_sets: pl.DataFrame  # prompt_idx, draw, layer, feature: the random same-size controls
    metrics: dict  # judge (name), direction_kl (mean harmless KL of the ablation, last position)

    @property
    def jailbreak_column(self) -> str:
        return f"is_jailbreak_{self.metrics['judge']}"

    def rate(self, condition: str, harmful: bool = True, refusal: bool = False) -> float | None:
        """Judged jailbreak (or, refusal=True, refusal) rate of one condition; None if it did not run."""
        t = self.completions.filter((pl.col("condition") == condition) & (pl.col("harmful") == harmful))
        if t.height == 0:
            return None
        jail = float(t[self.jailbreak_column].cast(pl.Float64).mean())
        return 1.0 - jail if refusal else jail

    def summary(self) -> dict:
        """Headline numbers. Unlike other stages, the keys carry their section prefix
        ("baseline.", "direction.", ...): evaluation numbers belong to the stage they judge,
        and the pipeline files each under its section of summary.json."""
        return {
            "baseline.harmful_refusal_rate": self.rate("none", refusal=True),
            "baseline.harmless_refusal_rate": self.rate("none", harmful=False, refusal=True),
            "direction.ablation_jailbreak_rate": self.rate("direction_ablation"),
            "direction.actadd_harmless_refusal_rate": self.rate(
                "direction_actadd", harmful=False, refusal=True
            ),
            "direction.kl": self.metrics.get("direction_kl"),
            "candidates.all_ablated_jailbreak_rate": self.rate("candidates_ablated"),
            "greedy.random_same_size_jailbreak_rate": self.rate("random_same_size"),
            "evaluate.minimal_jailbreak_rate": self.rate("minimal"),
            "evaluate.minimal_plus_fm_jailbreak_rate": self.rate("minimal_plus_fm"),
        }

    def save(self, out: StageDir) -> None:
        write_parquet(out.file("completions.parquet"), self.completions)
        write_parquet(out.file("random_sets.parquet"), self.random_sets)
        write_json(out.file("metrics.json"), self.metrics)
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> EvaluateResult:
        return cls(
            read_parquet(out.file("completions.parquet")),
            read_parquet(out.file("random_sets.parquet")),
            read_json(out.file("metrics.json")),
        )


def random_same_size(
    minimal: dict[int, Sequence[Feature]], widths: dict[int, int], n_random: int, seed: int
) -> dict[int, list[list[Feature]]]:
    """prompt_idx → n_random sets, each with M's count per layer, drawn without M (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list[list[Feature]]] = {}
    for idx in sorted(minimal):
        per_layer: dict[int, set[int]] = {}
        for layer, f in minimal[idx]:
            per_layer.setdefault(int(layer), set()).add(int(f))
        draws = []
        for _ in range(n_random):
            drawn: list[Feature] = []
            for layer, own in sorted(per_layer.items()):
                if widths[layer] - len(own) < len(own):
                    raise ValueError(f"layer {layer} has too few latents for a random set of size {len(own)}")
                perm = torch.randperm(widths[layer], generator=gen).tolist()
                drawn += [(layer, f) for f in [f for f in perm if f not in own][: len(own)]]
            draws.append(sorted(drawn))
        out[idx] = draws
    return out


def _fm_top(fm, idx: int, k: int, skip: Sequence[Feature]) -> list[Feature]:
    """The FM's k top features (by |w_i|, its own ranking) of prompt idx that are not already in M."""
    if fm is None:
        return []
    t = fm.top_features.filter(pl.col("prompt_idx") == idx).sort("rank")
    latent = "latent" if "latent" in t.columns else "feature"
    feats = [(int(a), int(b)) for a, b in zip(t["layer"].to_list(), t[latent].to_list(), strict=True)]
    return [f for f in feats if f not in set(skip)][:k]


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    direction,
    candidates,
    greedy,
    fm,
    prompts: Prompts,
    cfg: EvaluateConfig,
    out: StageDir,
    judge,
    seed: int,
) -> EvaluateResult:
    """Generate, judge and score every condition whose input stage ran (a missing stage is skipped)."""
    from .direction import ablation_edits, actadd_edits

    n = cfg.max_prompts or len(prompts.eval_harmful)
    harmful = prompts.eval_harmful.take(n)
    harmless = prompts.eval_harmless.take(n)
    all_harmful = list(range(len(harmful)))
    minimal = {}
    if greedy is not None:
        minimal = {i: [(int(a), int(b)) for a, b in m] for i, m in greedy.minimal_sets.items() if m and i < n}
    dissected = sorted(minimal)

    plan = [Condition("none", True, all_harmful)]
    if direction is not None:
        plan.append(Condition("direction_ablation", True, all_harmful, ablation_edits(direction)))
    if candidates is not None and candidates.features:
        pool = candidates.features
        edits = AblationEngine(model, saes, pool, value=cfg.coefficient).edits(torch.ones(len(pool)))
        plan.append(
            Condition("candidates_ablated", True, all_harmful, edits, sizes=[len(pool)] * len(all_harmful))
        )
    if dissected:
        plan.append(_per_prompt("minimal", model, saes, dissected, [minimal[i] for i in dissected], cfg))
        with_fm = [] if fm is None else [i for i in dissected if (fm.top_features["prompt_idx"] == i).any()]
        if with_fm:
            sets = [minimal[i] + _fm_top(fm, i, cfg.fm_top, minimal[i]) for i in with_fm]
            plan.append(_per_prompt("minimal_plus_fm", model, saes, with_fm, sets, cfg))
    widths = {layer: saes.width(layer) for layer in saes.layers}
    draws = random_same_size(minimal, widths, cfg.n_random, seed)
    for d in range(cfg.n_random if dissected else 0):
        sets = [draws[i][d] for i in dissected]
        plan.append(_per_prompt("random_same_size", model, saes, dissected, sets, cfg, draw=d))
    plan.append(Condition("none", False, list(range(len(harmless)))))
    if direction is not None:
        plan.append(Condition("direction_actadd", False, list(range(len(harmless))), actadd_edits(direction)))

    jail_col = f"is_jailbreak_{judge.name}"
    max_new = cfg.max_new_tokens or model.cfg.max_new_tokens
    rows, kl = [], None
    for cond in tqdm(plan, desc="evaluate", leave=False):
        pset = harmful if cond.harmful else harmless
        texts = [pset.instructions[i] for i in cond.rows]
        batch = model.tokenize(texts)
        logits = last_logits(model, batch, cond.edits, cfg.batch_size)
        scores = refusal_score_from_logits(logits, model.refusal_ids)
        responses = generate(model, batch, cond.edits, max_new, cfg.batch_size)
        refused = judge.refused(texts, responses)
        for j, i in enumerate(cond.rows):
            rows.append({
                "category": pset.categories[i], "prompt": texts[j], "response": responses[j],
                jail_col: not refused[j], "condition": cond.name, "prompt_idx": i,
                "refusal_score": float(scores[j]), "harmful": cond.harmful, "draw": cond.draw,
                "n_features": None if cond.sizes is None else cond.sizes[j],
            })  # fmt: skip
        if cond.name == "none" and not cond.harmful and direction is not None:
            ablated = last_logits(model, batch, ablation_edits(direction), cfg.batch_size)
            kl = float(kl_divergence(logits, ablated).mean())
    schema = {
        "category": pl.Utf8, "prompt": pl.Utf8, "response": pl.Utf8, jail_col: pl.Boolean, "condition": pl.Utf8,
        "prompt_idx": pl.Int64, "refusal_score": pl.Float64, "harmful": pl.Boolean, "draw": pl.Int64,
        "n_features": pl.Int64,
    }  # fmt: skip
    completions = pl.DataFrame(rows, schema=schema)
    if not completions["refusal_score"].is_finite().all():
        raise NonFiniteError("non-finite refusal scores in evaluate; check the model dtype")
    random_rows = [(i, d, layer, f) for i in dissected for d, s in enumerate(draws[i]) for layer, f in s]
    random_sets = pl.DataFrame(
        random_rows,
        schema={"prompt_idx": pl.Int64, "draw": pl.Int64, "layer": pl.Int64, "feature": pl.Int64},
        orient="row",
    )
    metrics = {"judge": judge.name, "direction_kl": kl}
    result = EvaluateResult(completions, random_sets, metrics)
    log.info("evaluate: %s", result.summary())
    return result


def _per_prompt(
    condition: str,
    model,
    saes,
    idx: list[int],
    sets: list[list[Feature]],
    cfg: EvaluateConfig,
    draw: int | None = None,
) -> Condition:
    """One condition whose prompt i ablates its own set sets[i]: per-row masks over the union pool."""
    pool = sorted({f for s in sets for f in s})
    engine = AblationEngine(model, saes, pool, value=cfg.coefficient)
    masks = torch.stack([engine.mask_of(s) for s in sets])  # [N, F]
    return Condition(condition, True, idx, engine.edits(masks), draw, [len(s) for s in sets])
