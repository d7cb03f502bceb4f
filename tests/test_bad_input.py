"""Bad input ends with one line naming the problem and the fix, exit code 2, no traceback, and
nothing in the run folder but the log (issue: reliability). One test per case."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_runner import run_cli

SMALL = ["model.organism_recipe=small", "experiment=smoke"]


def _check(code: int, err: str, run_dir, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if run_dir.exists():
        left = sorted(p.name for p in run_dir.iterdir())
        assert all(name.endswith(".log") for name in left), left


@pytest.mark.parametrize(
    ("arg", "needle"),
    [("model=nope", "unknown model 'nope'"), ("sae=nope", "unknown sae 'nope'"), ("data=nope", "unknown data 'nope'"),
     ("search=nope", "unknown search 'nope'"), ("experiment=nope", "unknown experiment 'nope'"),
     ("data/harmful=nope", "unknown data/harmful 'nope'")],
)  # fmt: skip
def test_unknown_names(arg, needle, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _check(*run_cli([arg, f"run_dir={run_dir}"], monkeypatch, capsys), run_dir, needle, "choose one of")


@pytest.mark.parametrize(
    ("arg", "needle"),
    [("search.candidates.top_k=0", "top_k=0 makes no sense"), ("search.greedy.coefficient=nan", "NaN"),
     ("search.fm.heldout_fraction=1.5", "heldout_fraction"), ("data.n_train=100000", "exceeds"),
     ("search.candidates.top_k=many", "must be an integer")],
)  # fmt: skip
def test_nonsense_numbers(arg, needle, small_organism, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _check(*run_cli([*SMALL, arg, f"run_dir={run_dir}"], monkeypatch, capsys), run_dir, needle)


def test_layer_out_of_range(small_organism, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _check(
        *run_cli([*SMALL, "sae.layers=[99]", f"run_dir={run_dir}"], monkeypatch, capsys),
        run_dir,
        "layer 99 is out of range",
    )


def _saved_sae(path, d_in: int, layer: int, hook_layer: int):
    from tiny import random_jumprelu_sae

    sae = random_jumprelu_sae(d_in, 4 * d_in, hook_layer)
    sae.save_model(str(path / f"layer_{layer}"))


def _disk_sae_args(tmp_path, run_dir) -> list[str]:
    return [
        *SMALL,
        "sae.source=disk",
        f"sae.path='{tmp_path}/saes/layer_{{layer}}'",
        "sae.layers=[0]",
        f"run_dir={run_dir}",
    ]


def test_sae_width_does_not_match(small_organism, tmp_path, monkeypatch, capsys):
    _saved_sae(tmp_path / "saes", d_in=7, layer=0, hook_layer=0)
    run_dir = tmp_path / "run"
    _check(*run_cli(_disk_sae_args(tmp_path, run_dir), monkeypatch, capsys), run_dir, "d_in=7", "d_model")


def test_sae_hook_on_missing_module(small_organism, tmp_path, monkeypatch, capsys):
    from refusal_nnsight.config import ModelConfig
    from refusal_nnsight.models import load_model

    d = load_model(ModelConfig(organism_recipe="small", device="cpu")).d_model
    _saved_sae(tmp_path / "saes", d_in=d, layer=0, hook_layer=40)
    run_dir = tmp_path / "run"
    _check(
        *run_cli(_disk_sae_args(tmp_path, run_dir), monkeypatch, capsys),
        run_dir,
        "model.layers.40 does not exist",
    )


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [(None, "csv", "does not exist"), ("", "csv", "is empty"), ("other\nx\n", "csv", "no column 'goal'"),
     ('{"goal": [', "json", "not valid JSON"), ("{x}\n", "jsonl", "not valid JSONL"), ("nope", "parquet", "not valid PARQUET"),
     ("a,b\n", "csv", "no column 'goal'")],
)  # fmt: skip
def test_bad_prompt_file(content, suffix, needle, small_organism, tmp_path, monkeypatch, capsys):
    path = tmp_path / f"prompts.{suffix}"
    if content is not None:
        path.write_text(content)
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        "data.harmful.source=file",
        f"data.harmful.path={path}",
        "data.harmful.column=goal",
        f"run_dir={run_dir}",
    ]
    _check(*run_cli(args, monkeypatch, capsys), run_dir, needle)


def test_real_model_not_cached_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    run_dir = tmp_path / "run"
    code, err = run_cli(
        ["model=gemma2_2b_it", "sae=gemma_scope_16k", f"run_dir={run_dir}"], monkeypatch, capsys
    )
    _check(code, err, run_dir, "google/gemma-2-2b-it", "huggingface-cli download")


def test_secret_as_override_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(["+ndif.api_key=sk-planted-0123", f"run_dir={run_dir}"], monkeypatch, capsys)
    _check(code, err, run_dir, "environment")
    assert "sk-planted-0123" not in err and not run_dir.exists()


def test_nan_activations_are_named_with_their_layer(small_organism):
    from refusal_nnsight.config import DataConfig, DirectionConfig, ModelConfig
    from refusal_nnsight.data import load_prompts
    from refusal_nnsight.errors import NonFiniteError
    from refusal_nnsight.models import load_model
    from refusal_nnsight.stages import direction

    model = load_model(ModelConfig(organism_recipe="small", device="cpu"))
    layer = model.lm._module.model.layers[1]
    with torch.no_grad():  # the Gemma-2 failure of the reference code: inf/NaN in a residual
        layer.mlp.down_proj.weight.fill_(math.inf)
    prompts = load_prompts(DataConfig(n_train=8, n_val=4, n_eval=4))
    with pytest.raises(NonFiniteError, match="layer 1"):
        direction.run(model, prompts, DirectionConfig(), _scratch_stage())


def _scratch_stage():
    import tempfile

    from refusal_nnsight.artifacts import StageDir

    return StageDir(tempfile.mkdtemp(), "direction")


def test_nothing_refused_writes_a_valid_empty_summary(small_organism, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    # "Sure" opens many compliant answers and never a refusal: with it as the refusal token no
    # harmful prompt scores as refused, so there is nothing to dissect.
    code, err = run_cli([*SMALL, "model.refusal_strings=[Sure]", f"run_dir={run_dir}"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "nothing to dissect" in summary["status"]
    assert (run_dir / "report.md").exists()
