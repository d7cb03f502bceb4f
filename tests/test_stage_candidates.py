"""Stage 1b (candidate features) against planted truth: an SAE latent whose decoder row is the
refusal direction ranks first with cosine 1, and ablating the candidate set jailbreaks the
planted-refusal model (see test_stage_direction.py) — while a no-op coefficient does not."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from test_stage_direction import load_small_organism, planted_prompts, planted_refusal_model
from tiny import random_jumprelu_sae

from refusal_nnsight.artifacts import StageDir
from refusal_nnsight.config import CandidatesConfig, DirectionConfig, SAEConfig
from refusal_nnsight.saes import LoadedSAEs
from refusal_nnsight.stages import candidates as stage
from refusal_nnsight.stages import direction
from refusal_nnsight.stages.candidates import CandidatesResult, cosine_table, top_cosine_features

PLANTED = 77  # the latent of the layer-0 SAE that reads and writes the refusal direction


def test_planted_decoder_row_ranks_first():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, generator=g)
    W = torch.randn(512, 64, generator=g)
    W[123] = 3.0 * r / r.norm()  # any positive scale: cosine ignores row norms
    W[7] = -r  # anti-aligned rows rank last, not first
    idx, cos = top_cosine_features(r, W, k=10)
    assert idx[0] == 123 and cos[0] == pytest.approx(1.0, abs=1e-6)
    assert 7 not in idx.tolist() and (cos[:-1] >= cos[1:]).all()
    brute = torch.nn.functional.cosine_similarity(W.double(), r.double()[None], dim=-1)
    assert torch.allclose(cos.double(), brute[idx], atol=1e-6)
    assert len(top_cosine_features(r, W[:4], k=10)[0]) == 4  # k larger than the SAE: every row


def planted_saes(u: torch.Tensor, neuronpedia: str | None = None) -> LoadedSAEs:
    saes = {layer: random_jumprelu_sae(u.numel(), 256, layer, seed=layer) for layer in range(3)}
    with torch.no_grad():
        sae = saes[0]
        sae.W_dec[PLANTED] = u
        sae.W_enc[:, PLANTED] = u  # f = x·u: the latent carries exactly the refusal component
        sae.b_enc[PLANTED] = 0.0
        sae.threshold[PLANTED] = 0.01
    return LoadedSAEs(SAEConfig(neuronpedia=neuronpedia), saes)


def test_cosine_table_finds_the_planted_feature_per_layer():
    u = torch.randn(64, generator=torch.Generator().manual_seed(5))
    table = cosine_table(u * 4, planted_saes(u / u.norm(), neuronpedia="tiny/{layer}-res"), k=3)
    assert table.height == 9 and table["rank_in_layer"].to_list() == [0, 1, 2] * 3
    top = table.row(0, named=True)
    assert (top["layer"], top["feature"], top["rank_in_layer"]) == (0, PLANTED, 0)
    assert top["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert table.filter(pl.col("layer") > 0)["cosine"].max() < 0.9  # random rows are not aligned
    assert top["neuronpedia"] == f"https://www.neuronpedia.org/tiny/0-res/{PLANTED}"


@pytest.fixture(scope="module")
def planted_stage1(tmp_path_factory):
    model, u = planted_refusal_model()
    root = tmp_path_factory.mktemp("run")
    prompts = planted_prompts()
    result = direction.run(model, prompts, DirectionConfig(batch_size=4), StageDir(root, "direction"))
    return model, planted_saes(u), result, prompts, root


def test_ablating_candidates_jailbreaks_the_planted_model(planted_stage1):
    model, saes, d, prompts, root = planted_stage1
    out = StageDir(root, "candidates")
    cfg = CandidatesConfig(top_k=4, coefficient=-3.0, batch_size=3)
    result = stage.run(model, saes, d, prompts, cfg, out)
    result.save(out)
    s = result.summary()
    assert result.features[0] == (0, PLANTED) and s["n_features"] == 12
    assert s["cosine_max"] == pytest.approx(1.0, abs=1e-4)
    assert result.refused == [0, 1, 2, 3] and s["n_refused_eval"] == 4
    assert s["all_ablated_score_jailbreak_rate"] == 1.0 and s["n_not_jailbroken"] == 0
    back = CandidatesResult.load(out)
    assert out.finished and back.table.equals(result.table) and back.prompts.equals(result.prompts)
    assert back.summary() == s and back.features == result.features


def test_a_noop_coefficient_is_reported_as_not_jailbroken(planted_stage1, tmp_path):
    model, saes, d, prompts, _ = planted_stage1
    result = stage.run(
        model, saes, d, prompts, CandidatesConfig(top_k=2, coefficient=1.0), StageDir(tmp_path, "candidates")
    )
    p = result.prompts
    assert torch.allclose(torch.tensor(p["all_ablated_score"]), torch.tensor(p["clean_score"]), atol=1e-4)
    assert result.summary()["all_ablated_score_jailbreak_rate"] == 0.0
    assert result.summary()["n_not_jailbroken"] == 4


def test_organism_candidates_jailbreak_at_minus_three(request, tmp_path):
    """Small organism: ablating the top-10-per-layer candidates at c = −3 jailbreaks ≥ 90% of the
    refused harmful eval prompts (measured 100%; c = −1 gives 6–73%, c = 0 none)."""
    model, prompts = load_small_organism(request)
    from refusal_nnsight.saes import load_saes

    d = direction.run(model, prompts, DirectionConfig(), StageDir(tmp_path, "direction"))
    result = stage.run(
        model, load_saes(SAEConfig(), model), d, prompts, CandidatesConfig(), StageDir(tmp_path, "candidates")
    )
    s = result.summary()
    assert s["n_features"] == 10 * model.n_layers and s["n_refused_eval"] > 0
    assert s["all_ablated_score_jailbreak_rate"] >= 0.9
