"""Stage 1a — the refusal direction (stage 1 of arXiv 2509.09708, steps 1–3; Arditi et al. 2024).

1. Baseline refusal scores of the train/val prompts; keep harmful prompts the model refuses
   (s > 0) and harmless ones it answers (s < 0).
2. Difference of means r[p, l] = mean_harmful x_l[p] − mean_harmless x_l[p] at every
   post-instruction ("eoi") position p and layer output l, accumulated in float64
   (andyrdt/refusal_direction `pipeline/submodules/generate_directions.py`).
3. Selection on val (`select_direction.py`): per candidate (p, l), bypass = mean s on harmful
   val with r̂ projected out of every layer's residual, induce = mean s on harmless val with r
   added at layer l, KL = mean KL(clean ‖ ablated) of the harmless next-token distribution.
   Candidates in the last layers, with KL above or induce below a threshold are discarded; the
   lowest bypass wins. If none survives we say so and fall back to the lowest bypass overall
   (Gemma-2 left the reference implementation with no candidate).
4. The refusal-score threshold τ of the "score" flip criterion: the best-separating threshold of
   the harmful vs harmless val baseline scores (`scoring.calibrate_threshold`), not a fixed 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import nnsight
import polars as pl
import torch
from tqdm.auto import tqdm

from .. import interventions
from ..artifacts import (
    StageDir,
    read_json,
    read_parquet,
    read_tensors,
    tensor_meta,
    write_json,
    write_parquet,
    write_tensors,
)
from ..backends import run_chunks
from ..config import DirectionConfig, LayerSelection
from ..data import Prompts
from ..errors import NonFiniteError, NothingToDissect, UserError
from ..interventions import DirectionAblation, DirectionAddition, Edit
from ..models import Batch, LoadedModel
from ..scoring import (
    calibrate_threshold,
    kl_divergence,
    last_logits,
    refusal_score_from_logits,
    refusal_scores,
)

log = logging.getLogger(__name__)


@dataclass
class DirectionResult:
    """Every candidate direction, the selected one, and the selection table."""

    directions: torch.Tensor  # [P, L, d] float32: r[p, l] for positions[p] and layer l
    positions: list[int]  # eoi offsets of the rows of `directions`, e.g. [-5..-1]
    direction: torch.Tensor  # [d] float32: the chosen mean difference (not normalised)
    layer: int
    position: int  # eoi offset (negative)
    table: pl.DataFrame  # position, layer, norm, bypass_score, induce_score, kl, kept, reason
    fallback: bool  # True: no candidate passed the filters; the lowest bypass was taken anyway
    fallback_reason: str | None
    n_harmful_kept: int  # train harmful prompts refused at baseline (used for the mean)
    n_harmless_kept: int  # train harmless prompts answered at baseline
    baseline: pl.DataFrame  # split, harmful, prompt_idx, score, kept
    score_threshold: float  # τ: val harmful s > τ, harmless s ≤ τ, best separated (score criterion)
    score_threshold_val_accuracy: float  # how well τ separates the val split

    @property
    def chosen(self) -> dict:
        """The table row of the chosen candidate."""
        row = self.table.filter((pl.col("position") == self.position) & (pl.col("layer") == self.layer))
        return row.row(0, named=True)

    def summary(self) -> dict:
        c = self.chosen
        return {
            "layer": self.layer,
            "position": self.position,
            "bypass_score": c["bypass_score"],
            "induce_score": c["induce_score"],
            "kl": c["kl"],
            "fallback": self.fallback,
            "n_harmful_refused_train": self.n_harmful_kept,
            "n_harmless_answered_train": self.n_harmless_kept,
            "score_threshold": self.score_threshold,
            "score_threshold_val_accuracy": self.score_threshold_val_accuracy,
        }

    def save(self, out: StageDir) -> None:
        """directions.safetensors (+ directions.meta.json), selection.parquet, baseline.parquet, direction.json; done last."""
        _check_finite(self.directions)
        meta = {"positions": self.positions, "layers": list(range(self.directions.shape[1])),
                "chosen": {"position": self.position, "layer": self.layer}}  # fmt: skip
        write_tensors(
            out.file("directions.safetensors"),
            {"directions": self.directions, "direction": self.direction},
            meta,
        )
        write_parquet(out.file("selection.parquet"), self.table)
        write_parquet(out.file("baseline.parquet"), self.baseline)
        write_json(out.file("direction.json"), {
            **self.summary(), "fallback_reason": self.fallback_reason, "n_harmless_kept": self.n_harmless_kept,
        })  # fmt: skip
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> DirectionResult:
        tensors = read_tensors(out.file("directions.safetensors"))
        meta = read_json(tensor_meta(out.file("directions.safetensors")))
        info = read_json(out.file("direction.json"))
        return cls(
            directions=tensors["directions"], positions=list(meta["positions"]), direction=tensors["direction"],
            layer=int(info["layer"]), position=int(info["position"]), table=read_parquet(out.file("selection.parquet")),
            fallback=bool(info["fallback"]), fallback_reason=info["fallback_reason"],
            n_harmful_kept=int(info["n_harmful_refused_train"]), n_harmless_kept=int(info["n_harmless_kept"]),
            baseline=read_parquet(out.file("baseline.parquet")), score_threshold=float(info["score_threshold"]),
            score_threshold_val_accuracy=float(info["score_threshold_val_accuracy"]),
        )  # fmt: skip


def ablation_edits(result: DirectionResult) -> list[Edit]:
    """Arditi's directional ablation of the chosen direction at every layer, all positions."""
    return [DirectionAblation(result.direction)]


def actadd_edits(result: DirectionResult, coeff: float = 1.0) -> list[Edit]:
    """Activation addition of coeff·r at the chosen layer (induces refusal on harmless prompts)."""
    return [DirectionAddition(result.direction, layer=result.layer, coeff=coeff)]


def mean_residuals(
    model: LoadedModel,
    batch: Batch,
    positions: list[int],
    batch_size: int,
    edits: list[Edit] | tuple = (),
    progress: str | None = None,
) -> torch.Tensor:
    """Mean residual [P, L, d] (float64) of every layer output at the eoi `positions` over the rows of `batch`.

    Residuals are read through `interventions.apply(capture=...)`, so `edits` (per-row masks
    allowed) act before the read; sums are float64 so a bf16 model's many rows do not swamp a small difference.
    """
    layers = list(range(model.n_layers))

    def one(i0: int, i1: int) -> torch.Tensor:
        chunk = batch.rows(i0, i1)
        # logits_to_keep=1: the head's output is not needed, keep its cost to one position
        with torch.no_grad(), model.lm.trace(**chunk.model_inputs(model.device), logits_to_keep=1):
            acts = interventions.apply(
                model, interventions.rows(edits, i0, i1), chunk.attention_mask, capture=layers
            )
            at_eoi = torch.stack([acts[layer][:, positions, :] for layer in layers], dim=2)  # [B, P, L, d]
            part = nnsight.save(at_eoi.double().sum(0).cpu())
        return part

    total = torch.zeros(len(positions), len(layers), model.d_model, dtype=torch.float64)
    for part in run_chunks(model, len(batch), batch_size, one, progress):
        total += part
    return total / len(batch)


def prune_limit(n_layers: int, fraction: float) -> int:
    """Candidates need layer < this (Arditi: int(n_layers·(1 − fraction))); at least 1 so tiny models keep one."""
    return max(1, int(n_layers * (1.0 - fraction)))


def select_layers(selection: LayerSelection, available: list[int], n_layers: int, setting: str) -> list[int]:
    """The layers of `available` that `selection` keeps (see config.LayerSelection); never empty.

    `setting` names the config key in the error, e.g. "search.candidates.layers"."""
    if selection is None:
        wanted = set(available)
    elif isinstance(selection, list):
        wanted = {int(layer) for layer in selection}
    elif "before_last_fraction" in selection:  # Arditi: layers < int(n_layers·(1 − f))
        wanted = set(range(prune_limit(n_layers, float(selection["before_last_fraction"]))))
    elif "before_layer" in selection:
        wanted = set(range(int(selection["before_layer"])))
    else:
        wanted = set(range(int(selection["start"]), int(selection["stop"])))
    layers = sorted(wanted & set(available))
    if not layers:
        raise UserError(f"{setting}={selection} keeps none of the layers {sorted(available)}")
    return layers


def select(table: pl.DataFrame, n_layers: int, cfg: DirectionConfig) -> tuple[pl.DataFrame, int, str | None]:
    """Mark each candidate kept/discarded and pick one (Arditi `select_direction.py`).

    `table` has position, layer, bypass_score, induce_score, kl. Returns (table with `kept` and
    `reason`, row index of the chosen candidate, fallback reason or None). Ties go to the
    earlier row, so the choice is deterministic. With no survivor, `cfg.fallback` picks the
    lowest bypass overall (as Arditi et al. do) or the lowest bypass among the least-violating candidates.
    """
    limit = prune_limit(n_layers, cfg.prune_last_fraction)
    reasons = []
    for r in table.iter_rows(named=True):
        why = []
        if not all(math.isfinite(r[k]) for k in ("bypass_score", "induce_score", "kl")):
            why.append("non-finite")
        if r["layer"] >= limit:
            why.append("last layers")
        if r["kl"] > cfg.kl_threshold:
            why.append("kl")
        if r["induce_score"] < cfg.induce_threshold:
            why.append("induce")
        reasons.append(",".join(why))
    table = table.with_columns(
        kept=pl.Series([not w for w in reasons]), reason=pl.Series(reasons, dtype=pl.Utf8)
    )
    bypass = table["bypass_score"].to_list()
    kept = [i for i, k in enumerate(table["kept"].to_list()) if k]
    if kept:
        return table, min(kept, key=lambda i: bypass[i]), None
    finite = [i for i, b in enumerate(bypass) if math.isfinite(b)]
    if not finite:
        raise NonFiniteError(
            "every refusal-direction candidate has a non-finite bypass score; check the model dtype"
        )
    counts = {w: sum(w in r.split(",") for r in reasons) for w in ("last layers", "kl", "induce")}
    failed = {i: len(reasons[i].split(",")) for i in finite}
    if cfg.fallback == "fewest_failures":  # relax as little as possible: fewest failed filters, then bypass
        best = min(finite, key=lambda i: (failed[i], bypass[i]))
        how = "the lowest bypass score among the candidates failing the fewest filters"
    else:  # Arditi et al.: the lowest bypass score overall
        best = min(finite, key=lambda i: bypass[i])
        how = "the lowest bypass score overall"
    reason = (f"no candidate passed the filters (layer < {limit}, kl ≤ {cfg.kl_threshold}, induce ≥ {cfg.induce_threshold}; "
              f"failures: {counts}); took {how}")  # fmt: skip
    return table, best, reason


def score_candidates(
    model: LoadedModel,
    directions: torch.Tensor,
    positions: list[int],
    harmful: list[str],
    harmless: list[str],
    batch_size: int,
    layers: list[int] | None = None,
) -> pl.DataFrame:
    """Bypass, induce and KL of every candidate r[p, l] (directions [P, L, d]) on the val sets; one row each.

    `layers` (default: all) limits the layers scored; the others get no row and cannot be chosen."""
    both, n_h = model.tokenize(harmful + harmless), len(harmful)
    harmless_batch = model.tokenize(harmless)
    clean = last_logits(model, harmless_batch, batch_size=batch_size)
    rows = []
    layers = list(range(directions.shape[1])) if layers is None else layers
    grid = [(pi, layer) for pi in range(len(positions)) for layer in layers]
    for pi, layer in tqdm(grid, desc="direction candidates", leave=False):
        r = directions[pi, layer]
        norm = float(r.norm())
        row = {"position": positions[pi], "layer": layer, "norm": norm}
        if norm == 0.0:  # identical means: nothing to ablate or add
            rows.append({**row, "bypass_score": math.nan, "induce_score": math.nan, "kl": math.nan})
            continue
        # one pass for both sets under the ablation: harmful rows give bypass, harmless rows give KL
        ablated = last_logits(model, both, [DirectionAblation(r)], batch_size)
        bypass = refusal_score_from_logits(ablated[:n_h], model.refusal_ids).mean()
        kl = kl_divergence(clean, ablated[n_h:]).mean()
        induce = refusal_scores(model, harmless_batch, [DirectionAddition(r, layer=layer)], batch_size).mean()
        rows.append({**row, "bypass_score": float(bypass), "induce_score": float(induce), "kl": float(kl)})
    return pl.DataFrame(rows, schema={"position": pl.Int64, "layer": pl.Int64, "norm": pl.Float64,
                                      "bypass_score": pl.Float64, "induce_score": pl.Float64, "kl": pl.Float64})  # fmt: skip


def _check_finite(directions: torch.Tensor) -> None:
    for layer in range(directions.shape[1]):
        if not torch.isfinite(directions[:, layer]).all():
            raise NonFiniteError(
                f"non-finite refusal direction at layer {layer}; check the model dtype (float32 or bfloat16)"
            )


def baseline_filter(model: LoadedModel, sets: dict, batch_size: int) -> tuple[dict, pl.DataFrame]:
    """Refusal score of every prompt of `sets` {(split, harmful): PromptSet}; keep refused harmful
    (s > 0) and answered harmless (s < 0). Returns ({key: kept [N] bool}, table of all scores)."""
    kept, frames = {}, []
    for (split, harmful), ps in sets.items():
        label = f"baseline {split} {'harmful' if harmful else 'harmless'}"
        s = refusal_scores(model, ps.instructions, batch_size=batch_size, progress=label)
        kept[split, harmful] = (s > 0) if harmful else (s < 0)
        frames.append(pl.DataFrame({
            "split": [split] * len(ps), "harmful": [harmful] * len(ps), "prompt_idx": list(range(len(ps))),
            "score": s.double().tolist(), "kept": kept[split, harmful].tolist(),
        }))  # fmt: skip
    return kept, pl.concat(frames)


def run(model: LoadedModel, prompts: Prompts, cfg: DirectionConfig, out: StageDir) -> DirectionResult:
    """Baseline filter → difference of means → Arditi selection. The caller saves (`result.save(out)`)."""
    scored = select_layers(cfg.layers, list(range(model.n_layers)), model.n_layers, "search.direction.layers")
    sets = {("train", True): prompts.train_harmful, ("train", False): prompts.train_harmless,
            ("val", True): prompts.val_harmful, ("val", False): prompts.val_harmless}  # fmt: skip
    kept, baseline = baseline_filter(
        model, sets, cfg.batch_size
    )  # 1. keep refused harmful, answered harmless
    n_h, n_l = int(kept["train", True].sum()), int(kept["train", False].sum())
    log.info("baseline: %d/%d harmful train refused, %d/%d harmless train answered",
             n_h, len(prompts.train_harmful), n_l, len(prompts.train_harmless))  # fmt: skip
    if n_h == 0:
        raise NothingToDissect("no harmful prompt is refused at baseline: nothing to dissect")
    if n_l == 0:
        raise UserError(
            "every harmless train prompt is refused at baseline: no contrast for the refusal direction"
        )
    for key in (("val", True), ("val", False)):
        if not kept[key].any():  # a small val set may lose all of one class; use it unfiltered then
            log.warning("no %s val prompt passes the baseline filter; selecting on the unfiltered val set",
                        "harmful" if key[1] else "harmless")  # fmt: skip
            kept[key] = torch.ones_like(kept[key])
    picked = {
        k: [t for t, on in zip(sets[k].instructions, kept[k].tolist(), strict=True) if on] for k in sets
    }

    positions = model.eoi_positions  # 2. difference of means at every eoi position and layer
    mean_h = mean_residuals(
        model, model.tokenize(picked["train", True]), positions, cfg.batch_size, progress="mean harmful"
    )
    mean_l = mean_residuals(
        model, model.tokenize(picked["train", False]), positions, cfg.batch_size, progress="mean harmless"
    )
    directions = (mean_h - mean_l).float()  # [P, L, d]
    _check_finite(directions)

    # 3. Arditi selection on val, over the layers search.direction.layers keeps (default: all)
    table = score_candidates(
        model, directions, positions, picked["val", True], picked["val", False], cfg.batch_size, scored
    )
    table, best, reason = select(table, model.n_layers, cfg)
    if reason is not None:
        log.warning("refusal direction: %s", reason)
    pos, layer = table["position"][best], table["layer"][best]
    # 4. τ of the score criterion, on the unfiltered val split
    val = baseline.filter(pl.col("split") == "val")
    tau, tau_acc = calibrate_threshold(
        torch.tensor(val.filter(pl.col("harmful"))["score"].to_list()),
        torch.tensor(val.filter(~pl.col("harmful"))["score"].to_list()),
    )
    log.info("score threshold τ = %.4g (separates %.1f%% of the val split)", tau, 100 * tau_acc)
    result = DirectionResult(
        directions=directions, positions=list(positions), direction=directions[positions.index(pos), layer].clone(),
        layer=int(layer), position=int(pos), table=table, fallback=reason is not None, fallback_reason=reason,
        n_harmful_kept=n_h, n_harmless_kept=n_l, baseline=baseline, score_threshold=tau,
        score_threshold_val_accuracy=tau_acc,
    )  # fmt: skip
    log.info("refusal direction: position %d, layer %d, %s", pos, layer, result.summary())
    return result
