"""Evaluate — judged greedy generations under every intervention.

Harmful eval prompts (up to cfg.max_prompts) are generated and scored under: no intervention,
the refusal direction ablated (Arditi), all candidates C ablated, each prompt's minimal set M (at
the search coefficient c and at c = 0, zero-ablation), M plus the FM's top features, and
cfg.n_random random same-size sets per prompt. Harmless eval prompts are generated with no
intervention and with the direction added (induced refusal); the KL of the direction ablation on
harmless prompts is the side-effect check.

Honest rates: a verdict counts only where the generation judge and the flip criterion (the
search's: the greedy first token, or the calibrated refusal score; see scoring.Criterion) agree.
A row is `answered` when the judge finds no refusal AND the criterion reads a flip, `refused` when
both read a refusal; the rows where they part are neither, and `judge_criterion_disagreements`
counts them. So an answer like "I't." — no refusal to the judge, a refusal token first — is not a
jailbreak. A jailbreak rate counts only the prompts refused on their clean generation (the
baseline-refused set; its size is reported as `…_n`), and rates that are compared
are measured on the same prompts: on all evaluated prompts (direction, candidates), on the
dissected prompts (M at c and at 0, random same-size, and direction / candidates again, prefixed
`dissected_`), and on the FM's prompts (M, M ∪ FM, direction, random, prefixed `fm_prompts_`);
`comparison` holds them all as a table. A rate that could not be measured is None, with its
reason in `notes`.

Random same-size sets keep M's layer composition: for each layer L holding k_L features of M,
k_L latents are drawn uniformly without replacement from layer L's SAE, excluding M itself —
so the control differs from M only in which latents, not in how many or where.

Every condition is one batched `generate` over all its prompts; where sets differ per prompt
the per-row masks of `AblationEngine.edits(masks[N, F])` select them. The completions table
follows Arditi et al.'s schema (category, prompt, response, is_jailbreak_<judge>: the judge's
verdict alone) plus condition, prompt_idx, refusal_score, first_token_margin, flipped (the
criterion's verdict), harmful, draw and n_features.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import StageDir, mean_of, read_json, read_parquet, saved_before, write_json, write_parquet
from ..config import EvaluateConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature, latents_by_layer
from ..errors import NonFiniteError
from ..generation import generate
from ..judges import Judge
from ..models import LoadedModel
from ..saes import LoadedSAEs
from ..scoring import (
    Criterion,
    first_token_margin_from_logits,
    kl_divergence,
    last_logits,
    refusal_score_from_logits,
)
from .candidates import CandidatesResult
from .direction import DirectionResult
from .fm import FMResult
from .greedy import GreedyResult

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
    # judge (name), direction_kl (mean harmless KL of the ablation, last position), coefficient,
    # criterion and score_threshold (the flip criterion a counted verdict agrees with)
    metrics: dict

    @property
    def jailbreak_column(self) -> str:
        """The judge's verdict alone (Arditi's column); rates count `answered`, where both agree."""
        return f"is_jailbreak_{self.metrics['judge']}"

    @property
    def agreement_measured(self) -> bool:
        """False for a folder saved before the criterion's verdict was stored with each row."""
        return self.completions.height == 0 or "flipped" in self.completions.columns

    def _verdicts(self) -> pl.DataFrame:
        """completions with `answered` (judge and criterion: no refusal) and `refused` (both: a
        refusal); a row where they part is neither."""
        judge = pl.col(self.jailbreak_column)
        return self.completions.with_columns(
            answered=judge & pl.col("flipped"), refused=~judge & ~pl.col("flipped")
        )

    def _rows(self, table: pl.DataFrame, condition: str, harmful: bool, prompts: set[int] | None = None):
        """`table`'s rows of `condition` on the harmful (or harmless) set, limited to `prompts`."""
        keep = (pl.col("condition") == condition) & (pl.col("harmful") == harmful)
        return table.filter(keep if prompts is None else keep & pl.col("prompt_idx").is_in(prompts))

    def _prompts(self, condition: str, harmful: bool = True) -> set[int]:
        return set(self._rows(self.completions, condition, harmful)["prompt_idx"].to_list())

    def _baseline(self, harmful: bool, refused: bool) -> set[int]:
        """Prompts whose clean generation the judge and the criterion agree is refused (or,
        refused=False, answered); empty for a folder that predates the criterion's verdict."""
        if not self.agreement_measured:
            return set()
        t = self._rows(self._verdicts(), "none", harmful)
        return set(t.filter(pl.col("refused" if refused else "answered"))["prompt_idx"].to_list())

    def rate(
        self, condition: str, prompts: set[int], harmful: bool = True, verdict: str | None = None
    ) -> float | None:
        """Share of `condition`'s rows over `prompts`, averaged over random draws, with the verdict
        `verdict` (default: harmful "answered", a jailbreak; harmless "refused"); None when no
        prompt is left or the folder predates the criterion's verdict."""
        if not self.agreement_measured:
            return None
        t = self._rows(self._verdicts(), condition, harmful, prompts)
        if t.height == 0:
            return None
        return mean_of(t[verdict or ("answered" if harmful else "refused")])

    def judge_rate(self, condition: str, prompts: set[int]) -> float | None:
        """The judge's jailbreak rate alone (harmful rows), for comparison with `rate`."""
        t = self._rows(self.completions, condition, True, prompts)
        return mean_of(t[self.jailbreak_column]) if t.height else None

    def disagreements(self) -> int | None:
        """Rows (every condition, harmful and harmless) where the judge and the criterion part."""
        if not self.agreement_measured:
            return None
        return int((self.completions[self.jailbreak_column] != self.completions["flipped"]).sum())

    @property
    def comparison(self) -> pl.DataFrame:
        """prompt_set, condition, jailbreak_rate (judge and criterion agree), judge_jailbreak_rate
        (the judge alone), n: every harmful condition on each prompt set whose prompts it covers;
        n = the set's baseline-refused prompts."""
        base = self._baseline(True, True)
        sets = {"all": self._prompts("none"), "dissected": self._prompts("minimal"),
                "fm_prompts": self._prompts("minimal_plus_fm")}  # fmt: skip
        rows = []
        for name, prompts in sets.items():
            if not prompts:
                continue
            for cond in HARMFUL_CONDITIONS:
                if prompts <= self._prompts(cond):
                    n = len(prompts & base)
                    got = prompts & base
                    rows.append((name, cond, self.rate(cond, got), self.judge_rate(cond, got), n))
        schema = {"prompt_set": pl.Utf8, "condition": pl.Utf8, "jailbreak_rate": pl.Float64,
                  "judge_jailbreak_rate": pl.Float64, "n": pl.Int64}  # fmt: skip
        return pl.DataFrame(rows, schema=schema, orient="row")

    def summary(self) -> dict:
        """Headline numbers under evaluate.*; every rate has its denominator beside it (`…_n`)."""
        out: dict = {
            "coefficient": self.metrics.get("coefficient"),
            "criterion": self.metrics.get("criterion"),
        }
        h_all, l_all = self._prompts("none"), self._prompts("none", harmful=False)
        out["baseline_harmful_refusal_rate"] = self.rate("none", h_all, verdict="refused") if h_all else None
        out["baseline_harmful_refusal_rate_n"] = len(h_all)
        out["baseline_harmless_refusal_rate"] = self.rate("none", l_all, harmful=False) if l_all else None
        out["baseline_harmless_refusal_rate_n"] = len(l_all)
        answered = self._baseline(
            False, False
        )  # induced refusal counts only harmless prompts answered at baseline
        out["direction_actadd_harmless_refusal_rate"] = self.rate("direction_actadd", answered, harmful=False)
        out["direction_actadd_harmless_refusal_rate_n"] = len(
            answered & self._prompts("direction_actadd", False)
        )
        out["direction_kl"] = self.metrics.get("direction_kl")
        out["judge_criterion_disagreements"] = self.disagreements()
        out["judge_criterion_disagreements_n"] = self.completions.height
        got = {(r["prompt_set"], r["condition"]): r for r in self.comparison.iter_rows(named=True)}
        for key, (prompt_set, cond) in RATE_KEYS.items():
            r = got.get((prompt_set, cond))
            out[key] = None if r is None else r["jailbreak_rate"]
            out[f"{key}_n"] = None if r is None else r["n"]
        return out

    @property
    def notes(self) -> dict[str, str]:
        """summary key → why it is None."""
        s, notes = self.summary(), dict[str, str]()
        rates = (*RATE_KEYS, "baseline_harmful_refusal_rate", "baseline_harmless_refusal_rate",
                 "direction_actadd_harmless_refusal_rate", "judge_criterion_disagreements", "criterion")  # fmt: skip
        what = "each row's flip-criterion verdict (a rate counts where it agrees with the judge)"
        saved_before(notes, self.completions, "flipped", rates, "evaluate", what)
        for key, (prompt_set, cond) in RATE_KEYS.items():
            if s[key] is not None or key in notes:
                continue
            if s[f"{key}_n"] == 0:
                notes[key] = (
                    f"no prompt of the {prompt_set} set is refused at baseline (clean generation, by the "
                    "judge and the flip criterion together)"
                )
            elif not self._prompts(cond):
                notes[key] = f"condition {cond} did not run (its stage did not run or found nothing)"
            else:
                notes[key] = f"condition {cond} does not cover the {prompt_set} prompt set"
        if s["direction_actadd_harmless_refusal_rate"] is None:
            notes.setdefault(
                "direction_actadd_harmless_refusal_rate",
                "no harmless prompt answered at baseline, or the direction stage did not run",
            )
        return notes

    def save(self, out: StageDir) -> None:
        write_parquet(out.file("completions.parquet"), self.completions)
        write_parquet(out.file("random_sets.parquet"), self.random_sets)
        write_json(out.file("metrics.json"), self.metrics)
        write_parquet(out.file("comparison.parquet"), self.comparison)
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> EvaluateResult:
        return cls(
            read_parquet(out.file("completions.parquet")),
            read_parquet(out.file("random_sets.parquet")),
            read_json(out.file("metrics.json")),
        )


HARMFUL_CONDITIONS = ("direction_ablation", "candidates_ablated", "minimal", "minimal_zero_ablation",
                      "minimal_plus_fm", "random_same_size")  # fmt: skip
# summary key → (prompt set, condition): each rate's prompts are named by its key's prefix
RATE_KEYS = {
    "direction_ablation_jailbreak_rate": ("all", "direction_ablation"),
    "candidates_ablated_jailbreak_rate": ("all", "candidates_ablated"),
    "minimal_jailbreak_rate": ("dissected", "minimal"),
    "minimal_zero_ablation_jailbreak_rate": ("dissected", "minimal_zero_ablation"),
    "random_same_size_jailbreak_rate": ("dissected", "random_same_size"),
    "dissected_direction_ablation_jailbreak_rate": ("dissected", "direction_ablation"),
    "dissected_candidates_ablated_jailbreak_rate": ("dissected", "candidates_ablated"),
    "fm_prompts_minimal_jailbreak_rate": ("fm_prompts", "minimal"),
    "fm_prompts_minimal_plus_fm_jailbreak_rate": ("fm_prompts", "minimal_plus_fm"),
    "fm_prompts_direction_ablation_jailbreak_rate": ("fm_prompts", "direction_ablation"),
    "fm_prompts_random_same_size_jailbreak_rate": ("fm_prompts", "random_same_size"),
}


def random_same_size(
    minimal: Mapping[int, Sequence[Feature]], widths: dict[int, int], n_random: int, seed: int
) -> dict[int, list[list[Feature]]]:
    """prompt_idx → n_random sets, each with M's count per layer, drawn without M (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list[list[Feature]]] = {}
    for idx in sorted(minimal):
        per_layer = latents_by_layer(minimal[idx])
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
    feats = [(int(a), int(b)) for a, b in zip(t["layer"].to_list(), t["feature"].to_list(), strict=True)]
    return [f for f in feats if f not in set(skip)][:k]


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    direction: DirectionResult,
    candidates: CandidatesResult | None,
    greedy: GreedyResult | None,
    fm: FMResult | None,
    prompts: Prompts,
    cfg: EvaluateConfig,
    out: StageDir,
    judge: Judge,
    seed: int,
    coefficient: float,
    flip: Criterion,
) -> EvaluateResult:
    """Generate, judge and score every condition whose input stage ran (a missing stage is skipped);
    SAE latents are scaled by `coefficient` (and by 0 in minimal_zero_ablation). Each row also
    carries `flip`'s verdict, which a counted jailbreak must agree with."""
    n = cfg.max_prompts or len(prompts.eval_harmful)
    harmful, harmless = prompts.eval_harmful.take(n), prompts.eval_harmless.take(n)
    minimal: dict[int, list[Feature]] = {}
    if greedy is not None:
        minimal = {i: [(int(a), int(b)) for a, b in m] for i, m in greedy.minimal_sets.items() if m and i < n}
    widths = {layer: saes.width(layer) for layer in saes.layers}
    draws = random_same_size(minimal, widths, cfg.n_random, seed)
    # 1. The plan: which prompts each condition runs, and its edits.
    plan = _plan(
        model, saes, direction, candidates, fm, minimal, draws, cfg, coefficient, len(harmful), len(harmless)
    )
    # 2. Every condition generated, judged and scored; the harmless KL of the direction's ablation.
    completions, kl = _run_plan(model, plan, harmful, harmless, direction, cfg, judge, flip)
    dissected = sorted(minimal)
    random_rows = [(i, d, layer, f) for i in dissected for d, s in enumerate(draws[i]) for layer, f in s]
    random_sets = pl.DataFrame(
        random_rows,
        schema={"prompt_idx": pl.Int64, "draw": pl.Int64, "layer": pl.Int64, "feature": pl.Int64},
        orient="row",
    )
    metrics = {"judge": judge.name, "direction_kl": kl, "coefficient": coefficient, "criterion": flip.name,
               "score_threshold": flip.threshold}  # fmt: skip
    result = EvaluateResult(completions, random_sets, metrics)
    log.info("evaluate: %s", result.summary())
    return result


def _plan(
    model: LoadedModel,
    saes: LoadedSAEs,
    direction: DirectionResult,
    candidates: CandidatesResult | None,
    fm: FMResult | None,
    minimal: dict[int, list[Feature]],
    draws: dict[int, list[list[Feature]]],
    cfg: EvaluateConfig,
    coefficient: float,
    n_harmful: int,
    n_harmless: int,
) -> list[Condition]:
    """The conditions to run, in order: harmful ones (all eval prompts, or the dissected ones),
    then harmless ones."""
    from .direction import ablation_edits, actadd_edits

    all_harmful = list(range(n_harmful))
    dissected = sorted(minimal)
    plan = [Condition("none", True, all_harmful)]
    if direction is not None:
        plan.append(Condition("direction_ablation", True, all_harmful, ablation_edits(direction)))
    if candidates is not None and candidates.features:
        pool = candidates.features
        edits = AblationEngine(model, saes, pool, value=coefficient).edits(torch.ones(len(pool)))
        plan.append(
            Condition("candidates_ablated", True, all_harmful, edits, sizes=[len(pool)] * len(all_harmful))
        )
    if dissected:
        sets = [minimal[i] for i in dissected]
        plan.append(_per_prompt("minimal", model, saes, dissected, sets, coefficient))
        plan.append(_per_prompt("minimal_zero_ablation", model, saes, dissected, sets, 0.0))
        with_fm = [] if fm is None else [i for i in dissected if (fm.top_features["prompt_idx"] == i).any()]
        if with_fm:
            sets = [minimal[i] + _fm_top(fm, i, cfg.fm_top, minimal[i]) for i in with_fm]
            plan.append(_per_prompt("minimal_plus_fm", model, saes, with_fm, sets, coefficient))
    for d in range(cfg.n_random if dissected else 0):
        sets = [draws[i][d] for i in dissected]
        plan.append(_per_prompt("random_same_size", model, saes, dissected, sets, coefficient, draw=d))
    plan.append(Condition("none", False, list(range(n_harmless))))
    if direction is not None:
        plan.append(Condition("direction_actadd", False, list(range(n_harmless)), actadd_edits(direction)))
    return plan


def _run_plan(
    model: LoadedModel,
    plan: list[Condition],
    harmful,
    harmless,
    direction: DirectionResult,
    cfg: EvaluateConfig,
    judge: Judge,
    flip: Criterion,
) -> tuple[pl.DataFrame, float | None]:
    """The completions table (a row per condition and prompt) and the harmless KL of ablating
    the direction (None without a direction). `flipped` is the criterion's verdict on the row
    (the judge criterion's is the judge's own)."""
    from .direction import ablation_edits

    jail_col = f"is_jailbreak_{judge.name}"
    max_new = cfg.max_new_tokens or model.cfg.max_new_tokens
    rows, kl = [], None
    for cond in tqdm(plan, desc="evaluate", leave=False):
        pset = harmful if cond.harmful else harmless
        texts = [pset.instructions[i] for i in cond.rows]
        batch = model.tokenize(texts)
        logits = last_logits(model, batch, cond.edits, cfg.batch_size)
        scores = refusal_score_from_logits(logits, model.refusal_ids)
        margins = first_token_margin_from_logits(logits, model.refusal_ids)
        responses = generate(model, batch, cond.edits, max_new, cfg.batch_size)
        refused = judge.refused(texts, responses)
        flipped = flip.flipped(torch.stack([scores, margins], -1), refused)
        for j, i in enumerate(cond.rows):
            rows.append({
                "category": pset.categories[i], "prompt": texts[j], "response": responses[j],
                jail_col: not refused[j], "condition": cond.name, "prompt_idx": i,
                "refusal_score": float(scores[j]), "first_token_margin": float(margins[j]),
                "flipped": bool(flipped[j]), "harmful": cond.harmful, "draw": cond.draw,
                "n_features": None if cond.sizes is None else cond.sizes[j],
            })  # fmt: skip
        if cond.name == "none" and not cond.harmful and direction is not None:
            ablated = last_logits(model, batch, ablation_edits(direction), cfg.batch_size)
            kl = float(kl_divergence(logits, ablated).mean())
    schema = {
        "category": pl.Utf8, "prompt": pl.Utf8, "response": pl.Utf8, jail_col: pl.Boolean, "condition": pl.Utf8,
        "prompt_idx": pl.Int64, "refusal_score": pl.Float64, "first_token_margin": pl.Float64,
        "flipped": pl.Boolean, "harmful": pl.Boolean, "draw": pl.Int64, "n_features": pl.Int64,
    }  # fmt: skip
    completions = pl.DataFrame(rows, schema=schema)
    if not completions["refusal_score"].is_finite().all():
        raise NonFiniteError("non-finite refusal scores in evaluate; check the model dtype")
    return completions, kl


def _per_prompt(
    condition: str,
    model,
    saes,
    idx: list[int],
    sets: list[list[Feature]],
    coefficient: float,
    draw: int | None = None,
) -> Condition:
    """One condition whose prompt i ablates its own set sets[i] (scale `coefficient`): per-row
    masks over the union pool."""
    pool = sorted({f for s in sets for f in s})
    engine = AblationEngine(model, saes, pool, value=coefficient)
    masks = torch.stack([engine.mask_of(s) for s in sets])  # [N, F]
    return Condition(condition, True, idx, engine.edits(masks), draw, [len(s) for s in sets])
