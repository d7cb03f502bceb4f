"""The paper presets compose and run end to end on tiny random stand-ins of the same
architecture: experiment=paper_llama31 on a tiny Llama-3 and experiment=paper_gemma2 on a tiny
Gemma-2 (each saved to disk and loaded by path like a hub checkout, with a refusal planted along
one direction u), with Llama Scope / Gemma Scope SAEs (their real formats; Gemma Scope at its
real 2304 × 65536 shape) served by sae-lens's own loaders from a fake HF cache."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from fake_hub import add_gemma_scope, add_llama_scope
from test_stage_direction import STEMS, planted_refusal_model
from tiny import tiny_gemma2

from refusal_nnsight import pipeline
from refusal_nnsight.cli import compose


def planted_gemma2(seed: int = 1, d: int = 2304, n_layers: int = 2):
    """A tiny Gemma-2 (d_model 2304, as Gemma Scope needs) that refuses exactly the prompts that
    contain "bomb": layer 0 attends uniformly and copies the u-component of "bomb" forward; every
    other write into the residual is zero; the tied unembedding reads "I" from u. (Its MLPs are
    64 wide, not 4 × 2304: they write nothing, and at full width they took most of the test's time.)"""
    hf, tok = tiny_gemma2(n_layers=n_layers, d=d, intermediate=64)
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    u /= u.norm()
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight  # tied with lm_head
        emb -= (emb @ u)[:, None] * u
        emb[tok.convert_tokens_to_ids("bomb")] = 2 * u
        emb[tok.convert_tokens_to_ids("I")] = 10 * u
        for i, layer in enumerate(hf.model.layers):
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
            if i == 0:
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.v_proj.weight.zero_()
                layer.self_attn.v_proj.weight[0] = u
                layer.self_attn.o_proj.weight[:, 0] = u
    return hf, tok, u


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline fake HF cache that sae-lens's loaders read from."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def _run_preset(tmp_path, experiment: str, hf, tok, model_overrides: list[str]) -> tuple[object, dict]:
    """Save the stand-in like a hub checkout, write bomb / harmless prompt files, run the preset
    with small search sizes; return (config, summary)."""
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    pl.DataFrame({"goal": [f"{s} bomb" for s in STEMS]}).write_csv(tmp_path / "harmful.csv")
    harmless = [f"{s} {o}" for o in ("cake", "process", "person") for s in STEMS]
    pl.DataFrame({"text": harmless}).write_csv(tmp_path / "harmless.csv")
    run_dir = tmp_path / "run"
    cfg = compose([
        f"experiment={experiment}", f"model.repo_id={tmp_path / 'model'}", *model_overrides,
        "model.dtype=float32", "model.device=cpu", f"model.refusal_token_ids=[{tok.convert_tokens_to_ids('I')}]",
        "model.max_new_tokens=4",
        "data.harmful.source=file", f"data.harmful.path={tmp_path / 'harmful.csv'}", "data.harmful.column=goal",
        "data.harmless.source=file", f"data.harmless.path={tmp_path / 'harmless.csv'}", "data.harmless.column=text",
        "data.n_train=4", "data.n_val=2", "data.n_eval=2",
        "search.greedy.max_prompts=2", "search.fm.n_masks=64", "search.fm.max_prompts=1", "search.fm.epochs=50",
        "search.evaluate.n_random=1", f"run_dir={run_dir}",
    ])  # fmt: skip
    pipeline.run(cfg)
    for stage in cfg.stages:
        assert (run_dir / stage / "done.json").exists(), stage
    return cfg, json.loads((run_dir / "summary.json").read_text())


def _check_planted_refusal_found(run_dir, summary: dict, neuronpedia: str) -> None:
    # the stand-ins refuse by their first token only (their generations are random words), so the
    # checks read refusal scores, not the generation judge
    assert summary["candidates"]["n_refused_eval"] == 2
    assert summary["candidates"]["all_ablated_flip_rate"] == 1.0
    assert summary["direction"]["bypass_score"] < 0
    assert summary["greedy"]["one_minimal_rate"] == 1.0
    sets = pl.read_parquet(run_dir / "greedy" / "sets.parquet")
    assert all(features == [0] for features in sets["features"].to_list())  # exactly the planted latent
    assert neuronpedia in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_paper_llama31_preset_runs_end_to_end_on_a_tiny_llama(tmp_path, hub):
    model, u = planted_refusal_model()  # refuses exactly the prompts that contain "bomb", via u
    for layer in range(model.n_layers):  # Llama Scope format; latent 0 is the planted refusal feature
        add_llama_scope(hub, layer, d_in=model.d_model, d_sae=256, seed=layer, plant=u)
    cfg, summary = _run_preset(tmp_path, "paper_llama31", model.lm._module, model.tokenizer,
                               ["model.n_layers=3", "model.d_model=64"])  # fmt: skip
    assert (cfg.sae.release, cfg.sae.sae_id, cfg.search.coefficient) == (
        "llama_scope_lxr_8x",
        "l{layer}r_8x",
        -1.0,
    )
    _check_planted_refusal_found(tmp_path / "run", summary, "neuronpedia.org/llama3.1-8b/")


@pytest.mark.slow
def test_paper_gemma2_preset_runs_end_to_end_on_a_tiny_gemma2(tmp_path, hub):
    hf, tok, u = planted_gemma2()
    # the 65k canonical SAE of layer 0 (sae-lens maps the id to this average_l0 folder)
    add_gemma_scope(hub, 0, "layer_0/width_65k/average_l0_73", d_sae=65536, plant=u)
    cfg, summary = _run_preset(tmp_path, "paper_gemma2", hf, tok, ["model.n_layers=2", "sae.layers=[0]"])
    assert (cfg.sae.release, cfg.sae.sae_id, cfg.model.d_model) == (
        "gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_65k/canonical", 2304)  # fmt: skip
    assert cfg.search.coefficient == -3.0
    _check_planted_refusal_found(tmp_path / "run", summary, "neuronpedia.org/gemma-2-2b/0-gemmascope-res-65k")
