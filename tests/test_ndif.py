"""backend=ndif and backend=ndif_check, offline.

ndif_check runs every stage step as a `model.session` job through nnsight's real client
serialization and an in-process server that refuses imports NDIF lacks; on the organism its
results must equal the local run's. The real NDIF path is checked up to the network: a missing
key, an unreachable host, a model NDIF does not run and a failed job each end in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from refusal_nnsight import backends, pipeline
from refusal_nnsight.cli import compose
from refusal_nnsight.errors import UserError

SECRET = "ndif-test-key-0123456789"


@pytest.mark.slow
def test_ndif_check_pipeline_equals_local(smoke_run, tmp_path):
    cfg_local, local_dir, local = smoke_run
    run_dir = tmp_path / "check"
    cfg = compose(["experiment=smoke", "backend=ndif_check", f"run_dir={run_dir}"])
    remote = pipeline.run(cfg)
    timing = remote.pop("timing")
    expected = {k: v for k, v in local.items() if k != "timing"}
    assert json.loads(json.dumps(remote)) == expected
    # one job per stage step, never one per prompt: far fewer jobs than traces
    assert 0 < timing["remote_jobs"] < 400, timing
    assert timing["remote_payload_mb"] > 0
    tables = sorted(p.relative_to(local_dir) for p in local_dir.glob("*/*.parquet"))
    assert tables
    for table in tables:  # every stage table, byte for byte
        assert (run_dir / table).read_bytes() == (local_dir / table).read_bytes(), table


def test_toolkit_ships_by_value():
    """An installed package is pickled by reference unless registered; the server lacks it."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from nnsight.intervention.serialization import dumps

    from refusal_nnsight import interventions

    backends.shipped_modules()
    assert "refusal_nnsight" in _PICKLE_BY_VALUE_MODULES
    assert b"def apply" in dumps(interventions.apply)


def test_strict_mock_refuses_an_unregistered_installed_helper(tmp_path, monkeypatch):
    """The check ndif_check exists for: a helper from an installed package fails on the server
    (remote='local' would pass it), and passes once registered."""
    import nnsight
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from tiny import model_config, tiny_gemma2

    from refusal_nnsight.models import wrap_model

    site = tmp_path / "lib" / "site-packages"
    (site / "rn_fake_helpers").mkdir(parents=True)
    (site / "rn_fake_helpers" / "__init__.py").write_text("def double(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(site))
    import rn_fake_helpers

    model = wrap_model(*tiny_gemma2(), model_config("gemma2"))
    batch = model.tokenize(["how to bake bread"])
    inputs = batch.model_inputs("cpu")

    def run():
        with torch.no_grad(), model.lm.session(backend=backends.in_process_ndif(model.lm)):  # noqa: SIM117 — a session holds traces
            with model.lm.trace(**inputs):
                out = rn_fake_helpers.double(model.layers()[0].output).save()
        return out

    with pytest.raises(ModuleNotFoundError, match="rn_fake_helpers"):
        run()
    nnsight.register(rn_fake_helpers)
    try:
        with torch.no_grad(), model.lm.trace(**inputs):
            ref = (model.layers()[0].output * 2).save()
        assert torch.allclose(run(), ref)
    finally:
        _PICKLE_BY_VALUE_MODULES.discard("rn_fake_helpers")
        sys.modules.pop("rn_fake_helpers", None)


class _FakeRemote(backends.Remote):
    """A Remote whose 'server' runs fn locally and runs out of memory above `limit` rows."""

    def __init__(self, limit: int):
        super().__init__("ndif", make_backend=lambda: None)
        self.limit, self.sizes = limit, []

    def job(self, model, spans, fns, progress):
        self.sizes.append(max(i1 - i0 for _, i0, i1 in spans))
        if self.sizes[-1] > self.limit:
            raise RuntimeError(
                "server traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
            )
        self.jobs += 1
        return [fns[t](i0, i1) for t, i0, i1 in spans]


def test_remote_job_out_of_memory_resubmits_smaller():
    class M:
        remote = _FakeRemote(limit=3)

    out = backends.run_chunks(M, 10, 8, lambda i0, i1: list(range(i0, i1)))
    assert [x for part in out for x in part] == list(range(10))
    assert M.remote.sizes == [8, 4, 2] and M.remote.jobs == 1


def test_remote_job_error_is_one_line():
    class Failing(_FakeRemote):
        def job(self, model, spans, fns, progress):
            raise RuntimeError(
                "Traceback (most recent call last):\n  File x\nValueError: shapes do not match"
            )

    class M:
        remote = Failing(limit=100)

    with pytest.raises(UserError, match="the NDIF job failed .*ValueError: shapes do not match") as err:
        backends.run_chunks(M, 4, 2, lambda i0, i1: None)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------- CLI failures


def _only_log(run_dir: Path) -> bool:
    return (
        all(p.suffix == ".log" or p.name == ".lock" for p in run_dir.iterdir()) if run_dir.exists() else True
    )


def _no_secret(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.fixture
def nnsight_config(monkeypatch):
    """nnsight's live config with no key and a host that refuses connections."""
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(CONFIG.API, "HOST", CONFIG.API.HOST)
    return CONFIG


def _cli(args, tmp_path, monkeypatch, capsys):
    from cli_runner import run_cli

    run_dir = tmp_path / "run"
    code, err = run_cli([*args, f"run_dir={run_dir}"], monkeypatch, capsys)
    return code, err, run_dir


def test_ndif_needs_a_hub_model(nnsight_config, tmp_path, monkeypatch, capsys):
    code, err, run_dir = _cli(["backend=ndif"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "hub repo id" in err, err
    assert _only_log(run_dir)


def test_ndif_without_a_key(nnsight_config, tmp_path, monkeypatch, capsys):
    code, err, run_dir = _cli(["model=gemma2_2b_it", "backend=ndif"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "no NDIF API key" in err, err
    assert _only_log(run_dir)


def test_ndif_host_unreachable(nnsight_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    monkeypatch.setattr(nnsight_config.API, "APIKEY", SECRET)
    args = ["model=gemma2_2b_it", "backend=ndif", "backend.host=http://127.0.0.1:9"]
    code, err, run_dir = _cli(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot reach NDIF at http://127.0.0.1:9" in err, err
    assert _only_log(run_dir)
    _no_secret(run_dir)


def test_ndif_model_not_running(nnsight_config, tmp_path, monkeypatch, capsys):
    import nnsight
    from nnsight import ndif

    monkeypatch.setattr(nnsight_config.API, "APIKEY", SECRET)
    monkeypatch.setattr(ndif, "_get", lambda path, **kw: {"deployments": {}})
    monkeypatch.setattr(nnsight, "is_model_running", lambda repo_id, **kw: False)
    code, err, run_dir = _cli(["model=llama31_8b_it", "backend=ndif"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "is not running 'meta-llama/Llama-3.1-8B-Instruct'" in err, err
    assert _only_log(run_dir)
    _no_secret(run_dir)


@pytest.mark.slow
def test_failed_job_ends_in_one_line_and_leaves_no_half_stage(small_organism, tmp_path, monkeypatch, capsys):
    def server_error(srv, compress):
        raise RuntimeError(
            "Traceback (most recent call last):\nRuntimeError: CUDA error: device-side assert triggered"
        )

    monkeypatch.setattr(backends, "_execute", server_error)
    code, err, run_dir = _cli(["experiment=smoke", "backend=ndif_check"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "ndif_check job failed" in err and "device-side assert" in err, err
    assert not (run_dir / "summary.json").exists()
    assert not list(run_dir.rglob("done.json")) and not list(run_dir.rglob("*.tmp*"))


@pytest.mark.slow
def test_ndif_builds_a_meta_model_and_a_failed_submission_is_one_line(
    small_organism, nnsight_config, monkeypatch
):
    """backend=ndif up to the network: the client holds no weights, the stages' host-side tensors
    live on the CPU, and a job that cannot be submitted (here: no hub to key the model) ends in
    one line naming NDIF."""
    from refusal_nnsight.config import BackendConfig, ModelConfig
    from refusal_nnsight.scoring import refusal_scores

    monkeypatch.setattr(nnsight_config.API, "APIKEY", SECRET)
    monkeypatch.setattr(backends, "_check_running", lambda repo_id, host: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mcfg = ModelConfig(name="organism_as_hub_repo", source="hf", repo_id=str(small_organism / "model"))
    model = backends.load_model(mcfg, BackendConfig(name="ndif"))
    assert model.remote is not None and model.remote.kind == "ndif"
    assert model.lm.device.type == "meta" and model.device.type == "cpu"
    assert model.n_layers > 0 and model.eoi_ids and model.refusal_ids
    with pytest.raises(UserError, match="the NDIF job failed") as err:
        refusal_scores(model, ["how do I bake bread"])
    assert "\n" not in str(err.value)
