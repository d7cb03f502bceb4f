"""run(cfg): the method of arXiv 2509.09708 as a numbered sequence of stage calls.

Each stage writes its folder in the run directory and a done.json marker last; a rerun with the
same run_dir loads finished stages instead of recomputing them (greedy and fm also resume inside
the stage, per prompt / per batch of masks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .artifacts import RunFolder, StageDir, write_json
from .backends import load_model
from .config import RunConfig, to_dict
from .data import load_prompts
from .errors import NothingToDissect, UserError
from .judges import make_judge
from .saes import load_saes
from .scoring import Criterion

log = logging.getLogger(__name__)


def _stage(
    run: RunFolder, name: str, timing: dict, compute: Callable[[StageDir], object], result_cls
) -> object:
    """Load a finished stage, or compute and save it; record its wall time."""
    out = run.stage(name)
    start = time.perf_counter()
    if out.finished:
        log.info("[%s] finished earlier; loading %s", name, out.path)
        result = result_cls.load(out)
    else:
        log.info("[%s] running", name)
        result = compute(out)
        result.save(out)
    timing[f"{name}_s"] = round(time.perf_counter() - start, 3)
    return result


def run(cfg: RunConfig) -> dict:
    """Run the configured stages on cfg.model / cfg.sae; return summary.json's content."""
    from .stages import candidates, direction, evaluate, fm, greedy, redundancy

    t0 = time.perf_counter()
    if not cfg.run_dir:
        raise UserError("run_dir is not set")
    unknown = [
        s
        for s in cfg.stages
        if s not in ("direction", "candidates", "greedy", "fm", "redundancy", "evaluate")
    ]
    if unknown:
        raise UserError(
            f"unknown stage(s) {unknown}; stages are direction, candidates, greedy, fm, redundancy, evaluate"
        )
    run_folder = RunFolder(cfg.run_dir)
    if run_folder.clean_temporaries():
        log.info("removed temporary files of an interrupted run")
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.backend)  # local weights, or a meta model whose traces run on NDIF
    saes = load_saes(cfg.sae, model)
    prompts = load_prompts(cfg.data)
    judge = make_judge(cfg.judge.name)
    write_json(run_folder.config, to_dict(cfg))
    s = cfg.search
    timing: dict = {}
    results: dict = {}
    summary: dict = {"model": cfg.model.name, "sae": cfg.sae.name, "data": cfg.data.name, "search": s.name}
    wanted = set(cfg.stages)

    try:
        # 1. direction — difference of means over layers × eoi positions; Arditi selection.
        results["direction"] = _stage(run_folder, "direction", timing,
            lambda out: direction.run(model, prompts, s.direction, out), direction.DirectionResult)  # fmt: skip
    except NothingToDissect as err:
        log.warning("%s", err)
        summary["status"] = str(err)
        _finish(run_folder, summary, timing, results, cfg, t0)
        return summary
    # One coefficient c for every SAE ablation; a flip (the model stops refusing) is decided by
    # the criterion, whose score threshold the direction stage calibrated on val.
    c = s.coefficient
    flip = Criterion(s.greedy.criterion, results["direction"].score_threshold)
    # 2. candidates — top-k decoder-cosine SAE features per searched layer; does ablating all flip?
    if "candidates" in wanted:
        results["candidates"] = _stage(run_folder, "candidates", timing,
            lambda out: candidates.run(model, saes, results["direction"], prompts, s.candidates, out, c, flip, judge),
            candidates.CandidatesResult)  # fmt: skip
    # 3. greedy — per harmful prompt, backward elimination to a verified 1-minimal set.
    if "greedy" in wanted:
        results["greedy"] = _stage(run_folder, "greedy", timing,
            lambda out: greedy.run(model, saes, results["candidates"], prompts, s.greedy, out, judge, c, flip),
            greedy.GreedyResult)  # fmt: skip
    # 4. fm — factorization machine over ablation masks of the pool; confirm top pairs; prompt classifier.
    if "fm" in wanted:
        results["fm"] = _stage(run_folder, "fm", timing,
            lambda out: fm.run(model, saes, results["candidates"], results["greedy"], prompts, s.fm, out, cfg.seed,
                               c, flip),
            fm.FMResult)  # fmt: skip
    # 5. redundancy — dormant features that wake when the minimal set is ablated; <bos> clamp.
    if "redundancy" in wanted:
        results["redundancy"] = _stage(run_folder, "redundancy", timing,
            lambda out: redundancy.run(model, saes, results["greedy"], prompts, s.redundancy, out, judge, c),
            redundancy.RedundancyResult)  # fmt: skip
    # 6. evaluate — judged generations under every intervention, and random same-size baselines.
    if "evaluate" in wanted:
        results["evaluate"] = _stage(run_folder, "evaluate", timing,
            lambda out: evaluate.run(model, saes, results["direction"], results.get("candidates"), results.get("greedy"),
                                     results.get("fm"), prompts, s.evaluate, out, judge, cfg.seed, c),
            evaluate.EvaluateResult)  # fmt: skip
    for name, result in results.items():
        summary.setdefault(name, {}).update(result.summary())
    summary["ground_truth"] = _ground_truth(cfg, model, saes, prompts, results)
    if model.remote is not None:  # costs of the run, kept with the timings (not a result)
        timing["remote_jobs"] = model.remote.jobs
        timing["remote_payload_mb"] = round(model.remote.payload_bytes / 2**20, 3)
    _finish(run_folder, summary, timing, results, cfg, t0)
    return summary


def _ground_truth(cfg: RunConfig, model, saes, prompts, results: dict) -> dict:
    """Planted-truth checks, available only on the organism (its grammar knows the cues)."""
    if cfg.model.source != "organism" or "greedy" not in results:
        return {"minimal_set_cue_precision": None, "fm_finds_compositional_pair": None}
    from . import ground_truth

    precision = ground_truth.minimal_set_cue_precision(model, saes, results["greedy"].minimal_sets, prompts)
    pair = None
    if "fm" in results:
        pair = ground_truth.compositional_pair_found(results["fm"], prompts, model, saes)
    return {"minimal_set_cue_precision": precision, "fm_finds_compositional_pair": pair}


def _finish(
    run_folder: RunFolder, summary: dict, timing: dict, results: dict, cfg: RunConfig, t0: float
) -> None:
    from .report import write_report

    timing["total_s"] = round(time.perf_counter() - t0, 3)
    summary["timing"] = timing
    write_json(run_folder.timing, timing)
    # summary.json without timings is byte-identical across runs with the same seed; timings are
    # also kept in timing.json on their own.
    write_json(run_folder.summary, summary)
    write_report(run_folder, summary, results, to_dict(cfg))
    log.info("run folder: %s", Path(run_folder.root).resolve())
