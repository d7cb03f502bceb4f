"""`refusal-nnsight-sweep-summary DIR`: one table over the jobs of a sweep.

Every job folder under DIR (summary.json beside .hydra/overrides.yaml, as a multirun writes
them) becomes a row: the job's folder, its command-line overrides as columns
(`search.candidates.top_k`), and summary.json's figures flattened to dotted columns
(`greedy.median_one_minimal_set_size`; a figure whose name is also an override key is kept as
`summary.<name>`). The table goes to DIR/sweep_summary.parquet and DIR/sweep_summary.md, each
written atomically, and the markdown is printed. `refusal-nnsight -m` writes the same table when
its sweep ends (cli.SweepSummaryCallback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from .artifacts import SweepFolder, read_json, write_parquet, write_text
from .errors import UserError


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"greedy": {"n_prompts": 4}} → {"greedy.n_prompts": 4}; a list becomes one JSON-text cell."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def parse_overrides(lines: list[str]) -> dict[str, Any]:
    """Hydra's saved overrides (`++search.coefficient=-3`, `experiment=smoke`) → {key: value}.

    The `+`/`++`/`~` prefixes go (the CLI adds `++` to every dotted key); numbers and
    true/false/null are read as such, anything else (`[direction,candidates]`) stays as typed.
    """
    out: dict[str, Any] = {}
    for line in lines:
        key, _, text = str(line).partition("=")
        out[key.lstrip("+~")] = _scalar(text) if text else None
    return out


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def collect(root: str | Path) -> pl.DataFrame:
    return _collect(root)[0]


def _collect(root: str | Path) -> tuple[pl.DataFrame, list[str]]:
    """The table of every finished job under `root`: one row per job, in job-number order."""
    folder = SweepFolder(root)
    if not folder.root.is_dir():
        raise UserError(f"{root} is not a folder; give a sweep folder, e.g. runs/multirun/<timestamp>")
    jobs = folder.jobs()
    if not jobs:
        raise UserError(
            f"no job folders under {root} (a job folder holds summary.json and .hydra/overrides.yaml)"
        )
    overrides = [parse_overrides(yaml.safe_load(job.overrides.read_text()) or []) for job in jobs]
    taken = {"job"} | {key for row in overrides for key in row}
    rows = []
    for job, asked in zip(jobs, overrides, strict=True):
        figures = flatten(read_json(job.summary))
        row = {"job": job.root.relative_to(folder.root).as_posix(), **asked}
        row.update({(f"summary.{k}" if k in taken else k): v for k, v in figures.items()})
        rows.append(row)
    names = list(dict.fromkeys(name for row in rows for name in row))  # first-seen order
    frame = pl.DataFrame([_column(name, [row.get(name) for row in rows]) for name in names])
    asked_keys = list(dict.fromkeys(key for row in overrides for key in row))
    return frame, asked_keys


# What a sweep is judged by: minimal set size, judged jailbreak rate of the minimal sets, FM accuracy.
OUTCOMES = {
    "greedy.median_one_minimal_set_size": "median minimal set size",
    "evaluate.minimal_jailbreak_rate": "minimal-set jailbreak rate (judged)",
    "fm.heldout_accuracy": "FM held-out accuracy",
}


def varying(frame: pl.DataFrame, keys: list[str]) -> dict[str, list]:
    """The overrides that take more than one value across the jobs, with their values."""
    out = {}
    for key in keys:
        if key in frame.columns:
            values = list(dict.fromkeys(frame[key].to_list()))
            if len(values) > 1:
                out[key] = values
    return out


def _stage_figures(frame: pl.DataFrame, key: str) -> list[str]:
    """For an override of one stage's settings (`search.<stage>.<field>`), that stage's numeric
    summary figures that differ across the jobs (what the setting moved)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "search":
        return []
    prefix = f"{parts[1]}."
    return [
        c
        for c in frame.columns
        if c.startswith(prefix)
        and c.rsplit(".", 1)[-1] != parts[-1]  # the setting itself, echoed in the summary
        and frame[c].dtype.is_numeric()
        and frame[c].drop_nulls().n_unique() > 1
    ]


def plot_outcomes(frame: pl.DataFrame, key: str, path: Path) -> bool:
    """One panel per outcome against a numeric override (a point per job); False when not numeric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .artifacts import atomic_write

    if not frame[key].dtype.is_numeric():
        return False
    outcomes = [
        (c, name) for c, name in OUTCOMES.items() if c in frame.columns and frame[c].dtype.is_numeric()
    ]
    outcomes += [(c, c.split(".", 1)[1]) for c in _stage_figures(frame, key) if c not in OUTCOMES][:3]
    if not outcomes:
        return False
    fig = Figure(figsize=(3.6 * len(outcomes), 3.2))
    part = frame.sort(key)
    for k, (col, name) in enumerate(outcomes):
        ax = fig.add_subplot(1, len(outcomes), k + 1)
        ax.plot(part[key].to_list(), part[col].to_list(), marker="o", lw=1)
        ax.set(xlabel=key)
        ax.set_title(name, fontsize=8)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100, metadata={"Software": None}))
    return True


def _column(name: str, values: list) -> pl.Series:
    """One typed column: bool, int, float (ints and floats mixed), or text for anything else."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pl.Series(name, values, dtype=pl.Boolean)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pl.Series(name, values, dtype=pl.Int64)
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pl.Series(name, [None if v is None else float(v) for v in values], dtype=pl.Float64)
    text = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    return pl.Series(name, text, dtype=pl.String)


def to_markdown(frame: pl.DataFrame) -> str:
    """A GitHub markdown table; floats to 4 significant digits, missing values blank."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def summarize(root: str | Path) -> tuple[pl.DataFrame, str]:
    """Collect the table, write DIR/sweep_summary.parquet and .md; return it and its markdown.
    Bad input raises UserError before anything is written."""
    frame, keys = _collect(root)
    folder = SweepFolder(root)
    varied = varying(frame, keys)
    lines = ["# Sweep summary", ""]
    if varied:
        lines += ["Overrides that vary across the jobs:", ""]
        lines += [f"- `{k}`: {', '.join(_cell(v) or 'null' for v in values)}" for k, values in varied.items()]
    else:
        lines += ["No override varies across the jobs: they are repeats of one config."]
    lines += [
        "",
        f"{frame.height} jobs; one row per job, its overrides first, then summary.json's figures.",
        "",
    ]
    lines += [to_markdown(frame), ""]
    for key in varied:
        path = folder.figure(key)
        if plot_outcomes(frame, key, path):
            lines += [f"![{key}]({path.name})", "",
                      f"The main outcomes, and the figures of that stage that moved, against `{key}` (one point per job; "
                      "other overrides may vary too).", ""]  # fmt: skip
    text = "\n".join(lines).rstrip("\n")
    write_parquet(folder.table, frame)
    write_text(folder.markdown, text + "\n")
    return frame, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="refusal-nnsight-sweep-summary",
        description="Tabulate every job's summary.json and overrides under a sweep folder.",
    )
    parser.add_argument("dir", type=Path, help="the sweep folder, e.g. runs/multirun/<timestamp>")
    args = parser.parse_args(argv)
    try:
        _, text = summarize(args.dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(text)


if __name__ == "__main__":
    main()
