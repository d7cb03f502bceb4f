"""The README's library example runs as written on the small organism."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_library_example_runs(small_organism, smoke_run, capsys):
    section = README.read_text().split("## Library use", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    scope: dict = {"run_dir": smoke_run[1]}  # the load_run block reads a finished run
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "bypass_score" in out and "one_minimal_rate" in out
    assert scope["minimal"].summary()["n_prompts"] >= 1
    # no coefficient passed: every stage used the model's own
    assert (
        scope["minimal"].coefficient
        == scope["redundant"].coefficient
        == scope["model"].cfg.coefficient
        == -1.0
    )
    # evaluate counts a jailbreak where the judge agrees with the criterion the sets were found with
    from refusal_nnsight.config import EvaluateConfig

    g = scope["minimal"]
    ev = scope["rn"].evaluate(scope["model"], scope["saes"], scope["direction"], scope["candidates"], g, None,
                              scope["prompts"], EvaluateConfig(max_prompts=2, n_random=1, max_new_tokens=4))  # fmt: skip
    assert (ev.metrics["criterion"], ev.metrics["score_threshold"]) == (g.criterion, g.score_threshold)
    assert ev.summary()["judge_criterion_disagreements"] is not None


def test_package_root_exposes_the_stage_functions():
    import refusal_nnsight as rn

    for name in ("find_direction", "candidate_features", "greedy_minimal_set", "fit_interactions",
                 "find_redundant", "evaluate", "load_model", "load_saes"):  # fmt: skip
        assert callable(getattr(rn, name)) and getattr(rn, name).__doc__


def test_load_run_round_trips_a_pipeline_run(smoke_run, tmp_path):
    """rn.load_run gives back every finished stage's typed result, equal to what the run wrote;
    a stage whose file changed since is not loaded, and says why."""
    import shutil

    import refusal_nnsight as rn
    from refusal_nnsight.stages.direction import DirectionResult
    from refusal_nnsight.stages.greedy import GreedyResult

    cfg, run_dir, summary = smoke_run
    run = rn.load_run(run_dir)
    assert isinstance(run.direction, DirectionResult) and isinstance(run.greedy, GreedyResult)
    untimed = {k: v for k, v in summary.items() if k != "timing"}  # a resume rewrites the timings
    assert run.unusable == {} and run.config["seed"] == cfg.seed
    assert {k: v for k, v in run.summary.items() if k != "timing"} == untimed
    assert run.greedy.summary() == summary["greedy"]
    assert run.direction.summary() == summary["direction"]
    assert all(getattr(run, s) is not None for s in cfg.stages)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    sets = copy / "greedy" / "sets.parquet"
    sets.write_bytes(sets.read_bytes()[:100])
    damaged = rn.load_run(copy)
    assert damaged.greedy is None and "sets.parquet" in damaged.unusable["greedy"]
    assert damaged.direction is not None
