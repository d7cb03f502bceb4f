"""Typed configuration: one dataclass per config group (conf/<group>/*.yaml).

YAML holds values, these dataclasses hold the schema. The CLI converts Hydra's DictConfig to
`RunConfig` with `from_dict`, which rejects unknown keys and wrong types with a one-line
`UserError`; no library function ever sees a DictConfig. Every numeric field has its valid range
in refusal_nnsight/validation.py (RULES), checked by `validate` before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserError


@dataclass
class ModelConfig:
    """A chat model and its family facts: chat template, post-instruction (eoi) tokens, refusal tokens."""

    name: str = "organism"  # short alias: run folders are runs/<name>/...
    # the toolkit's own organism, an HF repo id, or a GGUF file (loaded de-quantized)
    source: Literal["organism", "hf", "gguf"] = "organism"
    repo_id: str | None = None  # HF repo id (source=hf)
    gguf_path: str | None = None  # source=gguf: an installed package that ships the file, or a folder
    gguf_file: str | None = None  # source=gguf: the file's name in that folder
    organism_recipe: str = "default"  # which organism build (source=organism)
    organism_seed: int = 0  # its seed: splits, planted directions, training (default recipe: 0-4 ship)
    family: Literal["gemma2", "llama3", "chatml"] = "gemma2"
    # Whether a formatted prompt starts with exactly one BOS (Gemma-2, Llama-3: checked, and added
    # when the template lacks it). ChatML templates (SmolLM2, Qwen) write none; their tokenizers call
    # <|im_start|> the BOS, which every turn repeats. With false nothing is added or counted, and the
    # <bos> positions of the redundancy stage are the first token of the prompt.
    bos: bool = True
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
    # The model's ablation coefficient c, which search.coefficient takes unless set
    # (conf/search/default.yaml reads it): refusal_sae's model_clamp_val (src/benchmark.py) is -3
    # for Gemma-2 and -1 for Llama-3; conf/model/organism.yaml gives the organism's, with its reason
    coefficient: float = -1.0


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
    # Leave each prompt's first token out of every SAE edit and read. null = what the SAEs were
    # trained on: true for a tuned build's SAEs (trained without it), false otherwise (the paper
    # edits every position).
    skip_first_token: bool | None = None


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
    source: Literal["organism", "file", "hf", "package"] = "organism"
    # local CSV / JSON / JSONL / Parquet file, an HF dataset id (source=hf), or a data file inside an
    # installed package, "<package>/<path in it>" (source=package; the package is never imported)
    path: str | None = None
    config: str | None = None  # HF dataset config name
    split: str | None = None  # HF split
    column: str = "instruction"  # the column holding the instruction
    category_column: str | None = None
    filter_column: str | None = None  # keep only rows whose filter_column == filter_value
    filter_value: str | None = None
    license: str | None = None  # shown in the report (Alpaca is CC BY-NC 4.0)
    # split train / val / eval in proportion to category_column's values (else a plain shuffle)
    stratify: bool = False


@dataclass
class DataConfig:
    """Harmful / harmless prompts and the sizes of the train, val and eval sets (the direction stage)."""

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


# search.{direction,candidates,redundancy}.layers: null (every layer there is), a list [0, 2, 5], a range {start: 0, stop: 6}
# (stop excluded), {before_last_fraction: 0.2} (Arditi's pruning: layers < int(n·(1 − f))), or
# {before_layer: L} (layers < L, e.g. a model's known refusal-decision layer).
LayerSelection = list[int] | dict[str, float] | None
LAYER_SELECTION_KEYS = ({"start", "stop"}, {"before_last_fraction"}, {"before_layer"})


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
    # which layers' candidates are scored on val (see LayerSelection above); null = every layer, as
    # Arditi et al. Each candidate costs three val passes: on a deep model on CPU, score fewer layers.
    layers: LayerSelection = None


@dataclass
class CandidatesConfig:
    """Stage 1b: SAE features closest to the refusal direction."""

    top_k: int = 10  # per SAE layer
    layers: LayerSelection = None  # which SAE layers candidates come from (see LayerSelection above)
    batch_size: int = 64  # prompts per forward in the all-of-C ablation check
    # also ablate each searched layer's candidates alone, and all but that layer's: which layers do
    # the work, and whether one undoes the rest (two more passes per layer over the harmful eval
    # prompts, each also generated and judged: one generation per variant, plus the clean run)
    per_layer: bool = False
    # generate and judge those per-layer variants (their jailbreak rates); off = the flip
    # criterion's rates alone, without the 2·layers + 1 generations (under the judge criterion the
    # flips are the judge's own verdicts, so its rates come without extra generations either way)
    per_layer_judged: bool = True
    # random unit directions each layer's candidates are compared with (candidates.parquet null_p): a
    # candidate is "beyond the null" when fewer than 5% of them have a latent as close to them as it
    # is to r̂. 0 = off
    null_directions: int = 256
    # rank only the latents active (> 0 at some position) on at least this many of the harmful train
    # prompts; 0 = every latent, as the paper ranks them. A latent silent on a prompt is unchanged
    # by scaling it, so a dead latent in C (a trained SAE holds many, and their decoders can still
    # point along r̂) takes a place among the top k and edits nothing (candidates.n_silent counts them)
    min_active: int = 0


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
    # > 1: each prompt's M is scaled at its edge instead, the strongest of weak_steps scales from
    # weak_coefficient toward the search coefficient c (weak + k (c - weak) / weak_steps, k <
    # weak_steps) before the first at which M alone jailbreaks the prompt. Off by default: on the
    # organism's seven built seeds it finds redundancy on four, as zero-ablation does, but not the
    # same four (docs/organism-settings.md)
    weak_steps: int = 1
    # an awakened latent holds the refusal when ablating it with M lowers the refusal score by more
    # than this (refusal-score units, as fm.confirm_tolerance). Most latents of H change the score by
    # float32 rounding alone (on the default organism run at c = -3: 143 of 197 by exactly 0, 26 more
    # by under 0.01), and at a threshold of 0 another CPU kernel moves one of them across it
    holding_tolerance: float = 0.25
    reinject_scale: float = (
        2.0  # H scaled by this in the M-ablated run: its awakened contribution added once more
    )
    bos_features: Literal["awakened", "minimal", "both"] = "awakened"  # which latents the <bos> clamp sets
    max_new_tokens: int | None = None  # null = model.max_new_tokens
    # SAE layers scanned for awakened latents (a LayerSelection); null = the candidates' layers
    layers: LayerSelection = None
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
    # 0 = zero-ablation (evaluate also reports the minimal sets at c = 0). The YAML default is the
    # model's own (model.coefficient); this default, the organism's, serves a config built without conf/.
    coefficient: float = -1.0
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    fm: FMConfig = field(default_factory=FMConfig)
    redundancy: RedundancyConfig = field(default_factory=RedundancyConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


@dataclass
class JudgeConfig:
    name: str = "substring"


BackendName = Literal["local", "ndif", "ndif_check"]


@dataclass
class BackendConfig:
    """Where traces run: local weights, NDIF (remote sessions), or NDIF's path checked in-process."""

    name: BackendName = "local"
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
