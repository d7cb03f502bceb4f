"""Stage 2: greedy filtering of the candidate set C to a 1-minimal jailbreaking set M per prompt.

SPEC.md "Stage 2". For each harmful eval prompt that the model refuses and that ablating all of C
jailbreaks: order C (by single-feature effect, or by cosine with the refusal direction), then
backward-eliminate — drop f if the set without f still jailbreaks (refusal score < 0). The result
M is checked for 1-minimality (restoring any one of its features brings refusal back) and, when
configured, confirmed with the generation judge. Forward greedy (add the feature that lowers the
score most, until jailbreak) is run for comparison.

The search cores (`backward_minimal_steps`, `verify_one_minimal_steps`, `forward_greedy_steps`,
`effect_order_steps`) are pure generators: they yield batched score requests (masks [V, F] bool)
and are sent the refusal scores [V]. `backward_minimal` etc. drive them with a score function
(the tests use planted oracles); `run` drives every prompt's search in lock-step and answers
each round's requests with `AblationEngine.scores_many` — per prompt on a local model (one
batched forward for the V variants of a step), one job for all prompts on NDIF.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from statistics import mean, median

import polars as pl
import torch
from tqdm.auto import tqdm

from ..artifacts import StageDir, read_json, read_parquet, write_json, write_parquet
from ..config import GreedyConfig
from ..engine import AblationEngine, Feature
from ..errors import NonFiniteError, UserError
from ..generation import generate_many
from ..models import Batch

log = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # masks [V, F] bool → refusal scores [V]
Step = dict  # one trajectory entry: step, action, index (pool column), score, size
# The search cores are generators: they yield a request ("score", masks [V, F]) or ("generate",
# mask [F]) and are sent its answer (scores [V] / the completion). `drive` answers them with a
# score function; `run` answers the next request of every prompt together (one NDIF job).
Request = tuple[str, torch.Tensor]
Steps = Generator[Request, object, object]


def label(feature: Feature) -> str:
    """(layer, latent) → "L{layer}/F{latent}", the feature's name in every table."""
    return f"L{feature[0]}/F{feature[1]}"


def _ask(masks: torch.Tensor) -> Generator[Request, torch.Tensor, list[float]]:
    """Request the refusal scores of `masks` [V, F]; check and return them as floats."""
    s = yield ("score", masks.bool())
    if s.shape != (masks.shape[0],):
        raise ValueError(f"score function returned shape {tuple(s.shape)} for {masks.shape[0]} masks")
    if not torch.isfinite(s).all():
        raise NonFiniteError("non-finite refusal score under an ablation mask")
    return [float(v) for v in s.tolist()]


def drive(steps: Steps, score: ScoreFn):
    """Run a search core to its end, answering each score request with `score`."""
    try:
        kind, payload = next(steps)
        while True:
            if kind != "score":
                raise ValueError(f"drive() answers score requests only, got {kind!r}")
            kind, payload = steps.send(score(payload))
    except StopIteration as done:
        return done.value


def backward_minimal(
    score: ScoreFn, start: torch.Tensor, order: Sequence[int], max_passes: int = 10
) -> tuple[torch.Tensor, list[Step]]:
    """backward_minimal_steps answered by `score` (see there)."""
    return drive(backward_minimal_steps(start, order, max_passes), score)


def verify_one_minimal(score: ScoreFn, mask: torch.Tensor) -> bool:
    """verify_one_minimal_steps answered by `score`."""
    return drive(verify_one_minimal_steps(mask), score)


def forward_greedy(score: ScoreFn, pool_mask: torch.Tensor) -> tuple[torch.Tensor, list[Step]]:
    """forward_greedy_steps answered by `score`."""
    return drive(forward_greedy_steps(pool_mask), score)


def effect_order(score: ScoreFn, start: torch.Tensor) -> tuple[list[int], list[float], float]:
    """effect_order_steps answered by `score`."""
    return drive(effect_order_steps(start), score)


def backward_minimal_steps(
    start: torch.Tensor, order: Sequence[int], max_passes: int = 10
) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, list[Step]]]:
    """Backward elimination from the ablated set `start` [F] bool, trying features in `order`.

    Sequential semantics: for f in order, drop f if (current set ∖ {f}) still jailbreaks (s < 0).
    Batched by speculation: one score call evaluates the cumulative removals of the next features
    (cur∖{t0}, cur∖{t0,t1}, …); every prefix that still jailbreaks is exactly the state the
    sequential loop would reach, so all of them up to the first failure are dropped, the failing
    feature is kept, and the next call speculates from the feature after it. A pass costs
    (#kept + 1) calls instead of one per feature. Passes repeat until one drops nothing (at most
    `max_passes`): ablation effects are not monotone, and a feature kept early can become
    removable later; a pass that drops nothing has tested every kept feature against the final
    set, which is what makes M 1-minimal (checked in one call of all single
    removals after each pass that dropped something). Start features missing from `order` are tried last.
    Returns (M [F] bool, trajectory); if `start` itself does not jailbreak, M = start.
    """
    cur = start.clone().bool().flatten()
    seen: set[int] = set()
    seq = [i for i in [*order, *range(cur.numel())] if cur[i] and not (i in seen or seen.add(i))]
    s0 = (yield from _ask(cur[None]))[0]
    traj: list[Step] = [{"step": 0, "action": "start", "index": None, "score": s0, "size": int(cur.sum())}]
    if s0 >= 0:
        return cur, traj
    step = 0
    for _ in range(max_passes):
        todo = [i for i in seq if cur[i]]
        dropped = False
        while todo:
            variants = cur.repeat(len(todo), 1)
            for k, i in enumerate(todo):  # row k: cur without todo[0..k]
                variants[k:, i] = False
            s = yield from _ask(variants)
            step += 1
            fail = next((k for k, v in enumerate(s) if v >= 0), None)
            n_drop = len(todo) if fail is None else fail
            for k in range(n_drop):
                cur[todo[k]] = False
                traj.append(
                    {
                        "step": step,
                        "action": "remove",
                        "index": todo[k],
                        "score": s[k],
                        "size": int(cur.sum()),
                    }
                )
            dropped = dropped or n_drop > 0
            if fail is None:
                break
            traj.append(
                {
                    "step": step,
                    "action": "keep",
                    "index": todo[fail],
                    "score": s[fail],
                    "size": int(cur.sum()),
                }
            )
            todo = todo[fail + 1 :]
        if not dropped:
            break
        # Converged if no single removal from the new set jailbreaks: one call instead of a pass.
        kept = cur.nonzero().flatten()
        singles = cur.repeat(len(kept), 1)
        singles[torch.arange(len(kept)), kept] = False
        if len(kept) == 0 or all(v >= 0 for v in (yield from _ask(singles))):
            break
    return cur, traj


def verify_one_minimal_steps(mask: torch.Tensor) -> Generator[Request, torch.Tensor, bool]:
    """M jailbreaks (s < 0) and restoring any one of its features (ablating M ∖ {f}) gives s ≥ 0.

    One batched call: M itself plus its |M| one-feature restorations.
    """
    mask = mask.bool().flatten()
    idx = mask.nonzero().flatten()
    variants = mask.repeat(len(idx) + 1, 1)
    variants[torch.arange(1, len(idx) + 1), idx] = False
    s = yield from _ask(variants)
    return s[0] < 0 and all(v >= 0 for v in s[1:])


def forward_greedy_steps(
    pool_mask: torch.Tensor,
) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, list[Step]]]:
    """Forward greedy over `pool_mask` [F] bool: add the feature that lowers s most until s < 0.

    One batched call per step (every one-feature extension of the current set; the empty set
    rides along in the first). Stops when s < 0 or the pool is exhausted; the caller reads the
    last trajectory score to see whether it jailbroke. Returns (mask [F] bool, trajectory).
    """
    avail = pool_mask.clone().bool().flatten()
    cur = torch.zeros_like(avail)
    traj: list[Step] = []
    step = 0
    while avail.any():
        idx = avail.nonzero().flatten()
        variants = cur.repeat(len(idx), 1)
        variants[torch.arange(len(idx)), idx] = True
        if not traj:
            s = yield from _ask(torch.cat([cur[None], variants]))
            traj.append({"step": 0, "action": "start", "index": None, "score": s[0], "size": 0})
            if s[0] < 0:
                return cur, traj
            s = s[1:]
        else:
            s = yield from _ask(variants)
        step += 1
        k = min(range(len(s)), key=lambda j: (s[j], j))  # ties → lowest pool column
        cur[idx[k]], avail[idx[k]] = True, False
        traj.append(
            {"step": step, "action": "add", "index": int(idx[k]), "score": s[k], "size": int(cur.sum())}
        )
        if s[k] < 0:
            break
    return cur, traj


def effect_order_steps(
    start: torch.Tensor,
) -> Generator[Request, torch.Tensor, tuple[list[int], list[float], float]]:
    """Order for removal: least single-feature effect first (the strongest is kept longest).

    effect_i = s(nothing ablated) − s(only i ablated), one batched call. Returns (order over the
    start features, effects [F] with NaN outside start, the clean score s(nothing ablated)).
    """
    start = start.bool().flatten()
    idx = start.nonzero().flatten().tolist()
    masks = torch.zeros(len(idx) + 1, start.numel(), dtype=torch.bool)
    masks[torch.arange(1, len(idx) + 1), torch.tensor(idx, dtype=torch.long)] = True
    s = yield from _ask(masks)
    effects = [float("nan")] * start.numel()
    for k, i in enumerate(idx):
        effects[i] = s[0] - s[k + 1]
    return sorted(idx, key=lambda i: (effects[i], i)), effects, s[0]


def cosine_order(candidates, pool: Sequence[Feature]) -> list[int]:
    """Order for removal by the candidates table's cosine with r̂: least aligned tried first."""
    table = candidates.table
    if not {"layer", "feature", "cosine"} <= set(table.columns):
        raise UserError("greedy.order=cosine needs a candidates table with layer, feature and cosine columns")
    cos = {(int(r["layer"]), int(r["feature"])): float(r["cosine"]) for r in table.iter_rows(named=True)}
    return sorted(range(len(pool)), key=lambda i: (cos.get(pool[i], float("-inf")), i))


SETS_SCHEMA = {
    "prompt_idx": pl.Int64,
    "instruction": pl.Utf8,
    "features": pl.List(pl.Utf8),  # M as "L{layer}/F{latent}", in pool (candidate) order
    "layers": pl.List(pl.Int64),  # parallel to features
    "latents": pl.List(pl.Int64),  # parallel to features
    "size": pl.Int64,
    "one_minimal": pl.Boolean,
    "clean_score": pl.Float64,  # nothing ablated
    "start_score": pl.Float64,  # all of C ablated
    "final_score": pl.Float64,  # M ablated
    "judge_jailbreak": pl.Boolean,  # null when judge_confirm is off
    "completion": pl.Utf8,  # generation under M (null when judge_confirm is off)
    "forward_features": pl.List(pl.Utf8),
    "forward_size": pl.Int64,  # null when forward greedy did not reach a jailbreak (or is off)
    "forward_score": pl.Float64,
    "order": pl.Utf8,
    "n_candidates": pl.Int64,
}
TRAJECTORY_SCHEMA = {
    "prompt_idx": pl.Int64,
    "method": pl.Utf8,  # backward | forward
    "step": pl.Int64,  # score call index (0 = start)
    "action": pl.Utf8,  # start | keep | remove | add
    "feature": pl.Utf8,  # null for start
    "layer": pl.Int64,
    "latent": pl.Int64,
    "score": pl.Float64,  # refusal score of the set this action tested
    "size": pl.Int64,  # set size after the action
}


@dataclass
class GreedyResult:
    sets: pl.DataFrame  # one row per dissected prompt (SETS_SCHEMA)
    trajectory: pl.DataFrame  # every tested step (TRAJECTORY_SCHEMA)

    @property
    def minimal_sets(self) -> dict[int, list[Feature]]:
        """prompt_idx → M as [(layer, latent), ...]."""
        return {
            int(r["prompt_idx"]): list(zip(r["layers"], r["latents"], strict=True))
            for r in self.sets.iter_rows(named=True)
        }

    def summary(self) -> dict:
        rows = self.sets.to_dicts()
        sizes = [r["size"] for r in rows]
        fwd = [r["forward_size"] for r in rows if r["forward_size"] is not None]
        judged = [r["judge_jailbreak"] for r in rows if r["judge_jailbreak"] is not None]
        return {
            "n_prompts": len(rows),
            "median_set_size": float(median(sizes)) if sizes else None,
            "mean_set_size": float(mean(sizes)) if sizes else None,
            "one_minimal_rate": mean(float(r["one_minimal"]) for r in rows) if rows else None,
            "jailbreak_rate": mean(float(j) for j in judged) if judged else None,
            "forward_median_set_size": float(median(fwd)) if fwd else None,
        }

    def save(self, out: StageDir) -> None:
        write_parquet(out.file("sets.parquet"), self.sets)
        write_parquet(out.file("trajectory.parquet"), self.trajectory)
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> GreedyResult:
        return cls(read_parquet(out.file("sets.parquet")), read_parquet(out.file("trajectory.parquet")))


def _traj_rows(idx: int, method: str, traj: list[Step], pool: Sequence[Feature]) -> list[dict]:
    rows = []
    for t in traj:
        f = None if t["index"] is None else pool[t["index"]]
        rows.append({"prompt_idx": idx, "method": method, "step": t["step"], "action": t["action"],
                     "feature": None if f is None else label(f), "layer": None if f is None else f[0],
                     "latent": None if f is None else f[1], "score": t["score"], "size": t["size"]})  # fmt: skip
    return rows


def dissect_steps(
    pool: Sequence[Feature], instruction: str, cfg: GreedyConfig, judge, order_by
) -> Generator[Request, object, dict]:
    """Stage 2 on one prompt: order, backward-eliminate, verify, judge, forward. Yields the
    score and generate requests it needs; returns the prompt's record."""
    start = torch.ones(len(pool), dtype=torch.bool)
    order, effects, clean = yield from effect_order_steps(start)  # effects are recorded whatever the order
    if order_by is not None:
        order = order_by
    mask, traj = yield from backward_minimal_steps(start, order, cfg.max_passes)
    if traj[0]["score"] >= 0:
        return {"skipped": f"ablating all {len(pool)} candidates gives score {traj[0]['score']:.3f} >= 0"}
    feats = [pool[i] for i in mask.nonzero().flatten().tolist()]
    final = (yield from _ask(mask[None]))[0]
    one_minimal = yield from verify_one_minimal_steps(mask)
    record = {
        "instruction": instruction, "features": [label(f) for f in feats], "layers": [f[0] for f in feats],
        "latents": [f[1] for f in feats], "size": len(feats), "one_minimal": one_minimal,
        "clean_score": clean, "start_score": traj[0]["score"], "final_score": final, "judge_jailbreak": None,
        "completion": None, "forward_features": None, "forward_size": None, "forward_score": None,
        "order": cfg.order, "n_candidates": len(pool), "effects": effects,
    }  # fmt: skip
    if cfg.judge_confirm:
        text = yield ("generate", mask)
        record["completion"] = text
        record["judge_jailbreak"] = not judge.refused([instruction], [text])[0]
    trajectory = _traj_rows(-1, "backward", traj, pool)
    if cfg.forward:
        fmask, ftraj = yield from forward_greedy_steps(start)
        fscore = ftraj[-1]["score"]
        record["forward_features"] = [label(pool[i]) for i in fmask.nonzero().flatten().tolist()]
        record["forward_score"] = fscore
        record["forward_size"] = int(fmask.sum()) if fscore < 0 else None
        trajectory += _traj_rows(-1, "forward", ftraj, pool)
    record["trajectory"] = trajectory
    return record


def _answer(model, engine: AblationEngine, asks: dict[int, Request], batches: dict[int, Batch]) -> dict:
    """Answer the pending request of every prompt: all score requests together, then all
    generate requests together (each one NDIF job; locally prompt by prompt, as scores())."""
    replies: dict[int, object] = {}
    score = [i for i, (kind, _) in asks.items() if kind == "score"]
    if score:
        out = engine.scores_many([(batches[i], asks[i][1]) for i in score])
        replies.update(zip(score, out, strict=True))
    gen = [i for i, (kind, _) in asks.items() if kind == "generate"]
    if gen:
        reqs = [(batches[i], engine.edits(asks[i][1][None])) for i in gen]
        texts = generate_many(model, reqs, model.cfg.max_new_tokens)
        replies.update((i, t[0]) for i, t in zip(gen, texts, strict=True))
    return replies


def eligible_prompts(candidates, max_prompts: int) -> list[int]:
    """Harmful eval prompts refused at baseline and jailbroken by ablating all of C, by index."""
    # CandidatesResult names this table `prompts_table` in the brief and `prompts` in candidates.py.
    t = getattr(candidates, "prompts_table", None)
    t = candidates.prompts if t is None else t
    keep = t.filter(pl.col("refused") & pl.col("jailbroken")).sort("prompt_idx")
    return [int(i) for i in keep["prompt_idx"].to_list()[:max_prompts]]


def run(model, saes, candidates, prompts, cfg: GreedyConfig, out: StageDir, judge) -> GreedyResult:
    """Dissect up to cfg.max_prompts harmful eval prompts; resumes from per-prompt part files."""
    pool = [(int(layer), int(f)) for layer, f in candidates.features]
    if not pool:
        raise UserError("the candidate set is empty; rerun the candidates stage with candidates.top_k > 0")
    engine = AblationEngine(model, saes, pool, value=cfg.coefficient, batch_size=cfg.batch_size)
    order_by = cosine_order(candidates, pool) if cfg.order == "cosine" else None
    chosen = eligible_prompts(candidates, cfg.max_prompts)
    log.info("greedy: %d eligible prompts (refused, jailbroken by all %d candidates)", len(chosen), len(pool))
    records: dict[int, dict] = {}
    searches: dict[int, Steps] = {}
    for idx in chosen:
        part = out.part(f"prompt_{idx}.json")
        if part.exists():
            records[idx] = read_json(part)
        else:
            searches[idx] = dissect_steps(pool, prompts.eval_harmful.instructions[idx], cfg, judge, order_by)
    batches = {idx: model.tokenize([prompts.eval_harmful.instructions[idx]]) for idx in searches}
    # Lock-step: every round answers the next request of every unfinished prompt at once.
    asks = {idx: next(steps) for idx, steps in searches.items()}
    with tqdm(total=len(chosen), initial=len(records), desc="greedy", leave=False) as bar:
        while asks:
            for idx, reply in _answer(model, engine, asks, batches).items():
                try:
                    asks[idx] = searches[idx].send(reply)
                except StopIteration as done:
                    write_json(out.part(f"prompt_{idx}.json"), done.value)
                    records[idx] = done.value
                    del asks[idx]
                    bar.update(1)
    sets, traj = [], []
    for idx, rec in sorted(records.items()):
        if "skipped" in rec:
            log.warning("greedy: prompt %d skipped: %s", idx, rec["skipped"])
            continue
        sets.append({"prompt_idx": idx, **{k: rec[k] for k in SETS_SCHEMA if k != "prompt_idx"}})
        traj += [{**t, "prompt_idx": idx} for t in rec["trajectory"]]
    result = GreedyResult(
        pl.DataFrame(sets, schema=SETS_SCHEMA), pl.DataFrame(traj, schema=TRAJECTORY_SCHEMA)
    )
    return result
