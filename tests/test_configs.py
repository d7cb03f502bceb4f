"""Every config group option and preset composes into a typed RunConfig."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refusal_nnsight.cli import CONF_DIR, GROUPS, compose
from refusal_nnsight.config import RunConfig, from_dict
from refusal_nnsight.errors import UserError

OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "name"), OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_option_composes(group, name):
    cfg = compose([f"{group}={name}"])
    assert isinstance(cfg, RunConfig)
    if group in ("model", "sae", "data", "search"):
        assert getattr(cfg, group).name == name
    if group.startswith("data/"):
        assert getattr(cfg.data, group.split("/")[1]).name == name


def test_defaults_are_the_organism():
    cfg = compose()
    assert (cfg.model.source, cfg.sae.source, cfg.data.name) == ("organism", "organism", "organism")
    assert cfg.stages == ["direction", "candidates", "greedy", "fm", "redundancy", "evaluate"]


def test_layers_are_a_first_class_override():
    cfg = compose(["model=gemma2_2b_it", "sae=gemma_scope_16k", "sae.layers=[10,12,14]"])
    assert cfg.sae.layers == [10, 12, 14] and cfg.model.repo_id == "google/gemma-2-2b-it"
    assert cfg.sae.release == "gemma-scope-2b-pt-res-canonical"


def test_real_model_facts():
    g = compose(["model=gemma2_2b_it"]).model
    assert (g.n_layers, g.d_model, g.refusal_token_ids) == (26, 2304, [235285])
    llama = compose(["model=llama31_8b_it"]).model
    assert (llama.n_layers, llama.d_model, llama.refusal_token_ids) == (32, 4096, [40])
    assert not g.trust_remote_code and not llama.trust_remote_code


def test_the_coefficient_is_the_models_unless_set():
    """search.coefficient defaults to model.coefficient (refusal_sae keys it by model: -3 Gemma-2,
    -1 Llama-3; the organism -1); a search or preset that sets it wins, and it is range-checked."""
    for overrides, want in [([], -1.0), (["model=gemma2_2b_it"], -3.0), (["model=llama31_8b_it"], -1.0),
                            (["search=harm"], -1.0), (["experiment=smoke"], -1.0),
                            (["search.coefficient=-3"], -3.0), (["model.coefficient=-2"], -2.0),
                            (["experiment=paper_gemma2"], -3.0), (["experiment=paper_llama31"], -1.0)]:  # fmt: skip
        cfg = compose(overrides)
        assert cfg.search.coefficient == want, overrides
    assert compose(["search.coefficient=0"]).model.coefficient == -1.0  # the model's own is untouched
    with pytest.raises(UserError, match="coefficient=2.0 makes no sense"):
        compose(["model.coefficient=2"])
    with pytest.raises(UserError, match="model.coefficient=2.0 makes no sense"):
        compose(["model.coefficient=2", "search.coefficient=-1"])


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="unknown model 'nope'"):
        compose(["model=nope"])
    with pytest.raises(UserError, match="must be an integer"):
        from_dict(RunConfig, {"search": {"candidates": {"top_k": "many"}}})
    with pytest.raises(UserError, match="unknown key"):
        from_dict(RunConfig, {"model": {"colour": "red"}})
    with pytest.raises(UserError, match="NaN"):
        from_dict(RunConfig, {"search": {"coefficient": float("nan")}})


def test_cli_unknown_name_is_one_line_exit_2():
    exe = [sys.executable, "-c", "from refusal_nnsight.cli import main; main()", "model=nope"]
    proc = subprocess.run(exe, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown model 'nope'; choose one of ['gemma2_2b_it', 'llama31_8b_it', 'organism', 'smollm2_135m_it', 'smollm2_harmbench']"
    ]
