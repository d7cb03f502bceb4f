"""Stage 3 against planted truth: the FM recovers a planted pairwise interaction that a linear
model cannot fit, does no better than linear without one, fits deterministically, and `run`
confirms a planted pair causally, resumes from its mask parts and round-trips through its files.
The compositional ground-truth check is tested on planted activations."""

from __future__ import annotations

from types import SimpleNamespace

import polars as pl
import pytest
import torch

from refusal_nnsight import features, ground_truth
from refusal_nnsight.artifacts import StageDir
from refusal_nnsight.config import FMConfig
from refusal_nnsight.scoring import Criterion
from refusal_nnsight.stages import fm
from refusal_nnsight.stages.fm import FactorizationMachine, FMResult, LinearModel, fit, metrics, sample_masks


def planted(n: int, interaction: bool, seed: int = 0):
    """Masks over n features and y = 1 + 0.5·m3 − 2·m1·m4 (or − 1·m1) + N(0, 0.1²); split 80/20."""
    g = torch.Generator().manual_seed(seed)
    X = sample_masks(n, 2048, g).float()
    y = 1 + 0.5 * X[:, 3] + (-2 * X[:, 1] * X[:, 4] if interaction else -1.0 * X[:, 1])
    y = y + 0.1 * torch.randn(len(X), generator=g)
    held = torch.zeros(len(X), dtype=torch.bool)
    held[torch.randperm(len(X), generator=g)[: len(X) // 5]] = True
    return X, y, held


def fit_both(X, y, held, task="regression"):
    cfg = FMConfig()
    f, lin = FactorizationMachine(X.shape[1], cfg.rank, seed=0), LinearModel(X.shape[1])
    fit(f, X[~held], y[~held], task, cfg)
    fit(lin, X[~held], y[~held], task, cfg)
    return f, lin, metrics(f, X[held], y[held], task), metrics(lin, X[held], y[held], task)


def test_fm_forward_is_the_explicit_pairwise_sum():
    f = FactorizationMachine(6, 3, seed=1)
    with torch.no_grad():
        f.w.copy_(torch.randn(6))
        f.w0.fill_(0.7)
    X = (torch.rand(20, 6) < 0.5).float()
    vv = f.V @ f.V.T
    want = (
        f.w0
        + X @ f.w
        + torch.stack([sum(vv[i, j] * x[i] * x[j] for i in range(6) for j in range(i + 1, 6)) for x in X])
    )
    assert torch.allclose(f(X), want, atol=1e-5)


def test_fm_recovers_a_planted_interaction_that_linear_cannot_fit():
    X, y, held = planted(12, interaction=True)
    f, lin, m_fm, m_lin = fit_both(X, y, held)
    vv = f.interactions().detach()
    iu = torch.triu_indices(12, 12, 1)
    top = vv[iu[0], iu[1]].abs().argmax()
    assert (int(iu[0][top]), int(iu[1][top])) == (1, 4)
    assert vv[1, 4] < -1.5  # ≈ −2 in score units
    assert abs(float(f.w[3].detach()) - 0.5) < 0.15 and abs(float(f.w0.detach()) - 1) < 0.15
    assert m_fm["r2"] > 0.95 and m_fm["r2"] > m_lin["r2"] + 0.2
    # classification on jailbreak-like labels: the FM is at least as accurate
    _, _, c_fm, c_lin = fit_both(X, (y < 0).float(), held, "classification")
    assert c_fm["accuracy"] >= c_lin["accuracy"] and c_fm["accuracy"] > 0.95


def test_linear_is_as_good_without_an_interaction():
    X, y, held = planted(12, interaction=False)
    f, lin, m_fm, m_lin = fit_both(X, y, held)
    assert m_lin["r2"] >= m_fm["r2"] - 0.01
    assert abs(float(lin.w[1].detach()) + 1) < 0.05 and abs(float(lin.w[3].detach()) - 0.5) < 0.05
    assert f.interactions().abs().max() < 0.3  # no spurious strong pair


def _result_of(fit_rows) -> FMResult:
    """An FMResult whose fit table is `fit_rows` and whose other tables are empty."""
    tables = {name: pl.DataFrame(fit_rows if name == "fit" else [], schema=schema)
              for name, schema in fm.SCHEMAS.items()}  # fmt: skip
    return FMResult(tables["dataset"], tables["pools"], tables["fit"], tables["interactions"],
                    tables["top_features"], tables["classifier"], {}, -1.0, "first_token")  # fmt: skip


def test_beats_linear_is_a_sign_test_on_the_held_out_masks_only_one_labels_right():
    """A flip that is the XOR of two features: the FM labels held-out masks right that the linear
    model cannot, the discordant masks all go its way, and it beats it (p far below 0.05). A flip
    that one feature decides: both label every held-out mask alike, nothing is discordant, p = 1,
    and the FM does not beat it, whatever the mean accuracies' last digit says."""
    X, y, held = planted(12, interaction=True)
    cfg = FMConfig(epochs=300, lr=0.05)
    for flipped, beats in ((X[:, 1] != X[:, 4], True), (X[:, 1] > 0.5, False)):
        rows, models, _ = fm.fit_all(0, X, y, flipped, held, cfg, seed=0)
        only = {r["model"]: r["heldout_only_right"] for r in rows if r["task"] == "classification"}
        assert all(r["heldout_only_right"] is None for r in rows if r["task"] == "regression")
        right = {m: (models[("classification", m)](X[held]) > 0) == flipped[held] for m in ("fm", "linear")}
        assert only == {"fm": int((right["fm"] & ~right["linear"]).sum()),
                        "linear": int((right["linear"] & ~right["fm"]).sum())}  # fmt: skip
        s = _result_of(rows).summary()
        assert s["beats_linear"] is beats and (s["fm_only_right"], s["linear_only_right"]) == (
            only["fm"],
            only["linear"],
        )
        if beats:
            assert only["fm"] > 20 and only["linear"] == 0 and s["beats_linear_p"] < 1e-6
        else:
            assert only == {"fm": 0, "linear": 0} and s["beats_linear_p"] == 1.0
    old = _result_of([]).summary()  # no fit rows (or a run saved before the counts): not compared
    assert old["beats_linear"] is None and old["beats_linear_p"] is None


def test_heldout_accuracy_pools_the_masks_of_every_prompt():
    """A prompt whose small pool leaves 2 held-out masks counts for 2 of them, not for as much as one
    with 400: 0.5 on 2 masks and 1.0 on 398 pool to 399/400, where the mean of prompts says 0.75. A
    prompt with no held-out mask (a pool of one latent) adds nothing, and nulls neither figure nor
    the sign test."""

    def row(idx, model, n, acc, only):
        return {"prompt_idx": idx, "model": model, "task": "classification", "n_train": 4 * n + 2, "n_heldout": n,
                "train_loss": 0.0, "train_r2": None, "train_accuracy": 1.0, "heldout_r2": None,
                "heldout_accuracy": acc, "heldout_only_right": only}  # fmt: skip

    rows = [row(0, "fm", 2, 0.5, 0), row(1, "fm", 398, 1.0, 199), row(2, "fm", 0, None, None),
            row(0, "linear", 2, 1.0, 1), row(1, "linear", 398, 0.5, 0), row(2, "linear", 0, None, None)]  # fmt: skip
    s = _result_of(rows).summary()
    assert s["heldout_accuracy"] == pytest.approx(399 / 400) and s["n_heldout_masks"] == 400
    assert s["linear_heldout_accuracy"] == pytest.approx(201 / 400)
    assert (s["fm_only_right"], s["linear_only_right"]) == (199, 1) and s["beats_linear"] is True


def test_fit_is_deterministic_given_the_seed():
    X, y, held = planted(8, interaction=True)
    cfg = FMConfig(epochs=50)
    a, b, c = (
        FactorizationMachine(8, 4, seed=3),
        FactorizationMachine(8, 4, seed=3),
        FactorizationMachine(8, 4, seed=4),
    )
    for m in (a, b, c):
        fit(m, X, y, "regression", cfg)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.V, c.V)


def test_sample_masks_are_distinct_and_stratified_by_size():
    m = sample_masks(20, 600, torch.Generator().manual_seed(0))
    assert m.shape == (600, 20)
    assert not m[0].any() and m[1].all()
    assert len({r.numpy().tobytes() for r in m}) == 600
    sizes = torch.bincount(m.sum(1), minlength=21)
    assert (sizes[2:19] > 15).all()  # roughly uniform over sizes, not binomial around 10
    assert torch.equal(
        sample_masks(4, 100, torch.Generator()).sum(0), torch.full((4,), 8)
    )  # all 16 enumerated
    again = sample_masks(20, 600, torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


# --- run(): an oracle-backed engine instead of a model -----------------------------------------

POOL = [
    {"layer": 0, "feature": i, "source": "minimal" if i < 3 else "candidate", "max_act": 1.0}
    for i in range(8)
]


def oracle_score(masks: torch.Tensor) -> torch.Tensor:
    """s = 2 − 1.0·m0 − 0.5·m2 − 3·m1·m3: features 1 and 3 only matter together."""
    m = masks.float()
    return 2 - 1.0 * m[:, 0] - 0.5 * m[:, 2] - 3 * m[:, 1] * m[:, 3]


class FakeEngine:
    evaluated = 0

    def __init__(self, model, saes, pool, value, batch_size):
        self.size = len(pool)

    def scores(self, batch, masks):
        FakeEngine.evaluated += masks.shape[0]
        return oracle_score(masks.reshape(-1, self.size))

    def scores_many(self, requests, what="score"):
        out = [self.scores(b, m) for b, m in requests]  # first-token margin = score − 0.5 (planted)
        return [torch.stack([s, s - 0.5], -1) for s in out] if what == "flip" else out


def fake_run(monkeypatch, out, criterion: Criterion | None = None):
    monkeypatch.setattr(fm, "AblationEngine", FakeEngine)
    monkeypatch.setattr(fm, "build_pool", lambda *a: [dict(p) for p in POOL])
    model = SimpleNamespace(tokenize=lambda instr: instr[0])
    sets = pl.DataFrame(
        {
            "prompt_idx": [3, 5],
            "instruction": ["a", "b"],
            "layers": [[0, 0, 0]] * 2,
            "features": [[0, 1, 2]] * 2,
        }
    )
    cfg = FMConfig(n_masks=200, max_prompts=1, chunk=64, top_pairs=3, readout=["regression"])
    flip = criterion or Criterion("first_token")
    res = fm.run(
        model, None, SimpleNamespace(features=[]), SimpleNamespace(sets=sets), None, cfg, out, 0, -3.0, flip
    )
    res.save(out)  # the caller saves, as the pipeline does
    return res


def test_run_confirms_the_planted_pair_resumes_and_round_trips(monkeypatch, tmp_path):
    out = StageDir(tmp_path / "a", "fm")
    res = fake_run(monkeypatch, out)
    assert res.dataset.height == 200 and set(res.dataset["prompt_idx"]) == {3}  # max_prompts=1
    assert res.dataset["split"].to_list().count("heldout") == 40
    top = res.interactions.row(0, named=True)
    assert (top["feature_i"], top["feature_j"]) == (1, 3) and top["v_dot"] < -2 and top["confirmed"]
    assert top["joint_effect"] == pytest.approx(-3.0) and top["sum_singles"] == pytest.approx(0.0)
    assert top["kind"] == "synergy"  # neither alone moves the score; together they drop it by 3
    assert res.top_features["feature"][0] == 0  # the largest |w_i|
    s = res.summary()
    assert s["heldout_r2"] > 0.99 and s["heldout_r2"] > s["linear_heldout_r2"] + 0.1
    assert (
        s["n_masks_per_prompt"] == 200 and s["n_masks_total"] == 200 and 0 < s["top_pair_confirmed_rate"] <= 1
    )
    confirmed = res.interactions.filter(pl.col("confirmed"))
    assert s["n_synergy_pairs"] >= 1 and s["n_confirmed_pairs"] == confirmed.height
    assert s["n_synergy_pairs"] + s["n_redundant_pairs"] + s["n_suppression_pairs"] == confirmed.height
    # classification labels are the criterion's flips: first-token margin = score − 0.5 < 0
    d = res.dataset
    assert d["flipped"].to_list() == (d["score"] < 0.5).to_list()
    assert (
        s["classifier_heldout_accuracy"] is None
        and "classify_prompts" in res.notes["classifier_heldout_accuracy"]
    )
    assert out.finished

    loaded = FMResult.load(out)
    for name in fm.SCHEMAS:
        assert getattr(loaded, name).equals(getattr(res, name))
    assert loaded.weights.keys() == res.weights.keys()
    assert all(torch.equal(loaded.weights[k], v) for k, v in res.weights.items())

    FakeEngine.evaluated = 0
    again = fake_run(monkeypatch, out)
    assert FakeEngine.evaluated == 1 + 3 * 3  # only the causal pair checks; masks came from parts
    assert loaded.summary() == s
    assert again.dataset.equals(res.dataset)
    other = StageDir(tmp_path / "b", "fm")
    fake_run(monkeypatch, other)
    for name in ("dataset", "fit", "interactions"):  # byte-identical Parquet across runs
        assert out.file(f"{name}.parquet").read_bytes() == other.file(f"{name}.parquet").read_bytes()


def test_n_masks_per_prompt_and_total_say_what_they_count(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "AblationEngine", FakeEngine)
    monkeypatch.setattr(fm, "build_pool", lambda *a: [dict(p) for p in POOL])
    sets = pl.DataFrame(
        {"prompt_idx": [3, 5], "instruction": ["a", "b"], "layers": [[0]] * 2, "features": [[0]] * 2}
    )
    cfg = FMConfig(n_masks=64, max_prompts=2, epochs=20, top_pairs=1, readout=["regression"])
    res = fm.run(SimpleNamespace(tokenize=lambda i: i[0]), None, SimpleNamespace(features=[]),
                 SimpleNamespace(sets=sets), None, cfg, StageDir(tmp_path, "fm"), 0, -3.0, Criterion())  # fmt: skip
    s = res.summary()
    assert (s["n_masks_per_prompt"], s["n_masks_total"], s["n_prompts"]) == (64, 128, 2)
    assert s["median_pool_size"] == len(POOL)  # both prompts pool the same latents


def test_pair_kinds_from_planted_effects():
    """Effects are score changes (negative = refusal removed); tolerance 0.25."""
    assert fm.pair_kind(0.0, 0.0, -3.0, 0.25) == "synergy"  # neither alone, both together
    assert fm.pair_kind(-2.0, -2.0, -2.0, 0.25) == "redundant"  # either alone does what both do
    assert fm.pair_kind(-2.0, -1.0, -2.0, 0.25) == "suppression"  # ablating i silences j's effect
    assert fm.pair_kind(-1.0, 1.5, -1.0, 0.25) == "suppression"  # j's own effect vanishes with i
    assert fm.pair_kind(-1.0, -1.0, -2.1, 0.25) == "additive"


def test_prompt_classifier_learns_a_planted_xor_that_linear_cannot(monkeypatch, tmp_path):
    """Planted activations: a prompt is harmful iff exactly one of two pool features fires (XOR).
    The FM's pairwise term classifies it; a linear model cannot (at most 3/4)."""
    import random as _random

    rng = _random.Random(0)

    def make(n: int, tag: str) -> SimpleNamespace:
        return SimpleNamespace(instructions=[f"{tag}{rng.randrange(2)}{i}" for i in range(n)])

    def acts_of(text: str) -> torch.Tensor:
        harmful, coin = text[0] == "h", int(text[1])
        a, b = (coin, 1 - coin) if harmful else (coin, coin)  # harmful: 01 / 10; harmless: 00 / 11
        return torch.tensor([[0.0, 0.0, 0.0], [a * 2.0, b * 1.5, rng.random() * 0.1]])  # [T, F]

    monkeypatch.setattr(
        fm, "feature_activations", lambda model, saes, feats, texts, **k: [acts_of(t) for t in texts]
    )
    prompts = SimpleNamespace(train_harmful=make(60, "h"), train_harmless=make(60, "l"), val_harmful=make(20, "h"),
                              val_harmless=make(20, "l"), eval_harmful=make(20, "h"), eval_harmless=make(20, "l"))  # fmt: skip
    cfg = FMConfig(epochs=600, lr=0.05, l2=1e-5)
    rows, weights = fm.classify_prompts(None, None, [(0, 1), (0, 2), (1, 3)], prompts, cfg, seed=0)
    acc = {(r["model"], r["split"]): r["accuracy"] for r in rows}
    assert acc["fm", "heldout"] >= 0.95 and acc["linear", "heldout"] <= 0.8
    assert {r["n"] for r in rows if r["split"] == "heldout"} == {80} and "classifier/fm/V" in weights


def test_no_dissected_prompt_gives_nulls_with_reasons(tmp_path):
    empty = pl.DataFrame(schema={"prompt_idx": pl.Int64, "instruction": pl.Utf8, "layers": pl.List(pl.Int64),
                                 "features": pl.List(pl.Int64)})  # fmt: skip
    res = fm.run(None, None, SimpleNamespace(features=[]), SimpleNamespace(sets=empty), None, FMConfig(),
                 StageDir(tmp_path, "fm"), 0, -3.0, Criterion())  # fmt: skip
    s = res.summary()
    for key in ("n_prompts", "n_masks_per_prompt", "n_masks_total", "heldout_accuracy", "top_pair_confirmed_rate",
                "n_synergy_pairs", "classifier_heldout_accuracy"):  # fmt: skip
        assert s[key] is None, key
    assert res.notes["n_masks_per_prompt"] and res.notes["classifier_heldout_accuracy"]


def test_compositional_pair_found_on_planted_activations(monkeypatch):
    from tiny import model_config, tiny_gemma2

    from refusal_nnsight.models import wrap_model

    model = wrap_model(*tiny_gemma2(), model_config("gemma2"))
    text = "tell me how to kill a person"
    meta = {"kind": "compositional", "cues": ["kill", "person"], "cue_spans": [[15, 19], [22, 28]]}
    prompts = SimpleNamespace(eval_harmful=SimpleNamespace(instructions=[text], meta=[meta]))
    roles = torch.tensor(ground_truth.token_roles(model, text, meta["cue_spans"]))
    # feature → (cue it peaks on, cue it also fires on weakly); -1 = no cue (<bos> here)
    fires = {(1, 10): (0, None), (1, 11): (1, None), (2, 5): (-1, None), (2, 6): (-1, 1)}

    def fake_acts(model, saes, features, instructions, edits=(), batch_size=32):
        a = torch.zeros(len(roles), len(features))
        for c, f in enumerate(features):
            peak, weak = fires[f]
            a[(roles == peak).nonzero().flatten()[0], c] = 1.0
            if weak is not None:
                a[roles == weak, c] = 0.3
        return [a]

    monkeypatch.setattr(ground_truth, "feature_activations", fake_acts)

    def result(pair, confirmed=True):
        row = {"prompt_idx": 0, "label_i": "i", "layer_i": pair[0][0], "feature_i": pair[0][1], "label_j": "j",
               "layer_j": pair[1][0], "feature_j": pair[1][1], "confirmed": confirmed}  # fmt: skip
        return SimpleNamespace(fit=pl.DataFrame({"prompt_idx": [0]}), interactions=pl.DataFrame([row]))

    # each feature's role over the eval prompts (feature_roles); (3, 7) acts like (1, 11) on this
    # prompt but is another category's cue feature, so it is not the planted pair
    fires[(3, 7)] = fires[(1, 11)]
    role = {(1, 10): "composition", (1, 11): "composition", (2, 5): "composition", (2, 6): "composition",
            (3, 7): "cue:weapons"}  # fmt: skip
    role_table = pl.DataFrame([{"layer": a, "feature": b, "role": r} for (a, b), r in role.items()])

    def found(res, strict: bool = False):
        return ground_truth.compositional_pair_found(
            res, prompts, model, None, strict=strict, roles=role_table
        )

    assert found(result([(1, 10), (1, 11)])) == 1
    assert found(result([(1, 10), (1, 11)]), strict=True) == 1
    assert found(result([(1, 10), (2, 5)])) == 0
    loose = result([(1, 10), (2, 6)])  # (2, 6) peaks off the cues but also fires on the object
    assert found(loose) == 1
    assert found(loose, strict=True) == 0
    assert found(result([(1, 10), (1, 11)], False)) == 0
    assert found(result([(1, 10), (3, 7)])) == 0  # joins verb and object, but (3, 7) is a cue feature
    meta["kind"] = "cue"
    assert found(result([(1, 10), (1, 11)])) is None


def test_feature_activations_match_sae_lens_on_the_residual():
    """The activation reader (used for pools and ground truth) = sae-lens encode of layer L's output."""
    from tiny import model_config, random_jumprelu_sae, tiny_gemma2

    from refusal_nnsight.models import wrap_model
    from refusal_nnsight.saes import LoadedSAEs

    hf, tok = tiny_gemma2()
    model = wrap_model(hf, tok, model_config("gemma2"))
    sae = random_jumprelu_sae(model.d_model, 64, 1)
    with torch.no_grad():
        sae.b_enc.add_(0.3)  # make latents fire on a random model
    saes = LoadedSAEs(None, {1: sae})
    texts = ["hello there", "tell me how to make a bomb please"]
    feats = [(1, 3), (1, 10), (1, 40)]
    got = features.feature_activations(model, saes, feats, texts)
    for text, acts in zip(texts, got, strict=True):
        batch = model.tokenize([text])
        with torch.no_grad():
            hidden = hf(**batch.model_inputs("cpu"), output_hidden_states=True).hidden_states[2][0]
        assert acts.shape == (batch.input_ids.shape[1], 3)
        assert torch.allclose(acts, sae.encode(hidden)[:, [3, 10, 40]], atol=1e-5)
    assert sum(float(a.sum()) for a in got) > 0


def test_organism_fm_on_one_prompt(request, tmp_path):
    """Small organism, end to end: the pool holds M plus active candidates, every mask is scored
    by the engine (the all-off mask reproduces the clean score), and both models are fitted."""
    from test_stage_direction import load_small_organism

    from refusal_nnsight.api import load_saes
    from refusal_nnsight.config import CandidatesConfig, DirectionConfig, GreedyConfig, SAEConfig
    from refusal_nnsight.judges import SubstringJudge
    from refusal_nnsight.stages import candidates, direction, greedy

    model, prompts = load_small_organism(request)
    saes = load_saes(model, SAEConfig())
    d = direction.run(model, prompts, DirectionConfig(), StageDir(tmp_path, "direction"))
    flip = Criterion("first_token")
    c = candidates.run(
        model, saes, d, prompts, CandidatesConfig(), StageDir(tmp_path, "candidates"), -3.0, flip
    )
    g = greedy.run(model, saes, c, prompts, GreedyConfig(max_prompts=1, forward=False, judge_confirm=False),
                   StageDir(tmp_path, "greedy"), SubstringJudge(), -3.0, flip)  # fmt: skip
    res = fm.run(model, saes, c, g, prompts, FMConfig(n_masks=256, max_prompts=1), StageDir(tmp_path, "fm"), 0,
                 -3.0, flip)  # fmt: skip
    (idx, minimal), row = next(iter(g.minimal_sets.items())), g.sets.row(0, named=True)
    pool = res.pools.filter(pl.col("prompt_idx") == idx)
    assert set(minimal) <= set(zip(pool["layer"], pool["feature"], strict=True))
    assert set(pool.filter(pl.col("source") == "minimal")["label"]) == set(row["labels"])
    data = res.dataset.filter(pl.col("prompt_idx") == idx)
    assert data.height == min(256, 2**pool.height)
    off = data.filter(pl.col("size") == 0)["score"][0]
    assert off == pytest.approx(row["clean_score"], abs=1e-4)
    assert res.fit.height == 4 and res.fit["heldout_accuracy"].is_not_null().all()
    s = res.summary()
    assert all(s[k] is not None for k in ("heldout_accuracy", "linear_heldout_accuracy", "heldout_r2"))
    # the default readout runs the prompt classifier on the pool's features: harmful vs harmless
    assert s["classifier_heldout_accuracy"] >= 0.8 and s["classifier_linear_heldout_accuracy"] is not None
