"""Sweeps: `refusal-nnsight -m` writes one run folder per job (Hydra's sweep
<dir>/<job number>, .hydra/ beside the artifacts) on the basic and on the Ray launcher, and the
sweep summary table collects every job's summary.json with its overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from cli_runner import run_cli

from refusal_nnsight import sweep

# The cheap stages of the small organism, swept over the one setting candidates reads.
SWEEP = ["experiment=smoke", "stages=[direction,candidates]", "search.candidates.top_k=3,5"]


def _check_sweep(sweep_dir: Path) -> None:
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    n_features = []
    for job, top_k in zip(jobs, (3, 5), strict=True):
        assert (job / ".hydra" / "config.yaml").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        config = json.loads((job / "config.json").read_text())
        assert config["search"]["candidates"]["top_k"] == top_k
        assert Path(config["run_dir"]) == job.resolve()  # the job's folder is Hydra's job output dir
        summary = json.loads((job / "summary.json").read_text())
        assert summary["candidates"]["n_features"] % top_k == 0
        n_features.append(summary["candidates"]["n_features"])
    assert n_features[1] * 3 == n_features[0] * 5  # top_k per SAE layer, the same layers
    table = pl.read_parquet(sweep_dir / "sweep_summary.parquet")
    assert table["job"].to_list() == ["0", "1"]
    assert table["search.candidates.top_k"].to_list() == [3, 5]
    assert table["stages"].to_list() == ["[direction,candidates]"] * 2
    assert table["candidates.n_features"].to_list() == n_features
    markdown = (sweep_dir / "sweep_summary.md").read_text().splitlines()
    assert "- `search.candidates.top_k`: 3, 5" in markdown  # the override that varies, listed first
    table_lines = [line for line in markdown if line.startswith("|")]
    assert len(table_lines) == 4 and "search.candidates.top_k" in table_lines[0]


def test_sweep_basic_launcher(small_organism, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["-m", *SWEEP], monkeypatch, capsys)
    assert code == 0, err
    (sweep_dir,) = (tmp_path / "runs" / "multirun").iterdir()  # runs/multirun/<timestamp>
    _check_sweep(sweep_dir)


def test_sweep_ray_launcher(small_organism, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    sweep_dir = tmp_path / "sweep"
    argv = ["-m", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2", f"run_dir={sweep_dir}", *SWEEP]
    try:
        code, err = run_cli(argv, monkeypatch, capsys)
    finally:
        ray.shutdown()
    assert code == 0, err
    assert "\r" not in err  # no job progress bars forwarded as "(_run_job pid=…)" carriage-return lines
    _check_sweep(sweep_dir)


def test_run_dir_cannot_be_swept(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["-m", "run_dir=a,b"], monkeypatch, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: run_dir cannot be swept")
    assert not list(tmp_path.iterdir())


def test_ray_launcher_is_found_without_importing_ray():
    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.launcher import Launcher\n"
        "from hydra.core.config_store import ConfigStore\n"
        "names = [p.__name__ for p in Plugins.instance().discover(Launcher)]\n"
        "assert 'RayLauncher' in names, names\n"
        "assert 'ray.yaml' in ConfigStore.instance().list('hydra/launcher')\n"
        "assert 'ray' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ray_launcher_without_ray_is_one_line(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "from refusal_nnsight.cli import main\n"
        "sys.argv = ['refusal-nnsight', '-m', 'hydra/launcher=ray', 'seed=0,1']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=ray needs Ray: pip install 'ray>=2.10,<3'"
    ]


def test_flatten_and_parse_overrides():
    summary = {"greedy": {"n_prompts": 4, "sizes": [1, 2]}, "model": "organism", "timing": {"total_s": 1.5}}
    assert sweep.flatten(summary) == {
        "greedy.n_prompts": 4,
        "greedy.sizes": "[1, 2]",
        "model": "organism",
        "timing.total_s": 1.5,
    }
    saved = ["experiment=smoke", "stages=[direction,candidates]", "++search.greedy.coefficient=-3.5"]
    saved += ["++search.candidates.top_k=5", "+flag=true", "seed=null"]
    assert sweep.parse_overrides(saved) == {
        "experiment": "smoke",
        "stages": "[direction,candidates]",
        "search.greedy.coefficient": -3.5,
        "search.candidates.top_k": 5,
        "flag": True,
        "seed": None,
    }


def _fake_job(root: Path, name: str, overrides: list[str], summary: dict) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (root / name / "summary.json").write_text(json.dumps(summary))


def test_summary_command_table(tmp_path, capsys):
    for i, top_k in enumerate((5, 10, 20)):  # job 10 sorts after job 2
        summary = {"model": "organism", "candidates": {"n_features": 2 * top_k, "rate": 0.5 + i},
                   "greedy": {"median_one_minimal_set_size": 4.0 - i}}  # fmt: skip
        _fake_job(
            tmp_path, str([0, 2, 10][i]), ["model=organism", f"++search.candidates.top_k={top_k}"], summary
        )
    (tmp_path / "0" / "direction").mkdir()  # a stage folder is not a job
    sweep.main([str(tmp_path)])
    table = pl.read_parquet(tmp_path / "sweep_summary.parquet")
    assert table.columns == [
        "job",
        "model",
        "search.candidates.top_k",
        "summary.model",  # a figure named like an override keeps its value beside it
        "candidates.n_features",
        "candidates.rate",
        "greedy.median_one_minimal_set_size",
    ]
    assert table["job"].to_list() == ["0", "2", "10"]
    assert table["search.candidates.top_k"].dtype == pl.Int64 and table["candidates.rate"].dtype == pl.Float64
    out = capsys.readouterr().out
    assert out == (tmp_path / "sweep_summary.md").read_text()
    lines = out.splitlines()
    assert lines.index("- `search.candidates.top_k`: 5, 10, 20") < lines.index(
        "| 0 | organism | 5 | organism | 10 | 0.5 | 4 |"
    )
    assert "- `model`" not in out  # the same in every job: not a varying override
    # beside the main outcomes, the figures of the stage the override belongs to that moved
    assert sweep._stage_figures(table, "search.candidates.top_k") == [
        "candidates.n_features",
        "candidates.rate",
    ]
    assert sweep._stage_figures(table, "model") == []
    figure = tmp_path / "sweep_search.candidates.top_k.png"
    assert figure.read_bytes()[:4] == b"\x89PNG" and f"]({figure.name})" in out


@pytest.mark.parametrize("make", ["missing", "no_jobs"])
def test_summary_command_bad_input(tmp_path, capsys, make):
    target = tmp_path / "nope"
    if make == "no_jobs":
        target.mkdir()
        (target / "0").mkdir()
        (target / "0" / "summary.json").write_text("{}")  # no .hydra/overrides.yaml: not a job
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(target)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not list(tmp_path.rglob("sweep_summary.*"))
