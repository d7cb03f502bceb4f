"""Prompt sets: harmful / harmless × train / val / eval, with labels where they are known.

The default source is the organism's grammar (labels include the planted harm cues). Local
files (CSV / JSON / JSONL / Parquet) are read with polars, the instruction in a configurable column.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

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


def _from_organism(harmful: bool, split: str, seed: int) -> PromptSet:
    from .organism.grammar import load_split

    rows = [p for p in load_split(split, seed=seed) if p.harmful == harmful]
    random.Random(f"{seed}-{split}-{harmful}").shuffle(rows)
    return PromptSet(
        [p.text for p in rows], harmful, [p.category for p in rows],
        [{"kind": p.kind, "cues": list(p.cues), "cue_spans": [list(s) for s in p.cue_spans], "wrapper": p.wrapper} for p in rows],
    )  # fmt: skip


def read_prompt_file(src: PromptSource, harmful: bool) -> PromptSet:
    """Instructions from a local CSV / JSON / JSONL / Parquet file (one line error on any problem)."""
    import polars as pl

    if not src.path:
        raise UserError("data source 'file' needs a path (data.harmful.path=...)")
    path = Path(src.path).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    readers = {".csv": pl.read_csv, ".json": pl.read_json, ".jsonl": pl.read_ndjson, ".parquet": pl.read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"prompt file {path} has suffix '{path.suffix}'; use .csv, .json, .jsonl or .parquet")
    try:
        frame = reader(path)
    except Exception as err:  # polars raises many error types for malformed files
        raise UserError(f"prompt file {path} is not valid {path.suffix[1:].upper()}: {str(err).splitlines()[0]}") from None
    if src.column not in frame.columns:
        raise UserError(f"prompt file {path} has no column '{src.column}' (columns: {frame.columns}); set data.<set>.column")
    texts = [t for t in frame[src.column].cast(pl.Utf8).to_list() if t and t.strip()]
    if not texts:
        raise UserError(f"prompt file {path} has no prompts in column '{src.column}'")
    cats = frame[src.category_column].cast(pl.Utf8).to_list() if src.category_column in frame.columns else ["none"] * len(texts)
    return PromptSet(texts, harmful, cats[: len(texts)], [])


def load_prompts(cfg: DataConfig) -> Prompts:
    """Seeded, disjoint train / val / eval sets of each class (sizes from cfg)."""
    for key in ("n_train", "n_val", "n_eval"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"data.{key}={getattr(cfg, key)} must be positive")
    sets = {}
    for harmful, src in ((True, cfg.harmful), (False, cfg.harmless)):
        label = "harmful" if harmful else "harmless"
        if src.source == "organism":
            parts = {s: _from_organism(harmful, s, cfg.seed) for s in ("train", "val", "test")}
            need = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_eval}
            for s, n in need.items():
                if len(parts[s]) < n:
                    raise UserError(f"data.n_{'eval' if s == 'test' else s}={n} exceeds the {len(parts[s])} {label} organism prompts of split '{s}'")
            sets[label] = (parts["train"].take(cfg.n_train), parts["val"].take(cfg.n_val), parts["test"].take(cfg.n_eval))
        elif src.source == "file":
            full = read_prompt_file(src, harmful)
            idx = list(range(len(full)))
            random.Random(f"{cfg.seed}-{label}").shuffle(idx)
            total = cfg.n_train + cfg.n_val + cfg.n_eval
            if len(idx) < total:
                raise UserError(f"{label} prompt file has {len(idx)} prompts but n_train+n_val+n_eval={total}; lower them")
            a, b = cfg.n_train, cfg.n_train + cfg.n_val
            sets[label] = (full.subset(idx[:a]), full.subset(idx[a:b]), full.subset(idx[b:total]))
        else:
            raise UserError(f"data source '{src.source}' is not available in this build; use organism or file")
    (th, vh, eh), (tl, vl, el) = sets["harmful"], sets["harmless"]
    return Prompts(th, tl, vh, vl, eh, el)
