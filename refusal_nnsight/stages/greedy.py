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
from dataclasses import dataclass

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import StageDir, read_json, write_json
from ..config import GreedyConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature, latents_by_layer
from ..errors import UserError
from ..features import max_activations
from ..generation import generate_many
from ..judges import Judge
from ..models import Batch, LoadedModel
from ..saes import LoadedSAEs
from ..scoring import Criterion, judge_margin
from .candidates import CandidatesResult
from .greedy_result import ADDED_LATER, JUDGED_SCHEMA, SETS_SCHEMA, TRAJECTORY_SCHEMA, GreedyResult  # noqa: F401
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
    for idx in count_woken(model, saes, records, cfg.batch_size):
        write_json(out.part(f"prompt_{idx}.json"), records[idx])
    return _result(records, coefficient, criterion, cfg)


def count_woken(model: LoadedModel, saes: LoadedSAEs, records: dict[int, dict], batch_size: int) -> list[int]:
    """Sets each dissected record's n_woken: the members of M whose latent is silent on the clean
    prompt (largest activation over its real positions 0, read as the edit at its layer would read
    it). A silent latent's edit (c·0) changes nothing by itself, so a 1-minimal set holds one only
    because the other members' edits wake it. Returns the records it set (those lacking it)."""
    todo = [i for i, r in sorted(records.items()) if "skipped" not in r and "n_woken" not in r]
    latents = latents_by_layer(
        (layer, f)
        for i in todo
        for layer, f in zip(records[i]["layers"], records[i]["features"], strict=True)
    )
    clean: dict[int, torch.Tensor] = {}
    if latents:
        batch = model.tokenize([records[i]["instruction"] for i in todo])
        clean, _ = max_activations(model, saes, batch, [], batch_size, list(latents), latents)
    for row, i in enumerate(todo):
        r = records[i]
        r["n_woken"] = sum(
            float(clean[layer][row, latents[layer].index(f)]) <= 0.0
            for layer, f in zip(r["layers"], r["features"], strict=True)
        )
    return todo


def _result(
    records: dict[int, dict], coefficient: float, criterion: Criterion, cfg: GreedyConfig
) -> GreedyResult:
    sets, traj, judged = [], [], []
    for idx, rec in sorted(records.items()):
        if "skipped" in rec:
            log.warning("greedy: prompt %d skipped: %s", idx, rec["skipped"])
            continue
        sets.append({"prompt_idx": idx, **{k: rec.get(k) if k in ADDED_LATER else rec[k]
                                           for k in SETS_SCHEMA if k != "prompt_idx"}})  # fmt: skip
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
            notes[key] = (
                "no dissected prompt is refused on its clean generation by the judge and the criterion together"
            )
    return notes
