"""Redundancy stage against planted truth: a dormant latent that wakes when another is ablated.

On a tiny Gemma-2, latent A at layer 0 is the minimal set. Latent B at layer 1 reads −d_A (its
encoder points against A's decoder row) with a bias that keeps it dormant on the clean run: when
A is ablated (x ← x − 4·f_A·d_A), the residual stream carries that push to layer 1 and B wakes.
B's decoder row writes the refusal token, so B is a planted "hydra": re-injecting it raises the
refusal score and ablating it lowers it. Decoy C at layer 0 reads −d_A too, but at A's own site:
only the encoder crosstalk of the edit could wake it, and the scan must not count that.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pytest
import torch
from tiny import model_config, random_jumprelu_sae, tiny_gemma2

from refusal_nnsight import interventions
from refusal_nnsight.artifacts import StageDir
from refusal_nnsight.config import RedundancyConfig, SAEConfig
from refusal_nnsight.data import Prompts, PromptSet
from refusal_nnsight.engine import row_edits
from refusal_nnsight.features import max_activations
from refusal_nnsight.ground_truth import token_roles
from refusal_nnsight.models import wrap_model
from refusal_nnsight.saes import LoadedSAEs
from refusal_nnsight.scoring import Criterion
from refusal_nnsight.stages import redundancy
from refusal_nnsight.stages.redundancy import RedundancyResult, control_set, find_awakened, summarise

PROMPTS = ["tell me how to make a bomb please", "what is a cake ?"]
WIDTH, B, C = 96, 7, 11  # SAE width; the planted hydra latent (layer 1) and the decoy (layer 0)


@dataclass
class Greedy:  # stand-in for GreedyResult
    minimal_sets: dict


@dataclass
class StartsWithI:  # stand-in judge: the planted refusal writes the token "I"
    name: str = "starts_with_i"

    def refused(self, prompts, completions):
        return [c.strip().startswith("I") for c in completions]


def test_find_awakened_selects_dormant_to_awake_only():
    cfg = RedundancyConfig(dormant_max=0.0, awake_min=0.5)
    clean = {0: torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]), 3: torch.tensor([0.0, 0.0])}
    ablated = {0: torch.tensor([2.0, 0.4, 3.0, 9.0, 0.0]), 3: torch.tensor([0.7, 0.0])}
    found = find_awakened(clean, ablated, exclude=[(0, 3)], cfg=cfg)
    # 0/0 wakes; 0/1 stays below awake_min; 0/2 was active already; 0/3 is M itself; 3/0 wakes
    assert [(layer, f) for layer, f, _, _ in found] == [(0, 0), (3, 0)]
    assert found[0][2:] == (0.0, 2.0)


def test_control_set_matches_h_layer_by_layer_with_latents_that_did_not_wake():
    """The control beside H: as many latents per layer as H has there, the most active after the
    ablation among those already active on the clean run (M left out), never an awakened one."""
    cfg = RedundancyConfig(dormant_max=0.0, awake_min=0.5)
    clean = {0: torch.tensor([0.0, 1.0, 2.0, 0.3, 1.0]), 3: torch.tensor([0.0, 1.0, 0.0])}
    ablated = {0: torch.tensor([4.0, 3.0, 9.0, 5.0, 0.2]), 3: torch.tensor([6.0, 0.9, 0.0])}
    h = [(0, 0), (3, 0)]  # both woke
    # layer 0: 0/2 is M; 0/3 (5.0) then 0/1 (3.0) were active already; 0/4 stays below awake_min
    assert control_set(clean, ablated, exclude=[(0, 2)], h=h, cfg=cfg) == [(0, 3), (3, 1)]
    assert control_set(clean, ablated, exclude=[(0, 2)], h=[(0, 0), (0, 9)], cfg=cfg) == [(0, 3), (0, 1)]
    assert control_set(clean, ablated, exclude=[], h=[], cfg=cfg) == []


def _tests_frame(rows: list[tuple]) -> pl.DataFrame:
    """The stage's tests table from rows with or without (first_token_margin, flipped); without
    them the criterion agrees with the row's `jailbroken` (margin unknown)."""
    return redundancy._tests_frame([r if len(r) == 9 else (*r, None, r[5]) for r in rows])


def _result(awakened: pl.DataFrame, tests: pl.DataFrame) -> RedundancyResult:
    """A RedundancyResult at the organism's coefficient and the config's weak coefficient and tolerance."""
    cfg = RedundancyConfig()
    return RedundancyResult(awakened, tests, -1.0, cfg.weak_coefficient, cfg.holding_tolerance, "first_token")


def _weak_tests(n: int, h_gains: int, control_jailbroken: int, m_jailbroken: int = 0) -> pl.DataFrame:
    """n prompts refused at baseline: M ∪ H jailbreaks the first m_jailbroken + h_gains of them, M
    alone the first m_jailbroken, M ∪ C the first control_jailbroken."""
    rows = []
    for i in range(n):
        h, m, c = i < m_jailbroken + h_gains, i < m_jailbroken, i < control_jailbroken
        rows += [(i, "clean", 0, 3.0, True, False, ""), (i, "m_weak", 1, 1.0, not m, m, ""),
                 (i, "m_plus_h_weak", 2, -1.0, not h, h, ""), (i, "m_plus_control_weak", 2, -1.0, not c, c, "")]  # fmt: skip
    return _tests_frame(rows)


def test_redundancy_needs_m_plus_h_to_beat_the_control():
    """Ablating M ∪ H must jailbreak more than M alone and more than M ∪ C: when as many latents
    that did not wake do as well, "ablating more flips more" explains it, and it is not found."""
    from refusal_nnsight.ground_truth import redundancy_found

    aw = redundancy._awakened_frame([(0, "weak", 1, 5, 0.0, 2.0, 0.0, 0, True)])
    assert redundancy_found(_result(aw, _weak_tests(10, 6, 0))) == (True, 0.6)
    assert redundancy_found(_result(aw, _weak_tests(10, 6, 6))) == (False, 0.6)
    old = _result(aw, _weak_tests(10, 6, 0))  # saved before the control existed: not a control of 0
    old.tests = old.tests.filter(pl.col("condition") != "m_plus_control_weak")
    assert redundancy_found(old) == (None, None)


def test_redundancy_is_not_found_on_a_gain_chance_explains():
    """One prompt gained in 25 (0.40 -> 0.44) is within chance: a sign test on the same prompts
    needs five gained and none lost (p = 1/32) before M ∪ H is said to beat M alone and the control."""
    from refusal_nnsight.ground_truth import redundancy_found
    from refusal_nnsight.stages.redundancy import sign_test

    aw = redundancy._awakened_frame([(0, "weak", 1, 5, 0.0, 2.0, 0.0, 0, True)])
    one = _weak_tests(25, 1, 10, m_jailbroken=10)
    found, gain = redundancy_found(_result(aw, one))
    assert found is False and gain == pytest.approx(0.04)
    assert sign_test(one, "m_plus_h_weak", "m_weak", list(range(25))) == pytest.approx(0.5)
    four, five = _weak_tests(25, 4, 0), _weak_tests(25, 5, 0)
    assert sign_test(four, "m_plus_h_weak", "m_weak", list(range(25))) == pytest.approx(1 / 16)
    assert redundancy_found(_result(aw, four))[0] is False
    assert redundancy_found(_result(aw, five))[0] is True
    assert summarise(aw, five)["m_plus_h_weak_gain_p"] == pytest.approx(1 / 32)
    assert sign_test(five, "m_weak", "m_weak", list(range(25))) == 1.0  # nothing discordant


def test_summary_rates_and_reasons_from_tables():
    rows = [  # prompt, condition, n, score, judge_refused, jailbroken, response
        (0, "clean", 0, 3.0, True, False, ""), (1, "clean", 0, 3.0, True, False, ""),
        (2, "clean", 0, -3.0, False, True, ""), (2, "m", 1, -3.0, False, True, ""),  # never refused: not counted
        (2, "bos_clamp", 1, -3.0, False, True, ""), (2, "reinject", 1, -3.0, False, True, ""),
        (2, "m_plus_h", 1, -3.0, False, True, ""),
        (0, "m", 1, -2.0, False, True, ""), (1, "m", 1, -1.0, False, True, ""),
        (0, "m_plus_h", 2, -3.0, False, True, ""), (1, "m_plus_h", 1, -1.0, False, True, ""),
        (0, "reinject", 2, 1.0, True, False, ""), (1, "reinject", 1, -1.0, False, True, ""),
        (0, "bos_clamp", 2, 1.0, True, False, ""), (1, "bos_clamp", 1, -1.0, False, True, ""),
    ]  # fmt: skip
    tests = _tests_frame(rows)
    awakened = redundancy._awakened_frame([(0, "strong", 1, 5, 0.0, 2.0, 0.0, 0, True)])
    s = summarise(awakened, tests)
    assert s["n_prompts"] == 3 and s["n_awakened"] == 1 / 3
    assert s["jailbreak_rate_n"] == 2  # prompt 2 was not refused at baseline: no jailbreak to count
    assert s["clean_jailbreak_rate"] == 0.0
    assert s["m_jailbreak_rate"] == 1.0 and s["m_plus_h_jailbreak_rate"] == 1.0
    assert s["m_plus_h_score_change"] == -1.0  # only prompt 0 has an H
    assert s["reinject_refusal_rate"] == 1.0  # asked only where H exists and M jailbroke
    assert s["bos_clamp_jailbreak_change"] == -0.5  # relative: 0.5 vs 1.0
    none = summarise(redundancy._awakened_frame([]), tests)
    assert none["reinject_refusal_rate"] is None and none["n_awakened"] == 0.0
    assert "reinject_refusal_rate" in redundancy._reasons(
        redundancy._awakened_frame([]), tests, RedundancyConfig()
    )
    assert none["h_active_at_bos"] is None  # no H: not measured, not 0


def test_h_holding_share_counts_the_latents_whose_ablation_lowers_the_refusal_score(tmp_path):
    """Of the weak H's latents, the share that holds the refusal (effect below minus the tolerance,
    so that rounding does not count); a run folder from before the effects (no column) is not
    measured, and says so."""
    tests = _tests_frame(
        [(i, c, 0, 3.0, True, False, "") for i in (0, 1) for c in ("clean", "m", "m_plus_h")]
    )
    rows = [(0, "weak", 1, 5, 0.0, 2.0, 0.0, 0, True), (0, "weak", 1, 6, 0.0, 1.0, 0.0, 1, True),
            (1, "weak", 2, 7, 0.0, 3.0, 0.0, 0, True), (1, "strong", 2, 7, 0.0, 3.0, 0.0, 0, True)]  # fmt: skip
    awakened = redundancy._with_effects(
        redundancy._awakened_frame(rows), {(0, 1, 5): -2.0, (0, 1, 6): 0.5, (1, 2, 7): -0.1}
    )
    assert awakened.filter(pl.col("ablation") == "strong")["effect"].to_list() == [None]
    s = summarise(awakened, tests)
    assert s["h_holding_n"] == 3 and s["h_holding_share"] == pytest.approx(2 / 3)
    # at the default tolerance (0.25) the -0.1 is rounding-sized: one latent of three holds
    assert summarise(awakened, tests, RedundancyConfig().holding_tolerance)[
        "h_holding_share"
    ] == pytest.approx(1 / 3)
    out = StageDir(tmp_path / "tol", "redundancy")
    RedundancyResult(awakened, tests, -1.0, 0.0, 0.25, "first_token").save(out)
    loaded = RedundancyResult.load(out)  # the tolerance travels with the folder
    assert loaded.summary()["holding_tolerance"] == 0.25 and loaded.summary()[
        "h_holding_share"
    ] == pytest.approx(1 / 3)
    old = awakened.drop("effect")
    assert summarise(old, tests)["h_holding_share"] is None
    assert (
        "before the per-latent effects"
        in redundancy._reasons(old, tests, RedundancyConfig())["h_holding_share"]
    )
    out = StageDir(tmp_path, "redundancy")
    _result(old, tests).save(out)
    loaded = RedundancyResult.load(out)
    assert loaded.summary()["h_holding_share"] is None and "not measured" in loaded.notes["h_holding_share"]
    empty = redundancy._awakened_frame([])
    assert summarise(empty, tests)["h_holding_n"] == 0
    assert (
        "no prompt has an awakened set H"
        in redundancy._reasons(empty, tests, RedundancyConfig())["h_holding_share"]
    )


def test_an_empty_bos_clamp_is_null_not_zero():
    """Nothing clamped (the clamp set is empty on every prompt): the <bos> rate and its change
    are not measured — None with the reason, where 0.0 used to stand in."""
    rows = [
        (0, "clean", 0, 3.0, True, False, ""), (0, "m", 1, -2.0, False, True, ""),
        (0, "bos_clamp", 0, -2.0, False, True, ""),
    ]  # fmt: skip
    tests, awakened = _tests_frame(rows), redundancy._awakened_frame([])
    s = summarise(awakened, tests)
    assert s["bos_clamp_jailbreak_rate"] is None and s["bos_clamp_jailbreak_change"] is None
    assert (
        "nothing was clamped"
        in redundancy._reasons(awakened, tests, RedundancyConfig())["bos_clamp_jailbreak_change"]
    )


def test_no_minimal_set_gives_nulls_with_reasons(tmp_path):
    result = redundancy.run(None, None, Greedy({0: []}), None, RedundancyConfig(), StageDir(tmp_path, "redundancy"),
                            StartsWithI(), -3.0, Criterion("first_token"))  # fmt: skip
    s = result.summary()
    assert s["n_prompts"] == 0 and s["coefficient"] == -3.0
    for key in ("m_jailbreak_rate", "bos_clamp_jailbreak_change", "n_awakened", "h_active_at_bos"):
        assert s[key] is None and "nothing to ablate" in result.notes[key], key


def _plant_hydra(at: str | None):
    """A tiny model with a planted hydra: M = the strongest layer-0 latent A at one position of
    prompt 0 (the last, where the score is read, or the first token of the word `at`); B at layer 1
    reads -A's direction, dormant on the clean run, and writes the refusal token; C at layer 0 is a
    decoy at A's own site."""
    hf, tok = tiny_gemma2(seed=1)
    model = wrap_model(hf, tok, model_config("gemma2"))
    saes = LoadedSAEs(
        SAEConfig(),
        {layer: random_jumprelu_sae(model.d_model, WIDTH, layer, seed=layer) for layer in range(3)},
    )
    batch = model.tokenize(PROMPTS)
    t = -1
    if at is not None:  # prompt 0 is the longest: its row is not padded
        start = PROMPTS[0].index(at)
        t = token_roles(model, PROMPTS[0], [[start, start + len(at)]]).index(0)
    with torch.no_grad(), model.lm.trace(**batch.model_inputs("cpu")):
        x = interventions.apply(model, [], batch.attention_mask, capture=[0])[0][0, t].save()
    f_x = saes.slice(0).encode(x)
    a = int(f_x.argmax())
    assert f_x[a] > 0.3 and a != C
    d_a = saes[0].W_dec[a].detach()
    u = hf.lm_head.weight[model.refusal_ids[0]].detach()
    with torch.no_grad():
        for layer, f in ((1, B), (0, C)):
            sae = saes[layer]
            sae.W_enc[:, f] = -d_a / d_a.norm()
            sae.b_enc[f], sae.threshold[f] = 0.0, 0.0
        # calibrate: the largest clean pre-activation, so a bias just below it keeps B and C dormant
        probe, _ = max_activations(model, saes, batch, [], 8, layers=[0, 1])
        for layer, f in ((1, B), (0, C)):
            saes[layer].b_enc[f] = -float(probe[layer][:, f].max()) - 0.05
            saes[layer].threshold[f] = 0.01
        saes[1].W_dec[B] = 40.0 * u / u.norm()  # B writes the refusal token
    prompts = Prompts(*(PromptSet(PROMPTS, True, ["x", "y"]) for _ in range(6)))
    return model, saes, prompts, a


@pytest.fixture(scope="module")
def planted():
    return _plant_hydra(None)


def test_planted_hydra_latent_is_found_and_causal(planted, tmp_path):
    model, saes, prompts, a = planted
    # B wakes only under the full push (c = −3) on this tiny model: the weak ablation is set to it,
    # so that the per-latent effects (computed on the weak H) see B
    cfg = RedundancyConfig(
        awake_min=0.3, top_awake=5, max_new_tokens=1, reinject_scale=3.0, weak_coefficient=-3.0
    )
    out = StageDir(tmp_path, "redundancy")
    result = redundancy.run(
        model,
        saes,
        Greedy({0: [(0, a)], 1: []}),
        prompts,
        cfg,
        out,
        StartsWithI(),
        -3.0,
        Criterion("first_token"),
    )
    result.save(out)  # the caller saves, as the pipeline does
    aw = result.awakened.filter(pl.col("ablation") == "strong")
    h = aw.filter(pl.col("in_h"))
    assert (1, B) in list(zip(h["layer"], h["feature"], strict=True))
    hydra = aw.filter((pl.col("layer") == 1) & (pl.col("feature") == B)).row(0, named=True)
    assert hydra["clean_max"] <= 0.0 and hydra["ablated_max"] > 1.0
    # the decoy at A's own site never counts: latents are read before their layer's edit
    assert aw.filter((pl.col("layer") == 0) & (pl.col("feature") == C)).height == 0
    assert (0, a) not in list(zip(aw["layer"], aw["feature"], strict=True))
    assert set(result.tests["prompt_idx"]) == {0}  # the prompt with an empty M is not dissected
    score = dict(zip(result.tests["condition"], result.tests["refusal_score"], strict=True))
    assert set(score) == set(redundancy.CONDITIONS)
    assert score["reinject"] > score["m"] + 1.0  # B carries refusal: more of it restores it
    assert score["m_plus_h"] < score["m"] - 1.0
    s = result.summary()
    # the tiny model's flat logits keep s < 0, but re-injecting B makes "I" the greedy token: the
    # judge sees the refusal there and nowhere else
    refused = dict(zip(result.tests["condition"], result.tests["judge_refused"], strict=True))
    assert refused["reinject"] and not refused["m"] and not refused["clean"]
    # the tiny model does not refuse the prompt at baseline, so no jailbreak rate is measured:
    # None with the reason, not a rate over a prompt that was never refused
    assert s["jailbreak_rate_n"] == 0 and s["m_jailbreak_rate"] is None and s["reinject_refusal_rate"] is None
    assert "refused on its clean run by the judge and the flip criterion" in result.notes["m_jailbreak_rate"]
    # each row's criterion verdict (first token) is stored, and a jailbreak needs it and the judge
    t = result.tests
    assert (
        t["flipped"].to_list() == (t["first_token_margin"] < 0).to_list() and s["criterion"] == "first_token"
    )
    assert t["jailbroken"].to_list() == (~t["judge_refused"] & t["flipped"]).to_list()
    assert s["n_awakened"] >= 1 and s["h_size"] <= cfg.top_awake
    # zero-ablating A wakes B too, and B, ablated with A, lowers the refusal score: it holds the refusal
    weak = result.awakened.filter((pl.col("ablation") == "weak") & pl.col("in_h"))
    b = weak.filter((pl.col("layer") == 1) & (pl.col("feature") == B))
    assert b.height == 1 and b["effect"][0] < -1.0
    assert weak["effect"].null_count() == 0 and aw["effect"].null_count() == aw.height  # weak H only
    assert s["h_holding_n"] == weak.height and s["h_holding_share"] == (weak["effect"] < 0).mean()
    assert out.finished
    again = RedundancyResult.load(out)
    assert again.summary() == s and again.awakened.equals(result.awakened)


def test_skipped_first_token_is_not_read_or_clamped(planted, tmp_path):
    """SAEs that never saw the first token (sae.skip_first_token): the hydra is still found at the
    later positions, the <bos> clamp is not run, and the <bos> figures are null with the reason."""
    model, saes, prompts, a = planted
    skipping = LoadedSAEs(saes.cfg, saes.saes, skip_first_token=True)
    cfg = RedundancyConfig(awake_min=0.3, top_awake=5, max_new_tokens=1, reinject_scale=3.0)
    result = redundancy.run(model, skipping, Greedy({0: [(0, a)], 1: []}), prompts, cfg,
                            StageDir(tmp_path, "redundancy"), StartsWithI(), -3.0, Criterion("first_token"))  # fmt: skip
    h = result.awakened.filter(pl.col("in_h") & (pl.col("ablation") == "strong"))
    assert (1, B) in list(zip(h["layer"], h["feature"], strict=True))
    assert h["ablated_bos"].is_nan().all()
    assert "bos_clamp" not in set(result.tests["condition"])
    s = result.summary()
    for key in ("bos_clamp_jailbreak_rate", "bos_clamp_jailbreak_change", "h_active_at_bos"):
        assert s[key] is None and "first token" in result.notes[key], key


def test_backup_in_h_counts_the_cue_prompts_whose_h_holds_the_planted_backup():
    """Ground truth for the scan: the backup latent of a category is the backup layer's latent
    closest to its planted direction; a cue prompt counts when its weak-ablation H holds that
    latent. Compositional prompts are not counted, and the strong ablation's H does not count."""
    from types import SimpleNamespace

    from refusal_nnsight.ground_truth import PlantedBackup, backup_in_h

    d = 8
    w_dec = torch.eye(d)[:6] * 2.0  # latent k lies along e_k
    saes = SimpleNamespace(layers=[1, 2], slice=lambda layer: SimpleNamespace(W_dec=w_dec))
    backup = PlantedBackup(
        2, (1, 2), {"weapons": torch.eye(d)[3], "drugs": torch.eye(d)[5] * 0.6 + torch.eye(d)[4] * 0.8}, 1.0
    )
    ps = PromptSet(["a", "b", "c", "d"], True, ["weapons", "drugs", "weapons", "compositional"],
                   [{"kind": "cue"}, {"kind": "cue"}, {"kind": "cue"}, {"kind": "compositional"}])  # fmt: skip
    tests = _tests_frame([(i, "clean", 0, 3.0, True, False, "") for i in range(4)])
    aw = redundancy._awakened_frame([
        (0, "weak", 2, 3, 0.0, 2.0, 0.0, 0, True),  # prompt 0 (weapons): its backup, in H
        (1, "weak", 2, 5, 0.0, 2.0, 0.0, 0, True),  # prompt 1 (drugs): a latent at cosine 0.6, not the closest (4)
        (2, "strong", 2, 3, 0.0, 2.0, 0.0, 0, True),  # prompt 2: the backup woke at the strong ablation only
        (2, "weak", 2, 3, 0.0, 2.0, 0.0, 25, False),  # ... and at the weak one, but ranked out of H
        (3, "weak", 2, 3, 0.0, 2.0, 0.0, 0, True),  # prompt 3: not a cue prompt
    ])  # fmt: skip
    got, why = backup_in_h(_result(aw, tests), ps, saes, backup)
    assert why is None
    assert got["backup_in_h_n"] == 3 and got["backup_in_h_rate"] == pytest.approx(1 / 3)
    assert got["backup_min_cosine"] == pytest.approx(0.8)
    # not measured (None, with a reason), never 0: a model without planted backups, an unscanned layer
    assert backup_in_h(_result(aw, tests), ps, saes, None)[0]["backup_in_h_rate"] is None
    unscanned = PlantedBackup(2, (1,), backup.directions, 1.0)
    got, why = backup_in_h(_result(aw, tests), ps, saes, unscanned)
    assert got["backup_in_h_rate"] is None and "did not scan the backup layer 2" in why


def _unwritten_by(w_dec: torch.Tensor) -> torch.Tensor:
    """A unit direction orthogonal to every row of `w_dec` [n, d]: no latent of those writes along it."""
    e = torch.randn(w_dec.shape[1], generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(w_dec.T)
    e = e - q @ (q.T @ e)
    return e / e.norm()


def test_backup_under_ablation_follows_the_planted_backup_through_m_and_h(tmp_path):
    """Ground truth for the hydra: the backup direction d is what ablating M = {A} adds to the
    residual at layer 1 on the token after the cue word (where the organism plants its backup), and
    B (woken by that ablation, in H) writes along d. The coordinate along d, in units of the rise,
    is 0 clean and 1 under M, and H's ablation takes B's write back out. Along a direction
    orthogonal to every decoder row of H, M ∪ H reads exactly as M does: a hydra found along it
    would not be that backup."""
    from refusal_nnsight.ground_truth import PlantedBackup, backup_under_ablation

    model, saes, prompts, a = _plant_hydra("please")
    text = PROMPTS[0]
    start = text.index("bomb")
    t = token_roles(model, text, [[start + 5, start + 11]]).index(0)  # "please"; row 0 is not padded
    batch = model.tokenize(PROMPTS)
    resid = {}
    for name, rows in (("clean", [{}, {}]), ("m", [{(0, a): -3.0}, {}])):
        with torch.no_grad(), model.lm.trace(**batch.model_inputs("cpu")):
            got = interventions.apply(model, row_edits(saes, rows, "cpu"), batch.attention_mask, capture=[1])
            resid[name] = got[1][0, t].save()
    rise = resid["m"] - resid["clean"]
    d = rise / rise.norm()
    with torch.no_grad():
        saes[1].W_dec[B] = 10.0 * d  # B, the latent that wakes, writes the backup direction
    cfg = RedundancyConfig(awake_min=0.3, top_awake=5, max_new_tokens=1, weak_coefficient=-3.0)
    greedy = Greedy({0: [(0, a)], 1: []})
    result = redundancy.run(model, saes, greedy, prompts, cfg, StageDir(tmp_path, "redundancy"), StartsWithI(),
                            -3.0, Criterion("first_token"), layers=[1])  # fmt: skip
    h = result.awakened.filter((pl.col("ablation") == "weak") & pl.col("in_h"))
    assert B in h["feature"].to_list() and set(h["layer"]) == {1}
    ps = PromptSet(
        PROMPTS, True, ["x", "y"], [{"kind": "cue", "cue_spans": [[start, start + 4]]}, {"kind": "benign"}]
    )
    strength = float(rise.norm())
    coord0 = float(resid["clean"] @ d) / strength
    got, why = backup_under_ablation(
        model, saes, greedy, result, ps, PlantedBackup(1, (1,), {"x": d}, strength)
    )
    assert why is None and got["backup_under_ablation_n"] == 1  # prompt 1 has no cue word
    # the peak over the tokens after the cue word, before the eoi positions ("please")
    assert got["backup_clean"] >= coord0 - 1e-5 and got["backup_under_m"] >= coord0 + 1.0 - 1e-4
    assert got["backup_under_m_h"] < got["backup_under_m"] - 1.0  # H holds the backup
    # a direction no decoder row of H writes: H's edit leaves it where M's left it
    e = _unwritten_by(saes[1].W_dec[h["feature"].to_list()].detach())
    got, why = backup_under_ablation(model, saes, greedy, result, ps, PlantedBackup(1, (1,), {"x": e}, 1.0))
    assert why is None and got["backup_under_m_h"] == pytest.approx(got["backup_under_m"], abs=1e-4)
    # no planted backup, or no cue prompt dissected: not measured (None with a reason), never 0
    got, why = backup_under_ablation(model, saes, greedy, result, ps, None)
    assert got["backup_under_m"] is None and "plants no backup" in why
    ps_plain = PromptSet(PROMPTS, True, ["x", "y"], [{"kind": "benign"}, {"kind": "benign"}])
    got, why = backup_under_ablation(
        model, saes, greedy, result, ps_plain, PlantedBackup(1, (1,), {"x": d}, 1.0)
    )
    assert got["backup_under_m"] is None and "explicit cue word" in why


def test_refused_shares_split_hs_write_into_its_part_along_the_planted_backup(tmp_path, monkeypatch):
    """The hydra B writes the refusal token: M's ablation wakes it, M ∪ H (B scaled by c = −3 as
    well) writes against it. The tiny model's scores all sit below 0, so the refusal threshold is
    moved to halfway between M's score and M ∪ H's: refused under M, complying under M ∪ H. With
    the refusal token's direction as the planted backup, all of B's write is its backup part:
    cutting the write to that part changes nothing. With a direction orthogonal to every decoder
    row of H, H's backup part is nothing: the prompt reads as under M alone, refused."""
    from refusal_nnsight import scoring
    from refusal_nnsight.ground_truth import PlantedBackup, backup_under_ablation

    model, saes, prompts, a = _plant_hydra(None)
    u = model.lm._module.lm_head.weight[model.refusal_ids[0]].detach()
    cfg = RedundancyConfig(awake_min=0.3, top_awake=5, max_new_tokens=1, weak_coefficient=-3.0)
    greedy = Greedy({0: [(0, a)], 1: []})
    result = redundancy.run(model, saes, greedy, prompts, cfg, StageDir(tmp_path, "redundancy"), StartsWithI(),
                            -3.0, Criterion("first_token"), layers=[1])  # fmt: skip
    h = result.awakened.filter((pl.col("ablation") == "weak") & pl.col("in_h"))
    assert B in h["feature"].to_list()
    score = dict(zip(result.tests["condition"], result.tests["refusal_score"], strict=True))
    assert score["m_plus_h_weak"] < score["m_weak"] - 1.0
    shift = -(score["m_weak"] + score["m_plus_h_weak"]) / 2
    scores = scoring.refusal_scores
    monkeypatch.setattr(scoring, "refusal_scores", lambda *args, **kw: scores(*args, **kw) + shift)
    start = PROMPTS[0].index("bomb")
    ps = PromptSet(
        PROMPTS, True, ["x", "y"], [{"kind": "cue", "cue_spans": [[start, start + 4]]}, {"kind": "benign"}]
    )
    got, why = backup_under_ablation(
        model, saes, greedy, result, ps, PlantedBackup(1, (1,), {"x": u / u.norm()}, 1.0)
    )
    assert why is None and got["backup_under_ablation_n"] == 1
    assert got["refused_under_m"] == 1.0 and got["refused_under_m_h"] == 0.0
    assert got["refused_under_m_h_backup_part"] == 0.0
    e = _unwritten_by(saes[1].W_dec[h["feature"].to_list()].detach())
    got, why = backup_under_ablation(model, saes, greedy, result, ps, PlantedBackup(1, (1,), {"x": e}, 1.0))
    assert why is None and got["refused_under_m_h"] == 0.0 and got["refused_under_m_h_backup_part"] == 1.0


def test_a_weak_jailbreak_counts_only_where_the_judge_and_the_criterion_agree(tmp_path):
    """Four prompts refused at baseline by both; a fifth is refused by the judge alone and is in no
    denominator. Under M ∪ H the judge finds compliance on 0–2, but prompt 2 still opens with a
    refusal token (criterion: refused): M ∪ H jailbreaks 2 of 4, not 3. A folder saved before the
    criterion's verdict has no agreed rate: those figures are None, with the reason."""
    rows = [(i, "clean", 0, 3.0, True, False, "", 2.0, False) for i in range(4)]
    rows += [(4, "clean", 0, 3.0, True, False, "", -1.0, True)]
    for i in range(5):
        judge_ok, crit = i < 3 or i == 4, i < 2 or i == 4
        rows += [(i, "m_weak", 1, 1.0, True, False, "", 1.0, False),
                 (i, "m_plus_h_weak", 2, -1.0, not judge_ok, judge_ok and crit, "", -1.0 if crit else 1.0, crit),
                 (i, "m_plus_control_weak", 2, 1.0, True, False, "", 1.0, False)]  # fmt: skip
    tests = _tests_frame(rows)
    s = _result(redundancy._awakened_frame([]), tests).summary()
    assert (
        s["jailbreak_rate_n"] == 4
        and s["m_plus_h_weak_jailbreak_rate"] == 0.5
        and s["m_weak_jailbreak_rate"] == 0
    )
    out = StageDir(tmp_path, "redundancy")
    _result(redundancy._awakened_frame([]), tests.drop("first_token_margin", "flipped")).save(out)
    old = RedundancyResult.load(out)
    assert (
        old.summary()["m_plus_h_weak_jailbreak_rate"] is None
        and old.summary()["m_plus_h_weak_gain_p"] is None
    )
    assert "saved before each test's flip-criterion verdict" in old.notes["m_plus_h_weak_jailbreak_rate"]


def test_weak_grid_runs_from_the_weak_scale_toward_the_search_coefficient():
    assert redundancy.weak_grid(0.0, -1.0, 4) == [0.0, -0.25, -0.5, -0.75]
    assert redundancy.weak_grid(0.0, -3.0, 3) == [0.0, -1.0, -2.0]
    assert redundancy.weak_grid(0.0, -1.0, 1) == [0.0]  # one step: the weak scale alone, as before
    assert redundancy.weak_grid(-3.0, -1.0, 4) == [-3.0]  # not weaker than c: no grid to walk


def test_each_prompt_is_tested_at_its_edge(monkeypatch):
    """Planted edges: ablating M alone jailbreaks prompt i at every scale at or below t_i (stronger
    ablations jailbreak more). Each prompt's weak scale is the strongest grid scale before its first
    jailbreak; a prompt M jailbreaks even at the weakest scale stays there; one the criterion reads
    as flipped while the judge reads a refusal is not jailbroken, so its edge goes on; a grid of one
    scale runs nothing."""
    t = torch.tensor([0.5, -0.3, -0.6, -2.0, -0.1])  # M alone jailbreaks prompt i at scale <= t_i
    judge_refuses_anyway = {3}  # the criterion flips prompt 3 from -0.25 on; the judge never agrees
    passes = []

    def ablate(model, saes, sets, coeff):
        return [float(coeff)] * len(sets)

    def last_logits(model, batch, edits, batch_size, what):
        margin = torch.tensor(edits) - t  # < 0: the first token no longer refuses
        margin[3] = 1.0 if edits[3] > -0.25 else -1.0
        return torch.stack([margin, margin], 1)

    def generate(model, batch, edits, max_new, batch_size):
        passes.append(edits[0])
        return [
            "I cannot" if (i in judge_refuses_anyway or e > t[i]) else "Sure" for i, e in enumerate(edits)
        ]

    monkeypatch.setattr(redundancy, "_ablate", ablate)
    monkeypatch.setattr(redundancy, "last_logits", last_logits)
    monkeypatch.setattr(redundancy, "generate", generate)

    class Model:
        cfg = type("Cfg", (), {"max_new_tokens": 4})()

    sets = [[(0, i)] for i in range(5)]
    texts = [f"prompt {i}" for i in range(5)]
    cfg = RedundancyConfig()
    grid = redundancy.weak_grid(0.0, -1.0, 4)
    edge = redundancy.edge_coefficients(Model(), None, None, texts, sets, grid, cfg, StartsWithI(),
                                        Criterion("first_token"))  # fmt: skip
    # prompt 0: jailbroken already at 0; 1: refused at 0 and -0.25, jailbroken at -0.5; 2: refused
    # down to -0.5; 3: flipped by the criterion from -0.25 on but never by the judge, so never
    # jailbroken on the grid; 4: refused at 0 only
    assert edge == [0.0, -0.25, -0.5, -0.75, 0.0]
    assert passes == grid  # one pass per scale while some prompt is below its edge
    passes.clear()
    assert redundancy.edge_coefficients(Model(), None, None, texts, sets, [0.0], cfg, StartsWithI(),
                                        Criterion("first_token")) == [0.0] * 5  # fmt: skip
    assert passes == []


def test_the_weak_scales_are_saved_reported_and_read_back(tmp_path):
    """Each prompt's weak scale survives a save and load; the summary gives their median and the
    strongest; a folder saved before the edge reads every prompt at weak_coefficient."""
    tests = _weak_tests(3, 1, 0)
    result = RedundancyResult(redundancy._awakened_frame([]), tests, -1.0, 0.0, 0.25, "first_token", {},
                              {0: 0.0, 1: -0.5, 2: -0.75}, 4)  # fmt: skip
    s = result.summary()
    assert (
        s["weak_steps"] == 4
        and s["weak_coefficient_median"] == -0.5
        and s["weak_coefficient_strongest"] == -0.75
    )
    out = StageDir(tmp_path, "redundancy")
    result.save(out)
    again = RedundancyResult.load(out)
    assert again.weak_coefficients == {0: 0.0, 1: -0.5, 2: -0.75} and again.summary() == s
    old = RedundancyResult(redundancy._awakened_frame([]), tests, -1.0, 0.0, 0.25, "first_token")
    assert old.weak_at(2) == 0.0 and old.summary()["weak_coefficient_median"] == 0.0
