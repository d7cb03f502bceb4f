"""Stage 3: interaction discovery with a factorization machine over ablation masks.

Stage 3 of arXiv 2509.09708. Per dissected prompt: pool P = M ∪ the other candidates active on the prompt
(+ optionally the strongest other active SAE latents); sample binary masks over P stratified by
size, score each with the AblationEngine (batched, resumable), and fit a second-order FM
ŷ = w0 + Σ w_i m_i + Σ_{i<j} ⟨v_i, v_j⟩ m_i m_j and a first-order (linear) model on the same
train masks, for the refusal score (regression) and for the flip (classification; the flip
criterion decides, as in greedy — with criterion=judge, which would need a generation per mask,
the first-token criterion labels the masks and the notes say so). The FM must beat the linear
model on held-out masks for its interactions to mean anything. Top features by |w_i| and top
pairs by |⟨v_i, v_j⟩| are read out from one FM ("classification" if cfg.readout lists it, else
the regression FM: its target is continuous, so its weights are in refusal-score units), and the
top pairs are confirmed causally: ablate i alone, j alone, both. The FM beats the linear model
(`beats_linear`) when an exact one-sided sign test over every prompt's held-out masks, on those
that one of the two labels right and the other wrong, gives p ≤ 0.05 (`beats_linear_p`): a mean
accuracy ahead by one mask in a few dozen is not a finding.

Confirmation rule (ours): with Δ(S) = s(S ablated) − s(nothing), a pair is confirmed when the
measured interaction Δ(ij) − Δ(i) − Δ(j) has the sign the FM predicts (sign ⟨v_i, v_j⟩ for the
regression readout; flipped for the classification readout, whose positive class is the flip)
and magnitude above cfg.confirm_tolerance (refusal-score units). Each pair gets a kind (`pair_kind`),
from the drops d = −Δ (refusal removed) and tolerance t: additive when |d(ij) − d(i) − d(j)| ≤ t;
else redundant when d(ij) is within t of both singles (either alone suffices); suppression when it
is within t of exactly one (the pair does what one member does alone: ablating it switches the
other's effect off), or when d(ij) < d(i) + d(j) otherwise; synergy when the joint effect exceeds
the sum of the singles and neither alone accounts for it.

With "classify_prompts" in cfg.readout, an extra step fits the seed paper's classifier (Yeo,
Prakash et al. 2025): an FM and a linear model on the pool features' activations, max-pooled over
each prompt's positions and scaled by the train split's max, telling harmful from harmless
prompts; trained on the train split, held out on val + eval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean, median

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import (
    StageDir,
    mean_of,
    read_json,
    read_parquet,
    read_tensors,
    write_json,
    write_parquet,
    write_tensors,
)
from ..config import FMConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature
from ..features import feature_activations
from ..models import LoadedModel
from ..saes import LoadedSAEs
from ..scoring import SIGNIFICANCE, Criterion, sign_test_p
from .candidates import CandidatesResult
from .fm_models import FactorizationMachine, LinearModel, Task, fit, metrics, ridge  # noqa: F401
from .greedy import GreedyResult
from .greedy_search import label

log = logging.getLogger(__name__)


def sample_masks(n: int, n_masks: int, gen: torch.Generator) -> torch.Tensor:
    """[N, n] bool, distinct: all-off, all-on, then size ~ U{0..n} and a uniform subset of that size.

    When 2^n ≤ n_masks every mask is enumerated instead. Duplicates are dropped (they would leak
    across the train/held-out split), so small pools may give fewer than n_masks.
    """
    if n < 31 and 2**n <= n_masks:
        codes = torch.arange(2**n)
        return (codes[:, None] >> torch.arange(n)) & 1 == 1
    seen: dict[bytes, torch.Tensor] = {}
    for m in (torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)):
        seen[m.numpy().tobytes()] = m
    tries = 0
    while len(seen) < n_masks and tries < 50 * n_masks:
        tries += 1
        size = int(torch.randint(0, n + 1, (1,), generator=gen))
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[:size]] = True
        seen.setdefault(m.numpy().tobytes(), m)
    return torch.stack(list(seen.values()))


def build_pool(model, saes, instruction: str, minimal: Sequence[Feature], candidates: Sequence[Feature],
               extra_active: int) -> list[dict]:  # fmt: skip
    """P = M ∪ the candidates active (> 0 somewhere) on the prompt (+ the `extra_active` strongest
    other active latents of any SAE layer). One dict per pool column: layer, feature, source, max_act."""
    cands = [(int(a), int(b)) for a, b in candidates]
    acts = feature_activations(model, saes, cands, [instruction])[0].amax(0)  # [|C|]
    mins = {(int(a), int(b)) for a, b in minimal}
    pool = [{"layer": f[0], "feature": f[1], "source": "minimal", "max_act": float(a)}
            for f, a in zip(cands, acts.tolist(), strict=True) if f in mins]  # fmt: skip
    pool += [{"layer": f[0], "feature": f[1], "source": "candidate", "max_act": float(a)}
             for f, a in zip(cands, acts.tolist(), strict=True) if f not in mins and a > 0]  # fmt: skip
    if extra_active > 0:
        taken = set(cands)
        every = [(layer, i) for layer in saes.layers for i in range(saes.width(layer))]
        full = feature_activations(model, saes, every, [instruction])[0].amax(0)
        order = sorted(range(len(every)), key=lambda c: (-float(full[c]), c))
        extra = [c for c in order if full[c] > 0 and every[c] not in taken][:extra_active]
        pool += [
            {"layer": every[c][0], "feature": every[c][1], "source": "extra", "max_act": float(full[c])}
            for c in extra
        ]
    return pool


def evaluate_masks(
    engine: AblationEngine, batch, masks: torch.Tensor, out: StageDir, idx: int, chunk: int
) -> torch.Tensor:
    """(refusal score, first-token margin) [N, 2] of every mask; each chunk of masks is a part
    file, reused on resume."""
    flips = []
    for c, i0 in enumerate(tqdm(range(0, len(masks), chunk), desc=f"fm masks p{idx}", leave=False)):
        m = masks[i0 : i0 + chunk]
        part = out.part(f"prompt_{idx}_masks_{c:03d}.safetensors")
        if part.exists():
            saved = read_tensors(part)
            if torch.equal(saved["masks"], m.to(torch.uint8)) and "flips" in saved:
                flips.append(saved["flips"])
                continue
        f = engine.scores_many([(batch, m)], what="flip")[0].float().reshape(-1, 2)
        write_tensors(part, {"masks": m.to(torch.uint8), "flips": f})
        flips.append(f)
    return torch.cat(flips)


def confirm_pairs(engine: AblationEngine, batch, pairs: list[tuple[int, int]]) -> list[dict]:
    """Δ(i), Δ(j), Δ(ij) (score change from the clean run) for each pair, in one batched call."""
    masks = torch.zeros(1 + 3 * len(pairs), engine.size, dtype=torch.bool)
    for p, (i, j) in enumerate(pairs):
        masks[1 + 3 * p, i] = masks[2 + 3 * p, j] = True
        masks[3 + 3 * p, [i, j]] = True
    s = engine.scores(batch, masks).tolist()
    out = []
    for p in range(len(pairs)):
        di, dj, dij = (s[1 + 3 * p + q] - s[0] for q in range(3))
        out.append({"effect_i": di, "effect_j": dj, "joint_effect": dij, "sum_singles": di + dj})
    return out


def fit_all(
    idx: int,
    X: torch.Tensor,
    scores: torch.Tensor,
    flipped: torch.Tensor,
    held: torch.Tensor,
    cfg: FMConfig,
    seed: int,
):
    """FM and linear model × regression (score) and classification (flipped), on the same train
    masks. Returns (fit-table rows, {(task, model): fitted module}, weights by name). Each
    classification row also counts the held-out masks that model labels right and the other
    model wrong (`heldout_only_right`), what the sign test of FM against linear reads."""
    rows, models, weights = [], {}, {}
    tasks: tuple[tuple[Task, torch.Tensor], ...] = (
        ("regression", scores),
        ("classification", flipped.float()),
    )
    for task, y in tasks:
        for name in ("fm", "linear"):
            m = (
                FactorizationMachine(X.shape[1], cfg.rank, seed)
                if name == "fm"
                else LinearModel(X.shape[1], seed)
            )
            tr = fit(m, X[~held], y[~held], task, cfg)
            te = metrics(m, X[held], y[held], task) if held.any() else {"r2": None, "accuracy": None}
            rows.append({"prompt_idx": idx, "model": name, "task": task, "n_train": int((~held).sum()),
                         "n_heldout": int(held.sum()), "train_loss": tr["train_loss"], "train_r2": tr["r2"],
                         "train_accuracy": tr["accuracy"], "heldout_r2": te["r2"],
                         "heldout_accuracy": te["accuracy"]})  # fmt: skip
            models[(task, name)] = m
            weights.update(
                {f"{idx}/{task}/{name}/{k}": v.detach().clone() for k, v in m.state_dict().items()}
            )
    y = flipped[held] > 0.5
    with torch.no_grad():
        right = {
            name: (models[("classification", name)](X[held].float()) > 0) == y for name in ("fm", "linear")
        }
    for r in rows:
        if r["task"] == "classification":
            other = "linear" if r["model"] == "fm" else "fm"
            r["heldout_only_right"] = int((right[r["model"]] & ~right[other]).sum()) if held.any() else None
        else:
            r["heldout_only_right"] = None
    return rows, models, weights


def read_out(idx: int, feats: list[Feature], pool: list[dict], fm: FactorizationMachine, lin: LinearModel,
             engine: AblationEngine, batch, cfg: FMConfig) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Top features by |w_i| (all of P, ranked) and the top cfg.top_pairs pairs by |⟨v_i, v_j⟩|,
    each confirmed causally (see the module docstring for the rule)."""
    w, lw = fm.w.detach().tolist(), lin.w.detach().tolist()
    top = [{"prompt_idx": idx, "rank": r, "label": label(feats[i]), "layer": feats[i][0], "feature": feats[i][1],
            "source": pool[i]["source"], "weight": w[i], "linear_weight": lw[i]}
           for r, i in enumerate(sorted(range(len(pool)), key=lambda c: (-abs(w[c]), c)))]  # fmt: skip
    vv = fm.interactions().detach()
    pairs = sorted(((i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))),
                   key=lambda ij: (-abs(float(vv[ij])), ij))[: cfg.top_pairs]  # fmt: skip
    expected = (
        1.0 if mask_readout(cfg) == "regression" else -1.0
    )  # the classification's positive class lowers s
    inter_rows = []
    for r, ((i, j), c) in enumerate(zip(pairs, confirm_pairs(engine, batch, pairs), strict=True)):
        inter = c["joint_effect"] - c["sum_singles"]
        sign_ok = inter * expected * float(vv[i, j]) > 0
        inter_rows.append({"prompt_idx": idx, "rank": r, "label_i": label(feats[i]), "layer_i": feats[i][0],
                           "feature_i": feats[i][1], "label_j": label(feats[j]), "layer_j": feats[j][0],
                           "feature_j": feats[j][1], "v_dot": float(vv[i, j]), **c, "interaction": inter,
                           "confirmed": bool(sign_ok and abs(inter) > cfg.confirm_tolerance),
                           "kind": pair_kind(c["effect_i"], c["effect_j"], c["joint_effect"], cfg.confirm_tolerance)})  # fmt: skip
    return top, inter_rows


PAIR_KINDS = ("synergy", "redundant", "suppression", "additive")


def pair_kind(effect_i: float, effect_j: float, joint: float, tol: float) -> str:
    """synergy | redundant | suppression | additive from the score changes Δ(i), Δ(j), Δ(ij)
    (see the module docstring); drops d = −Δ, so a larger d removes more refusal."""
    di, dj, dij = -effect_i, -effect_j, -joint
    if abs(dij - di - dj) <= tol:
        return "additive"
    near_i, near_j = abs(dij - di) <= tol, abs(dij - dj) <= tol
    if near_i and near_j:
        return "redundant"
    if near_i or near_j or dij < di + dj:
        return "suppression"
    return "synergy"


def mask_readout(cfg: FMConfig) -> str:
    """The mask FM whose weights are read out: classification if listed, else regression."""
    return "classification" if "classification" in cfg.readout else "regression"


def dissect_prompt(model, saes, idx: int, instruction: str, minimal, candidates, cfg: FMConfig, out: StageDir,
                   seed: int, coefficient: float, criterion: Criterion) -> dict[str, list | dict]:  # fmt: skip
    """Stage 3 on one prompt → rows for each table and the fitted weights."""
    pool = build_pool(model, saes, instruction, minimal, candidates, cfg.extra_active)
    feats = [(p["layer"], p["feature"]) for p in pool]
    engine = AblationEngine(model, saes, feats, value=coefficient, batch_size=cfg.batch_size)
    batch = model.tokenize([instruction])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
    masks = sample_masks(len(pool), cfg.n_masks, gen)
    both = evaluate_masks(engine, batch, masks, out, idx, cfg.chunk)
    scores, flipped = both[:, 0], mask_criterion(criterion).margin(both) < 0
    held = torch.zeros(len(masks), dtype=torch.bool)
    held[torch.randperm(len(masks), generator=gen)[: round(cfg.heldout_fraction * len(masks))]] = True
    fit_rows, models, weights = fit_all(idx, masks.float(), scores, flipped, held, cfg, seed)
    readout = mask_readout(cfg)
    top, inter = read_out(idx, feats, pool, models[(readout, "fm")], models[(readout, "linear")],
                          engine, batch, cfg)  # fmt: skip
    pools = [
        {"prompt_idx": idx, "column": c, "label": label(f), **p}
        for c, (f, p) in enumerate(zip(feats, pool, strict=True))
    ]
    dataset = [{"prompt_idx": idx, "mask": "".join("1" if b else "0" for b in m), "size": sum(m), "score": s,
                "first_token_margin": ft, "flipped": f, "split": "heldout" if h else "train"}
               for m, s, ft, f, h in zip(masks.tolist(), scores.tolist(), both[:, 1].tolist(), flipped.tolist(),
                                         held.tolist(), strict=True)]  # fmt: skip
    return {"dataset": dataset, "pools": pools, "fit": fit_rows, "interactions": inter, "top_features": top,
            "weights": weights}  # fmt: skip


SCHEMAS = {
    "dataset": {"prompt_idx": pl.Int64, "mask": pl.Utf8, "size": pl.Int64, "score": pl.Float64,
                "first_token_margin": pl.Float64, "flipped": pl.Boolean, "split": pl.Utf8},
    "pools": {"prompt_idx": pl.Int64, "column": pl.Int64, "label": pl.Utf8, "layer": pl.Int64,
              "feature": pl.Int64, "source": pl.Utf8, "max_act": pl.Float64},
    "fit": {"prompt_idx": pl.Int64, "model": pl.Utf8, "task": pl.Utf8, "n_train": pl.Int64, "n_heldout": pl.Int64,
            "train_loss": pl.Float64, "train_r2": pl.Float64, "train_accuracy": pl.Float64,
            "heldout_r2": pl.Float64, "heldout_accuracy": pl.Float64, "heldout_only_right": pl.Int64},
    "interactions": {"prompt_idx": pl.Int64, "rank": pl.Int64, "label_i": pl.Utf8, "layer_i": pl.Int64,
                     "feature_i": pl.Int64, "label_j": pl.Utf8, "layer_j": pl.Int64, "feature_j": pl.Int64,
                     "v_dot": pl.Float64, "effect_i": pl.Float64, "effect_j": pl.Float64,
                     "joint_effect": pl.Float64, "sum_singles": pl.Float64, "interaction": pl.Float64,
                     "confirmed": pl.Boolean, "kind": pl.Utf8},
    "top_features": {"prompt_idx": pl.Int64, "rank": pl.Int64, "label": pl.Utf8, "layer": pl.Int64,
                     "feature": pl.Int64, "source": pl.Utf8, "weight": pl.Float64, "linear_weight": pl.Float64},
    # the prompt classifier (readout classify_prompts): one row per model × split
    "classifier": {"model": pl.Utf8, "split": pl.Utf8, "n": pl.Int64, "n_features": pl.Int64,
                   "accuracy": pl.Float64},
}  # fmt: skip


def mask_criterion(criterion: Criterion) -> Criterion:
    """The criterion that labels FM masks: the judge would need a generation per mask, so
    criterion=judge labels them by the first token (said in the notes)."""
    return Criterion("first_token") if criterion.name == "judge" else criterion


@dataclass
class FMResult:
    dataset: pl.DataFrame  # every scored mask: prompt_idx, mask (pool bitstring), score, flipped, split
    pools: pl.DataFrame  # the pool P of each prompt: column → feature
    fit: pl.DataFrame  # held-out / train metrics per prompt × model (fm, linear) × task
    interactions: pl.DataFrame  # top pairs by |⟨v_i, v_j⟩| with their causal check and kind
    top_features: pl.DataFrame  # pool features ranked by |w_i| of the readout FM
    classifier: pl.DataFrame  # the prompt classifier's accuracy per model × split (empty if not run)
    weights: dict[str, torch.Tensor]  # "{prompt_idx}/{task}/{model}/{w0|w|V}", "classifier/{model}/…"
    coefficient: float  # scale c of every ablated latent
    criterion: str  # labels the classification masks (judge → first_token)
    notes: dict[str, str] = field(default_factory=dict)  # summary key → why it is None

    def _mean(self, model: str, task: str, col: str) -> float | None:
        vals = self.fit.filter((pl.col("model") == model) & (pl.col("task") == task))[col].drop_nulls()
        return mean_of(vals) if len(vals) else None

    def _classification(self, model: str) -> pl.DataFrame:
        return self.fit.filter((pl.col("model") == model) & (pl.col("task") == "classification"))

    def _pooled_accuracy(self, model: str) -> float | None:
        """The fraction of all prompts' held-out masks the model labels right (None without any)."""
        rows = self._classification(model).filter(pl.col("heldout_accuracy").is_not_null())
        n = int(rows["n_heldout"].sum()) if rows.height else 0
        return float((rows["heldout_accuracy"] * rows["n_heldout"]).sum()) / n if n else None

    def _beats_linear(self) -> dict:
        """beats_linear, beats_linear_p and the discordant held-out masks they read (None without any
        held-out mask, or in a run saved before the counts were kept)."""
        rows = (
            self.fit.filter(pl.col("task") == "classification")
            if "heldout_only_right" in self.fit.columns
            else None
        )
        out = dict.fromkeys(("beats_linear", "beats_linear_p", "fm_only_right", "linear_only_right"))
        if rows is None or not int(rows["n_heldout"].sum()):
            return out
        # a prompt whose pool is too small to hold any mask out (a null count) adds nothing to the test
        fm, lin = (
            int(rows.filter(pl.col("model") == m)["heldout_only_right"].fill_null(0).sum())
            for m in ("fm", "linear")
        )
        p = sign_test_p(fm, lin)
        return {
            "beats_linear": p <= SIGNIFICANCE,
            "beats_linear_p": p,
            "fm_only_right": fm,
            "linear_only_right": lin,
        }

    def _classifier(self, model: str) -> float | None:
        t = self.classifier.filter((pl.col("model") == model) & (pl.col("split") == "heldout"))
        return float(t["accuracy"][0]) if t.height else None

    def summary(self) -> dict:
        conf = self.interactions.filter(pl.col("confirmed"))
        per_prompt = self.dataset.group_by("prompt_idx").len()["len"].to_list()
        pool_sizes = self.pools.group_by("prompt_idx").len()["len"].to_list()
        heldout = self.classifier.filter(pl.col("split") == "heldout")
        kinds = {
            k: int((conf["kind"] == k).sum()) if self.interactions.height else None for k in PAIR_KINDS[:3]
        }
        return {
            "n_prompts": self.fit["prompt_idx"].n_unique() if self.fit.height else None,
            "coefficient": self.coefficient,
            "criterion": self.criterion,
            # masks scored per prompt (fewer than fm.n_masks where a small pool has fewer distinct masks)
            "n_masks_per_prompt": (per_prompt[0] if len(set(per_prompt)) == 1 else float(mean(per_prompt)))
            if per_prompt else None,
            "n_masks_total": self.dataset.height if per_prompt else None,
            # latents in a prompt's pool (M and the other candidates active on it): a small pool has few
            # distinct masks to hold out, too few for the FM to show what its pairs add
            "median_pool_size": float(median(pool_sizes)) if pool_sizes else None,
            # pooled over every prompt's held-out masks: a prompt whose small pool leaves 3 held-out masks
            # counts for 3, not for as much as one with 400 (the per-prompt figures are in fit.parquet)
            "heldout_accuracy": self._pooled_accuracy("fm"),
            "linear_heldout_accuracy": self._pooled_accuracy("linear"),
            "n_heldout_masks": int(self._classification("fm")["n_heldout"].sum()) if self.fit.height else None,
            # the FM against the linear model on the held-out masks of every prompt: an exact sign test
            # on the masks that one of them labels right and the other wrong (p ≤ SIGNIFICANCE: it beats it)
            **self._beats_linear(),
            # the mean over prompts of each prompt's held-out R², against that prompt's own score variance
            # (pooling the masks would credit the model with the spread between prompts' scores)
            "heldout_r2": self._mean("fm", "regression", "heldout_r2"),
            "linear_heldout_r2": self._mean("linear", "regression", "heldout_r2"),
            "top_pair_confirmed_rate": mean_of(self.interactions["confirmed"])
            if self.interactions.height else None,
            "n_confirmed_pairs": conf.height if self.interactions.height else None,
            **{f"n_{k}_pairs": v for k, v in kinds.items()},
            "classifier_heldout_accuracy": self._classifier("fm"),
            "classifier_linear_heldout_accuracy": self._classifier("linear"),
            "classifier_n_heldout": int(heldout["n"][0]) if heldout.height else None,
            "classifier_n_features": int(heldout["n_features"][0]) if heldout.height else None,
        }  # fmt: skip

    def save(self, out: StageDir) -> None:
        for name in SCHEMAS:
            write_parquet(out.file(f"{name}.parquet"), getattr(self, name))
        write_tensors(out.file("weights.safetensors"), self.weights)
        meta = {"coefficient": self.coefficient, "criterion": self.criterion, "notes": self.notes}
        write_json(out.file("fm.json"), meta)
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> FMResult:
        tables = {name: read_parquet(out.file(f"{name}.parquet")) for name in SCHEMAS}
        meta = read_json(out.file("fm.json"))
        return cls(**tables, weights=read_tensors(out.file("weights.safetensors")),
                   coefficient=float(meta["coefficient"]), criterion=str(meta["criterion"]),
                   notes=dict(meta["notes"]))  # fmt: skip


def classify_prompts(model, saes, features: list[Feature], prompts, cfg: FMConfig, seed: int):
    """The prompt classifier: FM and linear model on the features' activations, max-pooled over
    each prompt, harmful (1) vs harmless (0); train split → train, val + eval → held out.
    Returns (classifier-table rows, weights by name)."""
    sets = {
        "train": [(prompts.train_harmful, 1.0), (prompts.train_harmless, 0.0)],
        "heldout": [(prompts.val_harmful, 1.0), (prompts.val_harmless, 0.0),
                    (prompts.eval_harmful, 1.0), (prompts.eval_harmless, 0.0)],
    }  # fmt: skip
    X, y = {}, {}
    for split, parts in sets.items():
        texts = [t for ps, _ in parts for t in ps.instructions]
        acts = feature_activations(model, saes, features, texts, batch_size=cfg.batch_size)
        X[split] = torch.stack([a.amax(0) for a in acts]).float()  # [N, F]: max over the prompt's positions
        y[split] = torch.tensor([lab for ps, lab in parts for _ in ps.instructions])
    # scaled to [0, 1] by the train split's max, as the mask FM's inputs are: standardising sparse
    # activations blows rare ones up to many σ, and the pairwise products of those overfit
    scale = X["train"].amax(0).clamp_min(1e-6)
    rows, weights = [], {}
    for name in ("fm", "linear"):
        m = (
            FactorizationMachine(len(features), cfg.rank, seed)
            if name == "fm"
            else LinearModel(len(features), seed)
        )
        fit(m, X["train"] / scale, y["train"], "classification", cfg)
        for split in sets:
            acc = metrics(m, X[split] / scale, y[split], "classification")["accuracy"]
            rows.append(
                {
                    "model": name,
                    "split": split,
                    "n": len(y[split]),
                    "n_features": len(features),
                    "accuracy": acc,
                }
            )
        weights.update({f"classifier/{name}/{k}": v.detach().clone() for k, v in m.state_dict().items()})
    weights["classifier/scale"] = scale
    return rows, weights


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    candidates: CandidatesResult,
    greedy: GreedyResult,
    prompts: Prompts,
    cfg: FMConfig,
    out: StageDir,
    seed: int,
    coefficient: float,
    criterion: Criterion,
) -> FMResult:
    """FM dissection of up to cfg.max_prompts prompts that greedy dissected (by prompt index),
    then the prompt classifier over the union of their pools (readout classify_prompts)."""
    chosen = greedy.sets.sort("prompt_idx").head(cfg.max_prompts).to_dicts()
    rows: dict[str, list] = {name: [] for name in SCHEMAS}
    weights: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    for r in tqdm(chosen, desc="fm", leave=False):
        minimal = list(zip(r["layers"], r["features"], strict=True))
        got = dissect_prompt(model, saes, r["prompt_idx"], r["instruction"], minimal, candidates.features, cfg,
                             out, seed, coefficient, criterion)  # fmt: skip
        for name in SCHEMAS:
            rows[name] += got.get(name, [])
        weights.update(got["weights"])
    pool = sorted({(int(p["layer"]), int(p["feature"])) for p in rows["pools"]})
    if "classify_prompts" in cfg.readout and pool:
        rows["classifier"], w = classify_prompts(model, saes, pool, prompts, cfg, seed)
        weights.update(w)
    tables = {name: pl.DataFrame(rows[name], schema=s) for name, s in SCHEMAS.items()}
    result = FMResult(
        tables["dataset"],
        tables["pools"],
        tables["fit"],
        tables["interactions"],
        tables["top_features"],
        tables["classifier"],
        weights,
        coefficient,
        mask_criterion(criterion).name,
    )
    for key, value in result.summary().items():  # why each None is None
        if value is not None:
            continue
        if key.startswith("classifier"):
            notes[key] = ("fm.readout does not list classify_prompts" if "classify_prompts" not in cfg.readout
                          else "no FM pool: the classifier has no features")  # fmt: skip
        elif not chosen:
            notes[key] = "greedy dissected no prompt: there is no pool to sample masks over"
        elif "pair" in key:
            notes[key] = "no pool had two features: there are no pairs"
        elif key.endswith("r2"):
            notes[key] = "the held-out scores have no variance (or no held-out masks): R² is undefined"
        elif key in ("beats_linear", "beats_linear_p", "fm_only_right", "linear_only_right"):
            notes[key] = "no held-out masks: the FM was not compared with the linear model"
    if criterion.name == "judge":
        notes["heldout_accuracy"] = (
            "criterion=judge: the masks' flip labels come from the first-token criterion"
        )
    result.notes = notes
    return result
