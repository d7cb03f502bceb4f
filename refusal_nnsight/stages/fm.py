"""Stage 3: interaction discovery with a factorization machine over ablation masks.

SPEC.md "Stage 3". Per dissected prompt: pool P = M ∪ the other candidates active on the prompt
(+ optionally the strongest other active SAE latents); sample binary masks over P stratified by
size, score each with the AblationEngine (batched, resumable), and fit a second-order FM
ŷ = w0 + Σ w_i m_i + Σ_{i<j} ⟨v_i, v_j⟩ m_i m_j and a first-order (linear) model on the same
train masks, for the refusal score (regression) and for jailbreak = score < 0 (classification).
The FM must beat the linear model on held-out masks for its interactions to mean anything. Top
features by |w_i| and top pairs by |⟨v_i, v_j⟩| are read out from one FM (cfg.readout, default
the regression FM: its target is continuous, so its weights are in refusal-score units), and the
top pairs are confirmed causally: ablate i alone, j alone, both.

Confirmation rule (ours): with Δ(S) = s(S ablated) − s(nothing), a pair is confirmed when the
measured interaction Δ(ij) − Δ(i) − Δ(j) has the sign the FM predicts (sign ⟨v_i, v_j⟩ for the
regression readout; flipped for the classification readout, whose positive class is "score < 0")
and magnitude above cfg.confirm_tolerance (refusal-score units).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts import StageDir, read_parquet, read_tensors, write_parquet, write_tensors
from ..config import FMConfig
from ..engine import AblationEngine, Feature
from ..errors import NonFiniteError
from ..ground_truth import feature_activations
from .greedy import label

log = logging.getLogger(__name__)

Task = Literal["regression", "classification"]


class FactorizationMachine(nn.Module):
    """Second-order FM (Rendle 2010) in its O(n·k) form:
    ŷ = w0 + Σ w_i m_i + ½ Σ_f [(Σ_i v_if m_i)² − Σ_i v_if² m_i²]. X [N, n] → ŷ [N]."""

    def __init__(self, n: int, k: int = 8, seed: int = 0, init_std: float = 0.05):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(n))
        self.V = nn.Parameter(torch.randn(n, k, generator=g) * init_std)  # small random: breaks symmetry

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        xv = X @ self.V  # [N, k]
        pair = 0.5 * (xv.pow(2) - X.pow(2) @ self.V.pow(2)).sum(-1)
        return self.w0 + X @ self.w + pair

    def penalty(self) -> torch.Tensor:
        return self.w.pow(2).sum() + self.V.pow(2).sum()

    def interactions(self) -> torch.Tensor:
        """[n, n] ⟨v_i, v_j⟩ with a zero diagonal."""
        m = self.V @ self.V.T
        return m - torch.diag(torch.diag(m))

    @torch.no_grad()
    def rescale_(self, mean: float, std: float) -> None:
        """Map a model of (y − mean)/std back to y: every term scales by std (V by √std)."""
        self.w0.mul_(std).add_(mean)
        self.w.mul_(std)
        self.V.mul_(std**0.5)


class LinearModel(nn.Module):
    """First-order baseline ŷ = w0 + Σ w_i m_i, fitted the same way as the FM."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.w0 + X @ self.w

    def penalty(self) -> torch.Tensor:
        return self.w.pow(2).sum()

    @torch.no_grad()
    def rescale_(self, mean: float, std: float) -> None:
        self.w0.mul_(std).add_(mean)
        self.w.mul_(std)


def fit(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: Task, cfg: FMConfig) -> dict:
    """Full-batch Adam with an L2 penalty (cfg.lr, cfg.l2, cfg.epochs); deterministic given the init.

    Adam moves each weight by about lr per step, so the start matters. Regression fits the
    standardised target and starts w0, w at the closed-form ridge solution (the exact first-order
    fit: the linear model is done, and the FM's steps go to its interactions); the weights are
    mapped back to score units after. Classification fits logits, starting from one IRLS step.
    Returns train metrics; warns when the loss was still falling at the end.
    """
    X, y = X.float(), y.float()
    if task == "regression":
        mean = float(y.mean())
        std = float(y.std().clamp(min=1e-6)) if len(y) > 1 else 1.0
        target, loss_fn = (y - mean) / std, nn.functional.mse_loss
        w0, w = ridge(X, target, cfg.l2)
    else:
        mean, std = 0.0, 1.0
        target, loss_fn = y, nn.functional.binary_cross_entropy_with_logits
        # one Newton (IRLS) step of logistic regression from the base rate p: ridge on the working response
        p = float(y.mean().clamp(1e-3, 1 - 1e-3))
        w0, w = ridge(X, math.log(p / (1 - p)) + (y - p) / (p * (1 - p)), cfg.l2)
    with torch.no_grad():
        model.w0.copy_(w0)
        model.w.copy_(w)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            opt.zero_grad()
            loss = loss_fn(model(X), target) + cfg.l2 * model.penalty()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    if task == "regression":
        model.rescale_(mean, std)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteError(f"the {type(model).__name__} fit diverged; lower fm.lr")
    tail = losses[-max(len(losses) // 10, 1)]
    if task == "regression" and losses and tail - losses[-1] > 0.05 * abs(tail):  # logistic loss always falls
        log.warning("%s %s fit still improving at the last epoch (%.4g → %.4g); raise fm.epochs",
                    type(model).__name__, task, tail, losses[-1])  # fmt: skip
    return {"train_loss": losses[-1] if losses else None, **metrics(model, X, y, task)}


def ridge(X: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w0, w) minimising mean (y − w0 − Xw)² + l2·‖w‖² in closed form (float64 normal equations)."""
    Xa = torch.cat([torch.ones(len(X), 1, dtype=torch.float64), X.double()], 1)
    reg = torch.eye(Xa.shape[1], dtype=torch.float64) * l2
    reg[0, 0] = 0.0  # the intercept is not penalised
    beta = torch.linalg.solve(Xa.T @ Xa / len(X) + reg + 1e-9 * torch.eye(Xa.shape[1], dtype=torch.float64),
                              Xa.T @ y.double() / len(X))  # fmt: skip
    return beta[0].float(), beta[1:].float()


@torch.no_grad()
def metrics(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: Task) -> dict:
    """r2 (regression) and accuracy: for regression the sign accuracy (ŷ < 0 ⇔ y < 0)."""
    pred = model(X.float())
    if task == "regression":
        sst = float((y - y.mean()).pow(2).sum())
        r2 = 1 - float((y - pred).pow(2).sum()) / sst if sst > 0 else None
        return {"r2": r2, "accuracy": float(((pred < 0) == (y < 0)).float().mean())}
    return {"r2": None, "accuracy": float(((pred > 0) == (y > 0.5)).float().mean())}


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
    other active latents of any SAE layer). One dict per pool column: layer, latent, source, max_act."""
    cands = [(int(a), int(b)) for a, b in candidates]
    acts = feature_activations(model, saes, cands, [instruction])[0].amax(0)  # [|C|]
    mins = {(int(a), int(b)) for a, b in minimal}
    pool = [{"layer": f[0], "latent": f[1], "source": "minimal", "max_act": float(a)}
            for f, a in zip(cands, acts.tolist(), strict=True) if f in mins]  # fmt: skip
    pool += [{"layer": f[0], "latent": f[1], "source": "candidate", "max_act": float(a)}
             for f, a in zip(cands, acts.tolist(), strict=True) if f not in mins and a > 0]  # fmt: skip
    if extra_active > 0:
        taken = set(cands)
        every = [(layer, i) for layer in saes.layers for i in range(saes.width(layer))]
        full = feature_activations(model, saes, every, [instruction])[0].amax(0)
        order = sorted(range(len(every)), key=lambda c: (-float(full[c]), c))
        extra = [c for c in order if full[c] > 0 and every[c] not in taken][:extra_active]
        pool += [
            {"layer": every[c][0], "latent": every[c][1], "source": "extra", "max_act": float(full[c])}
            for c in extra
        ]
    return pool


def evaluate_masks(
    engine: AblationEngine, batch, masks: torch.Tensor, out: StageDir, idx: int, chunk: int
) -> torch.Tensor:
    """Refusal score [N] of every mask; each chunk of masks is a part file, reused on resume."""
    scores = []
    for c, i0 in enumerate(tqdm(range(0, len(masks), chunk), desc=f"fm masks p{idx}", leave=False)):
        m = masks[i0 : i0 + chunk]
        part = out.part(f"prompt_{idx}_masks_{c:03d}.safetensors")
        if part.exists():
            saved = read_tensors(part)
            if torch.equal(saved["masks"], m.to(torch.uint8)):
                scores.append(saved["scores"])
                continue
        s = engine.scores(batch, m).float()
        write_tensors(part, {"masks": m.to(torch.uint8), "scores": s})
        scores.append(s)
    return torch.cat(scores)


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


def fit_all(idx: int, X: torch.Tensor, scores: torch.Tensor, held: torch.Tensor, cfg: FMConfig, seed: int):
    """FM and linear model × regression (score) and classification (score < 0), on the same train
    masks. Returns (fit-table rows, {(task, model): fitted module}, weights by name)."""
    rows, models, weights = [], {}, {}
    for task, y in (("regression", scores), ("classification", (scores < 0).float())):
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
    return rows, models, weights


def read_out(idx: int, feats: list[Feature], pool: list[dict], fm: FactorizationMachine, lin: LinearModel,
             engine: AblationEngine, batch, cfg: FMConfig) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Top features by |w_i| (all of P, ranked) and the top cfg.top_pairs pairs by |⟨v_i, v_j⟩|,
    each confirmed causally (see the module docstring for the rule)."""
    w, lw = fm.w.detach().tolist(), lin.w.detach().tolist()
    top = [{"prompt_idx": idx, "rank": r, "feature": label(feats[i]), "layer": feats[i][0], "latent": feats[i][1],
            "source": pool[i]["source"], "weight": w[i], "linear_weight": lw[i]}
           for r, i in enumerate(sorted(range(len(pool)), key=lambda c: (-abs(w[c]), c)))]  # fmt: skip
    vv = fm.interactions().detach()
    pairs = sorted(((i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))),
                   key=lambda ij: (-abs(float(vv[ij])), ij))[: cfg.top_pairs]  # fmt: skip
    expected = 1.0 if cfg.readout == "regression" else -1.0  # classification's positive class lowers s
    inter_rows = []
    for r, ((i, j), c) in enumerate(zip(pairs, confirm_pairs(engine, batch, pairs), strict=True)):
        inter = c["joint_effect"] - c["sum_singles"]
        sign_ok = inter * expected * float(vv[i, j]) > 0
        inter_rows.append({"prompt_idx": idx, "rank": r, "feature_i": label(feats[i]), "layer_i": feats[i][0],
                           "latent_i": feats[i][1], "feature_j": label(feats[j]), "layer_j": feats[j][0],
                           "latent_j": feats[j][1], "v_dot": float(vv[i, j]), **c, "interaction": inter,
                           "confirmed": bool(sign_ok and abs(inter) > cfg.confirm_tolerance)})  # fmt: skip
    return top, inter_rows


def dissect_prompt(model, saes, idx: int, instruction: str, minimal, candidates, cfg: FMConfig, out: StageDir,
                   seed: int) -> dict[str, list | dict]:  # fmt: skip
    """Stage 3 on one prompt → rows for each table and the fitted weights."""
    pool = build_pool(model, saes, instruction, minimal, candidates, cfg.extra_active)
    feats = [(p["layer"], p["latent"]) for p in pool]
    engine = AblationEngine(model, saes, feats, value=cfg.coefficient, batch_size=cfg.batch_size)
    batch = model.tokenize([instruction])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
    masks = sample_masks(len(pool), cfg.n_masks, gen)
    scores = evaluate_masks(engine, batch, masks, out, idx, cfg.chunk)
    held = torch.zeros(len(masks), dtype=torch.bool)
    held[torch.randperm(len(masks), generator=gen)[: round(cfg.heldout_fraction * len(masks))]] = True
    fit_rows, models, weights = fit_all(idx, masks.float(), scores, held, cfg, seed)
    top, inter = read_out(idx, feats, pool, models[(cfg.readout, "fm")], models[(cfg.readout, "linear")],
                          engine, batch, cfg)  # fmt: skip
    pools = [
        {"prompt_idx": idx, "column": c, "feature": label(f), **p}
        for c, (f, p) in enumerate(zip(feats, pool, strict=True))
    ]
    dataset = [{"prompt_idx": idx, "mask": "".join("1" if b else "0" for b in m), "size": sum(m), "score": s,
                "jailbreak": s < 0, "split": "heldout" if h else "train"}
               for m, s, h in zip(masks.tolist(), scores.tolist(), held.tolist(), strict=True)]  # fmt: skip
    return {"dataset": dataset, "pools": pools, "fit": fit_rows, "interactions": inter, "top_features": top,
            "weights": weights}  # fmt: skip


SCHEMAS = {
    "dataset": {"prompt_idx": pl.Int64, "mask": pl.Utf8, "size": pl.Int64, "score": pl.Float64,
                "jailbreak": pl.Boolean, "split": pl.Utf8},
    "pools": {"prompt_idx": pl.Int64, "column": pl.Int64, "feature": pl.Utf8, "layer": pl.Int64,
              "latent": pl.Int64, "source": pl.Utf8, "max_act": pl.Float64},
    "fit": {"prompt_idx": pl.Int64, "model": pl.Utf8, "task": pl.Utf8, "n_train": pl.Int64, "n_heldout": pl.Int64,
            "train_loss": pl.Float64, "train_r2": pl.Float64, "train_accuracy": pl.Float64,
            "heldout_r2": pl.Float64, "heldout_accuracy": pl.Float64},
    "interactions": {"prompt_idx": pl.Int64, "rank": pl.Int64, "feature_i": pl.Utf8, "layer_i": pl.Int64,
                     "latent_i": pl.Int64, "feature_j": pl.Utf8, "layer_j": pl.Int64, "latent_j": pl.Int64,
                     "v_dot": pl.Float64, "effect_i": pl.Float64, "effect_j": pl.Float64,
                     "joint_effect": pl.Float64, "sum_singles": pl.Float64, "interaction": pl.Float64,
                     "confirmed": pl.Boolean},
    "top_features": {"prompt_idx": pl.Int64, "rank": pl.Int64, "feature": pl.Utf8, "layer": pl.Int64,
                     "latent": pl.Int64, "source": pl.Utf8, "weight": pl.Float64, "linear_weight": pl.Float64},
}  # fmt: skip


@dataclass
class FMResult:
    dataset: pl.DataFrame  # every scored mask: prompt_idx, mask (pool bitstring), score, jailbreak, split
    pools: pl.DataFrame  # the pool P of each prompt: column → feature
    fit: pl.DataFrame  # held-out / train metrics per prompt × model (fm, linear) × task
    interactions: pl.DataFrame  # top pairs by |⟨v_i, v_j⟩| with their causal check
    top_features: pl.DataFrame  # pool features ranked by |w_i| of the readout FM
    weights: dict[str, torch.Tensor]  # "{prompt_idx}/{task}/{model}/{w0|w|V}"

    def _mean(self, model: str, task: str, col: str) -> float | None:
        vals = self.fit.filter((pl.col("model") == model) & (pl.col("task") == task))[col].drop_nulls()
        return float(vals.mean()) if len(vals) else None

    def summary(self) -> dict:
        conf = self.interactions["confirmed"]
        return {
            "n_prompts": self.fit["prompt_idx"].n_unique(),
            "n_masks": self.dataset.height,
            "heldout_accuracy": self._mean("fm", "classification", "heldout_accuracy"),
            "linear_heldout_accuracy": self._mean("linear", "classification", "heldout_accuracy"),
            "heldout_r2": self._mean("fm", "regression", "heldout_r2"),
            "linear_heldout_r2": self._mean("linear", "regression", "heldout_r2"),
            "top_pair_confirmed_rate": float(conf.cast(pl.Float64).mean()) if len(conf) else None,
        }

    def save(self, out: StageDir) -> None:
        for name in SCHEMAS:
            write_parquet(out.file(f"{name}.parquet"), getattr(self, name))
        write_tensors(out.file("weights.safetensors"), self.weights)
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> FMResult:
        tables = {name: read_parquet(out.file(f"{name}.parquet")) for name in SCHEMAS}
        return cls(**tables, weights=read_tensors(out.file("weights.safetensors")))


def run(model, saes, candidates, greedy, prompts, cfg: FMConfig, out: StageDir, seed: int) -> FMResult:
    """FM dissection of up to cfg.max_prompts prompts that greedy dissected (by prompt index)."""
    chosen = greedy.sets.sort("prompt_idx").head(cfg.max_prompts).to_dicts()
    rows: dict[str, list] = {name: [] for name in SCHEMAS}
    weights: dict[str, torch.Tensor] = {}
    for r in tqdm(chosen, desc="fm", leave=False):
        minimal = list(zip(r["layers"], r["latents"], strict=True))
        got = dissect_prompt(
            model, saes, r["prompt_idx"], r["instruction"], minimal, candidates.features, cfg, out, seed
        )
        for name in SCHEMAS:
            rows[name] += got[name]
        weights.update(got["weights"])
    result = FMResult(
        **{name: pl.DataFrame(rows[name], schema=s) for name, s in SCHEMAS.items()}, weights=weights
    )
    return result
