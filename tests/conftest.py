"""Shared fixtures. Tests never touch the user's cache: REFUSAL_NNSIGHT_HOME points into a
session tmp dir. The small organism ships with the package, so no test builds it."""

from __future__ import annotations

import os

import pytest

from refusal_nnsight.organism.store import HOME_ENV


@pytest.fixture(scope="session", autouse=True)
def organism_home(tmp_path_factory):
    """REFUSAL_NNSIGHT_HOME for the whole session (restored afterwards)."""
    old = os.environ.get(HOME_ENV)
    home = tmp_path_factory.mktemp("refusal_nnsight_home")
    os.environ[HOME_ENV] = str(home)
    yield home
    if old is None:
        os.environ.pop(HOME_ENV, None)
    else:
        os.environ[HOME_ENV] = old


@pytest.fixture(scope="session")
def small_organism(organism_home):
    """Path of the shipped 'small' organism (model/, saes/, planted.safetensors, manifest.json)."""
    from refusal_nnsight.organism import ensure_organism

    return ensure_organism("small")


@pytest.fixture(scope="session")
def smoke_run(small_organism, tmp_path_factory):
    """(RunConfig, run folder, summary) of one local experiment=smoke pipeline run, shared by the
    tests that check its outputs and those that compare other backends or resumes with it."""
    import json

    from refusal_nnsight import pipeline
    from refusal_nnsight.cli import compose

    run_dir = tmp_path_factory.mktemp("smoke_local") / "run"
    cfg = compose(["experiment=smoke", f"run_dir={run_dir}"])
    pipeline.run(cfg)
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text())
