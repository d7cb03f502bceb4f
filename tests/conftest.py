"""Shared fixtures. Tests never touch the user's cache: REFUSAL_NNSIGHT_HOME points into a
session tmp dir, and the small organism is built there once per session, on first request."""

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
    """Path of the 'small' organism (model/, saes/, manifest.json), built once per session."""
    from refusal_nnsight.organism.store import ensure_organism

    return ensure_organism("small")
