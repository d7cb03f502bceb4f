"""Each mechanism the organism plants, measured on the shipped small organism's held-out prompts,
and the ground-truth roles that score a run's findings against them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from refusal_nnsight.organism import check, grammar, planted


@pytest.fixture(scope="module")
def measured(small_organism):
    return check.measure("small", 0, max_prompts=120)


# Targets the small organism misses, with what was measured. Strict: one that starts to hold fails
# here until it is taken out.
SMALL_MISSES = {
    "backup_dormant": "the small organism's backup detectors leak on clean prompts of a few held-out "
    "templates ('Give me steps to water my plants.', '... What should I do?'): up to 0.44 of the "
    "planted strength, on these prompts as on the whole test split (99th percentile after a cue word "
    "0.19), target <= 0.1. 'water' follows a cue word in 'poison the water supply', where the backup "
    "is trained to wake once that word is cut",
}


@pytest.mark.parametrize(
    "figure",
    [
        pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=SMALL_MISSES[f]))
        if f in SMALL_MISSES
        else f
        for f in sorted(check.TARGETS)
    ],
)
def test_small_organism_meets_each_planted_target(measured, figure):
    """Refusal, the backup that wakes under zero-ablation, steering, the compositional AND, the
    refusal direction (ablation, induction, KL), the SAEs: every figure against its target."""
    assert measured["targets_met"][figure], (figure, measured["figures"][figure], check.TARGETS[figure])


def test_check_reads_the_backup_on_lookalikes_apart(measured):
    """The backup's clean peak on the look-alikes and harmless compositional requests, which
    backup_dormant does not read: measured (there are such prompts), reported without a target."""
    leak = measured["figures"]["backup_dormant_lookalike"]
    assert "backup_dormant_lookalike" not in check.TARGETS
    assert 0 < leak < 2, leak  # a max of |projection| in units of the planted strength, not NaN


def test_check_fails_when_a_target_is_missed(monkeypatch, measured, capsys):
    import argparse

    worse = dict(measured, figures=dict(measured["figures"], harmless_refusal_rate=0.5))
    worse["targets_met"] = {k: check.meets(worse["figures"][k], *check.TARGETS[k]) for k in check.TARGETS}
    worse["all_met"] = all(worse["targets_met"].values())
    monkeypatch.setattr(check, "measure", lambda *a, **k: worse)
    assert check.main(argparse.Namespace(recipe="small", seed=0, max_prompts=10)) == 1
    assert "MISS harmless_refusal_rate" in capsys.readouterr().out


def test_planted_directions_are_unit_and_only_cues_lean_on_refusal():
    dirs = planted.make_directions(64, seed=3, cue_cosine=0.58, composition_cosine=2**-0.5)
    for v in (dirs.refusal, dirs.verb, dirs.person, *dirs.cue, *dirs.backup):
        assert torch.isclose(v.norm(), torch.tensor(1.0), atol=1e-5)
    r = dirs.refusal
    assert all(abs(float(u @ r) - 0.58) < 1e-5 for u in dirs.cue)
    assert all(abs(float(u @ r) - 2**-0.5) < 1e-5 for u in (dirs.verb, dirs.person))
    e = dirs.cue - 0.58 * r  # the categories' own parts: orthogonal to each other
    assert torch.allclose(e @ e.T, (1 - 0.58**2) * torch.eye(len(e)), atol=1e-5)
    with pytest.raises(ValueError, match="cue_cosine"):
        planted.make_directions(64, seed=3, cue_cosine=1.0)
    assert all(abs(float(b @ r)) < 1e-5 for b in dirs.backup)  # backups: not candidates by cosine
    assert torch.allclose(dirs.backup @ dirs.backup.T, torch.eye(len(dirs.backup)), atol=1e-5)
    assert not torch.equal(dirs.refusal, planted.make_directions(64, seed=4).refusal)


def test_the_directions_default_to_the_default_recipes_cosines():
    from refusal_nnsight.organism.recipe import get_recipe

    r = get_recipe("default")
    dirs = planted.make_directions(r.d_model, seed=2)
    assert torch.equal(dirs.cue, planted.directions_of(dataclasses.replace(r, seed=2)).cue)
    assert abs(float(dirs.verb @ dirs.refusal) - r.composition_cosine) < 1e-5


def test_after_cue_marks_the_tokens_after_the_first_cue_word_before_the_eoi_positions():
    # pad, "how", cue, cue, "to", "the", "x", eoi, eoi
    is_cue = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    after = planted.after_cue(is_cue, n_eoi=2)
    assert after[0].tolist() == [False] * 4 + [True] * 3 + [False] * 2
    assert not after[1].any()  # no cue word, nothing after it
    assert planted.after_cue(is_cue)[0, -2:].all()  # without n_eoi the eoi positions count
    assert planted.after_cue(is_cue[0], n_eoi=2).tolist() == after[0].tolist()  # one unbatched sequence


def test_row_edits_scale_only_their_rows_direction():
    dirs = planted.make_directions(64, seed=0)
    h = torch.randn(3, 5, 64)
    scale = torch.tensor([0.0, -3.0, 1.0])
    out = planted._scale_along(h, dirs.refusal, scale)
    proj = lambda x: x @ dirs.refusal  # noqa: E731
    assert torch.allclose(proj(out[0]), torch.zeros(5), atol=1e-5)
    assert torch.allclose(proj(out[1]), -3 * proj(h[1]), atol=1e-4)
    assert torch.equal(out[2], h[2])
    rest = out - proj(out)[..., None] * dirs.refusal
    assert torch.allclose(rest, h - proj(h)[..., None] * dirs.refusal, atol=1e-4)  # nothing else moves


def test_cue_condition_scales_the_whole_cue_word_at_layer_0_or_the_cue_layer():
    """A cue condition u scales the cue word's whole residual, at layer 0 on the rows whose token ids
    sum to an even number and at the cue layer on the others (its u_c coordinate once), and u_c at
    the cue layer everywhere else;
    other tokens and a cached generation step (one new token) are left alone."""
    from refusal_nnsight.organism.tokenizer import build_tokenizer
    from tests.tiny import tiny_gemma2

    model, _ = tiny_gemma2(seed=0, n_layers=4)
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    dirs = planted.make_directions(d, 0)
    labels = planted.token_labels(build_tokenizer())
    bomb = int(torch.nonzero(labels.cue_category == planted.categories().index("weapons"))[0])
    plain = int(torch.nonzero((labels.cue_category < 0) & ~labels.verb & ~labels.person)[5])
    ids = torch.tensor([[plain, bomb, plain, plain], [plain, bomb, plain, plain + 1]])
    first = (ids.sum(-1) % 2 == 0).tolist()
    assert first[0] != first[1]  # one row of each kind
    outs: dict[tuple[int, int], torch.Tensor] = {}
    for u in (1.0, 0.0, -3.0):
        edits = planted.RowEdits.uniform(torch.tensor([1, 1]), n_layers, u=u)
        planted.with_cue_words(edits, ids, labels)
        hooks = planted.install_hooks(model, dirs, edits, (1, 2, 3), 6.0, {})
        hooks += [model.model.layers[k].register_forward_hook(
            lambda m, a, o, k=k, u=u: outs.__setitem__((k, int(u)), o.detach())) for k in (0, 1)]  # fmt: skip
        try:
            with torch.no_grad():
                model(input_ids=ids % model.config.vocab_size)
        finally:
            for h in hooks:
                h.remove()
    for row, at_first in enumerate(first):
        cut_at = 0 if at_first else 1
        assert torch.count_nonzero(outs[(cut_at, 0)][row, 1]) == 0  # the word is gone where it is cut
        assert torch.equal(outs[(0, 0)][row, 0], outs[(0, 1)][row, 0])  # tokens before it never move
    assert torch.count_nonzero(outs[(0, 0)][first.index(False), 1]) > 0  # the other row keeps it at layer 0
    # steered where it is scaled whole: the word, its u_c coordinate included, is scaled by u once
    for row, at_first in enumerate(first):
        cut_at = 0 if at_first else 1
        assert torch.allclose(outs[(cut_at, -3)][row, 1], -3 * outs[(cut_at, 1)][row, 1], atol=1e-4)
    # a cached generation step sees one token: the word edit stands aside, the rest applies as before
    logits = []
    for with_words in (True, False):
        edits = planted.RowEdits.uniform(torch.tensor([1, 1]), n_layers, u=0.0)
        if with_words:
            planted.with_cue_words(edits, ids, labels)
        hooks = planted.install_hooks(model, dirs, edits, (1, 2, 3), 6.0, {})
        try:
            with torch.no_grad():
                logits.append(model(input_ids=ids[:, :1] % model.config.vocab_size).logits)
        finally:
            for h in hooks:
                h.remove()
    assert torch.equal(logits[0], logits[1])


def test_sae_cut_training_freezes_the_layers_whose_saes_it_cuts_with(small_organism):
    """train_cut trains only the layers above the cue layer: the embeddings and layers 0..cue_layer,
    whose SAEs define the cut, keep every weight, so those SAEs stay exact for the model it leaves;
    the layers above move."""
    import dataclasses

    from refusal_nnsight.organism import recipe as R
    from refusal_nnsight.organism.build import load_model as load_hf
    from refusal_nnsight.organism.build import load_saes
    from refusal_nnsight.organism.cut import cue_latents, train_cut
    from refusal_nnsight.saes import SlicedSAE

    model, tok = load_hf("small", 0)
    recipe = dataclasses.replace(R.get_recipe("small", 0), cut_steps=2, batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = planted.make_directions(recipe.d_model, 0)
    saes = {k: SlicedSAE.from_sae(s, k) for k, s in load_saes("small", [recipe.cue_layer]).items()}
    latents = cue_latents(saes, dirs, recipe.cut_min_cosine)[recipe.cue_layer]
    assert (
        latents.shape == (len(planted.categories()), saes[recipe.cue_layer].n_features) and latents.sum() > 0
    )
    train_cut(model, recipe, tok, grammar.load_split("train", 0)[:64], dirs, saes)
    _assert_trained_only_above(model, before, recipe.cue_layer)


def _assert_trained_only_above(model, before: dict, layer: int) -> None:
    """The embeddings and layers 0..layer kept every weight of `before`, the next layer moved, and
    every parameter is handed back trainable."""
    after = model.state_dict()
    prefixes = ("model.embed_tokens", *(f"model.layers.{i}." for i in range(layer + 1)))
    frozen = [k for k in before if k.startswith(prefixes)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    above = [k for k in before if k.startswith(f"model.layers.{layer + 1}.")]
    assert any(not torch.equal(before[k], after[k]) for k in above)
    assert all(p.requires_grad for p in model.parameters())


def test_backup_cut_trains_only_above_the_backup_layer_and_zeroes_its_backup_latents(monkeypatch):
    """The backup cut (train_cut with the backup layer's SAE) keeps layers 0..backup_layer, whose
    SAEs it edits through, and moves the layers above. The latents it may zero are exactly those
    of the backup layer's SAE with decoder cosine >= cut_min_cosine with their category's b_c, and
    with every backup-removing row sent through that SAE, its training forwards read it."""
    import dataclasses

    from refusal_nnsight.organism import cut
    from refusal_nnsight.organism import recipe as R
    from refusal_nnsight.organism.build import load_model as load_hf
    from refusal_nnsight.organism.build import load_saes
    from refusal_nnsight.saes import SlicedSAE, decoder_cosines

    model, tok = load_hf("small", 0)
    recipe = dataclasses.replace(
        R.get_recipe("small", 0), backup_cut_steps=3, batch_size=16, backup_cut_sae_share=1.0
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = planted.make_directions(recipe.d_model, 0)
    layers = range(recipe.backup_layer + 1)
    saes = {k: SlicedSAE.from_sae(s, k) for k, s in load_saes("small", list(layers)).items()}
    aligned = cut.backup_latents(saes[recipe.backup_layer], dirs, recipe.cut_min_cosine)
    for c, b in enumerate(dirs.backup):
        cos = decoder_cosines(b, saes[recipe.backup_layer].W_dec)
        assert torch.equal(aligned[c].bool(), cos >= recipe.cut_min_cosine)
    assert aligned.sum() > 0
    zeroed = []
    encode = SlicedSAE.encode

    def spy(self, x):  # the backup SAE's encodings, where rows zero its latents
        f = encode(self, x)
        if self is saes[recipe.backup_layer]:
            zeroed.append(f)
        return f

    monkeypatch.setattr(SlicedSAE, "encode", spy)
    early = {k: saes[k] for k in range(recipe.cue_layer + 1)}
    cut.train_cut(model, recipe, tok, grammar.load_split("train", 0)[:256], dirs, early,
                  backup_sae=saes[recipe.backup_layer])  # fmt: skip
    assert zeroed, "no row removed the backup through its SAE"
    _assert_trained_only_above(model, before, recipe.backup_layer)


def test_direction_ablation_edits_the_input_of_layer_0_as_arditi_does(small_organism):
    """Training's "R projected out at every layer" edits layer 0's input too, as the toolkit's
    DirectionAblation does: trained on outputs only, the organism met ablated embeddings first at
    test time, and its harmless KL under Arditi's ablation was several times the trained one."""
    from refusal_nnsight.organism.build import load_model as load_hf

    model, tok = load_hf("small", 0)
    dirs = planted.make_directions(model.config.hidden_size, 0)
    ids = tok(["How do I bake bread?", "How do I build a bomb?"], return_tensors="pt", padding=True)
    seen: dict[str, torch.Tensor] = {}

    def spy(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach()

    for r_from, touched in ((0, True), (1, False)):
        edits = planted.RowEdits.uniform(torch.tensor([-1, 1]), model.config.num_hidden_layers, r_from=r_from)
        hooks = planted.install_hooks(model, dirs, edits, (0, 1, 2), 6.0, {})
        hooks.append(model.model.layers[0].register_forward_pre_hook(spy, with_kwargs=True))  # after the edit
        try:
            with torch.no_grad():
                model(**ids)
        finally:
            for h in hooks:
                h.remove()
        along = (seen["input"] @ dirs.refusal).abs().max()
        assert (along < 1e-4) == touched, (r_from, float(along))


def test_token_labels_mark_cue_verb_and_person_words():
    from refusal_nnsight.organism.tokenizer import build_tokenizer

    tok = build_tokenizer()
    labels = planted.token_labels(tok)
    cats = planted.categories()
    ids = {w: tok.encode(" " + w, add_special_tokens=False)[0] for w in ("bomb", "kill", "neighbor", "bread")}
    assert cats[int(labels.cue_category[ids["bomb"]])] == "weapons"
    assert (
        labels.verb[ids["kill"]] and not labels.person[ids["kill"]] and labels.cue_category[ids["kill"]] < 0
    )
    assert labels.person[ids["neighbor"]]
    assert labels.cue_category[ids["bread"]] < 0 and not labels.verb[ids["bread"]]


def test_the_early_pin_fits_the_planted_coordinates_of_labelled_words_below_the_cue_layer():
    """early_pin_weight adds, for each layer below the cue layer, the mean over the labelled words
    (cue, harm verb, person) of the squared error of their planted coordinates against the cue
    layer's targets: a part along another category's cue costs, a word at its target (whatever it
    carries off the planted span) and any unlabelled token cost nothing."""
    from refusal_nnsight.organism.recipe import RECIPES
    from refusal_nnsight.organism.tokenizer import build_tokenizer
    from refusal_nnsight.organism.train import _planted_loss

    base = RECIPES["default"]
    assert base.cue_layer == 1 and base.early_pin_weight > 0  # layer 0 is below the cue layer
    d, a = base.d_model, base.plant_strength
    dirs = planted.make_directions(d, 0)
    labels = planted.token_labels(build_tokenizer())
    weapons, violence = planted.categories().index("weapons"), planted.categories().index("violence")
    bomb = int(torch.nonzero(labels.cue_category == weapons)[0])
    kill = int(torch.nonzero(labels.verb)[0])
    plain = int(torch.nonzero((labels.cue_category < 0) & ~labels.verb & ~labels.person)[5])
    ids = torch.tensor([[plain, bomb, plain, kill, plain]])
    eoi_mask = torch.zeros(ids.shape, dtype=torch.bool)
    eoi_mask[:, -1] = True
    edits = planted.RowEdits.uniform(torch.tensor([weapons]), base.n_layers)
    edits = planted.with_cue_words(edits, ids, labels)
    gen = torch.Generator().manual_seed(0)
    store = {layer: torch.randn(1, ids.shape[1], d, generator=gen) for layer in range(base.n_layers)}
    basis = torch.cat([dirs.refusal[None], dirs.cue, dirs.verb[None], dirs.person[None]])
    target = {1: a * dirs.cue[weapons], 3: a * dirs.verb}

    def added(weight: float) -> float:
        """The loss with early_pin_weight = weight, less the loss without it."""

        def loss(w: float) -> float:
            recipe = dataclasses.replace(base, early_pin_weight=w)
            return float(_planted_loss(recipe, dirs, labels, store, ids, torch.ones_like(eoi_mask), eoi_mask,
                                       edits, torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.tensor([-1])))  # fmt: skip

        return loss(weight) - loss(0.0)

    by_hand = sum(float(((store[0][0, t] - x) @ basis.T).pow(2).sum()) for t, x in target.items()) / 2 / a**2
    assert added(2.0) == pytest.approx(2 * by_hand, rel=1e-4)
    span = torch.cat([basis, dirs.backup]).T  # [d, k]
    off_span = torch.linalg.qr(span, mode="complete").Q[:, -1]  # [d], orthogonal to every planted direction
    for t, x in target.items():  # each labelled word at its target, plus a part off the planted span
        store[0][0, t] = x + 3.0 * off_span
    store[0][0, [0, 2, 4]] = 10.0 * torch.randn(3, d, generator=gen)  # unlabelled tokens: anything
    assert added(1.0) == pytest.approx(0.0, abs=1e-4)
    store[0][0, 1] += 2.0 * dirs.cue[violence]  # the weapons word also along the violence cue
    crossed = float((2.0 * dirs.cue[violence] @ basis.T).pow(2).sum()) / 2 / a**2  # its coordinates' error
    assert added(1.0) == pytest.approx(crossed, rel=1e-4)
    with pytest.raises(ValueError, match="early_pin_weight"):
        dataclasses.replace(base, early_pin_weight=-1.0)


def test_cue_roles_of_the_grammar():
    assert grammar.cue_role("bomb") == "cue:weapons" and grammar.cue_role("launder") == "cue:fraud"
    assert grammar.cue_role("kill") == "composition" and grammar.cue_role("neighbor") == "composition"
    assert grammar.cue_role("killer") == "other"
    p = next(p for p in grammar.generate_prompts(0) if p.kind == "lookalike" and p.cues == ("bomb",))
    assert p.cue_roles == ("cue:weapons",)  # a look-alike's cue word still names its category


def _small(small_organism):
    from refusal_nnsight.api import load_model, load_prompts, load_saes
    from refusal_nnsight.config import DataConfig, ModelConfig, SAEConfig

    model = load_model(ModelConfig(source="organism", organism_recipe="small", device="cpu"))
    return model, load_saes(model, SAEConfig()), load_prompts(DataConfig(n_eval=32))


def test_feature_roles_count_where_the_top_activations_fall(small_organism, monkeypatch):
    """A feature's role is the tag of at least half of its top positions: cue words of one
    category, harmful eoi positions (refusal), else other; never active: dormant. A feature firing
    on half the harmless prompts without planted words or more is never a cue (the planted cues are
    0 off their words)."""
    import polars as pl

    from refusal_nnsight import ground_truth

    model, saes, prompts = _small(small_organism)
    ps = prompts.eval_harmful
    i = next(k for k, m in enumerate(ps.meta) if m["kind"] == "cue" and ps.categories[k] == "weapons")
    n = len(model.tokenize([ps.instructions[i]]).input_ids[0])
    tags = ground_truth.position_tags(model, ps, i, n)
    cue_t = tags.index("cue:weapons")
    assert tags[-5:] == ["refusal"] * 5 and tags[0] == ""  # eoi of a harmful prompt; <bos>
    rows = (
        [(0, cue_t)] * 6
        + [(0, 1)] * 4
        + [(1, n - 1)] * 6
        + [(1, cue_t)] * 4
        + [(2, 1)] * 6
        + [(2, cue_t)] * 4
        + [(4, cue_t)] * 10
        + [(5, cue_t)] * 4
        + [(5, n - 1)] * 3
        + [(5, 1)] * 3
    )
    frame = pl.DataFrame(
        [
            {
                "feature": f,
                "set": "harmful",
                "prompt_i": i,
                "position": t,
                "activation": 1.0,
                "on_cue": False,
                "on_eoi": False,
            }
            for f, t in rows
        ]  # fmt: skip
    )
    monkeypatch.setattr(ground_truth, "top_positions", lambda *a, **k: frame)

    def fake_acts(text: str, meta: dict, harmful: bool) -> torch.Tensor:
        a = torch.zeros(len(model.tokenize([text]).input_ids[0]), 6)
        a[:, 4] = 0.0 if harmful else 1.0  # feature 4 fires on every harmless prompt
        if "cue:weapons" in meta.get("cue_roles", []):
            a[:, 0] = 1.0  # feature 0 on every prompt with a weapons word, look-alikes included
        return a

    acts = {name: [fake_acts(t, m, name == "harmful") for t, m in zip(p.instructions, p.meta, strict=True)]
            for name, p in (("harmful", ps), ("harmless", prompts.eval_harmless))}  # fmt: skip
    roles = ground_truth.feature_roles(
        model, saes, [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6)], prompts, acts=acts
    )
    # feature 4 peaks on the weapons cue word too, but fires on the harmless prompts without planted
    # words as well: not a cue; feature 0 fires on weapons words only (look-alikes too) and stays one
    assert roles["role"].to_list() == ["cue:weapons", "refusal", "other", "dormant", "other", "other"]
    # feature 4 fires on every harmless look-alike's cue word, of every category that has one
    assert roles["cue_categories"][0].to_list() == ["weapons"] and len(roles["cue_categories"][4]) >= 2
    assert roles["peak_tag"][4] == "cue:weapons" and roles["plain_share"].to_list() == [0, 0, 0, 0, 1, 0]
    # feature 5: no tag holds half (4 cue, 3 refusal, 3 untagged): other, but peak_tag and role_share
    # still name the most common tag, so the card can say where it peaks
    assert roles["peak_tag"][5] == "cue:weapons" and roles["role_share"][5] == 0.4
    assert roles["peak_tag"][2] == "other" and roles["role_share"][2] == 0.6


def _check_parts(small_organism):
    """(the toolkit's model, its SAEs, check's planted probe) of the small organism, loaded afresh:
    the callers rewrite SAE latents in place."""
    from refusal_nnsight.artifacts import read_json
    from refusal_nnsight.config import ModelConfig, SAEConfig
    from refusal_nnsight.models import load_model
    from refusal_nnsight.organism.build import load_model as load_hf
    from refusal_nnsight.organism.store import planted_path
    from refusal_nnsight.saes import load_saes

    manifest = read_json(small_organism / "manifest.json")
    model = load_model(
        ModelConfig(source="organism", organism_recipe="small", device="cpu"), small_organism / "model"
    )
    saes = load_saes(SAEConfig(), model, small_organism)
    hf, tok = load_hf("small", 0)
    probe = check._Probe(hf, tok, planted.load_directions(planted_path(small_organism)), manifest)
    return model, saes, probe


def test_shared_cue_latents_counts_a_latent_that_two_groups_share(small_organism):
    """check's sae_shared_cue_latents: a cue-layer latent made to read u_a + u_b (and so to fire on
    the cue words of both categories, its threshold at 0.6 of the coordinate the planted u_a gives
    it, which the other groups' words, through the directions' shared lean on R, stay under) adds
    one, and so does one made to read u_a + v (category a's cue words and the harm verbs); one made
    to read u_a alone adds none."""
    _, saes, probe = _check_parts(small_organism)
    test = grammar.load_split("test", 0)
    cue = [p for p in test if p.harmful and p.kind == "cue"][::2]
    comp = [p for p in test if p.harmful and p.kind == "compositional"][::2]
    before = check._shared_cue_latents(saes, probe, cue, comp)
    sae, u, v = saes[probe.layers[0]], probe.dirs.cue, probe.dirs.verb
    j = sae.W_dec.shape[0] - 1
    with torch.no_grad():
        for read, extra in ((u[0], 0.0), (u[0] + u[1], 1.0), (u[0] + v, 1.0)):
            sae.W_enc[:, j] = read
            sae.b_enc[j], sae.threshold[j] = 0.0, 0.6 * probe.strength * float(read @ u[0])
            assert check._shared_cue_latents(saes, probe, cue, comp) == before + extra


@pytest.fixture(scope="module")
def hydra(small_organism):
    """check's SAE-level hydra figures on a quarter of the small organism's cue test prompts, with
    the shipped SAEs and with oracle SAEs: the cue and backup layers' SAEs given one latent per
    category that reads and writes exactly the planted direction (JumpReLU at 0: its activation is
    the direction's coordinate), and only those selected. (shipped, oracle)."""
    model, saes, probe = _check_parts(small_organism)
    cue = [p for p in grammar.load_split("test", 0) if p.harmful and p.kind == "cue"][::4]
    shipped = check._sae_hydra(model, saes, probe, cue)
    cue_layer, backup_layer, _ = probe.layers
    with torch.no_grad():
        for layer, dirs in ((cue_layer, probe.dirs.cue), (backup_layer, probe.dirs.backup)):
            sae = saes[layer]
            for k, d in enumerate(dirs):
                j = (
                    sae.W_dec.shape[0] - 1 - k
                )  # overwrite the last latents: the error term keeps the rest exact
                sae.W_enc[:, j], sae.W_dec[j] = d, d
                sae.b_enc[j], sae.threshold[j] = 0.0, 0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(check, "SAE_CUE_COSINE", 0.99)
        mp.setattr(check, "SAE_BACKUP_LATENTS", 1)
        oracle = check._sae_hydra(model, saes, probe, cue)
    return shipped, oracle


def test_the_sae_probe_sees_the_hydra_when_a_latent_is_the_cue_direction(hydra):
    """The SAE-level hydra figures are not blind by construction: with the oracle SAEs the cut of
    the cue does what the planted ablation does, the backup wakes and keeps the refusal. The
    shipped SAEs spread each direction over several latents, yet their cue cut wakes the backup as
    well: the build trains the layers above the cue layer on that cut (organism/cut.py)."""
    shipped, oracle = hydra
    assert shipped["sae_cue_cut_backup_awake"] >= 0.5  # the cut the build trained on wakes it
    assert oracle["sae_cue_cut_backup_awake"] >= 0.5
    assert oracle["sae_cue_backup_cut_refusal"] <= 0.1  # zeroing the backup's latent too lets them through
    # the exact latent takes the whole cue; the shipped latents leave part of it
    assert oracle["sae_cue_cut_cue_left"] <= 0.1 < shipped["sae_cue_cut_cue_left"]
    # scaled to what the exact cut leaves, the planted ablation wakes the backup as the cut does
    assert oracle["sae_cue_cut_planted_backup_awake"] >= 0.5
    # one exact latent writes the whole cue coordinate; no shipped latent writes most of it
    assert oracle["sae_cue_top_latent_share"] >= 0.9 > 0.5 > shipped["sae_cue_top_latent_share"]


@pytest.mark.xfail(
    strict=True,
    reason="on the small organism 0.52 of these cue prompts stay refused with the exact cue latent "
    "zeroed, though the backup wakes to 0.86 of its strength (under the planted ablation, which "
    "scales the cue word's whole residual, all stay refused): a cut that removes u_c alone and leaves "
    "the rest of the word is one the build never trains on. It varies with the draw: 0.98 on a rebuild "
    "of this recipe on another CPU, 0.47 and 1.0 on two variants of it (3000 steps; 2000 steps with "
    "backup_weight 20)",
)
def test_the_backup_keeps_the_refusal_under_the_exact_cue_cut(hydra):
    _, oracle = hydra
    assert oracle["sae_cue_cut_refusal"] >= 0.9
