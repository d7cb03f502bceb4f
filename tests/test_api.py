"""The README's library example runs as written on the small organism."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_library_example_runs(small_organism, capsys):
    section = README.read_text().split("## Library use", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "bypass_score" in out and "one_minimal_rate" in out
    assert scope["minimal"].summary()["n_prompts"] >= 1


def test_package_root_exposes_the_stage_functions():
    import refusal_nnsight as rn

    for name in ("find_direction", "candidate_features", "greedy_minimal_set", "fit_interactions",
                 "find_redundant", "evaluate", "load_model", "load_saes"):  # fmt: skip
        assert callable(getattr(rn, name)) and getattr(rn, name).__doc__
