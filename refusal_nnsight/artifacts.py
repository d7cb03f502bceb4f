"""Run-folder layout and atomic writes: the only module that builds artifact paths.

runs/<model>/<timestamp>/
  .hydra/                 composed config (written by Hydra)
  config.json             the typed RunConfig actually used
  summary.json            headline numbers (other tools read it); timings live in timing.json
  report.md               the file a person reads first
  figures/*.png
  <stage>/                direction, candidates, greedy, fm, redundancy, evaluate
    done.json             written last: the stage finished (resume skips it)
    *.parquet *.safetensors *.json

A multirun (Hydra's sweep dir) holds one such run folder per job, <sweep>/<job number>/, and
the table over them: sweep_summary.parquet and sweep_summary.md.

Every file is written to a temporary sibling and renamed, so a killed run never leaves a
half-written artifact; only Parquet, safetensors and JSON are written (never pickle).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STAGES = ("direction", "candidates", "greedy", "fm", "redundancy", "evaluate")


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through `write(tmp)` to a temporary sibling, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def write_json(path: Path, data: Any) -> Path:
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: Path, frame) -> Path:
    """A polars DataFrame → Parquet (deterministic: no statistics timestamps, fixed compression)."""
    return atomic_write(path, lambda p: frame.write_parquet(p, compression="zstd", statistics=False))


def read_parquet(path: Path):
    import polars as pl

    return pl.read_parquet(path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """safetensors file + a JSON sidecar (<name>.json) with the metadata."""
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(clean, str(p)))
    if metadata is not None:
        write_json(path.with_suffix(".json"), metadata)
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


class StageDir:
    """One stage's folder: its artifacts and the `done.json` marker written last."""

    def __init__(self, root: Path, name: str):
        assert name in STAGES, name
        self.name = name
        self.path = Path(root) / name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return (self.path / "done.json").exists()

    def mark_done(self, info: dict | None = None) -> None:
        write_json(self.path / "done.json", info or {})

    def part(self, name: str) -> Path:
        """Per-item progress files (greedy per prompt, fm per mask batch) for resume."""
        return self.path / "parts" / name


class RunFolder:
    """The run directory and every named file in it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def clean_temporaries(self) -> int:
        """Remove temporary files that a killed run left mid-write (finished files are untouched)."""
        stale = [p for p in self.root.rglob(".*.tmp") if p.is_file()] if self.root.exists() else []
        for p in stale:
            p.unlink()
        return len(stale)

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root, name)

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def overrides(self) -> Path:
        """The command-line overrides of the run, as Hydra saved them."""
        return self.root / ".hydra" / "overrides.yaml"

    def figure(self, name: str) -> Path:
        return self.root / "figures" / f"{name}.png"


class SweepFolder:
    """A multirun's folder: a run folder per job (any depth below it), and the table over them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def jobs(self) -> list[RunFolder]:
        """Finished job folders (summary.json beside .hydra/overrides.yaml), in job-number order."""
        roots = [p.parent for p in self.root.rglob("summary.json") if RunFolder(p.parent).overrides.is_file()]
        return [RunFolder(r) for r in sorted(roots, key=lambda r: _natural(r.relative_to(self.root)))]

    @property
    def table(self) -> Path:
        return self.root / "sweep_summary.parquet"

    @property
    def markdown(self) -> Path:
        return self.root / "sweep_summary.md"


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key that puts job 10 after job 9."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.parts]
