"""The valid range of every setting, and the checks that types alone cannot express.

`validate(cfg)` runs before anything is written: every numeric field against its Rule (RULES),
the stage dependencies, settings a source does not read, the device, the chat template, URLs
without credentials. `validate_section` runs a section's Rules on the config a library call was
given. `config_hash` names the config a run folder's results were computed under:
every field but those that change no result (NO_RESULT_FIELDS).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal, NamedTuple

from .config import LAYER_SELECTION_KEYS, RunConfig
from .errors import UserError

# Every numeric field of every dataclass in config.py has a Rule below: its valid range, checked
# by `validate` before anything is written. tests/test_config_ranges.py enumerates the numeric
# fields and fails for one without a Rule, then feeds each Rule's `bad` values to `validate`.
# Adding a field means adding one line to RULES, e.g. `count("search.fm.chunk")`.


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
    what = "a finite number"
    bad: tuple[float, ...] = (math.inf, -math.inf)
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
    Rule("model.refusal_strings", lambda v: len(v) > 0 and all(v), "a non-empty list of non-empty strings", ([], [""])),
    Rule("sae.layers", lambda v: len(v) > 0 and min(v) >= 0 and len(set(v)) == len(v),
         "a non-empty list of distinct layer indices >= 0 (null = every layer with an SAE)", ([], [-1], [2, 2])),
    count("data.n_train"),
    count("data.n_val"),
    count("data.n_eval"),
    count("data.seed", 0),
    count("model.organism_seed", 0),
    count("data.max_tokens"),
    interval("data.max_unknown_fraction", 0, 1),
    count("seed", 0),
    count("threads"),
    # search
    ablation("search.coefficient"),
    ablation("model.coefficient"),
    interval("search.direction.prune_last_fraction", 0, 1, hi_open=True),
    finite("search.direction.kl_threshold", above=0),
    finite("search.direction.induce_threshold"),
    count("search.direction.batch_size"),
    count("search.candidates.top_k"),  # and <= the SAE width, checked once the SAEs are loaded
    Rule("search.direction.layers", _layer_selection_ok,
         "a list of layers, {start: a, stop: b}, {before_last_fraction: f} with 0 <= f < 1, or {before_layer: L}",
         ([-1], {"start": 3.0, "stop": 1.0}, {"before_last_fraction": 1.5})),
    Rule("search.candidates.layers", _layer_selection_ok,
         "a list of layers, {start: a, stop: b}, {before_last_fraction: f} with 0 <= f < 1, or {before_layer: L}",
         ([-1], {"start": 3.0, "stop": 1.0}, {"before_last_fraction": 1.5})),
    Rule("search.redundancy.layers", _layer_selection_ok,
         "a list of layers, {start: a, stop: b}, {before_last_fraction: f} with 0 <= f < 1, or {before_layer: L}",
         ([-1], {"start": 3.0, "stop": 1.0}, {"before_last_fraction": 1.5})),
    count("search.candidates.batch_size"),
    count("search.candidates.null_directions", 0),
    count("search.candidates.min_active", 0),
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
    count("search.redundancy.weak_steps"),
    finite("search.redundancy.holding_tolerance", at_least=0),
    finite("search.redundancy.reinject_scale", above=1),  # 1 leaves H as it is; < 1 ablates it
    count("search.redundancy.max_new_tokens"),
    count("search.redundancy.batch_size"),
    count("search.evaluate.n_random"),
    count("search.evaluate.max_new_tokens"),
    count("search.evaluate.batch_size"),
    count("search.evaluate.max_prompts"),
    count("search.evaluate.fm_top"),
)  # fmt: skip

_RULE_OF = {rule.field: rule for rule in RULES}

# Stage dependencies: a stage reads the results of these (loaded when finished, else computed).
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "direction": (),
    "candidates": ("direction",),
    "greedy": ("candidates",),
    "fm": ("candidates", "greedy"),
    "redundancy": ("greedy",),
    "evaluate": ("direction",),  # and candidates, greedy, fm when they are listed
}
# Results a stage also reads when those stages ran (a stage is reused only while every result it
# read is the one it was computed from).
STAGE_OPTIONAL: dict[str, tuple[str, ...]] = {"evaluate": ("candidates", "greedy", "fm")}


def stage_reads(name: str) -> tuple[str, ...]:
    """Every stage whose result `name` reads, required ones first."""
    return STAGE_NEEDS[name] + STAGE_OPTIONAL.get(name, ())


# Fields that change no result: a run folder may be resumed with other values of these (the
# batch sizes, the device, the backend; `stages` only picks which stages run). Every other
# field is part of the run's config hash (patterns as in fnmatch).
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
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
    validate_section(cfg, "")
    if cfg.run_dir is not None and not cfg.run_dir.strip():
        raise UserError("run_dir is empty; give a folder (run_dir=runs/mine) or leave it out for a fresh one")
    _check_stages(cfg.stages)
    _check_applicable(cfg, explicit)
    if cfg.search.candidates.min_active > cfg.data.n_train:  # no latent could be active on more
        raise UserError(
            f"search.candidates.min_active={cfg.search.candidates.min_active} exceeds data.n_train="
            f"{cfg.data.n_train}, the harmful train prompts it counts; lower it"
        )
    if cfg.backend.name != "ndif":  # on NDIF the server's device is used
        _check_device(cfg.model.device)
    if cfg.model.chat_template is not None:
        _check_chat_template(cfg.model.chat_template)
    if cfg.backend.host is not None:
        _check_host(cfg.backend.host)
    return cfg


def validate_section(section: Any, path: str) -> Any:
    """Check one section of the config against the Rules under `path` (e.g. a CandidatesConfig
    against the search.candidates.* Rules; "" = the whole RunConfig). The library API calls this
    on the config each function is given, so a library call refuses what the CLI refuses, with the
    same UserError line, before anything runs. Returns `section`."""
    prefix = f"{path}." if path else ""
    for rule in RULES:
        if rule.field.startswith(prefix):
            check_value(rule.field, get_field(section, rule.field[len(prefix) :]))
    if path in ("", "search.redundancy"):
        r = section.search.redundancy if path == "" else section
        if r.awake_min < r.dormant_max:
            raise UserError(
                f"search.redundancy.awake_min={r.awake_min} is below dormant_max={r.dormant_max}: "
                "a latent counts as awake above awake_min and as dormant at or below dormant_max"
            )
    return section


def check_value(field: str, value: Any) -> Any:
    """Check one value against the Rule of `field` (a dotted path of RULES); None (null) passes."""
    if value is None or value is _MISSING:
        return value
    rule = _RULE_OF[field]
    if not rule.check(value):
        shown = value if not isinstance(value, str) else repr(value)
        raise UserError(f"{field}={shown} makes no sense: it must be {rule.what}")
    return value


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
        ("path", ("file", "hf", "package")), ("config", ("hf",)), ("split", ("hf",)),
        ("column", ("file", "hf", "package")), ("category_column", ("file", "hf", "package")),
        ("filter_column", ("file", "hf", "package")),
        ("filter_value", ("file", "hf", "package")), ("license", ("file", "hf", "package")),
        ("stratify", ("file", "hf", "package")),
    )
) + (
    ("model", "repo_id", ("hf",)), ("model", "organism_recipe", ("organism",)),
    ("model", "gguf_path", ("gguf",)), ("model", "gguf_file", ("gguf",)),
    ("model", "organism_seed", ("organism",)),
    ("sae", "release", ("pretrained",)), ("sae", "sae_id", ("pretrained",)), ("sae", "path", ("disk",)),
)  # fmt: skip
_SOURCE_HELP = {
    "file": "file (a local CSV / JSON / JSONL / Parquet file)", "hf": "hf (a hub repo or dataset id)",
    "package": "package (a data file in an installed package)",
    "organism": "organism", "gguf": "gguf (a GGUF file)", "pretrained": "pretrained (an sae-lens release)", "disk": "disk (an SAE folder)",
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
        if s.stratify and not s.category_column:
            raise UserError(
                f"{where}.stratify needs {where}.category_column (the column split in proportion)"
            )
        if (s.filter_column is None) != (s.filter_value is None):
            raise UserError(
                f"{where}.filter_column and {where}.filter_value go together; set both or neither"
            )
    if cfg.model.source == "hf" and not cfg.model.repo_id:
        raise UserError("model.source=hf needs model.repo_id (e.g. google/gemma-2-2b-it)")
    if cfg.model.source == "gguf" and not (cfg.model.gguf_path and cfg.model.gguf_file):
        raise UserError(
            "model.source=gguf needs model.gguf_path (an installed package or a folder) and model.gguf_file"
        )
    if cfg.model.source == "gguf" and cfg.backend.name != "local":
        # NDIF hosts hub models, and its client (ndif_check too) builds the model from a hub config
        raise UserError(f"backend={cfg.backend.name} needs a hub model; a GGUF model runs with backend=local")
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

    compile_template: Callable[[str], object]
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compile_template = _compile_jinja_template
    except ImportError:  # an older transformers: its sandboxed environment, approximately
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        compile_template = env.from_string
    try:
        compile_template(template)
    except TemplateError as err:
        lineno = getattr(err, "lineno", None)
        line = f" (line {lineno})" if lineno else ""
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
