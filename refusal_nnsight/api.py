"""The library API: each stage as a plain function on your own nnsight model and SAEs, no Hydra.

    import refusal_nnsight as rn
    model = rn.load_model()                     # the organism; or rn.load_model(ModelConfig(...))
    saes = rn.load_saes(model)
    prompts = rn.load_prompts()
    direction = rn.find_direction(model, prompts)
    candidates = rn.candidate_features(model, saes, direction, prompts)
    minimal = rn.greedy_minimal_set(model, saes, candidates, prompts)
    interactions = rn.fit_interactions(model, saes, candidates, minimal, prompts)
    redundant = rn.find_redundant(model, saes, minimal, prompts)
    report = rn.evaluate(model, saes, direction, candidates, minimal, interactions, prompts)

Each function takes the stage's config dataclass (defaults from refusal_nnsight.config), the
ablation coefficient (`search.coefficient` of a run; None, the default, is the model's own,
`model.cfg.coefficient`) and an optional `out` folder; the flip
criterion is chosen in `candidate_features` and travels with its result; with `out=None` the stage's artifacts go to a temporary folder that is
removed afterwards. Each returns the stage's result object (`.summary()`, its tables).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast, get_args

import polars as pl

from .artifacts import StageDir, StageResult
from .config import (
    BackendConfig,
    BackendName,
    CandidatesConfig,
    DataConfig,
    DirectionConfig,
    EvaluateConfig,
    FMConfig,
    GreedyConfig,
    ModelConfig,
    RedundancyConfig,
    SAEConfig,
)
from .data import Prompts
from .data import load_prompts as _load_prompts
from .errors import UserError
from .judges import make_judge
from .models import LoadedModel
from .models import load_model as _load_model
from .models import wrap_model as _wrap_model
from .saes import LoadedSAEs
from .saes import load_saes as _load_saes
from .validation import check_value, validate_section

__all__ = [
    "load_model", "wrap_model", "load_saes", "load_prompts", "find_direction", "candidate_features",
    "greedy_minimal_set", "fit_interactions", "find_redundant", "evaluate", "feature_cards", "load_run", "Run",
]  # fmt: skip


def load_model(cfg: ModelConfig | None = None, backend: str | BackendConfig = "local") -> LoadedModel:
    """An nnsight model with its family facts (default: the organism, built on first use).

    backend="ndif" builds a meta model and runs every stage step as one NDIF session job
    (NDIF_API_KEY from the environment or nnsight's config); "ndif_check" runs the same jobs
    through nnsight's request serialization against an in-process strict server.
    """
    if isinstance(backend, BackendConfig):
        bcfg = backend
    elif backend in get_args(BackendName):
        bcfg = BackendConfig(name=cast(BackendName, backend))
    else:
        raise UserError(f"backend={backend!r}: use one of {', '.join(get_args(BackendName))}")
    from .organism.resolve import weights_path

    cfg = validate_section(cfg or ModelConfig(), "model")
    if bcfg.name == "local":
        return _load_model(cfg, weights_path(cfg))
    from .backends import load_model as load_on_backend

    return load_on_backend(cfg, bcfg, weights_path(cfg))


def wrap_model(hf_model, tokenizer, cfg: ModelConfig) -> LoadedModel:
    """Your own already-built HF causal LM and tokenizer as an nnsight model, with the family facts
    of `cfg` (its refusal tokens, eoi suffix, coefficient)."""
    return _wrap_model(hf_model, tokenizer, validate_section(cfg, "model"))


def load_saes(model: LoadedModel, cfg: SAEConfig | None = None) -> LoadedSAEs:
    """sae-lens SAEs by layer, checked against `model` (default: the organism's)."""
    from .organism.resolve import organism_root

    return _load_saes(validate_section(cfg or SAEConfig(), "sae"), model, organism_root(model.cfg))


def load_prompts(cfg: DataConfig | None = None, organism_seed: int = 0) -> Prompts:
    """Harmful / harmless train, val and eval sets (default: the organism's grammar, split as the
    organism of `organism_seed` was)."""
    from .organism.resolve import prompt_splits

    cfg = validate_section(cfg or DataConfig(), "data")
    return _load_prompts(cfg, prompt_splits(check_value("model.organism_seed", organism_seed)))


def _c(model, coefficient: float | None) -> float:
    """The ablation coefficient a stage uses: the caller's, else the model's own (model.cfg.coefficient)."""
    return model.cfg.coefficient if coefficient is None else check_value("search.coefficient", coefficient)


def _in_stage(name: str, out: str | Path | None, fn: Callable[[StageDir], StageResult]):
    if out is not None:
        stage = StageDir(Path(out), name)
        result = fn(stage)
        result.save(stage)
        return result
    with tempfile.TemporaryDirectory(prefix=f"refusal_nnsight_{name}_") as tmp:
        return fn(StageDir(Path(tmp), name))


def find_direction(model: LoadedModel, prompts: Prompts, cfg: DirectionConfig | None = None, out=None):
    """Stage 1a: difference-of-means refusal direction with Arditi et al.'s selection."""
    from .stages import direction

    cfg = validate_section(cfg or DirectionConfig(), "search.direction")
    return _in_stage("direction", out, lambda o: direction.run(model, prompts, cfg, o))


def candidate_features(
    model,
    saes,
    direction,
    prompts: Prompts,
    cfg: CandidatesConfig | None = None,
    out=None,
    coefficient: float | None = None,
    criterion: str = "first_token",
    judge: str = "substring",
):
    """Stage 1b: per SAE layer, the top-k features by decoder cosine with the direction."""
    from .scoring import Criterion
    from .stages import candidates

    cfg, c = validate_section(cfg or CandidatesConfig(), "search.candidates"), _c(model, coefficient)
    flip = Criterion(criterion, direction.score_threshold)
    return _in_stage(
        "candidates",
        out,
        lambda o: candidates.run(model, saes, direction, prompts, cfg, o, c, flip, make_judge(judge)),
    )


def greedy_minimal_set(
    model,
    saes,
    candidates,
    prompts: Prompts,
    cfg: GreedyConfig | None = None,
    out=None,
    judge: str = "substring",
    coefficient: float | None = None,
):
    """Stage 2: per harmful prompt, a verified 1-minimal jailbreaking feature set."""
    from .stages import greedy

    cfg, c = validate_section(cfg or GreedyConfig(), "search.greedy"), _c(model, coefficient)
    return _in_stage(
        "greedy",
        out,
        lambda o: greedy.run(model, saes, candidates, prompts, cfg, o, make_judge(judge),
                             c, candidates.flip_criterion),
    )  # fmt: skip


def fit_interactions(
    model,
    saes,
    candidates,
    minimal,
    prompts: Prompts,
    cfg: FMConfig | None = None,
    out=None,
    seed: int = 0,
    coefficient: float | None = None,
):
    """Stage 3: a factorization machine over ablation masks; top features and confirmed pairs."""
    from .stages import fm

    cfg, seed = validate_section(cfg or FMConfig(), "search.fm"), check_value("seed", seed)
    c = _c(model, coefficient)
    return _in_stage(
        "fm",
        out,
        lambda o: fm.run(model, saes, candidates, minimal, prompts, cfg, o, seed, c,
                         candidates.flip_criterion),
    )  # fmt: skip


def find_redundant(
    model,
    saes,
    minimal,
    prompts: Prompts,
    cfg: RedundancyConfig | None = None,
    out=None,
    judge: str = "substring",
    coefficient: float | None = None,
    layers: list[int] | None = None,
):
    """Redundancy ("hydra") features that wake when the minimal set is ablated, with causal tests;
    `layers`: the SAE layers scanned (default all; the pipeline scans the candidates' layers). A
    test counts a jailbreak where the judge and the flip criterion `minimal` was found with agree."""
    from .scoring import Criterion
    from .stages import redundancy

    cfg, c = validate_section(cfg or RedundancyConfig(), "search.redundancy"), _c(model, coefficient)
    return _in_stage(
        "redundancy",
        out,
        lambda o: redundancy.run(
            model,
            saes,
            minimal,
            prompts,
            cfg,
            o,
            make_judge(judge),
            c,
            Criterion(minimal.criterion, minimal.score_threshold),
            layers,
        ),
    )


def evaluate(model, saes, direction, candidates, minimal, interactions, prompts: Prompts, cfg: EvaluateConfig | None = None,
             out=None, judge: str = "substring", seed: int = 0, coefficient: float | None = None,
             criterion: str | None = None):  # fmt: skip
    """Judged generations under every intervention (stages that did not run may be None). A
    jailbreak counts where the judge and the flip criterion agree: `criterion` (score,
    first_token or judge) defaults to the one `minimal` or `candidates` decided flips with, at
    its score threshold; without either, first_token at the direction's calibrated threshold."""
    from .scoring import Criterion
    from .stages import evaluate as ev

    cfg, seed = validate_section(cfg or EvaluateConfig(), "search.evaluate"), check_value("seed", seed)
    c = _c(model, coefficient)
    decided = next((r for r in (minimal, candidates) if getattr(r, "criterion", None)), None)
    flip = Criterion(
        criterion or (decided.criterion if decided else "first_token"),
        decided.score_threshold if decided else direction.score_threshold,
    )
    return _in_stage("evaluate", out, lambda o: ev.run(model, saes, direction, candidates, minimal, interactions, prompts,
                                                       cfg, o, make_judge(judge), seed,
                                                       c, flip))  # fmt: skip


def feature_cards(model, saes, prompts: Prompts, direction, minimal, interactions=None, redundant=None,
                  coefficient: float | None = None):  # fmt: skip
    """A card per found feature (minimal sets, the FM's top features, H): where it was found, its
    cosine with r̂, its top-activating contexts and its effect ablated alone (features.CARD_SCHEMA).
    The flip criterion is the one the candidates stage chose, carried by `minimal`."""
    from .features import feature_cards as cards
    from .scoring import Criterion

    flip = Criterion(minimal.criterion, minimal.score_threshold)
    return cards(
        model,
        saes,
        prompts,
        direction,
        minimal,
        interactions,
        redundant,
        coefficient=_c(model, coefficient),
        flip=flip,
    )


@dataclass
class Run:
    """A run folder loaded for a notebook: the typed result of every finished stage (the objects
    the functions above return), the summary and the config. A stage that did not finish, or whose
    files no longer match the hashes its done.json recorded, is None and listed in `unusable`."""

    path: Path
    config: dict
    summary: dict
    direction: object | None = None
    candidates: object | None = None
    greedy: object | None = None
    fm: object | None = None
    redundancy: object | None = None
    evaluate: object | None = None
    features: pl.DataFrame | None = None  # the feature cards (features.parquet), None if not written
    provenance: dict = field(default_factory=dict)  # provenance.json: toolkit, commit, command, weights
    unusable: dict[str, str] = field(default_factory=dict)  # stage -> why it was not loaded


def load_run(path: str | Path) -> Run:
    """Load a finished (or partly finished) run folder without recomputing anything."""
    from .artifacts import RunFolder, read_json, read_parquet
    from .errors import UserError
    from .stages import candidates, direction, evaluate, fm, greedy, redundancy

    folder = RunFolder(path)
    if not folder.config.is_file():
        raise UserError(f"{folder.root} is not a run folder (it has no {folder.config.name})")
    summary = read_json(folder.summary) if folder.summary.is_file() else {}
    run = Run(folder.root, read_json(folder.config), summary)
    if folder.features.is_file():
        run.features = read_parquet(folder.features)
    if folder.provenance.is_file():
        run.provenance = read_json(folder.provenance)
    classes: dict[str, type[StageResult]] = {
        "direction": direction.DirectionResult,
        "candidates": candidates.CandidatesResult,
        "greedy": greedy.GreedyResult,
        "fm": fm.FMResult,
        "redundancy": redundancy.RedundancyResult,
        "evaluate": evaluate.EvaluateResult,
    }
    for name, cls in classes.items():
        done = folder.stage(name).done
        if not done.is_file():
            run.unusable[name] = "did not finish"
            continue
        record = read_json(done)
        out = folder.stage(name, record.get("config_hash", ""), record.get("inputs"))
        why = out.damage()
        if why is not None:
            run.unusable[name] = why
            continue
        setattr(run, name, cls.load(out))
    return run
