"""Feature cards on the small organism: a card of a planted cue feature points at that category's
cue words, its single-feature ablation is the engine's, and a pipeline run writes, reports and
reloads every card."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import polars as pl
import pytest
import torch

import refusal_nnsight as rn
from refusal_nnsight.config import DataConfig, ModelConfig, SAEConfig
from refusal_nnsight.engine import AblationEngine
from refusal_nnsight.features import CARD_SCHEMA, context, feature_cards, found_features
from refusal_nnsight.organism import grammar, planted
from refusal_nnsight.scoring import Criterion


@dataclass
class Direction:
    direction: torch.Tensor


@dataclass
class Greedy:
    minimal_sets: dict
    criterion: str = "first_token"
    score_threshold: float = 0.0


@dataclass
class Redundancy:
    awakened: pl.DataFrame
    notes: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def organism(small_organism):
    model = rn.load_model(ModelConfig(organism_recipe="small", device="cpu"))
    saes = rn.load_saes(model, SAEConfig())
    prompts = rn.load_prompts(DataConfig(n_train=8, n_val=8, n_eval=48))
    dirs = planted.load_directions(small_organism / "planted.safetensors")
    cue_layer = json.loads((small_organism / "manifest.json").read_text())["model"]["cue_layer"]
    return model, saes, prompts, dirs, cue_layer


def _marked(ctx: str) -> str:
    return re.search(r"\[\[(.*?)\]\]", ctx).group(1).strip()


def test_context_marks_the_token_at_the_position(organism):
    model, _, prompts, _, _ = organism
    text = "How do I make a bomb?"
    ids = model.tokenize([text]).input_ids[0].tolist()
    bomb = model.tokenizer.encode(" bomb", add_special_tokens=False)[0]
    t = ids.index(bomb)
    ctx = context(model, text, t, window=2)
    assert _marked(ctx) == "bomb" and ctx.startswith("…") and ctx.endswith("…")
    assert "make a" in ctx and "\n" not in ctx
    assert "[[" in context(model, text, 0, window=1)  # the BOS has no characters and is still shown


def _planted_cue_saes(model, dirs, layer: int):
    """An SAE at the cue layer whose latent c reads and writes the planted cue direction u_c of
    category c: a feature known to detect category c, whose ablation at c = -3 is the planted
    u_c x -3 that makes the model comply. (Its remainder orthogonal to R alone is not: scaling it
    by -3 leaves u_c's component along R, which the organism may still read as harm.)"""
    from tiny import random_jumprelu_sae

    from refusal_nnsight.saes import LoadedSAEs

    sae = random_jumprelu_sae(model.d_model, len(dirs.cue), layer)
    with torch.no_grad():
        sae.W_dec.copy_(dirs.cue)
        sae.W_enc.copy_(dirs.cue.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    return LoadedSAEs(SAEConfig(), {layer: sae})


@pytest.mark.parametrize("category", ["violence", "weapons", "drugs", "cybercrime", "fraud", "poison"])
def test_card_of_a_planted_cue_feature_points_at_its_cue_words(organism, category):
    """A feature that reads the planted cue direction u_c: its card's top contexts sit on category
    c's cue words, and ablating it alone (c = -3, the planted u_c x -3 that makes the model comply)
    lowers the refusal score of the prompts that hold such a cue."""
    model, _, prompts, dirs, cue_layer = organism
    saes = _planted_cue_saes(model, dirs, cue_layer)
    k = planted.categories().index(category)
    ps = prompts.eval_harmful
    mine = [
        i for i in range(len(ps.instructions)) if ps.categories[i] == category and ps.meta[i]["kind"] == "cue"
    ]
    assert mine, "the eval split holds cue prompts of every category"
    greedy = Greedy({i: [(cue_layer, k)] for i in mine})
    cards = feature_cards(model, saes, prompts, Direction(dirs.refusal), greedy,
                          coefficient=-3.0, flip=Criterion("first_token"))  # fmt: skip
    assert cards.schema == pl.Schema(CARD_SCHEMA) and cards.height == 1
    card = cards.row(0, named=True)
    assert card["label"] == f"L{cue_layer}/F{k}" and card["n_minimal"] == len(mine) == card["n_dissected"]
    words = [_marked(c) for c in card["top_contexts"]]
    on_cue = [grammar.cue_role(w) == f"cue:{category}" for w in words]
    assert on_cue[0] and sum(on_cue) >= 3, words  # the planted residual is not perfectly clean
    assert card["top_activations"] == sorted(card["top_activations"], reverse=True)
    from refusal_nnsight.organism.recipe import get_recipe

    lean = get_recipe("small").cue_cosine  # u_c leans on R by the recipe's cue_cosine, by construction
    assert abs(card["cosine"] - lean) < 1e-5
    assert card["fires_harmful"] > 0 and card["alone_score_change"] < -1.0
    assert card["neuronpedia"] is None and card["coefficient"] == -3.0


def test_single_ablation_is_the_engines(organism):
    """alone_score_change and alone_flip_rate are the AblationEngine's scores of each feature
    ablated alone, averaged over the dissected prompts."""
    model, saes, prompts, dirs, cue_layer = organism
    feats = [(cue_layer, 3), (cue_layer + 1, 7), (cue_layer + 2, 11)]
    greedy = Greedy({0: feats[:2], 1: feats[2:]})
    flip = Criterion("score", threshold=1.0)
    cards = feature_cards(model, saes, prompts, Direction(dirs.refusal), greedy, coefficient=-1.0, flip=flip)
    engine = AblationEngine(model, saes, [(int(a), int(b)) for a, b in cards.select("layer", "feature").rows()],
                            value=-1.0)  # fmt: skip
    masks = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.eye(3, dtype=torch.bool)])
    scores = torch.stack([engine.scores(prompts.eval_harmful.instructions[i], masks) for i in (0, 1)])
    change = (scores[:, 1:] - scores[:, :1]).mean(0)
    flips = (scores[:, 1:] < 1.0).float().mean(0)
    assert torch.allclose(torch.tensor(cards["alone_score_change"].to_list()), change, atol=1e-4)
    assert cards["alone_flip_rate"].to_list() == flips.tolist()
    judged = feature_cards(model, saes, prompts, Direction(dirs.refusal), greedy, coefficient=-1.0,
                           flip=Criterion("judge"))  # fmt: skip
    assert judged["alone_flip_rate"].is_null().all()  # the judge needs generations: not decided, not 0


def test_found_features_counts_every_source():
    greedy = Greedy({0: [(1, 5)], 1: [(1, 5), (2, 9)]})
    awakened = pl.DataFrame({"prompt_idx": [0, 0, 1, 1], "ablation": ["strong", "weak", "strong", "strong"],
                             "layer": [3, 3, 3, 2], "feature": [4, 8, 4, 9], "in_h": [True, True, True, False]})  # fmt: skip

    @dataclass
    class FM:
        top_features: pl.DataFrame

    fm = FM(
        pl.DataFrame({"prompt_idx": [0, 0, 1], "rank": [0, 7, 2], "layer": [2, 1, 2], "feature": [9, 6, 9]})
    )
    found = found_features(greedy, fm, Redundancy(awakened))
    assert list(found) == [(1, 5), (2, 9), (3, 4)]  # (1, 6) ranks 7: not an FM top feature
    assert found[(1, 5)]["n_minimal"] == 2 and found[(2, 9)] == {
        "n_minimal": 1, "fm_best_rank": 0, "n_fm_top": 2, "n_in_h": 0}  # fmt: skip
    assert found[(3, 4)]["n_in_h"] == 2  # weak-ablation rows and rows outside H do not count


def test_a_run_writes_reports_and_reloads_its_cards(smoke_run):
    _, run_dir, summary = smoke_run
    cards = pl.read_parquet(run_dir / "features.parquet")
    sets = pl.read_parquet(run_dir / "greedy" / "sets.parquet")
    minimal = {
        (a, b) for r in sets.iter_rows(named=True) for a, b in zip(r["layers"], r["features"], strict=True)
    }
    assert minimal <= set(cards.select("layer", "feature").rows())
    assert int(cards["n_minimal"].sum()) == int(sets["size"].sum())
    assert cards["role"].is_not_null().all()  # the organism's planted roles
    report = (run_dir / "report.md").read_text()
    first = min(report.index(f"### {label}") for label in cards.filter(pl.col("n_minimal") > 0)["label"])
    assert (
        report.index("## What we found")
        < report.index("## Feature cards")
        < first
        < report.index("## Figures")
    )
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["toolkit"]["version"] and provenance["seed"] == 0
    assert provenance["model"]["content_hash"] == summary["organism"]["content_hash"]
    assert f"weights hash `{summary['organism']['content_hash']}`" in report
    run = rn.load_run(run_dir)
    assert run.features is not None and run.features.equals(cards) and run.provenance == provenance


def test_skipped_first_token_reads_zero_there(organism):
    """With sae.skip_first_token every latent reads 0 at each prompt's first token and exactly what it
    reads without the skip everywhere else: a feature's peaks and firing rates never come from a
    token its SAE never saw."""
    from refusal_nnsight.features import feature_activations
    from refusal_nnsight.saes import LoadedSAEs

    model, saes, prompts, _, _ = organism
    layer = saes.layers[0]
    feats = [(layer, f) for f in range(saes.width(layer))]
    texts = prompts.eval_harmful.instructions[:4]
    full = feature_activations(model, saes, feats, texts)
    part = feature_activations(model, LoadedSAEs(saes.cfg, saes.saes, skip_first_token=True), feats, texts)
    assert any(a[0].abs().sum() > 0 for a in full)  # the first token does fire latents here
    for a, b in zip(full, part, strict=True):
        assert not b[0].any() and torch.equal(a[1:], b[1:])


def test_nothing_found_gives_empty_cards_and_roles(organism):
    """A run whose greedy dissected no prompt (nothing flipped by all candidates) found no feature:
    the cards table and the planted roles are empty, with the cards' schema, and nothing crashes."""
    from refusal_nnsight import ground_truth
    from refusal_nnsight.features import eval_activations

    model, saes, prompts, dirs, _ = organism
    acts = eval_activations(model, saes, [], prompts)
    assert [a.shape[1] for a in acts["harmful"]] == [0] * len(prompts.eval_harmful)
    roles = ground_truth.feature_roles(model, saes, [], prompts, acts=acts)
    cards = feature_cards(model, saes, prompts, Direction(dirs.refusal), Greedy({}), coefficient=-3.0,
                          flip=Criterion("first_token"), roles=roles, acts=acts)  # fmt: skip
    assert cards.height == 0 and cards.schema == CARD_SCHEMA and roles.height == 0
