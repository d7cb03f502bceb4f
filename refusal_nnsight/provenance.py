"""provenance.json: what produced a run — the toolkit's version and git commit, the command line,
the model's exact weights and the SAEs, and the versions of the packages that computed it.

The report's head is written from it. Nothing here is a result: summary.json stays free of it so
that two runs of one config compare byte for byte.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "nnsight", "sae-lens", "polars")
_SOURCE = Path(__file__).resolve().parent.parent  # the checkout root, for an editable install


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path = _SOURCE) -> str | None:
    """HEAD of the git checkout the toolkit runs from ("<sha>-dirty" with uncommitted changes to
    tracked files); None for an installed wheel, or where git is missing."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise OSError(out.stderr.strip())
        return out.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # installed inside some other repository: its commit is not ours
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def _sha256(path: Path) -> str:
    """sha256 (16 hex) of a file, read in chunks (a GGUF file is ~100 MB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: the program's name (not its full path) and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def collect(cfg, model, organism: dict | None = None, skip_first_token: bool = False) -> dict:
    """The provenance of a run of `cfg` on the loaded `model` (see the module docstring);
    `skip_first_token` is the loaded SAEs' resolved sae.skip_first_token."""
    m, s = cfg.model, cfg.sae
    weights: dict = {"source": m.source}
    if organism:
        weights.update(organism)
    elif m.source == "gguf":
        from .models import gguf_folder

        weights.update(gguf_path=m.gguf_path, gguf_file=m.gguf_file,
                       gguf_sha256=_sha256(gguf_folder(m) / str(m.gguf_file)))  # fmt: skip
    else:
        weights["repo_id"] = m.repo_id
        # transformers records the hub snapshot it loaded; None for local folders
        weights["revision"] = getattr(getattr(model.lm, "config", None), "_commit_hash", None)
    return {
        "toolkit": {"version": version("refusal-nnsight"), "git_commit": git_commit()},
        "command": command_line(),
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seed": cfg.seed,
        "model": {"name": m.name, **weights},
        "sae": {
            "name": s.name,
            "source": s.source,
            "release": s.release,
            "sae_id": s.sae_id,
            "path": s.path,
            "layers": s.layers,
            "skip_first_token": skip_first_token,
        },
        "python": sys.version.split()[0],
        "packages": {p: version(p) for p in PACKAGES},
    }
