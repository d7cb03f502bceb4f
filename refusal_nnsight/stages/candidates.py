"""Stage 1b — candidate SAE features (SPEC.md "Stage 1", step 4; Yeo, Prakash et al. 2025).

For each SAE layer, the cosine between the unit refusal direction r̂ and every unit decoder
row; the top-k per layer form the candidate set C. Then a sanity check on the harmful eval
prompts: ablating all of C (scale c at every position, error term kept) should jailbreak
each prompt the model refuses at baseline (refusal score s < 0); the prompts where it does not
are reported, because later stages cannot find a minimal subset of a set that does not work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import polars as pl
import torch

from ..artifacts import StageDir, read_json, read_parquet, write_json, write_parquet
from ..config import CandidatesConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature
from ..errors import NonFiniteError
from ..models import LoadedModel
from ..saes import LoadedSAEs
from ..scoring import refusal_scores
from .direction import DirectionResult

log = logging.getLogger(__name__)


def top_cosine_features(
    direction: torch.Tensor, W_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [k] and cosines [k] of the decoder rows (W_dec [n, d]) most aligned with `direction` [d].

    Signed cosine, largest first: a latent whose decoder points along +r̂ writes refusal.
    Ties keep the lower index (stable sort), so the ranking is deterministic. Zero rows get 0.
    """
    W = W_dec.detach().float()  # on the SAE's device: no copy of a 65k-wide decoder to the host
    r = direction.detach().to(W.device, torch.float32)
    cos = ((W @ r) / (W.norm(dim=-1).clamp_min(1e-12) * r.norm().clamp_min(1e-12))).cpu()
    order = torch.sort(cos, descending=True, stable=True).indices[: min(k, W.shape[0])]
    return order, cos[order]


def cosine_table(direction: torch.Tensor, saes: LoadedSAEs, k: int) -> pl.DataFrame:
    """layer, feature, cosine, rank_in_layer, neuronpedia: the top-k features of every SAE layer."""
    rows = []
    for layer in saes.layers:
        idx, cos = top_cosine_features(direction, saes[layer].W_dec, k)
        if not torch.isfinite(cos).all():
            raise NonFiniteError(f"non-finite decoder cosine at layer {layer}; check the SAE weights")
        for rank, (f, c) in enumerate(zip(idx.tolist(), cos.tolist(), strict=True)):
            rows.append({"layer": layer, "feature": f, "cosine": c, "rank_in_layer": rank,
                         "neuronpedia": saes.neuronpedia_url(layer, f)})  # fmt: skip
    schema = {
        "layer": pl.Int64,
        "feature": pl.Int64,
        "cosine": pl.Float64,
        "rank_in_layer": pl.Int64,
        "neuronpedia": pl.Utf8,
    }
    return pl.DataFrame(rows, schema=schema)


@dataclass
class CandidatesResult:
    """The candidate set C and the all-of-C ablation check on the harmful eval prompts."""

    table: pl.DataFrame  # layer, feature, cosine, rank_in_layer, neuronpedia (C in this order)
    prompts: pl.DataFrame  # prompt_idx, instruction, clean_score, all_ablated_score, refused, jailbroken
    coefficient: float  # scale c applied to the ablated latents

    @property
    def features(self) -> list[Feature]:
        """C as (layer, feature) pairs, in table order (by layer, then cosine rank)."""
        return list(zip(self.table["layer"].to_list(), self.table["feature"].to_list(), strict=True))

    @property
    def refused(self) -> list[int]:
        """Indices of the harmful eval prompts refused at baseline (clean s > 0)."""
        return self.prompts.filter(pl.col("refused"))["prompt_idx"].to_list()

    def summary(self) -> dict:
        refused = self.prompts.filter(pl.col("refused"))
        n = refused.height
        jail = int(refused["jailbroken"].sum()) if n else 0
        return {
            "n_features": self.table.height,
            "n_refused_eval": n,
            "all_ablated_score_jailbreak_rate": jail / n if n else None,
            "n_not_jailbroken": n - jail,
            "cosine_max": float(self.table["cosine"].max()) if self.table.height else None,
        }

    def save(self, out: StageDir) -> None:
        """candidates.parquet, prompts.parquet, candidates.json; done.json last."""
        write_parquet(out.file("candidates.parquet"), self.table)
        write_parquet(out.file("prompts.parquet"), self.prompts)
        write_json(out.file("candidates.json"), {**self.summary(), "coefficient": self.coefficient})
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> CandidatesResult:
        info = read_json(out.file("candidates.json"))
        return cls(
            read_parquet(out.file("candidates.parquet")),
            read_parquet(out.file("prompts.parquet")),
            float(info["coefficient"]),
        )


def all_ablated_check(model: LoadedModel, saes: LoadedSAEs, features: list[Feature], instructions: list[str],
                      coefficient: float, batch_size: int) -> pl.DataFrame:  # fmt: skip
    """Clean and all-of-C-ablated refusal score of each prompt (one batched pass each)."""
    batch = model.tokenize(instructions)
    clean = refusal_scores(model, batch, batch_size=batch_size, progress="clean eval harmful")
    engine = AblationEngine(model, saes, features, value=coefficient, batch_size=batch_size)
    ablated = engine.scores_rows(
        batch, torch.ones(len(batch), engine.size, dtype=torch.bool), progress="all-C ablated"
    )
    return pl.DataFrame({
        "prompt_idx": list(range(len(batch))), "instruction": list(instructions),
        "clean_score": clean.double().tolist(), "all_ablated_score": ablated.double().tolist(),
        "refused": (clean > 0).tolist(), "jailbroken": (ablated < 0).tolist(),
    })  # fmt: skip


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    direction: DirectionResult,
    prompts: Prompts,
    cfg: CandidatesConfig,
    out: StageDir,
) -> CandidatesResult:
    """Top-k decoder cosines per SAE layer → C; check that ablating C jailbreaks the harmful eval prompts.

    The caller saves (`result.save(out)`), as for every stage.
    """
    table = cosine_table(direction.direction, saes, cfg.top_k)
    log.info("candidates: %d features over %d SAE layers (max cosine %.3f)",
             table.height, len(saes.layers), float(table["cosine"].max()))  # fmt: skip
    check = all_ablated_check(model, saes, list(zip(table["layer"], table["feature"], strict=True)),
                              prompts.eval_harmful.instructions, cfg.coefficient, cfg.batch_size)  # fmt: skip
    result = CandidatesResult(table, check, cfg.coefficient)
    missed = check.filter(pl.col("refused") & ~pl.col("jailbroken"))
    if missed.height:
        log.warning("ablating all %d candidates (c=%g) leaves %d refused harmful eval prompts refused, e.g. %r",
                    table.height, cfg.coefficient, missed.height, missed["instruction"][0])  # fmt: skip
    log.info("candidates: %s", result.summary())
    return result
