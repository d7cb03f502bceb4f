"""Redundancy ("hydra") features and the <bos> clamp (arXiv 2509.09708, the redundancy and <bos> experiments).

For each dissected harmful prompt with minimal set M (stage greedy):

1. Scan. Every latent of every SAE layer is encoded on the clean run and on the M-ablated run,
   over the real prompt positions (padding excluded). A latent at layer L is read from the
   residual *before* layer L's own edit — as sae-lens's spliced-in SAE reads it — so a latent
   counts as awake only if upstream computation woke it, not because the encoder of a
   neighbour picks up the −4·f·W_dec push of an ablated latent at the same site. Awakened =
   clean max ≤ dormant_max and ablated max > awake_min, M excluded; H = the top_awake of them.
2. Causal tests, each one batched generation + refusal score over all prompts (per-row edits):
   * m / m_plus_h: M vs M ∪ H at the greedy coefficient c. M jailbreaks by construction, so the
     rates saturate; the mean score change s(M∪H) − s(M) is reported too.
   * m_weak / m_plus_h_weak: the same at weak_coefficient (default 0, zero-ablation), where M
     alone need not jailbreak. "M minus its strongest feature" was rejected: M is 1-minimal, so
     that fails by construction, and H (awakened by all of M) is the wrong set for a smaller
     ablation. H is re-scanned under the weak ablation, so each test ablates what it wakes.
     With weak_steps > 1 each prompt takes its edge instead: of weak_steps scales from
     weak_coefficient toward c, the strongest before the first at which M alone jailbreaks it
     (judge and criterion agreeing; weak_coefficient where M alone jailbreaks it there already).
     A minimal set found at c = -1 and only zeroed can leave a prompt's refusal where it was, so
     the backup it wakes has nothing to hold; at the edge it has. But near its edge any further
     ablation can tip a prompt, so the control (below) matters more there.
   * m_plus_control_weak: the control for "ablating more latents flips more": M ∪ C at the weak
     coefficient, C as many latents at each of H's layers as H has there, the most active once M
     is ablated among those already active on the clean run (so not awakened). Redundancy needs
     M ∪ H to beat M ∪ C, not only M.
   * effect (per latent, in the awakened table): each latent h of the weak H ablated with M at
     the weak coefficient, one at a time: refusal score of M ∪ {h} minus that of M alone. A
     hydra feature holds the refusal (effect < −holding_tolerance); a latent that pushes toward
     compliance raises the score when ablated (effect > 0), and most change it by rounding alone.
   * reinject: in the M-ablated run, H is scaled by reinject_scale (default 2: its awakened
     contribution added once more). If H carries refusal, refusal returns.
   * bos_clamp: M ablated as in `m`, plus the `bos_features` latents (default H) clamped to
     bos_clamp_value at the <bos> position only. With the default (H, 0) this undoes the
     awakening at <bos> alone. The clamp is applied before M's edit at a shared layer, so it
     sees the same pre-edit residual as the scan.
   Jailbroken = the judge finds no refusal in the generation AND the flip criterion (the search's:
   first token or calibrated score) reads a flip; refused at baseline = both read a refusal on
   the clean run. Every jailbreak rate counts only those baseline-refused prompts (`…_n`).

A phenomenon the model does not show is reported as measured (0); a quantity that could not be
measured (nothing clamped, no awakened set) is None with its reason in `notes`, never 0.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import StageDir, mean_of, read_json, read_parquet, saved_before, write_json, write_parquet
from ..config import RedundancyConfig
from ..data import Prompts
from ..engine import Feature, row_edits
from ..features import max_activations
from ..generation import generate
from ..interventions import FeatureEdit
from ..judges import Judge
from ..models import Batch, LoadedModel
from ..saes import LoadedSAEs
from ..scoring import SIGNIFICANCE, Criterion, last_logits, refusal_scores, sign_test_p
from .greedy import GreedyResult

log = logging.getLogger(__name__)

CONDITIONS = (
    "clean",
    "m",
    "m_plus_h",
    "m_weak",
    "m_plus_h_weak",
    "m_plus_control_weak",
    "reinject",
    "bos_clamp",
)


@dataclass
class RedundancyResult:
    # prompt_idx, ablation (strong|weak), layer, feature, clean_max, ablated_max, ablated_bos, rank,
    # in_h, effect (weak H only: refusal score of M ∪ {h} minus M's, both at the weak coefficient)
    awakened: pl.DataFrame
    # prompt_idx, condition, n_edited, refusal_score, judge_refused, jailbroken (judge and criterion
    # agree), response, first_token_margin, flipped (the criterion's verdict)
    tests: pl.DataFrame
    coefficient: float  # scale of M (and H) in the strong conditions
    weak_coefficient: float  # the weakest scale of M in the weak conditions (cfg.weak_coefficient)
    holding_tolerance: float  # a latent holds the refusal when its effect is below minus this
    criterion: str | None  # the flip criterion a jailbreak agrees with (None: a folder from before it)
    notes: dict[str, str] = field(default_factory=dict)  # summary key → why it is None (or 0)
    # prompt_idx → the scale of M (and its weak H, and the control) in that prompt's weak conditions
    # (its edge when weak_steps > 1); empty in a folder saved before the edge existed, where every
    # prompt used weak_coefficient
    weak_coefficients: dict[int, float] = field(default_factory=dict)
    weak_steps: int = 1  # scales tried per prompt, from weak_coefficient toward the coefficient

    def weak_at(self, prompt_idx: int) -> float:
        """The scale of M in this prompt's weak conditions."""
        return self.weak_coefficients.get(prompt_idx, self.weak_coefficient)

    def summary(self) -> dict:
        """Flat headline numbers (the pipeline prefixes them with "redundancy.")."""
        scales = [self.weak_at(int(i)) for i in sorted(set(self.tests["prompt_idx"].to_list()))]
        out = {
            "coefficient": self.coefficient,
            "weak_coefficient": self.weak_coefficient,
            "weak_steps": self.weak_steps,
            # the weak test's scales of M over the dissected prompts (weak_coefficient on each,
            # unless weak_steps > 1 moved it to the prompt's edge)
            "weak_coefficient_median": float(statistics.median(scales)) if scales else None,
            "weak_coefficient_strongest": min(scales) if scales else None,
            "holding_tolerance": self.holding_tolerance,
            "criterion": self.criterion,
            **summarise(self.awakened, self.tests, self.holding_tolerance),
        }
        if self.judged_alone:  # its jailbroken column is the judge's alone: no rate claims agreement
            out.update(dict.fromkeys(JUDGED_KEYS))
        return out

    @property
    def judged_alone(self) -> bool:
        """A folder saved before each test row carried the flip criterion's verdict."""
        return self.tests.height > 0 and "flipped" not in self.tests.columns

    def save(self, out: StageDir) -> None:
        write_parquet(out.file("awakened.parquet"), self.awakened)
        write_parquet(out.file("tests.parquet"), self.tests)
        meta = {
            "notes": self.notes,
            "coefficient": self.coefficient,
            "weak_coefficient": self.weak_coefficient,
            "holding_tolerance": self.holding_tolerance,
            "criterion": self.criterion,
            "weak_steps": self.weak_steps,
            "weak_coefficients": {str(k): v for k, v in sorted(self.weak_coefficients.items())},
        }
        write_json(out.file("redundancy.json"), meta)
        out.mark_done({"summary": self.summary()})

    @classmethod
    def load(cls, out: StageDir) -> RedundancyResult:
        meta = read_json(out.file("redundancy.json"))
        awakened = read_parquet(out.file("awakened.parquet"))
        notes = dict(meta["notes"])
        if "effect" not in awakened.columns:  # saved before the per-latent effects were measured
            notes.setdefault(
                "h_holding_share", "a run folder from before the per-latent effects: not measured"
            )
        tests = read_parquet(out.file("tests.parquet"))
        what = "each test's flip-criterion verdict (a jailbreak counts where it agrees with the judge)"
        saved_before(notes, tests, "flipped", (*JUDGED_KEYS, "criterion"), "redundancy", what)
        return cls(
            awakened,
            tests,
            float(meta["coefficient"]),
            float(meta["weak_coefficient"]),
            # a folder saved before the tolerance counted every negative effect as holding
            float(meta.get("holding_tolerance", 0.0)),
            meta.get("criterion"),
            notes,
            # a folder saved before the edge: every prompt at weak_coefficient, one scale tried
            {int(k): float(v) for k, v in meta.get("weak_coefficients", {}).items()},
            int(meta.get("weak_steps", 1)),
        )


def find_awakened(
    clean_max: dict[int, torch.Tensor], ablated_max: dict[int, torch.Tensor], exclude: Sequence[Feature], cfg
) -> list[tuple[int, int, float, float]]:
    """Dormant → awake latents of one prompt, strongest first.

    clean_max / ablated_max: layer → [width] max activation over the prompt's positions.
    Returns (layer, feature, clean_max, ablated_max) with clean ≤ cfg.dormant_max and
    ablated > cfg.awake_min, `exclude` (the ablated set M) left out.
    """
    skip = {(int(a), int(b)) for a, b in exclude}
    found = []
    for layer in sorted(clean_max):
        c, a = clean_max[layer], ablated_max[layer]
        for f in torch.nonzero((c <= cfg.dormant_max) & (a > cfg.awake_min)).flatten().tolist():
            if (layer, f) not in skip:
                found.append((layer, f, float(c[f]), float(a[f])))
    found.sort(key=lambda r: (-r[3], r[0], r[1]))
    return found


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    greedy: GreedyResult,
    prompts: Prompts,
    cfg: RedundancyConfig,
    out: StageDir,
    judge: Judge,
    coefficient: float,
    flip: Criterion,
    layers: Sequence[int] | None = None,
) -> RedundancyResult:
    """Scan for awakened latents after ablating each prompt's minimal set (scale `coefficient`),
    then test them causally; a test row is jailbroken where the judge and `flip` agree.

    layers: the SAE layers scanned for awakened latents (default: every SAE layer). The pipeline
    passes the layers the candidates were searched in: a backup of a harm feature lives where harm
    is detected, while below the refusal decision every compliance feature "wakes" when a
    refusal is broken, and those would crowd the backups out of H.
    """
    dissected = sorted(i for i, m in greedy.minimal_sets.items() if m)
    settings = (coefficient, cfg.weak_coefficient, cfg.holding_tolerance, flip.name)
    grid = weak_grid(cfg.weak_coefficient, coefficient, cfg.weak_steps)
    if not dissected:
        empty = RedundancyResult(_awakened_frame([]), _tests_frame([]), *settings, weak_steps=len(grid))
        why = "greedy found no minimal set: there is nothing to ablate"
        notes = {k: why for k, v in empty.summary().items() if v is None}
        return RedundancyResult(empty.awakened, empty.tests, *settings, notes, weak_steps=len(grid))
    minimal = [[(int(a), int(b)) for a, b in greedy.minimal_sets[i]] for i in dissected]
    texts = [prompts.eval_harmful.instructions[i] for i in dissected]
    batch = model.tokenize(texts)
    scanned = sorted(saes.layers if layers is None else layers)
    # 0. Each prompt's weak scale of M: its edge on the grid.
    weak = edge_coefficients(model, saes, batch, texts, minimal, grid, cfg, judge, flip)
    log.info("redundancy: weak scales of M %s; scanning %d prompts x SAE layers %s",
             dict(sorted(Counter(weak).items())), len(texts), scanned)  # fmt: skip
    # 1. H: latents dormant on the clean run and awake once M is ablated (strongly, and weakly).
    awakened, h, h_weak, control = _find_h(model, saes, batch, dissected, minimal, cfg, coefficient, weak,
                                           scanned)  # fmt: skip
    # 2. The causal tests: every condition generated, judged and scored.
    conditions = _conditions(model, saes, minimal, h, h_weak, control, cfg, coefficient, weak)
    tests = _run_tests(model, batch, texts, dissected, conditions, cfg, judge, flip)
    # 3. Which of H hold the refusal: each latent of the weak H ablated with M, one at a time.
    awakened = _with_effects(awakened, h_effects(model, saes, texts, dissected, minimal, h_weak, weak, cfg))
    notes = _notes(awakened, tests, minimal, h, cfg, coefficient, scanned)
    result = RedundancyResult(awakened, tests, *settings, notes, dict(zip(dissected, weak, strict=True)),
                              len(grid))  # fmt: skip
    log.info("redundancy: %s", result.summary())
    return result


def _ablate(
    model, saes, sets: Sequence[Sequence[Feature]], coeff: float | Sequence[float]
) -> list[FeatureEdit]:
    """Row i scales the latents of sets[i] by coeff (or by coeff[i])."""
    scales = [coeff] * len(sets) if isinstance(coeff, int | float) else list(coeff)
    return row_edits(saes, [dict.fromkeys(s, c) for s, c in zip(sets, scales, strict=True)], model.device)


def weak_grid(weak: float, coefficient: float, steps: int) -> list[float]:
    """The weak test's scales of M, weakest first: `steps` of them from `weak` toward `coefficient`
    (weak + k (coefficient - weak) / steps, k < steps), never `coefficient` itself, at which M
    jailbreaks by construction. `weak` alone where it is not weaker than the coefficient."""
    if weak <= coefficient:
        return [weak]
    return [weak + k * (coefficient - weak) / steps for k in range(steps)]


def edge_coefficients(
    model,
    saes,
    batch: Batch,
    texts: list[str],
    minimal: list[list[Feature]],
    grid: list[float],
    cfg: RedundancyConfig,
    judge: Judge,
    flip: Criterion,
) -> list[float]:
    """Per prompt, its edge: the strongest scale of `grid` (weakest first) before the first at
    which ablating M alone jailbreaks it, read as the tests read a jailbreak (the judge and the flip
    criterion agreeing); grid[0] where M alone jailbreaks it there already. Each scale costs one
    scored and generated pass over `batch` (the tests' batch, so the same padding), until every
    prompt is past its edge; a grid of one scale costs nothing."""
    edge = [grid[0]] * len(minimal)
    below = [len(grid) > 1] * len(minimal)  # not yet jailbroken by M alone at any scale tried
    for scale in grid:
        if not any(below):
            break
        _, _, refused, flipped = _judged_run(model, batch, texts, _ablate(model, saes, minimal, scale), cfg,
                                             judge, flip)  # fmt: skip
        for i in range(len(minimal)):
            if below[i] and not _jailbroken(refused[i], flipped[i]):  # the edge moves up to this scale
                edge[i] = scale
            else:
                below[i] = False
    return edge


def _find_h(
    model,
    saes,
    batch: Batch,
    dissected: list[int],
    minimal: list[list[Feature]],
    cfg: RedundancyConfig,
    coefficient: float,
    weak: list[float],
    scanned: list[int],
) -> tuple[pl.DataFrame, list[list[Feature]], list[list[Feature]], list[list[Feature]]]:
    """Every awakened latent (the awakened table), H per prompt at the strong (coefficient) and
    weak (each prompt's scale in `weak`) ablation of M (its top_awake latents), and the weak test's
    control set per prompt (see `control_set`)."""
    clean_max, _ = max_activations(model, saes, batch, [], cfg.batch_size, scanned)
    rows: list[tuple] = []
    h_sets: dict[str, list[list[Feature]]] = {"control": []}
    coeffs: tuple[tuple[str, float | list[float]], ...] = (("strong", coefficient), ("weak", weak))
    for name, coeff in coeffs:
        abl_max, abl_bos = max_activations(
            model, saes, batch, _ablate(model, saes, minimal, coeff), cfg.batch_size, scanned
        )
        h_sets[name] = []
        for i, idx in enumerate(dissected):
            found = find_awakened(
                {k: v[i] for k, v in clean_max.items()},
                {k: v[i] for k, v in abl_max.items()},
                minimal[i],
                cfg,
            )
            for rank, (layer, f, cm, am) in enumerate(found):
                bos = float(abl_bos[layer][i, f])
                rows.append((idx, name, layer, f, cm, am, bos, rank, rank < cfg.top_awake))
            h_sets[name].append([(layer, f) for layer, f, _, _ in found[: cfg.top_awake]])
            if name == "weak":
                h_sets["control"].append(
                    control_set(
                        {k: v[i] for k, v in clean_max.items()},
                        {k: v[i] for k, v in abl_max.items()},
                        minimal[i],
                        h_sets["weak"][-1],
                        cfg,
                    )
                )
    return _awakened_frame(rows), h_sets["strong"], h_sets["weak"], h_sets["control"]


def control_set(
    clean_max: dict[int, torch.Tensor],
    ablated_max: dict[int, torch.Tensor],
    exclude: Sequence[Feature],
    h: Sequence[Feature],
    cfg,
) -> list[Feature]:
    """As many latents at each of H's layers as H has there: the most active once M is ablated
    (max > cfg.awake_min) among those already active on the clean run (max > cfg.dormant_max), so
    none of them woke; `exclude` (M) left out. Fewer where a layer has fewer such latents."""
    skip = {(int(a), int(b)) for a, b in exclude}
    out: list[Feature] = []
    for layer, n in sorted(Counter(layer for layer, _ in h).items()):
        c, a = clean_max[layer], ablated_max[layer]
        cand = [f for f in torch.nonzero((c > cfg.dormant_max) & (a > cfg.awake_min)).flatten().tolist()
                if (layer, f) not in skip]  # fmt: skip
        cand.sort(key=lambda f: (-float(a[f]), f))
        out += [(layer, f) for f in cand[:n]]
    return out


def _conditions(
    model,
    saes,
    minimal: list[list[Feature]],
    h: list[list[Feature]],
    h_weak: list[list[Feature]],
    control: list[list[Feature]],
    cfg: RedundancyConfig,
    c: float,
    weak: list[float],
) -> dict[str, tuple[list[FeatureEdit], list[int]]]:
    """Each test condition → (its edits, the number of latents it edits per prompt); `weak`: each
    prompt's scale of M in the weak conditions."""
    n = len(minimal)
    m_h, m_h_weak, m_control = _union(minimal, h), _union(minimal, h_weak), _union(minimal, control)
    bos_set = {"awakened": h, "minimal": minimal, "both": m_h}[cfg.bos_features]
    bos_clamp = row_edits(
        saes,
        [dict.fromkeys(s, cfg.bos_clamp_value) for s in bos_set],
        model.device,
        mode="clamp",
        positions="bos",
    )
    reinject = [
        {**dict.fromkeys(m, c), **dict.fromkeys(x, cfg.reinject_scale)}
        for m, x in zip(minimal, h, strict=True)
    ]
    conditions = {
        "clean": ([], [0] * n),
        "m": (_ablate(model, saes, minimal, c), _sizes(minimal)),
        "m_plus_h": (_ablate(model, saes, m_h, c), _sizes(m_h)),
        "m_weak": (_ablate(model, saes, minimal, weak), _sizes(minimal)),
        "m_plus_h_weak": (_ablate(model, saes, m_h_weak, weak), _sizes(m_h_weak)),
        "m_plus_control_weak": (_ablate(model, saes, m_control, weak), _sizes(m_control)),
        "reinject": (row_edits(saes, reinject, model.device), _sizes(m_h)),
        # the clamp goes first: at a shared layer it reads the residual before M's edit
        "bos_clamp": (bos_clamp + _ablate(model, saes, minimal, c), _sizes(bos_set)),
    }
    if saes.skip_first_token:  # the SAEs leave the first token alone: a <bos> clamp would edit nothing
        del conditions["bos_clamp"]
    return conditions


def _run_tests(
    model,
    batch: Batch,
    texts: list[str],
    dissected: list[int],
    conditions: dict[str, tuple[list[FeatureEdit], list[int]]],
    cfg: RedundancyConfig,
    judge: Judge,
    flip: Criterion,
) -> pl.DataFrame:
    """The tests table: per condition and prompt, the refusal score, the first-token margin, the
    judged generation and the criterion's verdict; jailbroken where the judge and it agree."""
    test_rows = []
    for name, (edits, sizes) in tqdm(conditions.items(), desc="redundancy tests", leave=False):
        both, texts_out, refused, flipped = _judged_run(model, batch, texts, edits, cfg, judge, flip)
        for i, idx in enumerate(dissected):
            score, margin = float(both[i, 0]), float(both[i, 1])
            test_rows.append((idx, name, sizes[i], score, bool(refused[i]), _jailbroken(refused[i], flipped[i]),
                              texts_out[i], margin, bool(flipped[i])))  # fmt: skip
    return _tests_frame(test_rows)


def _judged_run(
    model, batch: Batch, texts: list[str], edits, cfg: RedundancyConfig, judge: Judge, flip: Criterion
) -> tuple[torch.Tensor, list[str], list[bool], list[bool]]:
    """One condition over `batch`: ([N, 2] refusal score and first-token margin, the generations,
    the judge's refusal verdicts, the criterion's flips)."""
    both = last_logits(model, batch, edits, cfg.batch_size, what="flip")
    texts_out = generate(model, batch, edits, cfg.max_new_tokens or model.cfg.max_new_tokens, cfg.batch_size)
    refused = judge.refused(texts, texts_out)
    return both, texts_out, refused, flip.flipped(both, refused)


def _jailbroken(refused: bool, flipped: bool) -> bool:
    """A jailbreak: the judge finds no refusal and the flip criterion reads a flip."""
    return not refused and bool(flipped)


def _notes(
    awakened: pl.DataFrame,
    tests: pl.DataFrame,
    minimal: list[list[Feature]],
    h: list[list[Feature]],
    cfg: RedundancyConfig,
    c: float,
    scanned: list[int],
) -> dict[str, str]:
    """Why each None (or 0) of the summary is what it is."""
    notes: dict[str, str] = {}
    if not any(h):
        notes["n_awakened"] = (
            f"no latent is dormant (max <= {cfg.dormant_max}) on the clean run and awake "
            f"(max > {cfg.awake_min}) after ablating M at {c}"
        )
    notes.update(_reasons(awakened, tests, cfg))
    last = max(scanned)
    at_last = sum(all(layer == last for layer, _ in m) for m in minimal)
    if at_last:
        # a latent is read before its own layer's edit, so nothing can wake downstream of the last SAE layer
        notes["n_awakened"] = "; ".join(filter(None, [notes.get("n_awakened"),
            f"{at_last} of {len(minimal)} minimal sets lie only in the last SAE layer ({last}), downstream of "
            "which no latent can wake; n_awakened averages over all prompts"]))  # fmt: skip
    return notes


def h_effects(
    model,
    saes,
    texts: list[str],
    dissected: list[int],
    minimal: list[list[Feature]],
    h: list[list[Feature]],
    weak: list[float],
    cfg: RedundancyConfig,
) -> dict[tuple[int, int, int], float]:
    """(prompt_idx, layer, latent) → refusal score with M ∪ {h} ablated at the prompt's weak
    scale (`weak`) minus the score with M alone, for every latent h of each prompt's weak H. Both scores come from
    one tokenized batch (M alone, then M ∪ {h} per latent), so they share the padding."""
    rows: list[tuple[int, Feature | None]] = [(i, x) for i, hs in enumerate(h) if hs for x in [None, *hs]]
    if not rows:
        return {}
    sets = [minimal[i] + ([x] if x is not None else []) for i, x in rows]
    batch = model.tokenize([texts[i] for i, _ in rows])
    scores = refusal_scores(
        model, batch, _ablate(model, saes, sets, [weak[i] for i, _ in rows]), cfg.batch_size
    )
    base: dict[int, float] = {}
    out: dict[tuple[int, int, int], float] = {}
    for (i, x), score in zip(rows, scores.tolist(), strict=True):
        if x is None:
            base[i] = float(score)
        else:
            out[(dissected[i], int(x[0]), int(x[1]))] = float(score) - base[i]
    return out


def _with_effects(awakened: pl.DataFrame, effects: dict[tuple[int, int, int], float]) -> pl.DataFrame:
    """The awakened table with each weak-H latent's effect (null elsewhere)."""
    keys = zip(
        awakened["prompt_idx"], awakened["ablation"], awakened["layer"], awakened["feature"], strict=True
    )
    col = [effects.get((p, layer, f)) if a == "weak" else None for p, a, layer, f in keys]
    return awakened.with_columns(pl.Series("effect", col, dtype=pl.Float64))


def _union(a: list[list[Feature]], b: list[list[Feature]]) -> list[list[Feature]]:
    return [x + y for x, y in zip(a, b, strict=True)]


def _sizes(sets: list[list[Feature]]) -> list[int]:
    return [len(s) for s in sets]


def _awakened_frame(rows: list[tuple]) -> pl.DataFrame:
    schema = {
        "prompt_idx": pl.Int64, "ablation": pl.Utf8, "layer": pl.Int64, "feature": pl.Int64,
        "clean_max": pl.Float64, "ablated_max": pl.Float64, "ablated_bos": pl.Float64,
        "rank": pl.Int64, "in_h": pl.Boolean,
    }  # fmt: skip
    return _with_effects(pl.DataFrame(rows, schema=schema, orient="row"), {})


def _tests_frame(rows: list[tuple]) -> pl.DataFrame:
    """The tests table from (prompt_idx, condition, n_edited, refusal_score, judge_refused,
    jailbroken, response, first_token_margin, flipped) rows."""
    schema = {
        "prompt_idx": pl.Int64, "condition": pl.Utf8, "n_edited": pl.Int64, "refusal_score": pl.Float64,
        "judge_refused": pl.Boolean, "jailbroken": pl.Boolean, "response": pl.Utf8,
        "first_token_margin": pl.Float64, "flipped": pl.Boolean,
    }  # fmt: skip
    return pl.DataFrame(rows, schema=schema, orient="row")


def _baseline_refused(tests: pl.DataFrame) -> list[int]:
    """Prompts whose clean run the judge and the criterion agree is refused: the denominator of
    every rate (a folder from before the criterion's verdict: the judge's alone)."""
    refused = (
        pl.col("judge_refused") & ~pl.col("flipped")
        if "flipped" in tests.columns
        else pl.col("judge_refused")
    )
    return tests.filter((pl.col("condition") == "clean") & refused)["prompt_idx"].to_list()


def _rate(tests: pl.DataFrame, condition: str, prompts: list[int] | None = None, col: str = "jailbroken"):
    t = tests.filter(pl.col("condition") == condition)
    if prompts is not None:
        t = t.filter(pl.col("prompt_idx").is_in(prompts))
    return None if t.height == 0 else mean_of(t[col])


# The summary keys counted from `jailbroken` (and their denominators): None for a folder whose
# jailbroken column is the judge's alone
JUDGED_KEYS = (
    "jailbreak_rate_n", "clean_jailbreak_rate", "m_jailbreak_rate", "m_plus_h_jailbreak_rate", "m_weak_jailbreak_rate",
    "m_plus_h_weak_jailbreak_rate", "m_plus_control_weak_jailbreak_rate", "m_plus_h_weak_gain_p",
    "m_plus_h_weak_control_p", "reinject_refusal_rate", "reinject_refusal_rate_n", "bos_clamp_jailbreak_rate",
    "bos_clamp_jailbreak_change", "judge_criterion_disagreements",
)  # fmt: skip


def gain_significant(summary: dict) -> bool:
    """Whether both sign tests of a summary (M ∪ H against M alone, and against M ∪ C) pass its
    level; a summary saved before the tests existed has neither, and is not significant."""
    level, p_m, p_c = (
        summary.get(k) for k in ("gain_significance", "m_plus_h_weak_gain_p", "m_plus_h_weak_control_p")
    )
    return level is not None and p_m is not None and p_c is not None and max(p_m, p_c) <= level


def sign_test(tests: pl.DataFrame, better: str, than: str, prompts: list[int]) -> float | None:
    """One-sided exact sign test (binomial, p = 1/2) that condition `better` jailbreaks more of
    `prompts` than `than`, on the discordant prompts (jailbroken under one condition only).
    1.0 when none is discordant; None when either condition was not run."""
    pair = tests.filter(pl.col("prompt_idx").is_in(prompts) & pl.col("condition").is_in([better, than]))
    wide = pair.pivot(on="condition", index="prompt_idx", values="jailbroken")
    if better not in wide.columns or than not in wide.columns:
        return None
    gains = wide.filter(pl.col(better) & ~pl.col(than)).height
    losses = wide.filter(~pl.col(better) & pl.col(than)).height
    return sign_test_p(gains, losses)


def _h_prompts(awakened: pl.DataFrame, ablation: str = "strong") -> list[int]:
    return sorted(
        set(awakened.filter((pl.col("ablation") == ablation) & pl.col("in_h"))["prompt_idx"].to_list())
    )


def summarise(awakened: pl.DataFrame, tests: pl.DataFrame, holding_tolerance: float = 0.0) -> dict:
    """Headline numbers from the two tables (so a loaded result summarises identically). Every
    jailbreak rate is over the prompts refused at baseline (`jailbreak_rate_n` of them)."""
    prompts = sorted(set(tests["prompt_idx"].to_list()))
    n = len(prompts)
    base = _baseline_refused(tests)
    strong = awakened.filter(pl.col("ablation") == "strong")
    with_h = _h_prompts(awakened)
    m_rate = _rate(tests, "m", base)
    bos = tests.filter(pl.col("condition") == "bos_clamp")
    clamped = bos.height > 0 and int(bos["n_edited"].sum()) > 0
    bos_rate = _rate(tests, "bos_clamp", base) if clamped else None
    # restoration is asked only where M did jailbreak and something woke up
    broken = tests.filter((pl.col("condition") == "m") & pl.col("jailbroken"))["prompt_idx"].to_list()
    restore = [p for p in with_h if p in broken and p in base]
    reinject = _rate(tests, "reinject", restore) if restore else None
    score = tests.pivot(on="condition", index="prompt_idx", values="refusal_score") if n else None
    delta = None
    if score is not None and with_h:
        d = score.filter(pl.col("prompt_idx").is_in(with_h))
        delta = mean_of(d["m_plus_h"] - d["m"])
    rate = (lambda c: _rate(tests, c, base)) if base else (lambda c: None)
    # a run folder from before the per-latent effects has no effect column: not measured there
    effects = (
        awakened.filter(pl.col("effect").is_not_null())["effect"] if "effect" in awakened.columns else None
    )
    return {
        "n_prompts": n,
        "n_awakened": strong.height / n if n else None,  # all awakened latents, before the top_awake cut
        "h_size": strong.filter(pl.col("in_h")).height / n if n else None,
        "n_prompts_with_h": len(with_h) if n else None,
        "jailbreak_rate_n": len(base) if n else None,  # prompts refused at baseline (clean: judge and criterion)
        "clean_jailbreak_rate": rate("clean"),
        "m_jailbreak_rate": rate("m"),
        "m_plus_h_jailbreak_rate": rate("m_plus_h"),
        "m_plus_h_score_change": delta,
        "m_weak_jailbreak_rate": rate("m_weak"),
        "m_plus_h_weak_jailbreak_rate": rate("m_plus_h_weak"),
        "m_plus_control_weak_jailbreak_rate": rate("m_plus_control_weak"),
        # is the gain of M ∪ H more than chance? Sign tests on the same prompts, against M alone and M ∪ C
        "m_plus_h_weak_gain_p": sign_test(tests, "m_plus_h_weak", "m_weak", base) if base else None,
        "m_plus_h_weak_control_p": sign_test(tests, "m_plus_h_weak", "m_plus_control_weak", base) if base else None,
        "gain_significance": SIGNIFICANCE,  # the level both p-values are held to
        # test rows where the judge and the flip criterion part (counted as no jailbreak)
        "judge_criterion_disagreements": int((tests["judge_refused"] == tests["flipped"]).sum())
        if "flipped" in tests.columns else None,
        # of the weak H's latents, each ablated with M alone: the share that lowers the refusal score
        # by more than the tolerance
        "h_holding_share": mean_of(effects < -holding_tolerance) if effects is not None and len(effects) else None,
        "h_holding_n": len(effects) if effects is not None else None,
        "reinject_refusal_rate": None if reinject is None else 1.0 - reinject,
        "reinject_refusal_rate_n": len(restore) if n else None,
        "bos_clamp_jailbreak_rate": bos_rate,
        # relative change, like the paper's "−80%": (rate with clamp − rate of M) / rate of M
        "bos_clamp_jailbreak_change": (bos_rate - m_rate) / m_rate if m_rate and bos_rate is not None else None,
        "h_active_at_bos": float(strong.filter(pl.col("in_h") & (pl.col("ablated_bos") > 0)).height / len(with_h))
        if with_h and not strong["ablated_bos"].is_nan().all() else None,  # NaN: the first token was not read
    }  # fmt: skip


def _reasons(awakened: pl.DataFrame, tests: pl.DataFrame, cfg: RedundancyConfig) -> dict[str, str]:
    """Why a summary number is None or trivially 0: said once, next to the number."""
    s = summarise(awakened, tests)
    notes = {}
    if not s["jailbreak_rate_n"]:
        why = "no dissected prompt is refused on its clean run by the judge and the flip criterion together"
        notes.update({k: why for k in s if k.endswith("jailbreak_rate")})
    if s["reinject_refusal_rate"] is None:
        notes["reinject_refusal_rate"] = "no prompt has both an M-ablated jailbreak and an awakened set H"
    skipped = ("the SAEs leave each prompt's first token alone (sae.skip_first_token: they never saw it), so "
               "nothing is read or clamped at <bos>")  # fmt: skip
    if s["h_active_at_bos"] is None:
        with_h = awakened.filter(pl.col("in_h"))
        notes["h_active_at_bos"] = skipped if with_h.height else "no prompt has an awakened set H"
    bos = tests.filter(pl.col("condition") == "bos_clamp")
    if bos.height == 0 and tests.height:
        notes["bos_clamp_jailbreak_rate"] = notes["bos_clamp_jailbreak_change"] = skipped
    elif s["bos_clamp_jailbreak_rate"] is None and bos.height and int(bos["n_edited"].sum()) == 0:
        why = (
            f"the <bos> clamp set ({cfg.bos_features} latents) is empty on every prompt: nothing was clamped"
        )
        notes["bos_clamp_jailbreak_rate"] = notes["bos_clamp_jailbreak_change"] = why
    elif s["bos_clamp_jailbreak_change"] is None:
        notes["bos_clamp_jailbreak_change"] = "ablating M jailbroke no prompt, so there is no rate to change"
    else:
        by = tests.pivot(on="condition", index="prompt_idx", values="refusal_score")
        if float(cast(float, (by["bos_clamp"] - by["m"]).abs().max())) < 1e-5:
            notes["bos_clamp_jailbreak_change"] = (
                f"clamping the {cfg.bos_features} latents at <bos> to {cfg.bos_clamp_value} left every refusal "
                "score unchanged (to 1e-5): a no-op on this model, change 0 as measured"
            )
    if s["h_holding_share"] is None:
        notes["h_holding_share"] = (
            "a run folder from before the per-latent effects: not measured"
            if s["h_holding_n"] is None
            else "no prompt has an awakened set H at the weak ablation"
        )
    if s["m_plus_h_score_change"] is None:
        notes["m_plus_h_score_change"] = "no prompt has an awakened set H"
    elif s["m_plus_h_score_change"] > 0:
        notes["m_plus_h_score_change"] = (
            f"ablating H with M raised the refusal score by {s['m_plus_h_score_change']:.2f} on average: the "
            "awakened latents lean toward compliance, the opposite of compensating for M"
        )
    return notes
