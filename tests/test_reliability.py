"""Interruption, resume, determinism and secrets on the small organism (experiment=smoke).

One uninterrupted run A (in-process) and one run B in a subprocess that is killed with SIGKILL
during direction, mid-greedy and during fm, and rerun each time with the same run_dir: B's
Parquet tables and summary.json (timings aside) must be byte-identical to A's. B runs with a
fake NDIF key and HF token in its environment; neither may appear anywhere in its run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_nnsight import pipeline
from refusal_nnsight.cli import compose

FAKE = {"NDIF_API_KEY": "ndif-planted-secret-7f3a", "HF_TOKEN": "hf_plantedSecretToken9c1e"}
ARGS = ["experiment=smoke"]


def _cli(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, **FAKE}
    cmd = [sys.executable, "-m", "refusal_nnsight.cli", *ARGS, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL the run as soon as `ready()` holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run neither reached the kill point nor ended")


def _tables(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*.parquet"))}


def _summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    s.pop("timing")
    return s


@pytest.mark.slow
def test_killed_runs_resume_to_identical_tables_and_leak_no_secrets(small_organism, tmp_path):
    a = tmp_path / "a"
    pipeline.run(compose([*ARGS, f"run_dir={a}"]))

    b = tmp_path / "b"
    kill_points = [
        ("direction", lambda: (b / "config.json").exists() and not (b / "direction" / "done.json").exists()),
        ("greedy", lambda: any((b / "greedy" / "parts").glob("*"))),
        ("fm", lambda: (b / "fm").exists() and not (b / "fm" / "done.json").exists()),
    ]
    killed = []
    for name, ready in kill_points:
        if (b / name / "done.json").exists():
            continue
        if _kill_when(_cli(b), ready):
            killed.append(name)
    assert "direction" in killed and "greedy" in killed, killed
    final = _cli(b)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert not list(b.rglob("*.tmp")), "temporary files of killed writes were left behind"

    assert _tables(a).keys() == _tables(b).keys() and _tables(a)
    for name, data in _tables(a).items():
        assert _tables(b)[name] == data, f"{name} differs after interruption"
    assert _summary(a) == _summary(b)

    for path in b.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for value in FAKE.values():
                assert value.encode() not in text, f"{value} leaked into {path}"
