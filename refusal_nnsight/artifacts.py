"""Run-folder layout and atomic writes: the only module that builds artifact paths.

runs/<model>/<timestamp>/
  .hydra/                 composed config (written by Hydra)
  config.json             the typed RunConfig actually used
  summary.json            headline numbers (other tools read it); timings live in timing.json
  report.md               the file a person reads first
  figures/*.png
  run.json                the config hash the results were computed under, and its fields
  .lock                   held while a run writes here: a second run on the folder is refused
  <stage>/                direction, candidates, greedy, fm, redundancy, evaluate
    done.json             written last: config hash, input digests, size + sha256 of each artifact
    *.parquet *.safetensors *.json
    parts/<key>/          greedy (per prompt) and fm (per mask batch) progress, keyed on the
                          stage's config hash and inputs

A multirun (Hydra's sweep dir) holds one such run folder per job, <sweep>/<job number>/, and
the table over them: sweep_summary.parquet and sweep_summary.md.

Every file is written to a temporary sibling and renamed, so a killed run never leaves a
half-written artifact; only Parquet, safetensors and JSON are written (never pickle). A finished
stage is reused only while every artifact still has the size and hash its done.json records.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, Self, cast

import polars as pl
import torch

from .errors import RunDirBusy
from .validation import STAGE_NEEDS

STAGES = tuple(STAGE_NEEDS)

log = logging.getLogger(__name__)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
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


def mean_of(column: pl.Series) -> float:
    """The mean of a numeric or boolean column as a float; the column must not be empty."""
    value = column.cast(pl.Float64).mean()
    if value is None:
        raise ValueError(f"the mean of the empty column {column.name!r} is undefined")
    return float(cast(float, value))


def saved_before(notes: dict[str, str], frame: pl.DataFrame | None, column: str, keys: tuple[str, ...],
                 stage: str, what: str) -> dict[str, str]:  # fmt: skip
    """`notes` with the reason each of `keys` is null when `frame` (a stage table read back from a
    folder) holds rows but not `column`, which a later version added: the folder predates it."""
    if frame is not None and frame.height and column not in frame.columns:
        why = f"this {stage} folder was saved before {what}; rerun {stage} to measure it"
        for key in keys:
            notes.setdefault(key, why)
    return notes


def read_parquet(path: Path):
    import polars as pl

    return pl.read_parquet(path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """safetensors file + a JSON sidecar (<stem>.meta.json) with the metadata."""
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(clean, str(p)))
    if metadata is not None:
        write_json(tensor_meta(path), metadata)
    return path


def tensor_meta(path: Path) -> Path:
    """The metadata sidecar of a safetensors file: directions.safetensors → directions.meta.json."""
    return path.with_suffix(".meta.json")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def _readable(path: Path) -> bool:
    """Whether a part file parses (a truncated or garbled one does not)."""
    try:
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".safetensors":
            read_tensors(path)
        elif path.suffix == ".parquet":
            read_parquet(path)
    except Exception:  # each reader has its own error types for a damaged file
        return False
    return True


class StageResult(Protocol):
    """What every stage returns: its summary.json section, and its artifacts saved and loaded."""

    def summary(self) -> dict: ...

    def save(self, out: StageDir) -> None: ...

    @classmethod
    def load(cls, out: StageDir) -> Self: ...


# The layout of stage artifacts. A finished stage or a part file of another format is recomputed,
# never read. 2: tables name a latent's index `feature` and its text form `label` ("L3/F708");
# tensor sidecars are <stem>.meta.json.
FORMAT = 2


class StageDir:
    """One stage's folder: its artifacts and the `done.json` marker written last.

    done.json records the config hash and the digests of the upstream stages the results were
    computed from, and the size and sha256 of every artifact; `damage()` says why a finished
    stage may not be reused (None when it may). Part files live under parts/<key>/, where the
    key hashes the config hash and the inputs, so progress made under other inputs is never read.
    """

    def __init__(self, root: Path, name: str, config_hash: str = "", inputs: dict[str, str] | None = None):
        assert name in STAGES, name
        self.name = name
        self.path = Path(root) / name
        self.config_hash = config_hash
        self.inputs = dict(sorted((inputs or {}).items()))
        text = json.dumps([FORMAT, config_hash, self.inputs])
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16] if config_hash else ""

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    @property
    def finished(self) -> bool:
        """done.json is there and the artifacts, config and inputs are those it records."""
        return self.done.exists() and self.damage() is None

    def artifacts(self) -> list[Path]:
        """The stage's files: all but done.json, part files and temporaries."""
        if not self.path.is_dir():
            return []
        parts = self.path / "parts"
        return sorted(
            p for p in self.path.rglob("*")
            if p.is_file() and p != self.done and parts not in p.parents and not p.name.endswith(".tmp")
        )  # fmt: skip

    def mark_done(self, info: dict | None = None) -> None:
        record = {
            **(info or {}),
            "format": FORMAT,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "artifacts": {p.relative_to(self.path).as_posix(): file_digest(p) for p in self.artifacts()},
        }
        write_json(self.done, record)

    def damage(self) -> str | None:
        """Why the finished stage cannot be reused, in a few words; None if it can."""
        try:
            record = read_json(self.done)
        except (OSError, ValueError):
            return "done.json is missing or unreadable"
        if "artifacts" not in record:
            return "done.json records no artifact hashes (written by an older version)"
        if record.get("format", 1) != FORMAT:
            return f"it was written in artifact format {record.get('format', 1)} by an older version (now {FORMAT})"
        if record.get("config_hash", "") != self.config_hash:
            return "it was computed under another config"
        if record.get("inputs", {}) != self.inputs:
            changed = sorted(set(record.get("inputs", {})) ^ set(self.inputs)) or sorted(
                k for k in self.inputs if record["inputs"].get(k) != self.inputs[k]
            )
            return f"its inputs changed ({', '.join(changed)})"
        for name, want in record["artifacts"].items():
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != want["bytes"]:
                return f"{name} changed size ({want['bytes']} -> {path.stat().st_size} bytes)"
            if file_digest(path)["sha256"] != want["sha256"]:
                return f"{name} changed (sha256 differs)"
        return None

    def digest(self) -> str:
        """A hash of the finished stage's artifacts: what the stages reading it record as input."""
        record = read_json(self.done)
        return hashlib.sha256(json.dumps(record["artifacts"], sort_keys=True).encode()).hexdigest()[:16]

    def prepare(self) -> None:
        """Before (re)computing: drop done.json, part files of other keys, unreadable parts."""
        self.done.unlink(missing_ok=True)
        parts = self.path / "parts"
        if self.key and parts.is_dir():
            for entry in parts.iterdir():
                if entry.name != self.key:  # progress made under another config or other inputs
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        here = parts / self.key if self.key else parts
        for p in sorted(here.glob("*")) if here.is_dir() else []:
            if p.is_file() and not p.name.endswith(".tmp") and not _readable(p):
                log.warning("[%s] part file %s is damaged; recomputing it", self.name, p.name)
                p.unlink()

    def part(self, name: str) -> Path:
        """Per-item progress files (greedy per prompt, fm per mask batch) for resume."""
        return self.path / "parts" / self.key / name if self.key else self.path / "parts" / name


_HELD: dict[Path, int] = {}  # run folders this process holds, with their nesting depth


class RunFolder:
    """The run directory and every named file in it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config_hash = ""  # set by the pipeline once the run has claimed the folder
        self.digests: dict[str, str] = {}  # stage → digest of its artifacts, as stages finish

    @property
    def identity(self) -> Path:
        """run.json: the config hash (and fields) the folder's results were computed under."""
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one run: a second run on it is refused (RunDirBusy), never
        interleaved. flock is released by the kernel when the holder dies, even by SIGKILL.
        Re-entrant within a process (the CLI holds it around pipeline.run and its cleanup)."""
        self.root.mkdir(parents=True, exist_ok=True)
        held = self.root.resolve()
        if held in _HELD:
            _HELD[held] += 1
            try:
                yield
            finally:
                _HELD[held] -= 1
            return
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirBusy(
                f"run_dir {self.root} is in use by another run (pid {holder}); wait for it to finish, "
                "or give this run another run_dir"
            ) from None
        _HELD[held] = 1
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            del _HELD[held]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def check_free(self) -> None:
        """Raise RunDirBusy if another run holds the folder (takes and releases the lock)."""
        if self.lock_file.exists():
            with self.lock():
                pass

    def has_results(self) -> bool:
        """Whether any stage finished or left progress here."""
        return any(
            (self.root / s / "done.json").exists() or (self.root / s / "parts").is_dir() for s in STAGES
        )

    def clear_results(self) -> None:
        """Remove every result (force_restart); .hydra/, logs and the lock stay."""
        for name in (*STAGES, "figures"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for path in (
            self.identity,
            self.config,
            self.summary,
            self.timing,
            self.report,
            self.features,
            self.provenance,
        ):
            path.unlink(missing_ok=True)

    def clean_temporaries(self) -> int:
        """Remove temporary files that a killed run left mid-write (finished files are untouched)."""
        stale = [p for p in self.root.rglob(".*.tmp") if p.is_file()] if self.root.exists() else []
        for p in stale:
            p.unlink()
        return len(stale)

    def stage(self, name: str, config_hash: str = "", inputs: dict[str, str] | None = None) -> StageDir:
        return StageDir(self.root, name, config_hash, inputs)

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
    def features(self) -> Path:
        """features.parquet: a card for every feature the run found (features.CARD_SCHEMA)."""
        return self.root / "features.parquet"

    @property
    def provenance(self) -> Path:
        """provenance.json: toolkit version and commit, command line, package versions."""
        return self.root / "provenance.json"

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

    def figure(self, override: str) -> Path:
        """The outcomes-vs-override figure of one varying override."""
        return self.root / f"sweep_{override.replace('/', '_')}.png"


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key that puts job 10 after job 9."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.parts]
