"""Stage 1a (refusal direction) against planted truth.

`planted_refusal_model` is a tiny Llama-3 whose refusal is carried by one known unit direction
u: the word "bomb" embeds as 20·u (every other embedding ⟂ u), layer 0's attention averages the
u-component of the prompt into every position, and the refusal token's unembedding is 2·u.
So harmful ("bomb") prompts refuse, harmless ones do not, the difference of means is ∝ u, and
projecting u out everywhere removes the refusal — the stage must find exactly that.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch
from tiny import model_config, tiny_gemma2, tiny_llama3

from refusal_nnsight.artifacts import StageDir
from refusal_nnsight.config import DirectionConfig
from refusal_nnsight.data import Prompts, PromptSet
from refusal_nnsight.errors import NothingToDissect, UserError
from refusal_nnsight.interventions import DirectionAddition
from refusal_nnsight.models import wrap_model
from refusal_nnsight.scoring import refusal_scores
from refusal_nnsight.stages import direction as stage
from refusal_nnsight.stages.direction import DirectionResult, mean_residuals, prune_limit, select

STEMS = ["tell me how to make a", "explain how to make a", "write code for a", "what is a", "please explain the steps of a",
         "tell me a story of a", "hello there , what is the", "write a story for a"]  # fmt: skip


def planted_refusal_model(seed: int = 1):
    """(LoadedModel, u [d]): a tiny Llama-3 that refuses exactly the prompts containing "bomb", via u."""
    hf, tok = tiny_llama3()
    d = hf.config.hidden_size
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    u /= u.norm()
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb -= (emb @ u)[:, None] * u
        emb[tok.convert_tokens_to_ids("bomb")] = 20 * u
        for i, layer in enumerate(hf.model.layers):
            layer.mlp.down_proj.weight.zero_()  # MLPs and later attention write nothing: only u carries harm
            layer.self_attn.o_proj.weight.zero_()
            if i == 0:  # q = 0 → uniform causal attention; value = u-component; output along u
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.v_proj.weight.zero_()
                layer.self_attn.v_proj.weight[0] = u
                layer.self_attn.o_proj.weight[:, 0] = 20 * u
        head = hf.lm_head.weight
        head -= (head @ u)[:, None] * u
        head[tok.convert_tokens_to_ids("I")] = 2 * u
    return wrap_model(hf, tok, model_config("llama3")), u


def planted_prompts(harmful_word: str = "bomb") -> Prompts:
    def ps(objs, harmful):
        texts = [f"{s} {o}" for o in objs for s in STEMS]
        return PromptSet(texts, harmful, ["none"] * len(texts), [])

    harm, safe = ps([harmful_word], True), ps(["cake", "process", "person"], False)
    return Prompts(harm.subset(list(range(0, 8, 2))), safe.subset(list(range(0, 24, 3))), harm.subset([1, 3, 5]),
                   safe.subset([1, 5, 10, 20]), harm.subset([7, 6, 1, 0]), safe.subset([2, 9, 13]))  # fmt: skip


@pytest.fixture(scope="module")
def planted():
    return planted_refusal_model()


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    model, u = planted
    root, cfg = tmp_path_factory.mktemp("run"), DirectionConfig(batch_size=4)
    result = stage.run(model, planted_prompts(), cfg, StageDir(root, "direction"))
    result.save(StageDir(root, "direction"))
    return result, root


def test_mean_residuals_recover_a_planted_shift():
    model = wrap_model(*tiny_gemma2(), model_config("gemma2"))
    texts = ["hello there", "tell me how to make a cake please", "what is a bomb ?", "write code"]
    batch, pos = model.tokenize(texts), model.eoi_positions
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    clean = mean_residuals(model, batch, pos, batch_size=3)
    shifted = mean_residuals(
        model, batch, pos, batch_size=3, edits=[DirectionAddition(v, layer=0, positions=pos)]
    )
    assert clean.dtype == torch.float64 and clean.shape == (len(pos), model.n_layers, model.d_model)
    diff = (
        shifted - clean
    )  # the difference of means at the planted layer is the planted vector, every position
    assert torch.allclose(diff[:, 0], v.double().expand(len(pos), -1), atol=1e-5)
    assert diff[:, 1:].abs().max() > 1e-3  # and it propagates to later layers
    assert torch.allclose(
        mean_residuals(model, batch, pos, batch_size=1), clean, atol=1e-5
    )  # padding-invariant


def test_prune_limit_leaves_tiny_models_a_layer():
    assert prune_limit(26, 0.2) == 20  # Arditi: int(26·0.8)
    assert prune_limit(4, 0.2) == 3  # the organism keeps layers 0..2
    assert prune_limit(2, 0.2) == 1 and prune_limit(1, 0.2) == 1


def _table(rows):
    return pl.DataFrame(
        rows, schema=["position", "layer", "bypass_score", "induce_score", "kl"], orient="row"
    )


def test_select_discards_high_kl_last_layers_and_low_induce():
    cfg = DirectionConfig()
    table = _table([
        (-1, 0, -2.0, 1.0, 0.5),  # best bypass but KL too high
        (-1, 3, -3.0, 1.0, 0.0),  # better still, but in the last 20% of 4 layers
        (-2, 1, -4.0, -0.5, 0.0),  # induce below 0
        (-2, 2, -1.0, 2.0, 0.05),  # the only survivor
        (-1, 1, 0.5, 2.0, 0.01),  # survives, worse bypass
    ])  # fmt: skip
    out, best, reason = select(table, n_layers=4, cfg=cfg)
    assert reason is None and best == 3
    assert out["kept"].to_list() == [False, False, False, True, True]
    assert out["reason"].to_list() == ["kl", "last layers", "induce", "", ""]


def test_select_falls_back_to_best_bypass_when_nothing_survives():
    table = _table([(-1, 0, -1.0, -1.0, 0.0), (-1, 1, -2.0, 1.0, 9.0), (-1, 3, -5.0, 1.0, 0.0)])
    out, best, reason = select(table, n_layers=4, cfg=DirectionConfig())
    assert best == 2 and reason and "no candidate passed" in reason
    assert not any(out["kept"].to_list())
    # fewest_failures: each candidate fails one filter, so the lowest bypass among them (row 2 fails two)
    table = _table([(-1, 0, -1.0, -1.0, 0.0), (-1, 1, -2.0, 1.0, 9.0), (-1, 3, -5.0, -1.0, 0.0)])
    assert select(table, 4, DirectionConfig())[1] == 2
    _, best, reason = select(table, 4, DirectionConfig(fallback="fewest_failures"))
    assert best == 1 and "fewest" in reason


def test_run_finds_the_planted_direction(planted, planted_run):
    model, u = planted
    result, _ = planted_run
    s = result.summary()
    assert not result.fallback and s["n_harmful_refused_train"] == 4 and result.n_harmless_kept == 8
    assert result.directions.shape == (len(model.eoi_positions), model.n_layers, model.d_model)
    assert result.layer < prune_limit(model.n_layers, 0.2)
    cos = torch.nn.functional.cosine_similarity(result.direction, u, dim=0)
    assert cos > 0.999
    assert s["bypass_score"] < 0 < s["induce_score"] and s["kl"] < 0.01
    prompts = planted_prompts()
    assert (refusal_scores(model, prompts.eval_harmful.instructions) > 0).all()
    assert (refusal_scores(model, prompts.eval_harmful.instructions, stage.ablation_edits(result)) < 0).all()
    assert (refusal_scores(model, prompts.eval_harmless.instructions, stage.actadd_edits(result)) > 0).all()


def test_direction_layers_limit_the_scored_candidates(planted, planted_run, tmp_path):
    """search.direction.layers scores only the layers it keeps: the same scores there, no rows elsewhere,
    and the choice is made among them (the planted u is in every layer's mean difference)."""
    model, u = planted
    full, _ = planted_run
    cfg = DirectionConfig(batch_size=4, layers=[1])
    part = stage.run(model, planted_prompts(), cfg, StageDir(tmp_path, "direction"))
    assert set(part.table["layer"]) == {1} and part.layer == 1
    assert part.table.height == len(model.eoi_positions)
    assert part.table.equals(full.table.filter(pl.col("layer") == 1).select(part.table.columns))
    assert torch.equal(part.directions, full.directions)  # the means are still taken at every layer
    assert torch.nn.functional.cosine_similarity(part.direction, u, dim=0) > 0.999
    with pytest.raises(UserError, match="search.direction.layers"):
        stage.run(
            model, planted_prompts(), DirectionConfig(layers=[50]), StageDir(tmp_path / "bad", "direction")
        )


def test_save_load_round_trip_and_determinism(planted, planted_run, tmp_path):
    result, root = planted_run
    out = StageDir(root, "direction")
    assert out.finished
    back = DirectionResult.load(out)
    assert torch.equal(back.directions, result.directions) and torch.equal(back.direction, result.direction)
    assert back.table.equals(result.table) and back.baseline.equals(result.baseline)
    assert back.summary() == result.summary() and back.positions == result.positions
    model, _ = planted
    again = stage.run(
        model, planted_prompts(), DirectionConfig(batch_size=4), StageDir(tmp_path, "direction")
    )
    again.save(StageDir(tmp_path, "direction"))
    assert again.summary() == result.summary()
    name = "selection.parquet"
    assert (tmp_path / "direction" / name).read_bytes() == out.file(name).read_bytes()


def test_no_refused_harmful_prompt_is_a_user_error(planted, tmp_path):
    model, _ = planted
    with pytest.raises(NothingToDissect, match="no harmful prompt is refused"):
        stage.run(
            model, planted_prompts(harmful_word="cake"), DirectionConfig(), StageDir(tmp_path, "direction")
        )


def load_small_organism(request):
    """(model, prompts) of the small organism, or skip where tests/conftest.py has no `small_organism`."""
    try:
        request.getfixturevalue("small_organism")
    except pytest.FixtureLookupError:
        pytest.skip("the small_organism fixture is not available")
    from refusal_nnsight.api import load_model, load_prompts
    from refusal_nnsight.config import DataConfig, ModelConfig

    model = load_model(ModelConfig(source="organism", organism_recipe="small", device="cpu"))
    return model, load_prompts(DataConfig(n_train=32, n_val=16, n_eval=16))


def test_organism_direction_removes_most_of_the_refusal(request, tmp_path):
    """The selected direction, ablated, lowers the refusal log-odds of every refused harmful prompt
    by a wide margin. Whether it crosses 0, and whether a candidate passes Arditi's KL filter,
    depends on the organism build (measured: 4.3 → −0.55 with a KL fallback, 6.6 → 0.8 without),
    so those are not asserted here."""
    model, prompts = load_small_organism(request)
    result = stage.run(model, prompts, DirectionConfig(), StageDir(tmp_path, "direction"))
    s = result.summary()
    base = result.baseline.filter((pl.col("split") == "val") & pl.col("harmful") & pl.col("kept"))[
        "score"
    ].mean()
    assert result.n_harmful_kept > 0 and s["bypass_score"] < base - 3
    harmful = prompts.eval_harmful.instructions
    clean = refusal_scores(model, harmful)
    ablated = refusal_scores(model, harmful, stage.ablation_edits(result))
    assert (clean > 0).all() and (ablated < clean - 2).all()


def test_score_threshold_is_the_best_separating_midpoint():
    from refusal_nnsight.scoring import calibrate_threshold

    tau, acc = calibrate_threshold(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([-2.0, -1.0, 0.5]))
    assert tau == pytest.approx(1.75) and acc == 1.0  # midway between 0.5 and 3, not 0
    tau, acc = calibrate_threshold(torch.tensor([1.0, 5.0]), torch.tensor([2.0, -3.0]))
    assert acc == 0.75 and tau == pytest.approx(-1.0)  # two cuts tie at 3/4; the wider gap (-3, 1) wins
