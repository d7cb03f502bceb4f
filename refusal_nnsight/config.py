"""Typed configuration: one dataclass per config group (conf/<group>/*.yaml).

YAML holds values, these dataclasses hold the schema. The CLI converts Hydra's DictConfig to
`RunConfig` with `from_dict`, which rejects unknown keys and wrong types with a one-line
`UserError`; no library function ever sees a DictConfig.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from .errors import UserError


@dataclass
class ModelConfig:
    """A chat model and its family facts (SPEC.md "Targets", "Prompts and positions")."""

    name: str = "organism"  # short alias: run folders are runs/<name>/...
    source: Literal["organism", "hf"] = "organism"  # the toolkit's own organism, or an HF repo id
    repo_id: str | None = None  # HF repo id (source=hf)
    organism_recipe: str = "default"  # which organism build (source=organism)
    family: Literal["gemma2", "llama3"] = "gemma2"
    residual_module: str = "model.layers"  # ModuleList whose layer L output is blocks.L.hook_resid_post
    n_layers: int | None = None  # expected; checked against the loaded config when set
    d_model: int | None = None  # expected; checked against the loaded config when set
    chat_template: str | None = None  # jinja override; null = the tokenizer's own template
    eoi_suffix: str | None = None  # template text after the instruction; null = derived from the template
    refusal_strings: list[str] = field(default_factory=lambda: ["I"])  # first token of each = refusal tokens
    refusal_token_ids: list[int] | None = (
        None  # explicit ids (Gemma 235285, Llama-3 40); overrides refusal_strings
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu
    attn_implementation: str | None = "eager"  # Gemma-2 needs eager for its attention softcap
    trust_remote_code: bool = False  # off unless a user asks (never needed for Gemma-2 / Llama-3.1)
    max_new_tokens: int = 24  # generation judge budget


@dataclass
class SAEConfig:
    """Where the residual-stream SAEs come from, and which layers have one."""

    name: str = "organism"
    source: Literal["organism", "pretrained", "disk"] = "organism"
    release: str | None = None  # sae-lens release (source=pretrained)
    sae_id: str | None = None  # sae-lens id template with {layer} (source=pretrained)
    path: str | None = None  # folder template with {layer} (source=disk), sae-lens disk format
    layers: list[int] | None = None  # null = every layer that has an SAE
    neuronpedia: str | None = None  # Neuronpedia id template with {layer}, for report links
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # null = the model's dtype


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type; raise UserError if it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}={value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return {k: _coerce(args[1] if args else Any, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        if math.isnan(float(value)):
            raise UserError(f"{where} is NaN; give a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain mapping, checking every key and type."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict (JSON/YAML-safe)."""
    return dataclasses.asdict(obj)


@dataclass
class PromptSource:
    """One prompt set: the organism grammar, a local file, or an HF dataset (conf/data/{harmful,harmless})."""

    name: str = "organism"
    source: Literal["organism", "file", "hf"] = "organism"
    path: str | None = None  # local CSV / JSON / JSONL / Parquet file, or an HF dataset id (source=hf)
    config: str | None = None  # HF dataset config name
    split: str | None = None  # HF split
    column: str = "instruction"  # the column holding the instruction
    category_column: str | None = None
    filter_column: str | None = None  # keep only rows whose filter_column == filter_value
    filter_value: str | None = None
    license: str | None = None  # shown in the report (Alpaca is CC BY-NC 4.0)


@dataclass
class DataConfig:
    """Harmful / harmless prompts and the sizes of the train, val and eval sets (SPEC.md Stage 1)."""

    name: str = "organism"
    harmful: PromptSource = field(default_factory=PromptSource)
    harmless: PromptSource = field(default_factory=PromptSource)
    n_train: int = 128  # per class
    n_val: int = 32  # per class
    n_eval: int = 64  # harmful prompts dissected / evaluated (and as many harmless)
    seed: int = 0
    # Prompts the model cannot read are refused before any stage runs (data.check_readable):
    max_tokens: int | None = 512  # longest formatted prompt, in tokens; null = the model's context
    max_unknown_fraction: float = 0.05  # of a prompt set's tokens that may be the tokenizer's <unk>


@dataclass
class DirectionConfig:
    """Stage 1a: difference-of-means refusal direction and Arditi selection."""

    prune_last_fraction: float = 0.2  # discard candidates in the last 20% of layers
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0  # discard candidates whose induce score is below this
    batch_size: int = 32
    fallback: Literal["lowest_bypass", "fewest_failures"] = (
        "lowest_bypass"  # when no candidate survives (ours)
    )


# search.candidates.layers: null (every SAE layer), a list [0, 2, 5], a range {start: 0, stop: 6}
# (stop excluded), {before_last_fraction: 0.2} (Arditi's pruning: layers < int(n·(1 − f))), or
# {before_layer: L} (layers < L, e.g. a model's known refusal-decision layer).
LayerSelection = list[int] | dict[str, float] | None
LAYER_SELECTION_KEYS = ({"start", "stop"}, {"before_last_fraction"}, {"before_layer"})


@dataclass
class CandidatesConfig:
    """Stage 1b: SAE features closest to the refusal direction."""

    top_k: int = 10  # per SAE layer
    layers: LayerSelection = None  # which SAE layers candidates come from (see LayerSelection above)
    batch_size: int = 64  # prompts per forward in the all-of-C ablation check


@dataclass
class GreedyConfig:
    """Stage 2: backward elimination to a 1-minimal set, per harmful prompt."""

    # When an ablation "flips" a prompt (the model stops refusing): score = refusal score below the
    # threshold calibrated on val (direction.score_threshold); first_token = the greedy first token
    # is not a refusal token; judge = the generation judge finds no refusal (a generation per variant).
    criterion: Literal["score", "first_token", "judge"] = "first_token"
    order: Literal["effect", "cosine"] = "effect"  # which feature is tried for removal first
    max_prompts: int = 32  # harmful prompts dissected
    forward: bool = True  # also run forward greedy for comparison (and as a smaller verified set)
    judge_confirm: bool = True  # generate M and its restorations: judge verdicts, criterion agreement
    batch_size: int = 64
    max_passes: int = 10  # backward passes until one drops nothing (effects are not monotone)


@dataclass
class FMConfig:
    """Stage 3: factorization machine over ablation masks of the pool."""

    n_masks: int = 2048  # per prompt (summary: fm.n_masks_per_prompt, fm.n_masks_total)
    max_prompts: int = 4
    rank: int = 8
    l2: float = 1e-4
    lr: float = 0.01
    epochs: int = 300
    heldout_fraction: float = 0.2
    top_pairs: int = 5
    extra_active: int = 0  # extra SAE features active on the prompt added to the pool
    batch_size: int = 256
    # Steps read out after the mask FMs (always fitted, regression and classification): the mask FM
    # whose w and V rank features and pairs ("classification" if listed, else "regression"), and
    # "classify_prompts": an FM on the pool features' activations, max-pooled over each prompt,
    # telling harmful from harmless prompts (Yeo, Prakash et al. 2025), held out against linear.
    readout: list[Literal["regression", "classification", "classify_prompts"]] = field(
        default_factory=lambda: ["regression", "classify_prompts"]
    )
    confirm_tolerance: float = (
        0.25  # |joint − sum of singles| (refusal-score units) a confirmed pair must exceed
    )
    chunk: int = 512  # masks per resumable part file


@dataclass
class RedundancyConfig:
    """Redundancy ("hydra") features and the <bos> clamp experiment."""

    dormant_max: float = 0.0  # clean activation at or below this counts as dormant
    awake_min: float = 0.5  # ablated activation above this counts as awake
    top_awake: int = 20  # per prompt, strongest awakened latents kept in H
    bos_clamp_value: float = 0.0
    weak_coefficient: float = 0.0  # weaker ablation of M (zero-ablation) where M alone may not jailbreak
    reinject_scale: float = (
        2.0  # H scaled by this in the M-ablated run: its awakened contribution added once more
    )
    bos_features: Literal["awakened", "minimal", "both"] = "awakened"  # which latents the <bos> clamp sets
    max_new_tokens: int | None = None  # null = model.max_new_tokens
    batch_size: int = 16  # prompts per forward (the full-width SAE scan holds [B, T, width] per layer)


@dataclass
class EvaluateConfig:
    """Generations under each intervention, judged."""

    n_random: int = 3  # random same-size feature sets per prompt
    max_new_tokens: int | None = None  # null = model.max_new_tokens
    batch_size: int = 32
    max_prompts: int | None = None  # harmful and harmless eval prompts evaluated; null = all of data.n_eval
    fm_top: int = 5  # FM top features (by |w_i|, not already in M) added to M in "minimal_plus_fm"


@dataclass
class SearchConfig:
    """Stage settings (conf/search/*.yaml: fast, default, paper, harm)."""

    name: str = "default"
    # The one ablation coefficient: every stage scales the ablated latents by c (error term kept).
    # refusal_sae src/benchmark.py model_clamp_val: -3 for Gemma-2, -1 for Llama-3; 0 = zero-ablation
    # (evaluate also reports the minimal sets at c = 0).
    coefficient: float = -3.0
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    fm: FMConfig = field(default_factory=FMConfig)
    redundancy: RedundancyConfig = field(default_factory=RedundancyConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


@dataclass
class JudgeConfig:
    name: str = "substring"


@dataclass
class BackendConfig:
    """Where traces run: local weights, NDIF (remote sessions), or NDIF's path checked in-process."""

    name: Literal["local", "ndif", "ndif_check"] = "local"
    host: str | None = None  # ndif: API host; null = nnsight's config (NDIF_HOST, https://api.ndif.us)


@dataclass
class RunConfig:
    """Everything one run needs; composed by Hydra from conf/config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    run_dir: str | None = None  # null = runs/<model>/<timestamp>
    seed: int = 0
    stages: list[str] = field(
        default_factory=lambda: ["direction", "candidates", "greedy", "fm", "redundancy", "evaluate"]
    )
    # torch's CPU threads. Small models run fastest on one (no thread hand-offs per tiny matmul),
    # and the thread count changes float sums in the last digits: results are reproducible at the
    # count recorded in config.json. null = torch's default (all cores).
    threads: int | None = 1
    force_restart: bool = False  # discard the results already in run_dir and start again


# ---------------------------------------------------------------------------------- validation
#
# Every numeric field of every dataclass above has a Rule below: its valid range, checked by
# `validate` before anything is written. tests/test_config_ranges.py enumerates the numeric fields and
# fails for one without a Rule, then feeds each Rule's `bad` values to `validate`. Adding a field
# means adding one line here, e.g. `count("search.fm.chunk")`.


class Rule(NamedTuple):
    """The valid range (or set) of one config field, by its dotted path from RunConfig."""

    field: str  # e.g. "search.fm.chunk"
    check: Callable[[Any], bool]  # True when the value is valid; never called on None (null)
    what: str  # completes "it must be ..."
    bad: tuple = ()  # values outside the range: the test checks that each is refused


def count(name: str, minimum: int = 1) -> Rule:
    """An integer count, >= minimum (default 1: a count of nothing is a mistake)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return Rule(name, lambda v: v >= minimum, what, (minimum - 1, -5))


def interval(name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A fraction or other bounded number in [lo, hi], either end open."""
    low = (lambda v: v > lo) if lo_open else (lambda v: v >= lo)
    high = (lambda v: v < hi) if hi_open else (lambda v: v <= hi)
    what = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    bad = (lo - 1, hi + 1, math.inf) + ((lo,) if lo_open else ()) + ((hi,) if hi_open else ())
    return Rule(name, lambda v: low(v) and high(v), what, bad)


def finite(name: str, *, above: float | None = None, at_least: float | None = None) -> Rule:
    """A threshold or scale: a finite number, optionally > above or >= at_least."""
    what, bad = "a finite number", (math.inf, -math.inf)
    if above is not None:
        what, bad = f"a finite number > {above}", (*bad, above)
    if at_least is not None:
        what, bad = f"a finite number >= {at_least}", (*bad, at_least - 1)
    lo = -math.inf if above is None else above
    return Rule(
        name,
        lambda v: math.isfinite(v) and v > lo and (at_least is None or v >= at_least),
        what,
        bad,
    )


def ablation(name: str) -> Rule:
    """An ablation coefficient c (latents scaled f_i ← c·f_i): finite and < 1; c >= 1 amplifies."""
    what = (
        "a finite number < 1: c >= 1 would amplify the latents, not ablate them "
        "(0 = zero-ablation, -3 = refusal_sae's Gemma setting)"
    )
    return Rule(name, lambda v: math.isfinite(v) and v < 1, what, (1.0, 5.0, math.inf))


def _layer_selection_ok(v: Any) -> bool:
    if isinstance(v, list):
        return all(layer >= 0 for layer in v) and len(set(v)) == len(v)
    if set(v) not in [set(k) for k in LAYER_SELECTION_KEYS]:
        return False
    if "before_last_fraction" in v:
        return 0 <= v["before_last_fraction"] < 1
    if "before_layer" in v:
        return v["before_layer"] >= 1 and float(v["before_layer"]).is_integer()
    start, stop = v["start"], v["stop"]
    return 0 <= start < stop and float(start).is_integer() and float(stop).is_integer()


RULES: tuple[Rule, ...] = (
    # model, sae, data, run
    count("model.max_new_tokens"),
    count("model.n_layers"),
    count("model.d_model"),
    Rule("model.refusal_token_ids", lambda v: len(v) > 0 and min(v) >= 0, "a non-empty list of token ids >= 0", ([], [-1])),
    Rule("sae.layers", lambda v: min(v, default=0) >= 0 and len(set(v)) == len(v), "distinct layer indices >= 0", ([-1], [2, 2])),
    count("data.n_train"),
    count("data.n_val"),
    count("data.n_eval"),
    count("data.seed", 0),
    count("data.max_tokens"),
    interval("data.max_unknown_fraction", 0, 1),
    count("seed", 0),
    count("threads"),
    # search
    ablation("search.coefficient"),
    interval("search.direction.prune_last_fraction", 0, 1, hi_open=True),
    finite("search.direction.kl_threshold", above=0),
    finite("search.direction.induce_threshold"),
    count("search.direction.batch_size"),
    count("search.candidates.top_k"),  # and <= the SAE width, checked once the SAEs are loaded
    Rule("search.candidates.layers", _layer_selection_ok,
         "a list of layers, {start: a, stop: b}, {before_last_fraction: f} with 0 <= f < 1, or {before_layer: L}",
         ([-1], {"start": 3.0, "stop": 1.0}, {"before_last_fraction": 1.5})),
    count("search.candidates.batch_size"),
    count("search.greedy.max_prompts"),
    count("search.greedy.batch_size"),
    count("search.greedy.max_passes"),
    count("search.fm.n_masks", 16),
    count("search.fm.max_prompts"),
    count("search.fm.rank"),
    finite("search.fm.l2", at_least=0),
    finite("search.fm.lr", above=0),
    count("search.fm.epochs"),
    interval("search.fm.heldout_fraction", 0, 1, lo_open=True, hi_open=True),
    count("search.fm.top_pairs"),
    count("search.fm.extra_active", 0),
    count("search.fm.batch_size"),
    Rule("search.fm.readout", lambda v: len(v) > 0 and len(set(v) & {"regression", "classification"}) <= 1,
         "a non-empty list naming at most one of regression / classification (plus classify_prompts)",
         ([], ["regression", "classification"])),
    finite("search.fm.confirm_tolerance", at_least=0),
    count("search.fm.chunk"),
    finite("search.redundancy.dormant_max"),
    finite("search.redundancy.awake_min"),
    count("search.redundancy.top_awake"),
    finite("search.redundancy.bos_clamp_value"),
    ablation("search.redundancy.weak_coefficient"),
    finite("search.redundancy.reinject_scale", above=1),  # 1 leaves H as it is; < 1 ablates it
    count("search.redundancy.max_new_tokens"),
    count("search.redundancy.batch_size"),
    count("search.evaluate.n_random"),
    count("search.evaluate.max_new_tokens"),
    count("search.evaluate.batch_size"),
    count("search.evaluate.max_prompts"),
    count("search.evaluate.fm_top"),
)  # fmt: skip

# Stage dependencies: a stage reads the results of these (loaded when finished, else computed).
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "direction": (),
    "candidates": ("direction",),
    "greedy": ("candidates",),
    "fm": ("candidates", "greedy"),
    "redundancy": ("greedy",),
    "evaluate": ("direction",),  # and candidates, greedy, fm when they are listed
}

# Fields that change no result: a run folder may be resumed with other values of these (the
# batch sizes, the device, the backend; `stages` only picks which stages run). Every other
# field is part of the run's config hash. `*` matches one dotted part.
NO_RESULT_FIELDS = ("run_dir", "force_restart", "stages", "backend.*", "model.device", "search.*.batch_size")

_MISSING = object()


def get_field(cfg: Any, dotted: str) -> Any:
    """The value at a dotted path of a config (or _MISSING)."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            break
    return value


def leaf_fields(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, type) of every non-dataclass field under `cls` (default RunConfig), in order."""
    cls = RunConfig if cls is None else cls
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


def is_numeric(tp: Any) -> bool:
    """Whether a field type holds numbers (int, float, optional or inside a list / dict)."""
    if tp in (int, float):
        return True
    return any(is_numeric(a) for a in typing.get_args(tp) if typing.get_origin(tp) is not Literal)


def flat(cfg: RunConfig) -> dict[str, Any]:
    """{dotted path: value} of every leaf field, in declaration order."""
    return {name: get_field(cfg, name) for name, _ in leaf_fields()}


def result_fields(cfg: RunConfig) -> dict[str, Any]:
    """The fields a run's results depend on (all but NO_RESULT_FIELDS), dotted, in order."""
    import fnmatch

    return {
        k: v for k, v in flat(cfg).items() if not any(fnmatch.fnmatchcase(k, p) for p in NO_RESULT_FIELDS)
    }


def config_hash(cfg: RunConfig) -> str:
    """16 hex digits of sha256 over result_fields: what a run folder was computed under."""
    import hashlib
    import json

    text = json.dumps(result_fields(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate(cfg: RunConfig, explicit: Collection[str] | None = None) -> RunConfig:
    """Check every setting before anything is written; each failure is one UserError line.

    `explicit`: the dotted keys the user set (command-line overrides). A setting that does not
    apply (data.harmful.path with the organism's prompts) is refused when the user set it, and
    reset to its default when it came from a preset of another source (data=advbench then
    data.harmful.source=organism). None: every value counts as set by the user (library calls).
    """
    for rule in RULES:
        value = get_field(cfg, rule.field)
        if value is None or value is _MISSING:
            continue
        if not rule.check(value):
            shown = value if not isinstance(value, str) else repr(value)
            raise UserError(f"{rule.field}={shown} makes no sense: it must be {rule.what}")
    r = cfg.search.redundancy
    if r.awake_min < r.dormant_max:
        raise UserError(
            f"search.redundancy.awake_min={r.awake_min} is below dormant_max={r.dormant_max}: "
            "a latent counts as awake above awake_min and as dormant at or below dormant_max"
        )
    if cfg.run_dir is not None and not cfg.run_dir.strip():
        raise UserError("run_dir is empty; give a folder (run_dir=runs/mine) or leave it out for a fresh one")
    _check_stages(cfg.stages)
    _check_applicable(cfg, explicit)
    if cfg.backend.name != "ndif":  # on NDIF the server's device is used
        _check_device(cfg.model.device)
    if cfg.model.chat_template is not None:
        _check_chat_template(cfg.model.chat_template)
    if cfg.backend.host is not None:
        _check_host(cfg.backend.host)
    return cfg


def _check_stages(stages: list[str]) -> None:
    unknown = [s for s in stages if s not in STAGE_NEEDS]
    if unknown or not stages:
        raise UserError(
            f"stages={stages}: {'unknown ' + str(unknown) if unknown else 'empty'}; "
            f"stages are {', '.join(STAGE_NEEDS)}"
        )
    for stage in stages:
        missing = [need for need in STAGE_NEEDS[stage] if need not in stages]
        if missing:
            closure = set(stages)
            while True:
                more = {n for s in closure for n in STAGE_NEEDS[s]} - closure
                if not more:
                    break
                closure |= more
            listed = ",".join(s for s in STAGE_NEEDS if s in closure)
            raise UserError(
                f"stage {stage} needs {', '.join(missing)}: list it too, stages=[{listed}] "
                "(a finished stage is loaded, not recomputed)"
            )


# Settings that only some sources read: (section, field, the sources that read it).
_APPLIES: tuple[tuple[str, str, tuple[str, ...]], ...] = tuple(
    (f"data.{s}", name, sources)
    for s in ("harmful", "harmless")
    for name, sources in (
        ("path", ("file", "hf")), ("config", ("hf",)), ("split", ("hf",)), ("column", ("file", "hf")),
        ("category_column", ("file", "hf")), ("filter_column", ("file", "hf")),
        ("filter_value", ("file", "hf")), ("license", ("file", "hf")),
    )
) + (
    ("model", "repo_id", ("hf",)), ("model", "organism_recipe", ("organism",)),
    ("sae", "release", ("pretrained",)), ("sae", "sae_id", ("pretrained",)), ("sae", "path", ("disk",)),
)  # fmt: skip
_SOURCE_HELP = {
    "file": "file (a local CSV / JSON / JSONL / Parquet file)", "hf": "hf (a hub repo or dataset id)",
    "organism": "organism", "pretrained": "pretrained (an sae-lens release)", "disk": "disk (an SAE folder)",
}  # fmt: skip


def _check_applicable(cfg: RunConfig, explicit: Collection[str] | None) -> None:
    """Refuse a setting its section's source does not read (or drop it when a preset set it)."""
    for section, name, sources in _APPLIES:
        owner = get_field(cfg, section)
        default = next(f for f in dataclasses.fields(owner) if f.name == name).default
        source = owner.source
        if source in sources or getattr(owner, name) == default:
            continue
        key = f"{section}.{name}"
        if explicit is not None and key not in explicit:
            setattr(owner, name, default)  # a preset's value for another source: not used, not shown
            continue
        pick = " or ".join(_SOURCE_HELP[s] for s in sources)
        raise UserError(
            f"{key} is set, but {section}.source={source} does not read it; to use it pick "
            f"{section}.source={pick}, or drop {key}"
        )
    for s in (cfg.data.harmful, cfg.data.harmless):
        where = f"data.{'harmful' if s is cfg.data.harmful else 'harmless'}"
        if s.source != "organism" and not s.path:
            raise UserError(f"{where}.source={s.source} needs {where}.path (a file, or a hub dataset id)")
        if (s.filter_column is None) != (s.filter_value is None):
            raise UserError(
                f"{where}.filter_column and {where}.filter_value go together; set both or neither"
            )
    if cfg.model.source == "hf" and not cfg.model.repo_id:
        raise UserError("model.source=hf needs model.repo_id (e.g. google/gemma-2-2b-it)")
    if cfg.sae.source == "pretrained" and not (cfg.sae.release and cfg.sae.sae_id):
        raise UserError("sae.source=pretrained needs sae.release and sae.sae_id (an sae-lens release and id)")
    if cfg.sae.source == "disk" and not cfg.sae.path:
        raise UserError("sae.source=disk needs sae.path (a folder template with {layer})")
    if cfg.backend.host is not None and cfg.backend.name != "ndif":
        if explicit is not None and "backend.host" not in explicit:
            cfg.backend.host = None
        else:
            raise UserError(
                f"backend.host is set, but backend={cfg.backend.name} does not use it; use backend=ndif or drop it"
            )


def _check_device(name: str) -> None:
    """model.device must name a device that exists on this machine."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"model.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise UserError(
                f"model.device={name} but no CUDA device is visible; use model.device=cpu (or auto)"
            )
        if device.index is not None and device.index >= n:
            raise UserError(
                f"model.device={name} but this machine has {n} CUDA device(s): cuda:0..cuda:{n - 1}"
            )
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise UserError(f"model.device={name} is not available here; use auto, cpu or cuda[:N]")


def _check_chat_template(template: str) -> None:
    """model.chat_template must compile as transformers compiles it (sandboxed jinja)."""
    from jinja2 import TemplateError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # an older transformers: its sandboxed environment, approximately
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        compile_template = env.from_string
    try:
        compile_template(template)
    except TemplateError as err:
        line = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        raise UserError(f"model.chat_template does not compile: {err.message}{line}") from None


def _check_host(host: str) -> None:
    """backend.host: a URL without credentials (the key comes from NDIF_API_KEY)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(host)
    except ValueError:
        raise UserError("backend.host is not a URL; give e.g. https://api.ndif.us") from None
    if parts.username is not None or parts.password is not None:
        raise UserError(
            "backend.host holds credentials (user:password@); give the host alone and the key "
            "through the environment (NDIF_API_KEY)"
        )
