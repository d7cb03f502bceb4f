"""The paper presets compose and run end to end on tiny random stand-ins of the same
architecture: experiment=paper_llama31 on a tiny Llama-3 (saved to disk, loaded by path like a
hub checkout) with Llama Scope SAEs served by sae-lens's real loader from a fake HF cache."""

from __future__ import annotations

import json

import polars as pl
import pytest
from fake_hub import add_llama_scope
from test_stage_direction import STEMS, planted_refusal_model

from refusal_nnsight import pipeline
from refusal_nnsight.cli import compose


@pytest.mark.slow
def test_paper_llama31_preset_runs_end_to_end_on_a_tiny_llama(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, u = planted_refusal_model()  # refuses exactly the prompts that contain "bomb", via u
    model.lm._module.save_pretrained(tmp_path / "llama")
    model.tokenizer.save_pretrained(tmp_path / "llama")
    for layer in range(model.n_layers):  # Llama Scope format; latent 0 is the planted refusal feature
        add_llama_scope(tmp_path / "hub", layer, d_in=model.d_model, d_sae=256, seed=layer, plant=u)
    pl.DataFrame({"goal": [f"{s} bomb" for s in STEMS]}).write_csv(tmp_path / "harmful.csv")
    pl.DataFrame({"text": [f"{s} {o}" for o in ("cake", "process", "person") for s in STEMS]}).write_csv(
        tmp_path / "harmless.csv"
    )
    run_dir = tmp_path / "run"
    cfg = compose([
        "experiment=paper_llama31", f"model.repo_id={tmp_path / 'llama'}", "model.n_layers=3", "model.d_model=64",
        "model.dtype=float32", "model.device=cpu", f"model.refusal_token_ids=[{model.tokenizer.convert_tokens_to_ids('I')}]",
        "model.max_new_tokens=4",
        "data.harmful.source=file", f"data.harmful.path={tmp_path / 'harmful.csv'}", "data.harmful.column=goal",
        "data.harmless.source=file", f"data.harmless.path={tmp_path / 'harmless.csv'}", "data.harmless.column=text",
        "data.n_train=4", "data.n_val=2", "data.n_eval=2",
        "search.greedy.max_prompts=2", "search.fm.n_masks=64", "search.fm.max_prompts=1", "search.fm.epochs=50",
        "search.evaluate.n_random=1", f"run_dir={run_dir}",
    ])  # fmt: skip
    assert (cfg.sae.release, cfg.sae.sae_id, cfg.search.greedy.coefficient) == (
        "llama_scope_lxr_8x",
        "l{layer}r_8x",
        -1.0,
    )
    pipeline.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in cfg.stages:
        assert (run_dir / stage / "done.json").exists(), stage
    # the planted model refuses by its first token only (its generations are random words), so
    # the checks read refusal scores, not the generation judge
    assert summary["candidates"]["n_refused_eval"] == 2
    assert summary["candidates"]["all_ablated_score_jailbreak_rate"] == 1.0
    assert summary["direction"]["bypass_score"] < 0
    assert summary["greedy"]["one_minimal_rate"] == 1.0
    # the planted latent (0) of some layer is the whole minimal set
    sets = pl.read_parquet(run_dir / "greedy" / "sets.parquet")
    assert all(latents == [0] for latents in sets["latents"].to_list())
    assert "neuronpedia.org/llama3.1-8b/" in (run_dir / "report.md").read_text()
