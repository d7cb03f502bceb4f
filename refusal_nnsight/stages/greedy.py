"""Stage 2: greedy filtering of the candidate set C to a 1-minimal flipping set M per prompt.

Stage 2 of arXiv 2509.09708. For each harmful eval prompt that the model refuses and that ablating all of C
flips: order C (by single-feature effect on the refusal score, or by cosine with the refusal
direction), then backward-eliminate — drop f if the set without f still flips. A flip is decided
by the flip criterion (`scoring.Criterion`: the calibrated score threshold, the greedy first
token, or the generation judge). The result M is checked for 1-minimality (restoring any one of
its features brings refusal back). Forward greedy (add the feature that lowers the margin most,
until the prompt flips) runs beside it; the smaller of the two verified sets is the prompt's
smallest set (backward elimination's 1-minimal set need not be the smallest).

With judge_confirm, M, each one-feature restoration M ∖ {f}, the forward set and the clean run
are generated and judged: the judge's verdict on M is the confirmed jailbreak, and the verdicts
on all the variants measure how often each criterion (score, first_token) agrees with the judge.

The search cores live in `greedy_search`; `run` drives every prompt's search in lock-step and
answers each round's requests with `AblationEngine.scores_many` — per prompt on a local model
(one batched forward for the V variants of a step), one job for all prompts on NDIF.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean, median

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import StageDir, mean_of, read_json, read_parquet, write_json, write_parquet
from ..config import GreedyConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature
from ..errors import UserError
from ..generation import generate_many
from ..judges import Judge
from ..models import Batch, LoadedModel
from ..saes import LoadedSAEs
from ..scoring import Criterion, judge_margin
from .candidates import CandidatesResult
from .greedy_search import (  # noqa: F401  (re-exported: the search cores' public names)
    Request,
    ScoreFn,
    Step,
    Steps,
    _ask,
    backward_minimal,
    backward_minimal_steps,
    drive,
    effect_order,
    effect_order_steps,
    forward_greedy,
    forward_greedy_steps,
    label,
    verify_one_minimal,
    verify_one_minimal_steps,
)

log = logging.getLogger(__name__)


def cosine_order(candidates, pool: Sequence[Feature]) -> list[int]:
    """Order for removal by the candidates table's cosine with r̂: least aligned tried first."""
    table = candidates.table
    if not {"layer", "feature", "cosine"} <= set(table.columns):
        raise UserError("greedy.order=cosine needs a candidates table with layer, feature and cosine columns")
    cos = {(int(r["layer"]), int(r["feature"])): float(r["cosine"]) for r in table.iter_rows(named=True)}
    return sorted(range(len(pool)), key=lambda i: (cos.get(pool[i], float("-inf")), i))


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
    }
)
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
SEARCH_FLIPS = {"minimal": True, "restore": False, "forward": True}  # what the search claims per variant


@dataclass
class GreedyResult:
    sets: pl.DataFrame  # one row per dissected prompt (SETS_SCHEMA)
    trajectory: pl.DataFrame  # every tested step (TRAJECTORY_SCHEMA)
    judged: pl.DataFrame  # generations of the decided variants (JUDGED_SCHEMA)
    criterion: str = "first_token"
    score_threshold: float = 0.0  # τ of the score criterion (from the direction stage)
    coefficient: float = -3.0
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
        jail = ~t["judge_refused"]
        flip = {
            "score": t["refusal_score"] < self.score_threshold,
            "first_token": t["first_token_margin"] < 0,
            "judge": jail,
        }[criterion]
        return mean_of(flip == jail)

    def summary(self) -> dict:
        rows = self.sets.to_dicts()
        sizes = [r["size"] for r in rows]
        fwd = [r["forward_size"] for r in rows if r["forward_size"] is not None]
        small = [r["smallest_size"] for r in rows]
        # jailbreak rate over the dissected prompts the judge finds refused at baseline
        clean = self.judged.filter((pl.col("variant") == "clean") & pl.col("judge_refused"))
        base = set(clean["prompt_idx"].to_list())
        judged = [
            r["judge_jailbreak"] for r in rows if r["prompt_idx"] in base and r["judge_jailbreak"] is not None
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
            "jailbreak_rate": mean(float(j) for j in judged) if judged else None,
            "jailbreak_rate_n": len(judged) if rows and self.judged.height else None,
            "criterion_judge_agreement": self.agreement(self.criterion),
            "score_judge_agreement": self.agreement("score"),
            "first_token_judge_agreement": self.agreement("first_token"),
            "agreement_n": self.judged.filter(pl.col("variant") != "clean").height if self.judged.height else None,
        }  # fmt: skip

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
        return cls(
            read_parquet(out.file("sets.parquet")),
            read_parquet(out.file("trajectory.parquet")),
            read_parquet(out.file("judged.parquet")),
            str(meta["criterion"]),
            float(meta["score_threshold"]),
            float(meta["coefficient"]),
            dict(meta["notes"]),
        )


def _traj_rows(method: str, traj: list[Step], pool: Sequence[Feature]) -> list[dict]:
    rows = []
    for t in traj:
        f = None if t["index"] is None else pool[t["index"]]
        rows.append({"method": method, "step": t["step"], "action": t["action"],
                     "label": None if f is None else label(f), "layer": None if f is None else f[0],
                     "feature": None if f is None else f[1], "margin": t["score"], "size": t["size"]})  # fmt: skip
    return rows


def dissect_steps(pool: Sequence[Feature], instruction: str, cfg: GreedyConfig, order_by) -> Steps:
    """Stage 2 on one prompt: order, backward-eliminate, verify, forward. Yields the flip and
    score requests it needs; returns the prompt's record (a JSON-able dict)."""
    start = torch.ones(len(pool), dtype=torch.bool)
    order, effects, clean = yield from effect_order_steps(start)  # effects are recorded whatever the order
    if order_by is not None:
        order = order_by
    mask, traj = yield from backward_minimal_steps(start, order, cfg.max_passes)
    if traj[0]["score"] >= 0:
        return {
            "skipped": f"ablating all {len(pool)} candidates gives flip margin {traj[0]['score']:.3f} >= 0"
        }
    cols = mask.nonzero().flatten().tolist()
    final_score = (yield from _ask(mask[None], "score"))[0]
    final_margin = (yield from _ask(mask[None]))[0]
    one_minimal = yield from verify_one_minimal_steps(mask)
    feats = [pool[i] for i in cols]
    record = {
        "instruction": instruction, "labels": [label(f) for f in feats], "layers": [f[0] for f in feats],
        "features": [f[1] for f in feats], "size": len(feats), "one_minimal": one_minimal,
        "clean_score": clean, "start_margin": traj[0]["score"], "final_score": final_score,
        "final_margin": final_margin, "judge_jailbreak": None, "completion": None, "forward_labels": None,
        "forward_size": None, "forward_margin": None, "order": cfg.order, "n_candidates": len(pool),
        "effects": effects, "minimal_columns": cols, "forward_columns": None,
    }  # fmt: skip
    trajectory = _traj_rows("backward", traj, pool)
    if cfg.forward:
        fmask, ftraj = yield from forward_greedy_steps(start)
        fmargin = ftraj[-1]["score"]
        fcols = fmask.nonzero().flatten().tolist()
        record["forward_labels"] = [label(pool[i]) for i in fcols]
        record["forward_margin"] = fmargin
        if fmargin < 0:  # verified: the last forward call tested exactly this set
            record["forward_size"], record["forward_columns"] = len(fcols), fcols
        trajectory += _traj_rows("forward", ftraj, pool)
    use_forward = record["forward_size"] is not None and record["forward_size"] < len(cols)
    record["smallest_source"] = "forward" if use_forward else "backward"
    record["smallest_labels"] = record["forward_labels"] if use_forward else record["labels"]
    record["smallest_size"] = record["forward_size"] if use_forward else len(cols)
    record["trajectory"] = trajectory
    return record


@dataclass
class _Answerer:
    """Answers the pending request of every prompt: all flip requests together, then all score
    requests (each one NDIF job; locally prompt by prompt, as scores())."""

    model: LoadedModel
    engine: AblationEngine
    criterion: Criterion
    judge: Judge | None  # None when nothing is judged (judge_confirm off, criterion not judge)
    batches: dict[int, Batch]
    instructions: dict[int, str]

    def __call__(self, asks: dict[int, Request]) -> dict[int, torch.Tensor]:
        replies: dict[int, torch.Tensor] = {}
        score = [i for i, (kind, _) in asks.items() if kind == "score"]
        flip = [i for i, (kind, _) in asks.items() if kind == "flip"]
        if score:
            out = self.engine.scores_many([(self.batches[i], asks[i][1]) for i in score])
            replies.update(zip(score, out, strict=True))
        if flip and self.criterion.name != "judge":
            out = self.engine.scores_many([(self.batches[i], asks[i][1]) for i in flip], what="flip")
            replies.update((i, self.criterion.margin(o)) for i, o in zip(flip, out, strict=True))
        elif flip:  # the judge decides: generate every variant
            scores = self.engine.scores_many([(self.batches[i], asks[i][1]) for i in flip])
            texts = self.generate({i: asks[i][1] for i in flip})
            for i, s in zip(flip, scores, strict=True):
                refused = self.judged([self.instructions[i]] * len(texts[i]), texts[i])
                replies[i] = judge_margin(refused, s)
        return replies

    def judged(self, instructions: list[str], completions: list[str]) -> list[bool]:
        """The judge's verdicts (True: refused); the caller asked for a judge."""
        if self.judge is None:
            raise ValueError("a judged variant was requested, but greedy runs without a judge")
        return self.judge.refused(instructions, completions)

    def generate(self, masks: dict[int, torch.Tensor]) -> dict[int, list[str]]:
        """Greedy generations of each prompt under each of its mask variants [V, F]."""
        reqs = [(self.batches[i].repeat(m.shape[0]), self.engine.edits(m)) for i, m in masks.items()]
        texts = generate_many(self.model, reqs, self.model.cfg.max_new_tokens)
        return dict(zip(masks, texts, strict=True))


def judge_variants(answer: _Answerer, records: dict[int, dict], pool: Sequence[Feature]) -> None:
    """Generate and judge, per prompt, the clean run, M, each M ∖ {f} and the forward set; store
    the rows in each record ("judged") and the judge's verdict on M ("judge_jailbreak")."""
    todo = {i: r for i, r in records.items() if "skipped" not in r and "judged" not in r}
    if not todo:
        return
    variants: dict[int, list[tuple[str, str | None, list[int]]]] = {}
    for i, r in todo.items():
        m = r["minimal_columns"]
        vs: list[tuple[str, str | None, list[int]]] = [("clean", None, []), ("minimal", None, m)]
        vs += [("restore", label(pool[c]), [x for x in m if x != c]) for c in m]
        if r["forward_columns"] is not None and sorted(r["forward_columns"]) != sorted(m):
            vs.append(("forward", None, r["forward_columns"]))
        variants[i] = vs
    masks: dict[int, torch.Tensor] = {}
    for i, vs in variants.items():
        mk = torch.zeros(len(vs), len(pool), dtype=torch.bool)
        for k, (_, _, cols) in enumerate(vs):
            mk[k, cols] = True
        masks[i] = mk
    both = answer.engine.scores_many([(answer.batches[i], masks[i]) for i in variants], what="flip")
    texts = answer.generate(masks)
    for (i, vs), fl in zip(variants.items(), both, strict=True):
        refused = answer.judged([answer.instructions[i]] * len(vs), texts[i])
        todo[i]["judged"] = [
            {"variant": v, "label": f, "size": len(cols), "refusal_score": float(fl[k, 0]),
             "first_token_margin": float(fl[k, 1]), "judge_refused": bool(refused[k]), "completion": texts[i][k]}
            for k, (v, f, cols) in enumerate(vs)
        ]  # fmt: skip
        todo[i]["completion"] = texts[i][1]
        todo[i]["judge_jailbreak"] = not refused[1]


def eligible_prompts(candidates, max_prompts: int) -> list[int]:
    """Harmful eval prompts refused at baseline and flipped by ablating all of C, by index."""
    keep = candidates.prompts.filter(pl.col("refused") & pl.col("jailbroken")).sort("prompt_idx")
    return [int(i) for i in keep["prompt_idx"].to_list()[:max_prompts]]


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    candidates: CandidatesResult,
    prompts: Prompts,
    cfg: GreedyConfig,
    out: StageDir,
    judge: Judge | None,
    coefficient: float,
    criterion: Criterion,
) -> GreedyResult:
    """Dissect up to cfg.max_prompts harmful eval prompts; resumes from per-prompt part files."""
    pool = [(int(layer), int(f)) for layer, f in candidates.features]
    if not pool:
        raise UserError("the candidate set is empty; rerun the candidates stage with candidates.top_k > 0")
    engine = AblationEngine(model, saes, pool, value=coefficient, batch_size=cfg.batch_size)
    order_by = cosine_order(candidates, pool) if cfg.order == "cosine" else None
    chosen = eligible_prompts(candidates, cfg.max_prompts)
    log.info("greedy: %d eligible prompts (refused, flipped by all %d candidates; criterion %s)",
             len(chosen), len(pool), criterion.name)  # fmt: skip
    records: dict[int, dict] = {}
    searches: dict[int, Steps] = {}
    for idx in chosen:
        part = out.part(f"prompt_{idx}.json")
        if part.exists():
            records[idx] = read_json(part)
        else:
            searches[idx] = dissect_steps(pool, prompts.eval_harmful.instructions[idx], cfg, order_by)
    instructions = {idx: prompts.eval_harmful.instructions[idx] for idx in chosen}
    batches = {idx: model.tokenize([instructions[idx]]) for idx in chosen}
    answer = _Answerer(model, engine, criterion, judge, batches, instructions)
    # Lock-step: every round answers the next request of every unfinished prompt at once.
    asks = {idx: next(steps) for idx, steps in searches.items()}
    with tqdm(total=len(chosen), initial=len(records), desc="greedy", leave=False) as bar:
        while asks:
            for idx, reply in answer(asks).items():
                try:
                    asks[idx] = searches[idx].send(reply)
                except StopIteration as done:
                    write_json(out.part(f"prompt_{idx}.json"), done.value)
                    records[idx] = done.value
                    del asks[idx]
                    bar.update(1)
    if cfg.judge_confirm:
        pending = [i for i, r in records.items() if "skipped" not in r and "judged" not in r]
        judge_variants(answer, records, pool)
        for idx in pending:
            write_json(out.part(f"prompt_{idx}.json"), records[idx])
    return _result(records, coefficient, criterion, cfg)


def _result(
    records: dict[int, dict], coefficient: float, criterion: Criterion, cfg: GreedyConfig
) -> GreedyResult:
    sets, traj, judged = [], [], []
    for idx, rec in sorted(records.items()):
        if "skipped" in rec:
            log.warning("greedy: prompt %d skipped: %s", idx, rec["skipped"])
            continue
        sets.append({"prompt_idx": idx, **{k: rec[k] for k in SETS_SCHEMA if k != "prompt_idx"}})
        traj += [{**t, "prompt_idx": idx} for t in rec["trajectory"]]
        judged += [{**j, "prompt_idx": idx} for j in rec.get("judged") or []]
    result = GreedyResult(
        pl.DataFrame(sets, schema=SETS_SCHEMA),
        pl.DataFrame(traj, schema=TRAJECTORY_SCHEMA),
        pl.DataFrame(judged, schema=JUDGED_SCHEMA),
        criterion.name,
        criterion.threshold,
        coefficient,
    )
    result.notes = _reasons(result, cfg)
    return result


def _reasons(result: GreedyResult, cfg: GreedyConfig) -> dict[str, str]:
    """Why each None of the summary is None."""
    notes = {}
    for key, value in result.summary().items():
        if value is not None:
            continue
        if result.sets.height == 0:
            notes[key] = (
                "no harmful eval prompt is both refused at baseline and flipped by ablating all candidates"
            )
        elif key.startswith("forward"):
            notes[key] = "greedy.forward is off" if not cfg.forward else "forward greedy flipped no prompt"
        elif not cfg.judge_confirm:
            notes[key] = "greedy.judge_confirm is off: no generation was judged"
        elif key.startswith("jailbreak_rate"):
            notes[key] = "the judge finds no dissected prompt refused on its clean generation"
    return notes
