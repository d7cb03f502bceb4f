"""Stage 1b (candidate features) against planted truth: an SAE latent whose decoder row is the
refusal direction ranks first with cosine 1, and ablating the candidate set jailbreaks the
planted-refusal model (see test_stage_direction.py) — while a no-op coefficient does not."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch
from test_stage_direction import load_small_organism, planted_prompts, planted_refusal_model
from tiny import random_jumprelu_sae

from refusal_nnsight.artifacts import StageDir, write_parquet
from refusal_nnsight.config import CandidatesConfig, DirectionConfig, SAEConfig
from refusal_nnsight.errors import UserError
from refusal_nnsight.report import found_sentences
from refusal_nnsight.saes import LoadedSAEs
from refusal_nnsight.scoring import Criterion
from refusal_nnsight.stages import candidates as stage
from refusal_nnsight.stages import direction
from refusal_nnsight.stages.candidates import CandidatesResult, cosine_table, top_cosine_features
from refusal_nnsight.stages.direction import select_layers

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
    cfg = CandidatesConfig(top_k=4, batch_size=3)
    result = stage.run(model, saes, d, prompts, cfg, out, -3.0, Criterion("score", d.score_threshold))
    result.save(out)
    s = result.summary()
    assert result.features[0] == (0, PLANTED) and s["n_features"] == 12
    assert s["cosine_max"] == pytest.approx(1.0, abs=1e-4)
    assert result.refused == [0, 1, 2, 3] and s["n_refused_eval"] == 4
    assert s["all_ablated_flip_rate"] == 1.0 and s["n_not_flipped"] == 0 and s["all_ablated_flip_rate_n"] == 4
    assert (s["coefficient"], s["criterion"], s["layers"]) == (-3.0, "score", [0, 1, 2])
    back = CandidatesResult.load(out)
    assert out.finished and back.table.equals(result.table) and back.prompts.equals(result.prompts)
    assert back.summary() == s and back.features == result.features


def test_a_noop_coefficient_is_reported_as_not_jailbroken(planted_stage1, tmp_path):
    model, saes, d, prompts, _ = planted_stage1
    flip = Criterion("score", d.score_threshold)
    result = stage.run(
        model, saes, d, prompts, CandidatesConfig(top_k=2), StageDir(tmp_path, "candidates"), 1.0, flip
    )
    p = result.prompts
    assert torch.allclose(torch.tensor(p["all_ablated_score"]), torch.tensor(p["clean_score"]), atol=1e-4)
    assert result.summary()["all_ablated_flip_rate"] == 0.0
    assert result.summary()["n_not_flipped"] == 4


def test_an_unknown_criterion_is_a_user_error_before_any_forward_pass():
    """A library caller's typo (the CLI checks the config) is said in one line with the choices,
    not as the judge criterion's "decided on generations" error after the model has run."""
    with pytest.raises(UserError, match="criterion='first-token': use one of score, first_token, judge"):
        Criterion("first-token")
    assert [Criterion(name).name for name in ("score", "first_token", "judge")] == [
        "score",
        "first_token",
        "judge",
    ]


def test_the_criterion_decides_refused_and_flipped(planted_stage1, tmp_path):
    """refused / jailbroken follow the criterion's own margins: the first-token margin's sign,
    or the refusal score against τ (a τ above every score calls every prompt flipped)."""
    model, saes, d, prompts, _ = planted_stage1
    cfg = CandidatesConfig(top_k=2)
    ft = stage.run(
        model, saes, d, prompts, cfg, StageDir(tmp_path, "candidates"), -3.0, Criterion("first_token")
    )
    p = ft.prompts
    assert p["refused"].to_list() == (p["clean_first_token_margin"] > 0).to_list()
    assert p["jailbroken"].to_list() == (p["all_ablated_first_token_margin"] < 0).to_list()
    high = stage.run(
        model, saes, d, prompts, cfg, StageDir(tmp_path, "candidates"), -3.0, Criterion("score", 1e6)
    )
    assert high.refused == [] and high.summary()["all_ablated_flip_rate"] is None


def test_no_refused_prompt_gives_nulls_with_reasons(planted_stage1, tmp_path):
    """Empty case: harmless prompts in the harmful eval slot; nothing is refused at baseline, so
    the flip rate is not measured: None, not 0, with its reason."""
    model, saes, d, prompts, _ = planted_stage1
    swapped = dataclasses.replace(prompts, eval_harmful=prompts.eval_harmless)
    flip = Criterion("score", d.score_threshold)
    result = stage.run(model, saes, d, swapped, CandidatesConfig(top_k=2), StageDir(tmp_path, "candidates"),
                       -3.0, flip)  # fmt: skip
    s = result.summary()
    assert s["n_refused_eval"] == 0 and s["all_ablated_flip_rate"] is None and s["n_not_flipped"] is None
    assert "refused at baseline" in result.notes["all_ablated_flip_rate"]


def test_layer_selection_list_range_and_before_last_fraction(planted_stage1, tmp_path):
    sae_layers = [0, 2, 3, 5, 7, 9]
    key = "search.candidates.layers"
    assert select_layers(None, sae_layers, 10, key) == sae_layers
    assert select_layers([2, 5, 6], sae_layers, 10, key) == [2, 5]  # layers without an SAE are dropped
    assert select_layers({"start": 2.0, "stop": 6.0}, sae_layers, 10, key) == [2, 3, 5]
    assert select_layers({"before_last_fraction": 0.2}, sae_layers, 10, key) == [0, 2, 3, 5, 7]  # Arditi: < 8
    assert select_layers({"before_layer": 4.0}, sae_layers, 10, key) == [0, 2, 3]
    with pytest.raises(UserError, match=r"search.candidates.layers=\[1\] keeps none"):
        select_layers([1], sae_layers, 10, key)
    model, saes, d, prompts, _ = planted_stage1  # 3 layers: before_last_fraction 0.4 keeps layer 0
    result = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=2, layers={"before_last_fraction": 0.4}),
                       StageDir(tmp_path, "candidates"), -3.0, Criterion("score", d.score_threshold))  # fmt: skip
    assert set(result.table["layer"]) == {0} and result.summary()["layers"] == [0]


def test_organism_candidates_jailbreak_at_minus_three(request, tmp_path):
    """Small organism: ablating the top-10-per-layer candidates at c = −3 jailbreaks ≥ 90% of the
    refused harmful eval prompts (measured 100%; c = −1 gives 6–73%, c = 0 none)."""
    model, prompts = load_small_organism(request)
    from refusal_nnsight.api import load_saes

    d = direction.run(model, prompts, DirectionConfig(), StageDir(tmp_path, "direction"))
    saes = load_saes(model, SAEConfig())
    result = stage.run(model, saes, d, prompts, CandidatesConfig(), StageDir(tmp_path, "candidates"), -3.0,
                       Criterion("first_token"))  # fmt: skip
    s = result.summary()
    assert s["n_features"] == 10 * len(saes.layers) and s["n_refused_eval"] > 0
    assert s["all_ablated_flip_rate"] >= 0.9


def test_search_harm_preset_and_one_coefficient():
    """search=harm restricts candidates to the layers before the last 20% (Arditi's pruning); the
    coefficient is one search.coefficient, set once (paper_llama31: -1) and no stage carries its own."""
    from refusal_nnsight.cli import compose

    harm = compose(["search=harm"]).search
    assert harm.candidates.layers == {"before_last_fraction": 0.2}
    assert select_layers(harm.candidates.layers, list(range(26)), 26, "h") == list(range(20))  # Gemma-2: 0–19
    llama = compose(["experiment=paper_llama31"]).search
    assert llama.coefficient == -1.0
    for name in ("candidates", "greedy", "fm", "redundancy", "evaluate"):
        assert not hasattr(getattr(llama, name), "coefficient"), name
    assert compose().search.greedy.criterion == "first_token"  # agrees with the judge most often (greedy)


def test_per_layer_check_finds_the_layer_that_carries_refusal(planted_stage1, tmp_path):
    """Planted truth: only layer 0's SAE has a latent along the refusal direction. Its candidates
    alone flip every refused prompt, all but its flip none; each row is the all-of-C check of
    that subset (the same flips as a run that searches only those layers)."""
    model, _, d, prompts, _ = planted_stage1
    u = d.direction / d.direction.norm()
    saes = planted_saes(u)
    with torch.no_grad():
        for layer in (1, 2):  # no latent of these layers writes along the refusal direction
            w = saes[layer].W_dec
            w -= (w @ u)[:, None] * u
    flip = Criterion("score", d.score_threshold)
    out = StageDir(tmp_path, "candidates")
    result = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4, per_layer=True), out, -3.0, flip)
    result.save(out)
    s = result.summary()
    assert s["layer_alone_flip_rate"] == {"0": 1.0, "1": 0.0, "2": 0.0}
    assert s["layer_without_flip_rate"] == {"0": 0.0, "1": 1.0, "2": 1.0}
    assert (
        result.by_layer["n_features"].to_list() == [4, 4, 4]
        and result.by_layer["n_refused"].to_list() == [4] * 3
    )
    only_12 = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4, layers=[1, 2]),
                        StageDir(tmp_path / "c12", "candidates"), -3.0, flip)  # fmt: skip
    assert only_12.summary()["all_ablated_flip_rate"] == s["layer_without_flip_rate"]["0"]
    back = CandidatesResult.load(out)
    assert back.by_layer is not None and back.by_layer.equals(result.by_layer) and back.summary() == s
    assert "layer_kept_activation" not in back.notes  # measured: no reason needed
    # a folder saved before the kept activation existed: null, with the reason beside it
    write_parquet(out.file("layers.parquet"), result.by_layer.drop("kept_activation"))
    older = CandidatesResult.load(out)
    assert older.summary()["layer_kept_activation"] is None
    assert "saved before the kept activation was measured" in older.notes["layer_kept_activation"]
    text = "\n".join(found_sentences({"candidates": s}, {}, None))
    assert "layer 0 4 of 4 (1) alone, 0 of 4 (0) without it" in text
    # off (the default), or one layer searched: not measured, with the reason
    off = stage.run(
        model,
        saes,
        d,
        prompts,
        CandidatesConfig(top_k=4),
        StageDir(tmp_path / "off", "candidates"),
        -3.0,
        flip,
    )
    assert (
        off.summary()["layer_alone_flip_rate"] is None
        and "per_layer is off" in off.notes["layer_alone_flip_rate"]
    )
    one = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4, layers=[0], per_layer=True),
                    StageDir(tmp_path / "one", "candidates"), -3.0, flip)  # fmt: skip
    assert one.by_layer is None and "one SAE layer" in one.notes["layer_without_flip_rate"]
    assert one.summary()["layer_alone_jailbreak_rate"] is None
    assert "one SAE layer" in one.notes["layer_alone_jailbreak_rate"]
    # without a judge the variants are not generated: no jailbreak rate, and the reason
    assert s["layer_alone_jailbreak_rate"] is None and s["layer_jailbreak_rate_n"] is None
    assert "no judge was given" in back.notes["layer_without_jailbreak_rate"]


class _ScriptedJudge:
    """The clean run's generations: every prompt refused but #1. Every later call (an edited
    variant): only #0 still refused. So the judge and the criterion part on #1 (clean) and #0."""

    name = "scripted"

    def __init__(self):
        self.calls = 0

    def refused(self, prompts, completions):
        self.calls += 1
        n = len(completions)
        return [i != 1 for i in range(n)] if self.calls == 1 else [i == 0 for i in range(n)]


def test_per_layer_jailbreaks_count_where_the_judge_and_the_criterion_agree(planted_stage1, tmp_path):
    """Planted truth as above (layer 0's candidates carry refusal). The criterion flips all 4
    refused prompts with layer 0 ablated; the judge read #1 as answered on the clean run (out of
    the base: 3 prompts) and #0 as still refused, so layer 0 alone jailbreaks 2 of 3."""
    model, _, d, prompts, _ = planted_stage1
    u = d.direction / d.direction.norm()
    saes = planted_saes(u)
    with torch.no_grad():
        for layer in (1, 2):
            w = saes[layer].W_dec
            w -= (w @ u)[:, None] * u
    judge = _ScriptedJudge()
    out = StageDir(tmp_path, "candidates")
    result = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4, per_layer=True), out, -3.0,
                       Criterion("score", d.score_threshold), judge)  # fmt: skip
    result.save(out)
    s = result.summary()
    assert judge.calls == 1 + 6  # the clean run and each distinct variant, judged once
    assert s["layer_alone_flip_rate"] == {"0": 1.0, "1": 0.0, "2": 0.0}  # the criterion's, unchanged
    assert s["layer_jailbreak_rate_n"] == 3
    assert s["layer_alone_jailbreak_rate"] == {"0": pytest.approx(2 / 3), "1": 0.0, "2": 0.0}
    assert s["layer_without_jailbreak_rate"] == {
        "0": 0.0,
        "1": pytest.approx(2 / 3),
        "2": pytest.approx(2 / 3),
    }
    assert CandidatesResult.load(out).summary() == s
    text = "\n".join(found_sentences({"candidates": s}, {}, None))
    assert (
        "of the 3 both read as refused on the clean run: layer 0 2 of 3 (0.6667) alone, 0 of 3 (0) without it"
        in text
    )
    agreed = s | {"layer_jailbreak_rate_n": 4, "layer_alone_jailbreak_rate": s["layer_alone_flip_rate"],
                  "layer_without_jailbreak_rate": s["layer_without_flip_rate"]}  # fmt: skip
    text = "\n".join(found_sentences({"candidates": agreed}, {}, None))
    assert "these variants jailbreak the same prompts" in text and "both read as refused" not in text
    # a folder saved before the variants were judged: null, with the reason beside it
    write_parquet(out.file("layers.parquet"),
                  result.by_layer.drop("n_refused_judged", "alone_jailbreak_rate", "without_jailbreak_rate"))  # fmt: skip
    older = CandidatesResult.load(out)
    assert older.summary()["layer_alone_jailbreak_rate"] is None
    assert "saved before the per-layer variants were judged" in older.notes["layer_jailbreak_rate_n"]
    assert older.summary()["layer_alone_flip_rate"] == s["layer_alone_flip_rate"]
    # per_layer_judged off: nothing generated, the criterion's rates unchanged, the judged ones null
    unjudged = _ScriptedJudge()
    off = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4, per_layer=True, per_layer_judged=False),
                    StageDir(tmp_path / "off", "candidates"), -3.0, Criterion("score", d.score_threshold),
                    unjudged)  # fmt: skip
    assert unjudged.calls == 0
    assert off.summary()["layer_alone_flip_rate"] == s["layer_alone_flip_rate"]
    assert off.summary()["layer_alone_jailbreak_rate"] is None
    assert "per_layer_judged is off" in off.notes["layer_jailbreak_rate_n"]


def test_kept_activation_shows_the_edits_below_silencing_a_layer(planted_stage1, tmp_path):
    """Planted truth: layers 0 and 1 each hold a latent that reads and writes the refusal
    direction. Steered at -3 at layer 0, the refusal component that layer 1's latent reads turns
    negative, so with all of C ablated it keeps ~none of its clean activation and its own edit has
    nothing to scale, while layer 0, with nothing edited below it, keeps exactly all of its own.
    Each layer is read before its own edit: read after it, layer 0 would read its steered value."""
    model, _, d, prompts, _ = planted_stage1
    u = d.direction / d.direction.norm()
    saes = planted_saes(u)
    with torch.no_grad():
        sae = saes[1]
        sae.W_dec -= (sae.W_dec @ u)[:, None] * u  # only the planted latent lies along the direction
        sae.W_dec[PLANTED], sae.W_enc[:, PLANTED] = u, u
        sae.b_enc[PLANTED], sae.threshold[PLANTED] = 0.0, 0.01
    flip = Criterion("score", d.score_threshold)
    cfg = CandidatesConfig(top_k=1, per_layer=True)
    result = stage.run(model, saes, d, prompts, cfg, StageDir(tmp_path, "candidates"), -3.0, flip)
    assert result.features[:2] == [(0, PLANTED), (1, PLANTED)]
    kept = result.summary()["layer_kept_activation"]
    assert kept["0"] == 1.0 and kept["1"] < 0.05, kept
    text = "\n".join(found_sentences({"candidates": result.summary()}, {}, None))
    assert "layer 0 1.00; layer 1 0.00;" in text and "silence the candidates of layers 1 and 2:" in text
    # a no-op coefficient edits nothing: every layer keeps all of its activation
    same = stage.run(model, saes, d, prompts, cfg, StageDir(tmp_path / "noop", "candidates"), 1.0, flip)
    assert all(v == pytest.approx(1.0) for v in same.summary()["layer_kept_activation"].values())


def test_null_separates_planted_alignment_from_rank():
    """Planted truth: three decoder rows along r̂ (cosines 0.9, 0.7, 0.6) among 509 random rows in
    64 dimensions. Those three stand out from random directions' closest latents; the rows ranked
    after them are the best of the random rest, as close as any direction's closest latent, so they
    do not. A direction carrying no information finds none."""
    from refusal_nnsight.stages.candidates import NULL_LEVEL, NULL_SEED, null_cosines, null_p

    g = torch.Generator().manual_seed(3)
    r = torch.randn(64, generator=g)
    r = r / r.norm()
    W = torch.randn(512, 64, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    for row, c in ((11, 0.9), (200, 0.7), (401, 0.6)):
        off = W[row] - (W[row] @ r) * r
        W[row] = c * r + (1 - c * c) ** 0.5 * off / off.norm()
    idx, cos = top_cosine_features(r, W, k=10)
    assert idx[:3].tolist() == [11, 200, 401]
    null = null_cosines(W, 256)
    assert null.shape == (256,) and 0.3 < float(null.median()) < 0.6
    p = null_p(cos, null)
    assert (p[:3] <= NULL_LEVEL).all() and p[:3].max() == pytest.approx(1 / 257)
    assert (p[3:] > NULL_LEVEL).all() and (p[:-1] <= p[1:]).all(), p  # monotone in the cosine
    noise = torch.randn(64, generator=torch.Generator().manual_seed(99))
    _, cos0 = top_cosine_features(noise, W, k=10)
    assert (null_p(cos0, null) > NULL_LEVEL).all()
    # the chunked product is the whole one
    rand = torch.randn(256, 64, generator=torch.Generator().manual_seed(NULL_SEED))
    whole = (W @ (rand / rand.norm(dim=-1, keepdim=True)).T).amax(dim=0)
    assert torch.allclose(null, whole, atol=1e-6)


def test_beyond_null_per_layer_in_the_summary_report_and_old_folders(planted_stage1, tmp_path):
    """The planted latent (cosine 1 with r̂) is the one candidate of layer 0 beyond the null; the
    random SAEs of layers 1-2 hold none. Off (0 directions) or read from a folder saved before
    the column, the figure is null with the reason."""
    model, planted, d, prompts, _ = planted_stage1
    # layer 1's SAE of the fixture draws its rows from seed 1, as the planted direction does: its
    # first row is r̂ itself. Another draw keeps layer 1 random (seed 12: the closest random row of
    # seed 11 is one of the 5% a null at level 0.05 calls aligned, p = 0.012; the calibration test
    # below checks that rate)
    layers = {0: planted[0], 1: random_jumprelu_sae(d.direction.numel(), 256, 1, seed=12), 2: planted[2]}
    saes = LoadedSAEs(SAEConfig(), layers)
    flip = Criterion("score", d.score_threshold)
    out = StageDir(tmp_path, "candidates")
    result = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4), out, -3.0, flip)
    assert result.table["null_p"][0] == pytest.approx(1 / 257)
    assert result.summary()["layer_beyond_null"] == {"0": 1, "1": 0, "2": 0}
    text = "\n".join(found_sentences({"candidates": result.summary()}, {"candidates": result}, None))
    assert "layer 0 1 of 4; layer 1 0 of 4; layer 2 0 of 4" in text
    off = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=4, null_directions=0),
                    StageDir(tmp_path / "off", "candidates"), -3.0, flip)  # fmt: skip
    assert off.summary()["layer_beyond_null"] is None and "null_directions" in off.notes["layer_beyond_null"]
    result.save(out)
    write_parquet(out.file("candidates.parquet"), result.table.drop("null_p"))
    old = CandidatesResult.load(out)
    assert old.summary()["layer_beyond_null"] is None and "saved before" in old.notes["layer_beyond_null"]


def test_the_null_is_calibrated_on_random_directions():
    """For directions that carry no information, the first candidate is beyond the null about as
    often as the level says (5%), on a wide and a narrow random SAE alike."""
    from refusal_nnsight.stages.candidates import NULL_LEVEL, null_cosines, null_p

    for d_in, width in ((64, 512), (16, 2048)):
        W = random_jumprelu_sae(d_in, width, 0, seed=4).W_dec.detach()
        null = null_cosines(W, 512)
        dirs = torch.randn(400, d_in, generator=torch.Generator().manual_seed(8))
        first = torch.stack([top_cosine_features(r, W, k=1)[1][0] for r in dirs])
        rate = float((null_p(first, null) <= NULL_LEVEL).double().mean())
        assert 0.02 <= rate <= 0.09, (d_in, width, rate)


def test_min_active_ranks_only_latents_that_fire_and_n_silent_counts_the_rest(planted_stage1, tmp_path):
    """Planted truth: a dead latent of layer 0 whose decoder row is the refusal direction itself
    (as a trained SAE's dead latents can point along r̂) ranks first by cosine and edits nothing.
    Ranked over every latent (the paper's ranking, min_active=0) it takes layer 0's one place, and
    n_silent counts it; with min_active=1 only latents that fire on a harmful train prompt are
    ranked, and the planted refusal latent takes the place."""
    model, _, d, prompts, _ = planted_stage1
    u = d.direction / d.direction.norm()
    saes = planted_saes(u)
    dead = 5  # below PLANTED: at an equal cosine the stable sort puts it first
    with torch.no_grad():
        sae = saes[0]
        sae.W_dec[dead], sae.W_enc[:, dead] = u, -u
        sae.b_enc[dead], sae.threshold[dead] = -100.0, 100.0
    flip = Criterion("score", d.score_threshold)
    every = stage.run(
        model, saes, d, prompts, CandidatesConfig(top_k=1), StageDir(tmp_path, "candidates"), -3.0, flip
    )
    assert every.features[0] == (0, dead) and every.table["active_prompts"][0] == 0
    assert every.summary()["n_silent"] >= 1 and every.summary()["min_active"] == 0
    out = StageDir(tmp_path / "live", "candidates")
    live = stage.run(model, saes, d, prompts, CandidatesConfig(top_k=1, min_active=1), out, -3.0, flip)
    assert live.features[0] == (0, PLANTED) and (0, dead) not in live.features
    assert live.table["active_prompts"][0] == len(prompts.eval_harmful)  # f = x·u fires on every prompt
    assert live.summary()["all_ablated_flip_rate"] == 1.0 and live.summary()["min_active"] == 1
    live.save(out)
    assert CandidatesResult.load(out).summary() == live.summary()
    too_many = CandidatesConfig(top_k=1, min_active=len(prompts.train_harmful) + 1)
    with pytest.raises(UserError, match="exceeds the"):
        stage.run(model, saes, d, prompts, too_many, StageDir(tmp_path / "x", "candidates"), -3.0, flip)


def test_a_folder_saved_before_the_activity_count_reads_n_silent_null_with_a_reason(planted_stage1, tmp_path):
    model, saes, d, prompts, _ = planted_stage1
    out = StageDir(tmp_path, "candidates")
    flip = Criterion("score", d.score_threshold)
    stage.run(model, saes, d, prompts, CandidatesConfig(top_k=1), out, -3.0, flip).save(out)
    path = out.file("candidates.parquet")
    write_parquet(path, pl.read_parquet(path).drop("active_prompts"))  # as a folder saved before
    back = CandidatesResult.load(out)
    assert back.summary()["n_silent"] is None and "n_silent" in back.notes
