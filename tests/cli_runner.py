"""Run the `refusal-nnsight` Hydra app in-process (no subprocess start-up per case)."""

from __future__ import annotations

import sys

import pytest


def run_cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `refusal-nnsight ARGV`."""
    from hydra.core.global_hydra import GlobalHydra

    from refusal_nnsight.cli import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["refusal-nnsight", *argv])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        GlobalHydra.instance().clear()
    err = capsys.readouterr().err
    if code not in (0, 2):
        pytest.fail(f"unexpected exit code {code}: {err[-2000:]}")
    return code, err
