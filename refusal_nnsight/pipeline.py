"""run(cfg): the method of arXiv 2509.09708 as a numbered sequence of stage calls.

Each stage writes its folder in the run directory and a done.json marker last; a rerun with the
same run_dir loads finished stages instead of recomputing them (greedy and fm also resume inside
the stage, per prompt / per batch of masks). A run folder belongs to one config: run.json records
its hash, a rerun under another config is refused (force_restart=true discards the old results),
and a finished stage whose artifacts no longer match their recorded hashes is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import polars as pl
import torch

from . import provenance
from .artifacts import RunFolder, StageDir, StageResult, read_json, write_json, write_parquet
from .backends import load_model
from .config import RunConfig, to_dict
from .data import check_readable, load_prompts
from .errors import NothingToDissect, UserError
from .judges import make_judge
from .organism.planted import planted_backup
from .organism.resolve import organism_root, prompt_splits
from .saes import load_saes
from .scoring import Criterion
from .validation import config_hash, result_fields, stage_reads, validate

log = logging.getLogger(__name__)


R = TypeVar("R", bound=StageResult)


def _stage(
    run: RunFolder, name: str, timing: dict, compute: Callable[[StageDir], R], result_cls: type[R]
) -> R:
    """Load a finished stage, or compute and save it; record its wall time.

    A stage is loaded only when its done.json matches the run's config hash, the digests of the
    stages it reads and the hashes of its own artifacts; otherwise it is recomputed, with a
    warning when it had finished (a damaged or changed artifact is never read).
    """
    key, digests = run.config_hash, run.digests
    out = run.stage(name, key, {d: digests[d] for d in stage_reads(name) if d in digests})
    start = time.perf_counter()
    damage = out.damage() if out.done.exists() else "not finished"
    if damage is None:
        log.info("[%s] finished earlier; loading %s", name, out.path)
        result = result_cls.load(out)
    else:
        if out.done.exists():
            log.warning("[%s] %s; recomputing %s", name, damage, name)
        else:
            log.info("[%s] running", name)
        out.prepare()
        result = compute(out)
        result.save(out)
    digests[name] = out.digest()
    timing[f"{name}_s"] = round(time.perf_counter() - start, 3)
    return result


def claim(run_folder: RunFolder, cfg: RunConfig) -> str:
    """The run's config hash, once the folder may hold its results (force_restart=true first
    discards the results already there)."""
    if cfg.force_restart:
        if run_folder.has_results():
            log.warning("force_restart: removing the results in %s", run_folder.root)
        run_folder.clear_results()
    return claim_check(run_folder, cfg)


def claim_check(run_folder: RunFolder, cfg: RunConfig) -> str:
    """Refuse, in one line naming the first differing field, a folder that holds results of
    another config (or results without a recorded config); return the run's config hash."""
    key = config_hash(cfg)
    if cfg.force_restart:
        return key
    fix = "use a new run_dir, or force_restart=true (--force-restart) to discard them"
    if not run_folder.identity.exists():
        if run_folder.has_results():
            raise UserError(
                f"run_dir {run_folder.root} holds results without a recorded config (run.json); {fix}"
            )
        return key
    recorded = read_json(run_folder.identity)
    if recorded.get("config_hash") != key:
        old, new = recorded.get("fields", {}), _plain(result_fields(cfg))
        diff = next((k for k in [*new, *old] if old.get(k, "<absent>") != new.get(k, "<absent>")), "?")
        raise UserError(
            f"run_dir {run_folder.root} holds results of another config: {diff}="
            f"{_short(old.get(diff, '<absent>'))} there, {_short(new.get(diff, '<absent>'))} now "
            f"(only batch sizes, model.device, backend and stages may change on resume); {fix}"
        )
    return key


def _plain(fields: dict) -> dict:
    """JSON round trip, so that recorded and current values compare alike (tuples, floats)."""
    import json

    return json.loads(json.dumps(fields, default=str))


def _build_key(built: dict) -> dict:
    """What names an organism build's weights: its recipe, seed and hashes."""
    return {k: built[k] for k in ("recipe", "seed", "recipe_hash", "content_hash")}


def _claim_build(run_folder: RunFolder, built: dict | None) -> None:
    """Refuse a folder whose results were computed on another organism build: the same config
    names a recipe and seed, not weights, and a recipe changed in code (or a rebuild on another
    CPU) yields other weights under the same settings."""
    if not built or not run_folder.identity.exists():
        return
    recorded = read_json(run_folder.identity).get("organism")
    if recorded is None:  # a folder from before builds were recorded: nothing to compare
        log.warning("run_dir %s does not record which organism build it dissected", run_folder.root)
        return
    now = _build_key(built)
    if recorded != now:
        diff = next(k for k in now if recorded.get(k) != now[k])
        raise UserError(
            f"run_dir {run_folder.root} holds results on another build of the organism: {diff}="
            f"{recorded.get(diff)} there, {now[diff]} now; use a new run_dir, or force_restart=true "
            "(--force-restart) to discard them"
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run(cfg: RunConfig) -> dict:
    """Run the configured stages on cfg.model / cfg.sae; return summary.json's content."""
    validate(cfg)
    if not cfg.run_dir:
        raise UserError("run_dir is not set")
    run_folder = RunFolder(cfg.run_dir)
    with run_folder.lock():  # a second run on this folder is refused, never interleaved
        run_folder.config_hash = claim(run_folder, cfg)
        return _run(cfg, run_folder)


def _run(cfg: RunConfig, run_folder: RunFolder) -> dict:
    from .stages.candidates import CandidatesResult
    from .stages.candidates import run as find_candidates
    from .stages.direction import DirectionResult
    from .stages.direction import run as find_direction
    from .stages.evaluate import EvaluateResult
    from .stages.evaluate import run as evaluate
    from .stages.fm import FMResult
    from .stages.fm import run as fit_interactions
    from .stages.greedy import GreedyResult
    from .stages.greedy import run as greedy_minimal_sets
    from .stages.redundancy import RedundancyResult
    from .stages.redundancy import run as find_redundant

    t0 = time.perf_counter()
    if run_folder.clean_temporaries():
        log.info("removed temporary files of an interrupted run")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    # The organism (when model.source=organism) is resolved here, at the edge: its folder and grammar.
    organism = organism_root(cfg.model)
    model = load_model(
        cfg.model, cfg.backend, organism and organism / "model"
    )  # local, or a meta model for NDIF
    saes = load_saes(cfg.sae, model, organism)
    _check_against_saes(cfg, saes)
    prompts = load_prompts(cfg.data, prompt_splits(cfg.model.organism_seed))
    check_readable(prompts, model, cfg.data)  # too long, unreadable (<unk>) or holding control tokens
    judge = make_judge(cfg.judge.name)
    built = _organism_provenance(organism) if organism is not None else None
    _claim_build(run_folder, built)
    write_json(run_folder.config, to_dict(cfg))
    if not run_folder.identity.exists():
        identity = {"config_hash": run_folder.config_hash, "fields": result_fields(cfg)}
        write_json(run_folder.identity, identity | ({"organism": _build_key(built)} if built else {}))
    s = cfg.search
    timing: dict = {"torch_threads": torch.get_num_threads()}
    summary: dict = {"model": cfg.model.name, "sae": cfg.sae.name, "data": cfg.data.name, "search": s.name}
    if built:  # which build was dissected (the report names it)
        summary["organism"] = built
    write_json(
        run_folder.provenance, provenance.collect(cfg, model, summary.get("organism"), saes.skip_first_token)
    )
    stage = _Stages(run_folder, timing, cfg.stages)

    try:
        # 1. direction — difference of means over layers × eoi positions; Arditi selection.
        direction = _stage(
            run_folder,
            "direction",
            timing,
            lambda out: find_direction(model, prompts, s.direction, out),
            DirectionResult,
        )
    except NothingToDissect as err:
        log.warning("%s", err)
        summary["status"] = str(err)
        _finish(run_folder, summary, timing, {}, cfg, t0)
        return summary
    # One coefficient c for every SAE ablation; a flip (the model stops refusing) is decided by
    # the criterion, whose score threshold the direction stage calibrated on val.
    c = s.coefficient
    flip = Criterion(s.greedy.criterion, direction.score_threshold)
    # 2. candidates — top-k decoder-cosine SAE features per searched layer; does ablating all flip?
    candidates = stage(
        "candidates",
        CandidatesResult,
        lambda out: find_candidates(model, saes, direction, prompts, s.candidates, out, c, flip, judge),
    )
    # 3. greedy — per harmful prompt, backward elimination to a verified 1-minimal set.
    greedy = stage(
        "greedy",
        GreedyResult,
        lambda out: greedy_minimal_sets(
            model, saes, _needed(candidates), prompts, s.greedy, out, judge, c, flip
        ),
    )
    # 4. fm — factorization machine over ablation masks of the pool; confirm top pairs; prompt classifier.
    fm = stage(
        "fm",
        FMResult,
        lambda out: fit_interactions(
            model, saes, _needed(candidates), _needed(greedy), prompts, s.fm, out, cfg.seed, c, flip
        ),
    )
    # 5. redundancy — dormant features that wake when the minimal set is ablated; <bos> clamp.
    redundancy = stage(
        "redundancy",
        RedundancyResult,
        lambda out: find_redundant(
            model,
            saes,
            _needed(greedy),
            prompts,
            s.redundancy,
            out,
            judge,
            c,
            flip,
            _scanned_layers(s, saes, model, _needed(candidates)),
        ),
    )
    # 6. evaluate — judged generations under every intervention, and random same-size baselines.
    evaluation = stage(
        "evaluate",
        EvaluateResult,
        lambda out: evaluate(
            model, saes, direction, candidates, greedy, fm, prompts, s.evaluate, out, judge, cfg.seed, c, flip
        ),
    )
    results = {
        name: result
        for name, result in (
            ("direction", direction),
            ("candidates", candidates),
            ("greedy", greedy),
            ("fm", fm),
            ("redundancy", redundancy),
            ("evaluate", evaluation),
        )
        if result is not None
    }
    for name, result in results.items():
        summary.setdefault(name, {}).update(result.summary())
    # What each found feature is (features.parquet), and how the findings score against planted truth.
    roles = _features(run_folder, cfg, model, saes, prompts, results, timing, flip)
    summary["ground_truth"] = _ground_truth(cfg, model, saes, prompts, results, roles, organism)
    if model.remote is not None:  # costs of the run, kept with the timings (not a result)
        timing["remote_jobs"] = model.remote.jobs
        timing["remote_payload_mb"] = round(model.remote.payload_bytes / 2**20, 3)
    _finish(run_folder, summary, timing, results, cfg, t0)
    return summary


def _needed(result: R | None) -> R:
    """A result the stage list guarantees (validation.STAGE_NEEDS): its absence is a bug."""
    if result is None:
        raise RuntimeError("a stage ran without a stage it needs; validate(cfg) should have refused this")
    return result


class _Stages:
    """`stage(name, result_cls, compute)`: the stage's result, or None when cfg.stages omits it."""

    def __init__(self, run_folder: RunFolder, timing: dict, wanted: list[str]):
        self.run_folder, self.timing, self.wanted = run_folder, timing, set(wanted)

    def __call__(self, name: str, result_cls: type[R], compute: Callable[[StageDir], R]) -> R | None:
        if name not in self.wanted:
            return None
        return _stage(self.run_folder, name, self.timing, compute, result_cls)


def _check_against_saes(cfg: RunConfig, saes) -> None:
    """Settings that need the loaded SAEs: top_k cannot exceed an SAE's width."""
    k = cfg.search.candidates.top_k
    narrowest = min(saes.layers, key=saes.width, default=None)
    if narrowest is not None and k > saes.width(narrowest):
        raise UserError(
            f"search.candidates.top_k={k} exceeds the width of the SAE at layer {narrowest} "
            f"({saes.width(narrowest)} latents); use at most that"
        )


def _organism_provenance(root: Path) -> dict:
    """Recipe, seed and hashes of the organism a run dissects."""
    from .organism.store import read_manifest, shipped_dir

    m = read_manifest(root)
    return {
        "recipe": m["recipe"],
        "kind": m.get("kind", "organism"),  # "tuned": a real model safety-tuned by the recipe
        "seed": m.get("seed", 0),
        "recipe_hash": m["recipe_hash"],
        "content_hash": m.get("content_hash"),
        "shipped": root == shipped_dir(m["recipe"], m.get("seed", 0)),
    }


def _scanned_layers(s, saes, model, candidates) -> list[int]:
    """The SAE layers the redundancy stage scans: search.redundancy.layers, else the candidates'."""
    from .stages.direction import select_layers

    if s.redundancy.layers is None:
        return list(candidates.layers)
    return select_layers(s.redundancy.layers, list(saes.layers), model.n_layers, "search.redundancy.layers")


@dataclass
class GroundTruth:
    """The planted-truth scoring of a run: each found feature's role, and why a figure is null."""

    roles: pl.DataFrame  # layer, feature, role, role_share, n_top, plain_share, peak_tag, cue_categories
    notes: dict[str, str]


def _features(
    run_folder: RunFolder, cfg: RunConfig, model, saes, prompts, results: dict, timing: dict, flip: Criterion
) -> pl.DataFrame | None:
    """Write features.parquet, a card for every feature the run found (results["features"], for
    the report); return the planted role of each (None without greedy, empty off the organism)."""
    from . import ground_truth
    from .features import eval_activations, feature_cards, found_features

    greedy = results.get("greedy")
    if greedy is None:
        return None
    start = time.perf_counter()
    fm, redundancy = results.get("fm"), results.get("redundancy")
    found = list(found_features(greedy, fm, redundancy))
    acts = eval_activations(model, saes, found, prompts)  # read by the roles and the cards alike
    roles = ground_truth.feature_roles(model, saes, found, prompts, acts=acts)
    cards = feature_cards(
        model,
        saes,
        prompts,
        results["direction"],
        greedy,
        fm,
        redundancy,
        coefficient=cfg.search.coefficient,
        flip=flip,
        roles=roles,
        acts=acts,
    )
    write_parquet(run_folder.features, cards)
    results["features"] = cards
    timing["features_s"] = round(time.perf_counter() - start, 3)
    return roles


def _ground_truth(
    cfg: RunConfig, model, saes, prompts, results: dict, roles: pl.DataFrame | None, organism: Path | None
) -> dict:
    """Planted-truth checks, available only on the organism (its grammar knows the cues); `organism`
    is its folder (None for other models), which holds the planted backup directions."""
    from . import ground_truth

    backup = None
    planted = planted_backup(organism) if organism is not None else None
    if planted is not None and results.get("candidates") is not None:
        scanned = tuple(_scanned_layers(cfg.search, saes, model, results["candidates"]))
        backup = ground_truth.PlantedBackup(planted[0], scanned, planted[1], planted[2])
    greedy, fm, redundancy = results.get("greedy"), results.get("fm"), results.get("redundancy")
    candidates = results.get("candidates")
    figures, roles, notes = ground_truth.ground_truth_summary(
        model, saes, prompts, greedy, fm, redundancy, roles, backup=backup,
        candidates=None if candidates is None else candidates.features,
        refused=None if candidates is None else candidates.refused,
    )  # fmt: skip
    results["ground_truth"] = GroundTruth(roles, notes)  # for the report: roles and null reasons
    return figures


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
