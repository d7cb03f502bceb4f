"""The greedy stage's result: a verified 1-minimal set per dissected prompt, every step of the
search that found it, and the generations that checked it (schemas, summary, save and load)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from statistics import mean, median

import polars as pl
import torch

from ..artifacts import StageDir, mean_of, read_json, read_parquet, saved_before, write_json, write_parquet
from ..engine import Feature
from ..scoring import Criterion

SETS_SCHEMA = pl.Schema(
    {
        "prompt_idx": pl.Int64(),
        "instruction": pl.Utf8(),
        "labels": pl.List(pl.Utf8),  # M as "L{layer}/F{feature}", in pool (candidate) order
        "layers": pl.List(pl.Int64),  # parallel to features
        "features": pl.List(pl.Int64),  # the latent indices of M, parallel to labels
        "size": pl.Int64(),  # |M|, the 1-minimal set of backward elimination
        "one_minimal": pl.Boolean(),
        "clean_score": pl.Float64(),  # refusal score, nothing ablated
        "start_margin": pl.Float64(),  # flip margin (criterion; < 0 = flipped), all of C ablated
        "final_score": pl.Float64(),  # refusal score, M ablated
        "final_margin": pl.Float64(),  # flip margin, M ablated
        "judge_jailbreak": pl.Boolean(),  # the judge on M's generation; null when judge_confirm is off
        "completion": pl.Utf8(),  # generation under M (null when judge_confirm is off)
        "forward_labels": pl.List(pl.Utf8),
        "forward_size": pl.Int64(),  # null when forward greedy did not reach a flip (or is off)
        "forward_margin": pl.Float64(),
        "smallest_labels": pl.List(pl.Utf8),  # the smallest set found and verified to flip
        "smallest_size": pl.Int64(),
        "smallest_source": pl.Utf8(),  # backward | forward
        "order": pl.Utf8(),
        "n_candidates": pl.Int64(),
        # members of M silent on the clean prompt (largest activation over its positions 0): only
        # the other members' edits wake them, so their own edit is a push the prompt never made
        "n_woken": pl.Int64(),
    }
)
# SETS_SCHEMA columns that part files written before them lack (null there)
ADDED_LATER = frozenset({"n_woken"})
TRAJECTORY_SCHEMA = pl.Schema(
    {
        "prompt_idx": pl.Int64,
        "method": pl.Utf8,  # backward | forward
        "step": pl.Int64,  # score call index (0 = start)
        "action": pl.Utf8,  # start | keep | remove | add
        "label": pl.Utf8,  # null for start
        "layer": pl.Int64,
        "feature": pl.Int64,
        "margin": pl.Float64,  # flip margin (criterion) of the set this action tested; < 0 = flipped
        "size": pl.Int64,  # set size after the action
    }
)
# The judged variants of each prompt: what the search decided, checked on generations.
JUDGED_SCHEMA = pl.Schema(
    {
        "prompt_idx": pl.Int64,
        "variant": pl.Utf8,  # clean | minimal | restore (M ∖ {feature}) | forward
        "label": pl.Utf8,  # the restored feature (restore rows)
        "size": pl.Int64,  # latents ablated
        "refusal_score": pl.Float64,
        "first_token_margin": pl.Float64,
        "judge_refused": pl.Boolean,
        "completion": pl.Utf8,
    }
)


@dataclass
class GreedyResult:
    sets: pl.DataFrame  # one row per dissected prompt (SETS_SCHEMA)
    trajectory: pl.DataFrame  # every tested step (TRAJECTORY_SCHEMA)
    judged: pl.DataFrame  # generations of the decided variants (JUDGED_SCHEMA)
    criterion: str  # the flip criterion that decided each set
    score_threshold: float  # τ of the score criterion (from the direction stage)
    coefficient: float  # scale c of every ablated latent
    notes: dict[str, str] = field(default_factory=dict)  # summary key → why it is None

    @property
    def minimal_sets(self) -> dict[int, list[Feature]]:
        """prompt_idx → M as [(layer, latent), ...]."""
        return {
            int(r["prompt_idx"]): list(zip(r["layers"], r["features"], strict=True))
            for r in self.sets.iter_rows(named=True)
        }

    def agreement(self, criterion: str) -> float | None:
        """Fraction of the judged decided variants on which `criterion` and the judge agree."""
        t = self.judged.filter(pl.col("variant") != "clean")
        if t.height == 0:
            return None
        return mean_of(self._flips(t, criterion) == ~t["judge_refused"])

    def _flips(self, t: pl.DataFrame, criterion: str) -> pl.Series:
        """Per judged row, whether `criterion` (at the set's score threshold) reads a flip."""
        flip = torch.tensor(t.select("refusal_score", "first_token_margin").to_numpy(), dtype=torch.float64)
        verdicts = Criterion(criterion, self.score_threshold).flipped(flip, t["judge_refused"].to_list())
        return pl.Series(verdicts, dtype=pl.Boolean)

    def _agreed(self, variant: str, refused: bool) -> set[int]:
        """Prompts whose `variant` run the judge and the set's criterion agree is refused (or,
        refused=False, answered)."""
        t = self.judged.filter(pl.col("variant") == variant)
        flips = self._flips(t, self.criterion)
        both = (t["judge_refused"] & ~flips) if refused else (~t["judge_refused"] & flips)
        return set(t.filter(both)["prompt_idx"].to_list())

    def summary(self) -> dict:
        rows = self.sets.to_dicts()
        sizes = [r["size"] for r in rows]
        fwd = [r["forward_size"] for r in rows if r["forward_size"] is not None]
        small = [r["smallest_size"] for r in rows]
        # jailbreak rate of M over the dissected prompts refused at baseline, each verdict where the
        # judge and the criterion agree (M flips by the criterion by construction, unless it is the judge)
        base = self._agreed("clean", refused=True) if self.judged.height else set()
        broken = self._agreed("minimal", refused=False) if self.judged.height else set()
        judged = [
            r["prompt_idx"] in broken
            for r in rows
            if r["prompt_idx"] in base and r["judge_jailbreak"] is not None
        ]
        return {
            "n_prompts": len(rows),
            "criterion": self.criterion,
            "coefficient": self.coefficient,
            "score_threshold": self.score_threshold,
            "median_one_minimal_set_size": float(median(sizes)) if sizes else None,
            "mean_one_minimal_set_size": float(mean(sizes)) if sizes else None,
            "one_minimal_rate": mean(float(r["one_minimal"]) for r in rows) if rows else None,
            "forward_median_set_size": float(median(fwd)) if fwd else None,
            "median_smallest_set_size": float(median(small)) if small else None,
            "mean_smallest_set_size": float(mean(small)) if small else None,
            "n_smallest_below_one_minimal": sum(s < m for s, m in zip(small, sizes, strict=True)) if rows else None,
            **self.woken(),
            # one latent in most sets is the trivial explanation to rule out: a latent that flips any
            # prompt (e.g. one steered along the refusal direction) explains them all alike
            **self.top_feature(),
            "jailbreak_rate": mean(float(j) for j in judged) if judged else None,
            "jailbreak_rate_n": len(judged) if rows and self.judged.height else None,
            "criterion_judge_agreement": self.agreement(self.criterion),
            "score_judge_agreement": self.agreement("score"),
            "first_token_judge_agreement": self.agreement("first_token"),
            "agreement_n": self.judged.filter(pl.col("variant") != "clean").height if self.judged.height else None,
        }  # fmt: skip

    def woken(self) -> dict:
        """woken_member_share: of all minimal-set memberships, the share whose latent is silent on
        its clean prompt and woken only by the other members' edits (None for a folder saved before
        it was counted, or when nothing was dissected); woken_member_n: the memberships counted."""
        if "n_woken" not in self.sets.columns:
            return {"woken_member_share": None, "woken_member_n": None}
        counted = self.sets.filter(pl.col("n_woken").is_not_null())
        n = int(counted["size"].sum()) if counted.height else 0
        share = int(counted["n_woken"].sum()) / n if n else None
        return {"woken_member_share": share, "woken_member_n": n if counted.height else None}

    def top_feature(self) -> dict:
        """The latent in the most minimal sets (ties: the lowest layer, then latent) and the fraction
        of dissected prompts whose set holds it; None for both when nothing was dissected."""
        counts = Counter(f for m in self.minimal_sets.values() for f in set(m))
        if not counts:
            return {"top_feature": None, "top_feature_share": None}
        (layer, latent), n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return {"top_feature": f"L{layer}/F{latent}", "top_feature_share": n / self.sets.height}

    def save(self, out: StageDir) -> None:
        write_parquet(out.file("sets.parquet"), self.sets)
        write_parquet(out.file("trajectory.parquet"), self.trajectory)
        write_parquet(out.file("judged.parquet"), self.judged)
        meta = {"criterion": self.criterion, "score_threshold": self.score_threshold,
                "coefficient": self.coefficient, "notes": self.notes}  # fmt: skip
        write_json(out.file("greedy.json"), meta)
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> GreedyResult:
        meta = read_json(out.file("greedy.json"))
        sets = read_parquet(out.file("sets.parquet"))
        notes = saved_before(dict(meta["notes"]), sets, "n_woken", ("woken_member_share", "woken_member_n"),
                             "greedy", "woken members were counted")  # fmt: skip
        return cls(
            sets,
            read_parquet(out.file("trajectory.parquet")),
            read_parquet(out.file("judged.parquet")),
            str(meta["criterion"]),
            float(meta["score_threshold"]),
            float(meta["coefficient"]),
            notes,
        )
