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
from refusal_nnsight.artifacts import StageDir
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


# ------------------------------------------------------------------ runs that cannot mix

QUICK = ["experiment=smoke", "stages=[direction,candidates,greedy]"]


def _compose_run(run_dir: Path, *extra: str):
    return compose([*QUICK, *extra, f"run_dir={run_dir}"])


def test_resume_under_another_config_is_refused_naming_the_field(
    small_organism, tmp_path, monkeypatch, capsys
):
    from cli_runner import run_cli

    from refusal_nnsight.errors import UserError

    run_dir = tmp_path / "run"
    pipeline.run(_compose_run(run_dir, "stages=[direction]"))
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["fields"]["search.candidates.top_k"] == 10 and recorded["config_hash"]

    with pytest.raises(UserError, match=r"search\.candidates\.top_k=10 there, 5 now.*force_restart=true"):
        pipeline.run(_compose_run(run_dir, "search.candidates.top_k=5"))
    hydra_overrides = run_dir / ".hydra"
    assert not hydra_overrides.exists()  # pipeline.run in-process: no Hydra folder to protect here

    # the CLI refuses before Hydra writes into the folder
    capsys.readouterr()  # drop the progress bars of the runs above
    code, err = run_cli([*QUICK, "search.fm.rank=4", f"run_dir={run_dir}"], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "search.fm.rank=8 there, 4 now" in err
    assert not hydra_overrides.exists()

    # batch sizes, device, backend and stages may differ: the finished stage is loaded
    before = (run_dir / "direction" / "directions.safetensors").stat().st_mtime_ns
    pipeline.run(
        _compose_run(run_dir, "stages=[direction]", "search.direction.batch_size=5", "model.device=cpu")
    )
    assert (run_dir / "direction" / "directions.safetensors").stat().st_mtime_ns == before

    # force_restart (or --force-restart) discards the old results and records the new config
    code, err = run_cli([*QUICK, "stages=[direction]", "search.candidates.top_k=5", "--force-restart",
                         f"run_dir={run_dir}"], monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((run_dir / "run.json").read_text())["fields"]["search.candidates.top_k"] == 5


def test_resume_on_another_build_of_the_organism_is_refused(small_organism, tmp_path):
    """The config names a recipe and seed, not weights: a run folder records which build it
    dissected, and a resume against other weights under the same config is refused."""
    from refusal_nnsight.errors import UserError

    run_dir = tmp_path / "run"
    pipeline.run(_compose_run(run_dir, "stages=[direction]"))
    identity = run_dir / "run.json"
    recorded = json.loads(identity.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert recorded["organism"] == {k: summary["organism"][k] for k in recorded["organism"]}
    assert recorded["organism"]["content_hash"]

    pipeline.run(_compose_run(run_dir, "stages=[direction]"))  # the same build resumes
    recorded["organism"]["content_hash"] = "0" * 16  # as if the folder had dissected another build
    identity.write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"another build of the organism: content_hash=0{16} there"):
        pipeline.run(_compose_run(run_dir, "stages=[direction]"))
    pipeline.run(_compose_run(run_dir, "stages=[direction]", "force_restart=true"))
    assert json.loads(identity.read_text())["organism"] == {
        k: summary["organism"][k] for k in recorded["organism"]
    }


def test_damaged_artifacts_are_detected_and_recomputed(small_organism, tmp_path, caplog):
    run_dir = tmp_path / "run"
    pipeline.run(_compose_run(run_dir))
    done = json.loads((run_dir / "direction" / "done.json").read_text())
    assert done["artifacts"]["directions.safetensors"]["sha256"] and done["config_hash"]
    assert json.loads((run_dir / "greedy" / "done.json").read_text())["inputs"].keys() == {"candidates"}
    keep = {p: p.read_bytes() for p in run_dir.glob("*/*") if p.suffix in (".parquet", ".safetensors")}
    parts = sorted((run_dir / "greedy" / "parts").rglob("prompt_*.json"))
    # part files live under parts/<key>, the key hashing the config hash and the stage's inputs
    assert parts and parts[0].parent.parent.name == "parts" and len(parts[0].parent.name) == 16

    # truncate a safetensors and a Parquet of finished stages, and a greedy part file
    damaged = [
        run_dir / "direction" / "directions.safetensors",
        run_dir / "candidates" / "candidates.parquet",
    ]
    for path in damaged:
        path.write_bytes(path.read_bytes()[:50])
    (run_dir / "greedy" / "done.json").unlink()
    parts[0].write_text(parts[0].read_text()[:20])
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipeline.run(_compose_run(run_dir))
    warned = caplog.text
    assert "[direction] directions.safetensors changed size" in warned
    assert "[candidates] candidates.parquet changed size" in warned
    assert f"part file {parts[0].name} is damaged" in warned
    for path, data in keep.items():  # recomputed to the same bytes (same config, same threads)
        assert path.read_bytes() == data, path
    for stage in ("direction", "candidates", "greedy"):  # each finished again, its hashes recorded
        record = json.loads((run_dir / stage / "done.json").read_text())
        assert StageDir(run_dir, stage, record["config_hash"], record["inputs"]).damage() is None


def test_a_missing_artifact_is_never_read(small_organism, tmp_path, caplog):
    run_dir = tmp_path / "run"
    pipeline.run(_compose_run(run_dir, "stages=[direction]"))
    (run_dir / "direction" / "selection.parquet").unlink()
    with caplog.at_level("WARNING"):
        pipeline.run(_compose_run(run_dir, "stages=[direction]"))
    assert "[direction] selection.parquet is missing; recomputing direction" in caplog.text
    assert (run_dir / "direction" / "selection.parquet").exists()


def test_a_held_run_folder_is_refused_in_one_line(small_organism, tmp_path, monkeypatch, capsys):
    from cli_runner import run_cli

    run_dir = tmp_path / "run"
    hold = (  # another process holds the folder, as a run in progress does
        "import sys, time\nfrom refusal_nnsight.artifacts import RunFolder\n"
        "with RunFolder(sys.argv[1]).lock():\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_cli([*QUICK, f"run_dir={run_dir}"], monkeypatch, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: run_dir ") and "is in use by another run (pid " in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written, not even .hydra/


def test_two_runs_started_at_once_do_not_interleave(small_organism, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "refusal_nnsight.cli",
        "experiment=smoke",
        "search=default",
        f"run_dir={run_dir}",
    ]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (err,) = [err for code, err in results if code == 2]
    assert len(err.strip().splitlines()) == 1 and "is in use by another run" in err
    assert (run_dir / "summary.json").exists() and (run_dir / "evaluate" / "done.json").exists()


# ------------------------------------------------------------------ memory


def test_cpu_out_of_memory_halves_the_batch_and_batch_size_one_is_one_line():
    from refusal_nnsight.backends import map_chunks
    from refusal_nnsight.errors import UserError

    cpu_oom = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"
    seen = []

    def fn(i0, i1):
        seen.append(i1 - i0)
        if i1 - i0 > 2:
            raise RuntimeError(cpu_oom)
        return list(range(i0, i1))

    assert [x for part in map_chunks(6, 8, fn) for x in part] == list(range(6))
    assert seen[:3] == [6, 4, 2]  # halved (8 → 4 → 2) as on a GPU
    with pytest.raises(UserError, match="out of memory on this machine even at batch size 1"):
        map_chunks(3, 4, lambda i0, i1: (_ for _ in ()).throw(MemoryError()))


def test_a_stage_written_in_an_older_artifact_format_is_not_read(tmp_path):
    """Column names changed between formats: a finished stage of another format is recomputed
    (and its part files live under another key), never loaded with the wrong names."""
    from refusal_nnsight import artifacts

    out = artifacts.StageDir(tmp_path, "greedy", "cfg", {"candidates": "abc"})
    out.path.mkdir(parents=True)
    (out.path / "sets.parquet").write_bytes(b"x")
    out.mark_done()
    assert out.damage() is None
    record = json.loads(out.done.read_text())
    out.done.write_text(json.dumps({**record, "format": artifacts.FORMAT - 1}))
    assert "older version" in out.damage()
    del record["format"]  # written before formats were recorded
    out.done.write_text(json.dumps(record))
    assert "artifact format 1" in out.damage()
    assert out.key != artifacts.StageDir(tmp_path, "greedy", "", {"candidates": "abc"}).key
