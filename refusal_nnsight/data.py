"""Prompt sets: harmful / harmless × train / val / eval, with labels where they are known.

The default source is the organism's grammar (labels include the planted harm cues). Local
files (CSV / JSON / JSONL / Parquet) are read with polars, the instruction in a configurable column.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig, PromptSource
from .errors import UserError


@dataclass
class PromptSet:
    instructions: list[str]
    harmful: bool
    categories: list[str]
    meta: list[dict] = field(default_factory=list)  # organism: kind, cues, cue_spans

    def __len__(self) -> int:
        return len(self.instructions)

    def take(self, n: int) -> PromptSet:
        return PromptSet(self.instructions[:n], self.harmful, self.categories[:n], self.meta[:n])

    def subset(self, idx: list[int]) -> PromptSet:
        return PromptSet([self.instructions[i] for i in idx], self.harmful, [self.categories[i] for i in idx],
                         [self.meta[i] for i in idx] if self.meta else [])  # fmt: skip


@dataclass
class Prompts:
    train_harmful: PromptSet
    train_harmless: PromptSet
    val_harmful: PromptSet
    val_harmless: PromptSet
    eval_harmful: PromptSet
    eval_harmless: PromptSet


def _from_organism(harmful: bool, split: str, splits: Callable[[str], Sequence[Any]], seed: int) -> PromptSet:
    """One split of the organism grammar, as split by the organism's own seed (so "held-out" means
    held out from that organism's training), shuffled by the data seed with its kinds interleaved
    (cue, compositional, ...): every prefix a stage takes (the first prompts greedy or fm
    dissects) then holds each kind of harm, not whichever the shuffle happened to put first.
    `splits(split)` gives the grammar's prompts of a split (text, harmful, category, kind, cues,
    cue_spans, cue_roles, wrapper)."""
    rows = [p for p in splits(split) if p.harmful == harmful]
    random.Random(f"{seed}-{split}-{harmful}").shuffle(rows)
    by_kind: dict[str, list] = {}
    for p in rows:
        by_kind.setdefault(p.kind, []).append(p)
    queues = [by_kind[k] for k in sorted(by_kind)]
    rows = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return PromptSet(
        [p.text for p in rows], harmful, [p.category for p in rows],
        [{"kind": p.kind, "cues": list(p.cues), "cue_spans": [list(s) for s in p.cue_spans],
          "cue_roles": list(p.cue_roles), "wrapper": p.wrapper} for p in rows],
    )  # fmt: skip


_READERS = {".csv": "read_csv", ".json": "read_json", ".jsonl": "read_ndjson", ".parquet": "read_parquet"}


def package_dir(name: str) -> Path | None:
    """The folder of the installed package `name` (None if there is none). The package is located,
    never imported: importing would run its code, and some data packages load pickles on import."""
    import importlib.util

    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _package_file(spec: str) -> Path:
    """The file "<package>/<path>" names inside the installed package (see package_dir)."""
    package, _, rel = spec.partition("/")
    folder = package_dir(package)
    if folder is None or not rel:
        raise UserError(
            f"data path '{spec}' is not '<installed package>/<file in it>' (package '{package}' not found); "
            "install the package, e.g. `make install-smollm2` for HarmBench"
        )
    return folder / rel


def _read_frame(src: PromptSource):
    """The source's rows as a polars DataFrame; every problem is one UserError line."""
    import polars as pl

    if not src.path:
        raise UserError(
            f"data source '{src.source}' of prompt set '{src.name}' needs a path (data.harmful.path=...)"
        )
    if src.source == "hf":
        try:
            import datasets

            ds = datasets.load_dataset(src.path, src.config, split=src.split or "train")
        except Exception as err:  # offline, unknown id, gated: datasets raises many types
            raise UserError(
                f"dataset '{src.path}' could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                f"where the hub is unreachable, point data.<set>.source=file and data.<set>.path at a local CSV/JSON/JSONL/Parquet copy"
            ) from None
        return ds.to_polars()
    path = _package_file(src.path) if src.source == "package" else Path(src.path).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; check data.<set>.path")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"prompt file {path} has suffix '{path.suffix}'; use .csv, .json, .jsonl or .parquet")
    if path.stat().st_size == 0:
        raise UserError(f"prompt file {path} is empty")
    try:
        return getattr(pl, reader)(path)
    except Exception as err:  # polars raises many error types for malformed files
        raise UserError(
            f"prompt file {path} is not valid {path.suffix[1:].upper()}: {str(err).splitlines()[0][:160]}"
        ) from None


def read_prompt_source(src: PromptSource, harmful: bool) -> PromptSet:
    """Instructions of a file or HF source, filtered, in file order."""
    import polars as pl

    frame = _read_frame(src)
    where = f"prompt source '{src.name}' ({src.path})"
    for col, key in (
        (src.column, "column"),
        (src.filter_column, "filter_column"),
        (src.category_column, "category_column"),
    ):
        if col is not None and col not in frame.columns:
            raise UserError(f"{where} has no column '{col}' (columns: {frame.columns}); set data.<set>.{key}")
    if isinstance(frame.schema[src.column], pl.List):  # a multi-turn set (MT-Bench): its first turn
        frame = frame.with_columns(pl.col(src.column).list.first())
    if src.filter_column is not None:
        frame = frame.filter(
            pl.col(src.filter_column).cast(pl.Utf8).fill_null("") == (src.filter_value or "")
        )
    frame = frame.filter(
        pl.col(src.column).is_not_null() & (pl.col(src.column).cast(pl.Utf8).str.strip_chars() != "")
    )
    if frame.height == 0:
        raise UserError(f"{where} has no prompts in column '{src.column}'")
    texts = frame[src.column].cast(pl.Utf8).to_list()
    cats = (
        frame[src.category_column].cast(pl.Utf8).fill_null("none").to_list()
        if src.category_column
        else ["none"] * len(texts)
    )
    return PromptSet(texts, harmful, cats, [])


def _order(categories: Sequence[str] | None, n: int, seed: str) -> list[int]:
    """A seeded order of n prompts whose consecutive slices are the train / val / eval sets.

    Stratified (categories given): each category is shuffled on its own, and its k-th of m
    prompts is placed at (k + ½)/m of the way, so every slice holds each category in proportion.
    """
    rng = random.Random(seed)
    if categories is None:
        idx = list(range(n))
        rng.shuffle(idx)
        return idx
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        groups.setdefault(c, []).append(i)
    keyed = []
    for rank, members in enumerate(groups.values()):
        rng.shuffle(members)
        keyed += [((k + 0.5) / len(members), rank, i) for k, i in enumerate(members)]
    return [i for *_, i in sorted(keyed)]


def load_prompts(cfg: DataConfig, organism_splits: Callable[[str], Sequence[Any]] | None = None) -> Prompts:
    """Seeded, disjoint train / val / eval sets of each class (sizes from cfg). A source "organism"
    reads `organism_splits` (refusal_nnsight.organism.resolve.prompt_splits: the grammar's splits,
    as the organism dissected was split)."""
    for key in ("n_train", "n_val", "n_eval"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"data.{key}={getattr(cfg, key)} must be positive")
    sets = {}
    for harmful, src in ((True, cfg.harmful), (False, cfg.harmless)):
        label = "harmful" if harmful else "harmless"
        if src.source == "organism":
            if organism_splits is None:
                raise UserError(
                    "data source organism: load the prompts through refusal_nnsight.load_prompts, or give "
                    "the grammar's splits (refusal_nnsight.organism.resolve.prompt_splits)"
                )
            # the grammar's own splits are disjoint by template instance
            parts = {
                s: _from_organism(harmful, s, organism_splits, cfg.seed) for s in ("train", "val", "test")
            }
            need = {
                "train": ("n_train", cfg.n_train),
                "val": ("n_val", cfg.n_val),
                "test": ("n_eval", cfg.n_eval),
            }
            for split, (key, n) in need.items():
                if len(parts[split]) < n:
                    raise UserError(
                        f"data.{key}={n} exceeds the {len(parts[split])} {label} organism prompts of split '{split}'"
                    )
            sets[label] = (
                parts["train"].take(cfg.n_train),
                parts["val"].take(cfg.n_val),
                parts["test"].take(cfg.n_eval),
            )
            continue
        full = read_prompt_source(src, harmful)
        idx = _order(full.categories if src.stratify else None, len(full), f"{cfg.seed}-{label}")
        total = cfg.n_train + cfg.n_val + cfg.n_eval
        if len(idx) < total:
            raise UserError(
                f"{label} prompt source '{src.name}' has {len(idx)} prompts but data.n_train+n_val+n_eval={total}; lower them"
            )
        a, b = cfg.n_train, cfg.n_train + cfg.n_val
        sets[label] = (full.subset(idx[:a]), full.subset(idx[a:b]), full.subset(idx[b:total]))
    (th, vh, eh), (tl, vl, el) = sets["harmful"], sets["harmless"]
    return Prompts(th, tl, vh, vl, eh, el)


_SETS = ("train_harmful", "val_harmful", "eval_harmful", "train_harmless", "val_harmless", "eval_harmless")


def check_readable(prompts: Prompts, model, cfg: DataConfig) -> None:
    """Refuse, in one line, prompt sets the model cannot read, before any stage runs.

    * a prompt longer than data.max_tokens, or than the model's context less the generation
      budget, once formatted with the chat template (refused, not truncated: a cut prompt may
      lose the very request the label is about);
    * a share of <unk> tokens above data.max_unknown_fraction (real English on the organism,
      whose tokenizer knows only its grammar's words);
    * a chat control token inside a prompt (`<end_of_turn><start_of_turn>` would open turns of
      its own: the model would read a conversation the data never meant).
    """
    tok = model.tokenizer
    context = getattr(model.lm.config, "max_position_embeddings", None)
    limits = [(cfg.max_tokens, f"data.max_tokens={cfg.max_tokens}")] if cfg.max_tokens else []
    if context:
        budget = context - model.cfg.max_new_tokens
        limits.append(
            (budget, f"the model's context ({context} tokens, less {model.cfg.max_new_tokens} generated)")
        )
    limit, why = min(limits, default=(None, ""), key=lambda x: x[0])
    control = {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    control |= set(tok.all_special_ids)
    control.discard(tok.unk_token_id)
    for label, src in (("harmful", cfg.harmful), ("harmless", cfg.harmless)):
        source = "the organism grammar" if src.source == "organism" else f"'{src.path}'"
        unknown = total = 0
        long: list[tuple[str, int, int]] = []
        for name in (s for s in _SETS if s.endswith(label)):
            texts = getattr(prompts, name).instructions
            if not texts:
                continue
            split = name.split("_")[0]
            for i, ids in enumerate(tok(list(texts), add_special_tokens=False)["input_ids"]):
                total += len(ids)
                unknown += sum(1 for t in ids if t == tok.unk_token_id) if tok.unk_token_id is not None else 0
                hit = next((t for t in ids if t in control), None)
                if hit is not None:
                    raise UserError(
                        f"{label} prompt {split} #{i} of {source} holds the chat control token "
                        f"{tok.convert_ids_to_tokens(hit)!r}, which would open a turn of its own; "
                        "remove control tokens from the data"
                    )
            if limit is not None:
                formatted = tok(model.format(texts), add_special_tokens=False)["input_ids"]
                long += [(split, i, len(ids)) for i, ids in enumerate(formatted) if len(ids) > limit]
        if long:
            split, i, n = max(long, key=lambda x: x[2])
            fix = "raise data.max_tokens" if why.startswith("data.") else "use a model with a longer context"
            raise UserError(
                f"{len(long)} {label} prompt(s) of {source} are longer than {why}, e.g. {split} #{i} "
                f"with {n} tokens; shorten or drop them, or {fix} (prompts are refused, never truncated)"
            )
        if total and unknown / total > cfg.max_unknown_fraction:
            raise UserError(
                f"{unknown / total:.0%} of the {label} prompts' tokens are unknown (<unk>) to model "
                f"'{model.cfg.name}' (data.max_unknown_fraction={cfg.max_unknown_fraction}): it cannot read "
                f"{source}; the organism reads only its grammar (data=organism), other data needs a real model"
            )
