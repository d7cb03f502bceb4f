"""report.md and figures from stand-in stage results; stages that did not run are skipped with a note."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import torch

from refusal_nnsight.artifacts import RunFolder
from refusal_nnsight.features import CARD_SCHEMA
from refusal_nnsight.figures import FIGURES
from refusal_nnsight.report import found_sentences, write_report


@dataclass
class Direction:
    table: pl.DataFrame
    layer: int = 1
    position: int = -1
    direction: torch.Tensor = field(default_factory=lambda: torch.ones(4))
    fallback: bool = True
    fallback_reason: str = "every candidate had KL > 0.1"


@dataclass
class Candidates:
    table: pl.DataFrame

    @property
    def features(self):
        return list(zip(self.table["layer"], self.table["feature"], strict=True))


@dataclass
class Greedy:
    minimal_sets: dict
    trajectory: pl.DataFrame
    sets: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(
        {"prompt_idx": [0, 3], "clean_score": [4.0, 3.5], "final_score": [-2.0, -1.0]}))  # fmt: skip
    score_threshold: float = 0.8
    coefficient: float = -3.0


@dataclass
class FM:
    fit: pl.DataFrame
    interactions: pl.DataFrame


@dataclass
class Redundancy:
    awakened: pl.DataFrame
    notes: dict


@dataclass
class Evaluate:
    completions: pl.DataFrame


def _results() -> dict:
    direction = Direction(pl.DataFrame({
        "position": [p for p in (-2, -1) for _ in range(3)], "layer": [0, 1, 2] * 2,
        "bypass_score": [1.0, -2.0, 0.5, 0.3, -3.0, 2.0], "kept": [True, True, False, True, True, False]}))  # fmt: skip
    candidates = Candidates(pl.DataFrame({"layer": [0, 0, 1, 2], "feature": [4, 9, 17, 3],
                                          "cosine": [0.4, 0.2, 0.6, 0.1], "rank_in_layer": [0, 1, 0, 0]}))  # fmt: skip
    greedy = Greedy({0: [(1, 17)], 3: [(0, 4), (2, 3)]}, pl.DataFrame({
        "prompt_idx": [0, 0, 0, 3, 3], "method": ["backward"] * 5, "step": [0, 1, 2, 0, 1],
        "score": [-4.0, -3.0, -1.0, -2.0, -0.5]}))  # fmt: skip
    fm = FM(
        pl.DataFrame({"prompt_idx": [0] * 4, "model": ["fm", "linear"] * 2,
                      "task": ["regression"] * 2 + ["classification"] * 2,
                      "heldout_r2": [0.9, 0.6, None, None], "heldout_accuracy": [0.95, 0.9, 0.97, 0.8]}),
        pl.DataFrame({"prompt_idx": [0, 0], "label_i": ["L1/F17", "L0/F4"], "label_j": ["L0/F4", "L2/F3"],
                      "v_dot": [1.5, -0.7], "confirmed": [True, False]}),
    )  # fmt: skip
    red = Redundancy(pl.DataFrame({
        "prompt_idx": [0, 0, 3], "ablation": ["strong", "weak", "strong"], "layer": [2, 2, 1], "feature": [8, 8, 30],
        "clean_max": [0.0, 0.0, 0.0], "ablated_max": [2.5, 0.9, 1.2], "in_h": [True, True, True]}),
        {"bos_clamp_jailbreak_change": "no awakened latent is active at <bos>"})  # fmt: skip
    ev = Evaluate(pl.DataFrame({"condition": ["none", "none", "minimal", "none"], "harmful": [True, True, True, False],
                                "is_jailbreak_substring": [False, True, True, True]}))  # fmt: skip
    return {"direction": direction, "candidates": candidates, "greedy": greedy, "fm": fm,
            "redundancy": red, "evaluate": ev}  # fmt: skip


def _cards(neuronpedia: str | None) -> pl.DataFrame:
    """Feature cards of the stand-in minimal sets: L1/F17 in one set, L0/F4 and L2/F3 in the other."""
    rows = []
    for (layer, feature), n_minimal in (((1, 17), 1), ((0, 4), 1), ((2, 3), 1)):
        rows.append({
            "layer": layer, "feature": feature, "label": f"L{layer}/F{feature}", "n_minimal": n_minimal,
            "n_dissected": 2, "fm_best_rank": 0 if feature == 17 else None, "n_fm_top": int(feature == 17),
            "n_in_h": 0, "cosine": 0.5, "fires_harmful": 1.0, "fires_harmless": 0.25, "max_activation": 3.0,
            "top_contexts": [f"… how to [[bomb]] (L{layer})…"], "top_activations": [3.0], "top_sources": ["harmful:0"],
            "coefficient": -3.0, "criterion": "first_token", "alone_score_change": -4.5, "alone_flip_rate": 0.5,
            "neuronpedia": neuronpedia and f"{neuronpedia}/{feature}", "role": None, "role_share": None,
        })  # fmt: skip
    return pl.DataFrame(rows, schema=CARD_SCHEMA)


CFG = {
    "model": {"name": "gemma2_2b_it", "repo_id": "google/gemma-2-2b-it", "dtype": "bfloat16", "max_new_tokens": 64},
    "sae": {"name": "gemma_scope_16k", "source": "pretrained", "release": "gemma-scope-2b-pt-res-canonical",
            "sae_id": "layer_{layer}/width_16k/canonical", "neuronpedia": "gemma-2-2b/{layer}-gemmascope-res-16k"},
    "data": {"name": "organism", "n_train": 128, "n_val": 32, "n_eval": 64, "seed": 0},
    "search": {"name": "default", "coefficient": -3.0, "greedy": {"criterion": "first_token"}},
    "judge": {"name": "substring"}, "seed": 0,
    "stages": ["direction", "candidates", "greedy", "fm", "redundancy", "evaluate"],
}  # fmt: skip
SUMMARY = {"model": "gemma2_2b_it", "direction": {"layer": 1, "kl": 0.05}, "redundancy": {"n_awakened": 1.5},
           "timing": {"direction_s": 1.2, "total_s": 9.0}}  # fmt: skip


def test_report_and_every_figure_from_stand_ins(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "greedy").mkdir()
    (tmp_path / "greedy" / "sets.parquet").write_bytes(b"x")
    results = {
        **_results(),
        "features": _cards("https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k"),
    }
    path = write_report(run, SUMMARY, results, CFG)
    text = path.read_text()
    for spec in FIGURES:
        png = run.figure(spec.name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", spec.name
        assert f"figures/{spec.name}.png" in text and spec.caption in text  # every figure has its caption
    assert "gemma2_2b_it" in text and "google/gemma-2-2b-it" in text and "n_train=128" in text
    assert "**direction**\n\n| quantity | value |\n|---|---|\n| layer | 1 |\n| kl | 0.05 |" in text
    assert "| n_awakened | 1.5 |" in text and "| sae |" not in text  # results only, no settings
    assert "https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/17" in text
    assert "`greedy/sets.parquet`" in text and "fm: no files" in text
    assert "no awakened latent is active at <bos>" in text and "fallback" in text
    assert not list(tmp_path.glob("figures/.*tmp"))  # atomic writes leave no temporaries


def test_missing_stages_skip_their_figures(tmp_path):
    run = RunFolder(tmp_path)
    results = {k: v for k, v in _results().items() if k in ("direction", "greedy")}
    results["features"] = _cards(None)
    text = write_report(
        run, {"status": "no harmful prompt is refused"}, results, {"model": {"name": "organism"}}
    ).read_text()
    assert run.figure("direction_selection").exists() and run.figure("greedy_minimal_sets").exists()
    for name in ("candidate_cosines", "fm_fit", "fm_interactions", "redundancy", "evaluate_rates"):
        assert not run.figure(name).exists()
    assert "skipped: stage fm did not run" in text and "skipped: stage redundancy did not run" in text
    assert "no harmful prompt is refused" in text
    assert "L1/F17" in text and "neuronpedia" not in text  # the organism has no Neuronpedia pages


FULL_SUMMARY = {
    "model": "organism",
    "greedy": {"n_prompts": 4, "criterion": "first_token", "coefficient": -3.0, "score_threshold": 1.25,
               "criterion_judge_agreement": 0.97, "score_judge_agreement": 0.41, "first_token_judge_agreement": 0.97,
               "agreement_n": 30, "median_one_minimal_set_size": 3.0, "median_smallest_set_size": 2.0,
               "n_smallest_below_one_minimal": 1},
    "fm": {"n_confirmed_pairs": 5, "n_synergy_pairs": 2, "n_redundant_pairs": 1, "n_suppression_pairs": 2,
           "n_masks_per_prompt": 2048, "n_masks_total": 8192, "classifier_heldout_accuracy": 0.98,
           "classifier_linear_heldout_accuracy": 0.93, "classifier_n_heldout": 192},
    "evaluate": {"coefficient": -3.0, "minimal_jailbreak_rate": 0.9, "minimal_zero_ablation_jailbreak_rate": 0.0,
                 "minimal_jailbreak_rate_n": 30, "criterion": "first_token", "judge_criterion_disagreements": 1,
                 "judge_criterion_disagreements_n": 53},
    "redundancy": {"weak_coefficient": 0.0, "bos_clamp_jailbreak_change": None},
}  # fmt: skip


@dataclass
class EvaluateWithComparison:
    completions: pl.DataFrame
    comparison: pl.DataFrame
    notes: dict


def test_report_states_the_edit_criterion_and_honest_rates(tmp_path):
    results = _results()
    results["evaluate"] = EvaluateWithComparison(
        results["evaluate"].completions,
        pl.DataFrame({"prompt_set": ["fm_prompts", "fm_prompts"], "condition": ["minimal", "minimal_plus_fm"],
                      "jailbreak_rate": [0.75, 1.0], "judge_jailbreak_rate": [1.0, 1.0], "n": [4, 4]}),
        {"candidates_ablated_jailbreak_rate": "condition candidates_ablated did not run"},
    )  # fmt: skip
    cfg = {
        **CFG,
        "search": {**CFG["search"], "redundancy": {"bos_features": "awakened", "bos_clamp_value": 0.0}},
    }
    text = write_report(RunFolder(tmp_path), FULL_SUMMARY, results, cfg).read_text()
    assert "scales the chosen latents by c = -3" in text and "negative steering" in text
    assert "Flip criterion `first_token`" in text and "τ = 1.25" in text
    assert "configured (first_token) 0.97, score 0.41, first_token 0.97" in text
    # where the judge alone counts a jailbreak the criterion does not, the agreed rate is the lower one
    assert (
        "| fm_prompts | minimal | 0.75 | 1 | 4 |" in text
        and "| fm_prompts | minimal_plus_fm | 1 | 1 | 4 |" in text
    )
    assert "the flip criterion (`first_token`) reads a flip" in text and "They part on 1 of the 53" in text
    assert "at c = -3: 0.9; at c = 0 (zero-ablation): 0" in text
    assert "median size 3; smallest verified set (backward or forward): median 2" in text
    assert "(synergy 2, redundant 1, suppression 2)" in text
    assert "FM 0.98, linear 0.93" in text and "2048 per prompt, 8192 in total" in text
    assert "evaluate.candidates_ablated_jailbreak_rate: condition candidates_ablated did not run" in text
    assert (
        "at every position)" in text
        and "its <bos> clamp sets the awakened latents to 0 at <bos> only" in text
    )


def test_the_method_lines_say_when_the_first_token_is_left_alone(tmp_path):
    """SAEs that never saw a prompt's first token: the edit line says so, and the <bos> clamp is
    reported as not run rather than described as if it had been."""
    from refusal_nnsight.artifacts import write_json

    run = RunFolder(tmp_path)
    write_json(run.provenance, {"sae": {"skip_first_token": True}})
    text = write_report(run, FULL_SUMMARY, _results(), CFG).read_text()
    assert "at every position but each prompt's first token)" in text
    assert "its <bos> clamp was not run (the SAEs never saw the first token)" in text
    assert "at <bos> only" not in text


def test_found_sentences_follow_the_numbers():
    """The report's first section is generated from the numbers; each verdict follows its comparison."""
    summary = {
        **FULL_SUMMARY,
        "direction": {"layer": 3, "position": -1, "kl": 0.04, "fallback": True},
        "fm": {"n_prompts": 4, "heldout_accuracy": 0.9, "linear_heldout_accuracy": 0.95, "heldout_r2": 0.6,
               "linear_heldout_r2": 0.4},
        "redundancy": {"h_size": 3.0, "n_prompts_with_h": 2, "n_prompts": 4, "weak_coefficient": 0.0,
                       "m_weak_jailbreak_rate": 0.25, "m_plus_h_weak_jailbreak_rate": 0.75},
        "evaluate": {**FULL_SUMMARY["evaluate"], "direction_ablation_jailbreak_rate": 0.5,
                     "direction_ablation_jailbreak_rate_n": 8, "random_same_size_jailbreak_rate": None,
                     "random_same_size_jailbreak_rate_n": 30},
    }  # fmt: skip
    text = "\n".join(found_sentences(summary, {}, _cards(None)))
    assert "jailbreaks 4 of 8 (0.5)" in text and "It is a fallback" in text
    assert "silent on their clean prompt" not in text  # not counted (an older folder): no clause
    woken = {**summary, "greedy": {**summary["greedy"], "woken_member_share": 0.25, "woken_member_n": 8}}
    assert (
        "2 of the 8 memberships are latents silent on their clean prompt, woken only by the other members' edits"
        in "\n".join(found_sentences(woken, {}, _cards(None)))
    )
    assert (
        "Greedy dissected 4 prompts" in text
        and "jailbreak 27 of 30 (0.9) generations (judge and criterion agreeing)" in text
    )
    assert "Random sets of the same sizes" in text and "jailbreak not measured" in text  # None is never 0
    assert "shape the score, not the decision" in text  # R² better, accuracy not
    # a run folder saved before the control existed: M ∪ H beating M alone is not called redundancy
    assert "raises the jailbreak rate from 0.25 to 0.75; the control" in text
    assert "redundancy found" not in text
    assert "[L1/F17](#l1f17)" in text  # the most frequent minimal-set features link to their cards
    summary["fm"]["heldout_accuracy"] = 0.97
    assert "so the interactions add something" in "\n".join(found_sentences(summary, {}, None))
    tested = {
        **summary["fm"],
        "beats_linear": False,
        "beats_linear_p": 0.31,
        "fm_only_right": 3,
        "linear_only_right": 2,
    }
    text = "\n".join(found_sentences({**summary, "fm": tested}, {}, None))  # ahead, but not significantly
    assert "so the interactions add something" not in text
    assert (
        "a little better than the linear model, but not significantly (sign test on the 5 held-out masks that "
        "only one of them labels right: 3 to 2, p = 0.31)"
    ) in text
    tested.update(beats_linear=True, beats_linear_p=0.0001, fm_only_right=40, linear_only_right=2)
    assert "3 to 2" not in (text := "\n".join(found_sentences({**summary, "fm": tested}, {}, None)))
    assert "better than the linear model (sign test on the 42 held-out masks" in text
    assert "so the interactions add something" in text
    summary["fm"].update(heldout_accuracy=0.9, heldout_r2=0.3)
    assert "the interactions add nothing measurable" in "\n".join(found_sentences(summary, {}, None))
    summary["redundancy"]["m_plus_control_weak_jailbreak_rate"] = 0.5  # the control does less
    assert "0.25 to 0.75 (as many latents that were already active: 0.5); whether that is more than chance was " \
        "not tested" in "\n".join(found_sentences(summary, {}, None))  # fmt: skip
    summary["redundancy"].update(
        m_plus_h_weak_gain_p=0.01, m_plus_h_weak_control_p=0.03, gain_significance=0.05
    )
    assert "0.25 to 0.75 (as many latents that were already active: 0.5; one-sided sign-test p = 0.01 against M " \
        "alone, 0.03 against the control): redundancy found" in "\n".join(found_sentences(summary, {}, None))  # fmt: skip
    summary["redundancy"]["m_plus_h_weak_control_p"] = 0.5  # as likely as not against the control
    assert "does not separate that from chance (one-sided p = 0.01 against M alone, 0.5 against the control; " \
        "level 0.05): no redundancy found" in "\n".join(found_sentences(summary, {}, None))  # fmt: skip
    summary["redundancy"]["m_plus_h_weak_control_p"] = 0.03
    summary["redundancy"]["m_plus_control_weak_jailbreak_rate"] = 0.75  # the control does as well
    assert "but as many latents that were already active raise it to 0.75: no redundancy found" in "\n".join(
        found_sentences(summary, {}, None)
    )
    summary["redundancy"]["m_plus_h_weak_jailbreak_rate"] = 0.25
    assert "does not raise the jailbreak rate (0.25 → 0.25): no redundancy found" in "\n".join(
        found_sentences(summary, {}, None)
    )
    assert "lower the refusal score" not in "\n".join(found_sentences(summary, {}, None))  # not measured
    summary["redundancy"].update(h_holding_share=0.25, h_holding_n=8)
    assert "one at a time with M (same c), 2 of H's 8 latents lower the refusal score, as a feature that holds " \
        "the refusal would; the other 6 raise it or leave it" in "\n".join(found_sentences(summary, {}, None))  # fmt: skip
    summary["redundancy"]["holding_tolerance"] = 0.25
    assert "2 of H's 8 latents lower the refusal score by more than 0.25, as a feature that holds the refusal " \
        "would; the other 6 raise it or move it by 0.25 or less" in "\n".join(found_sentences(summary, {}, None))  # fmt: skip
    summary["redundancy"].update(h_holding_share=1 / 8)
    assert "1 of H's 8 latents lowers the refusal score by more than 0.25" in "\n".join(
        found_sentences(summary, {}, None)
    )


def test_cards_render_where_found_contexts_and_single_ablation(tmp_path):
    results = {
        **_results(),
        "features": _cards("https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k"),
    }
    text = write_report(RunFolder(tmp_path), FULL_SUMMARY, results, CFG).read_text()
    card = text[text.index("### L1/F17") :].split("\n\n")[1]
    assert "in 1 of 2 minimal sets; FM top-1 (top 5 on 1 prompts)" in card
    assert "[L1/F17](https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/17)" in card
    assert "ablated alone (c = -3): refusal score -4.5 on average; flips 50% of the dissected prompts" in card
    assert "`… how to [[bomb]] (L1)…` 3 (harmful #0)" in card
    assert text.index("## What we found") < text.index("## Feature cards") < text.index("## Figures")


def test_a_run_that_dissects_nothing_says_so_and_flags_a_breaking_direction():
    """No prompt flipped by all candidates: one sentence says nothing was dissected and why, instead
    of a random baseline, interactions and redundancy over no prompts; a direction whose ablation
    moves harmless outputs by KL >= 1 nat is flagged as possibly breaking the model."""
    summary = {
        "direction": {"layer": 4, "position": -1, "kl": 12.9, "fallback": True},
        "candidates": {"n_features": 40, "layers": [6, 12], "coefficient": -3.0, "criterion": "first_token",
                       "all_ablated_flip_rate": 0.0, "all_ablated_flip_rate_n": 29},
        "greedy": {"n_prompts": 0},
        "fm": {"n_prompts": None},
        "redundancy": {"n_prompts": 0},
        "evaluate": {"direction_ablation_jailbreak_rate": 1.0, "direction_ablation_jailbreak_rate_n": 29,
                     "direction_kl": 13.25, "random_same_size_jailbreak_rate": None},
    }  # fmt: skip
    text = "\n".join(found_sentences(summary, {}, None))
    assert "13.25 nats" in text and "the model breaking" in text
    assert "Nothing dissected" in text and "flips 0 of 29 (0)" in text
    assert "Random sets" not in text and "Interactions" not in text and "Redundancy" not in text
    summary["evaluate"]["direction_kl"] = 0.05
    assert "the model breaking" not in "\n".join(found_sentences(summary, {}, None))


def test_random_baseline_counts_draws_not_prompts():
    """The random same-size rate averages every draw of every prompt: 1 jailbreak in 3 draws on
    each of 32 prompts is "1 of 96", never "0 of 32" beside a non-zero rate."""

    @dataclass
    class Evaluate:
        random_sets: pl.DataFrame

    sets = pl.DataFrame({"prompt_idx": [i for i in range(32) for _ in range(3)], "draw": [0, 1, 2] * 32})
    ev = {**FULL_SUMMARY["evaluate"], "random_same_size_jailbreak_rate": 1 / 96,
          "random_same_size_jailbreak_rate_n": 32}  # fmt: skip
    summary = {**FULL_SUMMARY, "evaluate": ev}
    text = "\n".join(found_sentences(summary, {"evaluate": Evaluate(sets)}, None))
    assert "jailbreak 1 of 96 (0.01042) of their draws (3 per prompt) on the same 32 prompts" in text
    alone = "\n".join(found_sentences(summary, {}, None))  # draws unknown: a rate, not a count
    assert "0 of 32" not in alone and "0.01042 on average over 32" in alone


def test_card_says_why_a_feature_peaking_on_cues_is_not_a_cue():
    """A card whose role was withheld (it peaks on cue words but fires on most plain harmless prompts)
    names where it peaks and why it is not a cue; a plain role reads as before."""
    from refusal_nnsight.report import _card

    row = _cards(None).row(0, named=True)
    plain = "\n".join(_card(dict(row, role="cue:weapons", role_share=0.9)))
    assert (
        "- planted role: **cue:weapons** (90% of its 10 strongest activations are on cue:weapons words)"
        in plain
    )
    general = "\n".join(
        _card(dict(row, role="other", role_share=0.6, role_peak="composition", role_plain_share=1.0))
    )
    assert "**other**: 60% of its 10 strongest activations are on composition words" in general
    assert "fires on 100% of the harmless eval prompts that hold no planted word" in general
    generic = "\n".join(_card(dict(row, role="generic", role_share=0.9, role_peak="cue:poison",
                                    role_cue_categories=["drugs", "poison", "weapons"])))  # fmt: skip
    assert (
        "**generic**: 90% of its 10 strongest activations are on cue:poison words, but it fires on at least "
        "half of the cue words of 3 harm categories (drugs, poison, weapons)"
    ) in generic
    on_verbs = "\n".join(_card(dict(row, role="generic", role_share=0.9, role_peak="cue:fraud",
                                     role_cue_categories=["composition", "fraud"])))  # fmt: skip
    assert (
        "but it fires on at least half of the cue words of 1 harm categories (fraud) and of the harm verbs "
        "and person words: it reads what they share"
    ) in on_verbs


def test_card_says_where_a_feature_without_a_majority_tag_peaks():
    """A feature is "other" when no planted tag holds half of its top activations; its card says so
    and names the tag that holds the most, rather than a share that reads as the share of "other"."""
    from refusal_nnsight.report import _card

    row = _cards(None).row(0, named=True)
    split = "\n".join(_card(dict(row, role="other", role_share=0.4, role_peak="composition")))
    assert (
        "**other**: no planted tag holds half of its 10 strongest activations "
        "(the most, 40%, are on composition words)"
    ) in split
    untagged = "\n".join(_card(dict(row, role="other", role_share=0.4, role_peak=None)))
    assert "(the most, 40%, are on no planted word)" in untagged
    majority = "\n".join(_card(dict(row, role="other", role_share=0.7, role_peak=None)))
    assert "**other** (70% of its 10 strongest activations are on no planted word)" in majority
    refusal = "\n".join(_card(dict(row, role="refusal", role_share=0.8, role_peak=None)))
    assert "(80% of its 10 strongest activations are on the post-instruction positions)" in refusal
    dormant = "\n".join(_card(dict(row, role="dormant", role_share=0.0, role_peak=None)))
    assert "**dormant**: it fires on none of the clean eval prompts" in dormant


def test_candidates_sentence_sets_the_judge_beside_the_criterion():
    """On the same refused prompts: where the ablated model opens with the refusal's first token
    and then complies, the criterion says refused and the judge says jailbroken — the report says
    how often, with an example, and that greedy leaves those prompts out."""
    from refusal_nnsight.stages.evaluate import EvaluateResult

    @dataclass
    class Candidates:
        prompts: pl.DataFrame

    # prompt 3 is not refused at baseline: not counted. 0 agrees (flip); 1 and 2 open with "I'm"
    # and comply; 4 flips by the criterion and the judge finds a refusal.
    cands = Candidates(pl.DataFrame({"prompt_idx": [0, 1, 2, 3, 4], "refused": [True, True, True, False, True],
                                     "jailbroken": [True, False, False, False, True]}))  # fmt: skip
    done = pl.DataFrame({
        "prompt_idx": [0, 1, 2, 3, 4, 0],
        "condition": ["candidates_ablated"] * 5 + ["none"],
        "response": ["Sure, here", "I'm: here are some.", "I'm: here is how", "Sure", "I'm sorry", "I'm sorry"],
        "is_jailbreak_substring": [True, True, True, True, False, False],
    })  # fmt: skip
    ev = EvaluateResult(done, pl.DataFrame(), {"judge": "substring"})
    summary = {"candidates": {"n_features": 5, "layers": [0, 1], "coefficient": -3.0, "criterion": "first_token",
                              "all_ablated_flip_rate": 0.5, "all_ablated_flip_rate_n": 4}}  # fmt: skip
    text = "\n".join(found_sentences(summary, {"candidates": cands, "evaluate": ev}, None))
    assert "flips 2 of 4 (0.5) refused prompts by the `first_token` criterion" in text
    assert "the same ablation jailbreaks 3 of 4 of them" in text
    assert (
        "on 2 the criterion counts a refusal where the judge finds compliance (e.g. “I'm: here are some.”)"
        in text
    )
    assert "greedy leaves those prompts out; on 1 the criterion counts a flip the judge does not." in text
    assert "Judged on their generations" not in "\n".join(
        found_sentences(summary, {"candidates": cands}, None)
    )


def test_planted_truth_sentence_says_whether_h_holds_the_planted_backup():
    """Beside "redundancy found", the organism's run says on how many dissected cue prompts H held
    the planted backup's latent, so a redundancy found through other latents is not read as the
    planted one; without a measurement the clause is left out, not written as 0."""
    gt = {"cue_recall": 1.0, "cue_precision": 1.0, "refusal_features": [], "compositional_pair_found": True,
          "redundancy_found": True, "backup_in_h_rate": 0.0, "backup_in_h_n": 14, "backup_min_cosine": 0.28}  # fmt: skip
    summary = {**FULL_SUMMARY, "ground_truth": gt, "redundancy": {"weak_coefficient": 0.0}}
    text = "\n".join(found_sentences(summary, {}, None))
    assert "redundancy found: yes." in text
    assert (
        "cosine ≥ 0.28) is in H on 0 of the 14 dissected prompts with a cue word (M ablated at c = 0)" in text
    )
    gt.update(backup_in_h_rate=0.625, backup_in_h_n=16)
    assert "is in H on 10 of the 16 dissected prompts" in "\n".join(found_sentences(summary, {}, None))
    # each prompt at its edge: the report states the grid and the scales it chose
    summary["redundancy"] = {"weak_coefficient": 0.0, "coefficient": -1.0, "weak_steps": 4,
                             "weak_coefficient_median": -0.5, "weak_coefficient_strongest": -0.75}  # fmt: skip
    assert (
        "(M ablated at each prompt's edge (the strongest of 4 scales from c = 0 toward c = -1 before the "
        "first at which M alone jailbreaks it; median c = -0.5, strongest -0.75))"
    ) in "\n".join(found_sentences(summary, {}, None))
    gt.update(backup_in_h_rate=None, backup_in_h_n=None)
    assert "planted backup" not in "\n".join(found_sentences(summary, {}, None))


def test_planted_truth_sentence_follows_the_planted_backup_through_m_and_h():
    """The planted backup's own coordinate clean, under M and under M ∪ H, and the share of what
    M's ablation woke that H removes; a backup M does not wake is said to be no planted hydra."""
    gt = {"cue_recall": 1.0, "cue_precision": 1.0, "refusal_features": [], "compositional_pair_found": True,
          "redundancy_found": True, "backup_in_h_rate": 0.0769, "backup_in_h_n": 13, "backup_min_cosine": 0.28,
          "backup_clean": 0.076, "backup_under_m": 0.196, "backup_under_m_h": 0.128}  # fmt: skip
    summary = {**FULL_SUMMARY, "ground_truth": gt, "redundancy": {"weak_coefficient": 0.0}}
    text = "\n".join(found_sentences(summary, {}, None))
    assert "is 0.076 clean, 0.196 with M ablated and 0.128 with M and H ablated (same c)" in text
    assert "H removes 0.5667 of what M's ablation woke." in text
    gt.update(backup_under_m=0.07, backup_under_m_h=0.07)
    assert "M's ablation does not wake it, so no hydra found here is the planted one." in "\n".join(
        found_sentences(summary, {}, None)
    )
    gt.update(backup_under_m=None)
    assert "with M and H ablated" not in "\n".join(found_sentences(summary, {}, None))


def test_planted_truth_sentence_names_the_undissected_categories_and_whether_c_offered_their_cues():
    """The recall over every planted category names those greedy never dissected and says how many
    planted categories the candidates hold a cue feature of, so a loss after the ranking (all of C
    left those prompts refused) reads apart from one in the ranking; without a figure, no clause."""
    gt = {"cue_recall": 1.0, "cue_categories_dissected": 4, "cue_recall_planted": 0.6667,
          "cue_categories_planted": 6, "cue_categories_undissected": ["cybercrime", "weapons"],
          "cue_candidate_recall": 1.0, "cue_candidate_recall_planted": 1.0, "cue_precision": 1.0,
          "refusal_features": [], "compositional_pair_found": True}  # fmt: skip
    summary = {**FULL_SUMMARY, "ground_truth": gt}
    text = "\n".join(found_sentences(summary, {}, None))
    assert (
        "those never dissected counted as missed: 0.6667 (never dissected: cybercrime, weapons; share of "
        "the 6 with a cue feature among the candidates: 1)"
    ) in text
    gt.update(cue_candidate_recall_planted=None)
    assert "(never dissected: cybercrime, weapons);" in "\n".join(found_sentences(summary, {}, None))
    gt.update(cue_categories_undissected=[])
    assert "never dissected:" not in "\n".join(found_sentences(summary, {}, None))


def test_candidates_sentence_counts_the_silent_candidates_and_names_the_ranked_pool():
    """|C| is not the number of latents the ablation acts through: the sentence says how many fire
    on no harmful eval prompt, and which latents were ranked when min_active restricted them."""
    cand = {"n_features": 90, "layers": [0, 1, 2], "coefficient": -1.0, "all_ablated_flip_rate": 1.0,
            "all_ablated_flip_rate_n": 8, "criterion": "first_token", "n_silent": 48, "min_active": 0}  # fmt: skip
    text = "\n".join(found_sentences({"candidates": cand}, {}, None))
    assert (
        "90 SAE latents on layers [0, 1, 2] point most along it (48 of them fire on no harmful eval prompt, "
        "so their edit changes nothing there); ablating all of them"
    ) in text
    cand.update(n_silent=0, min_active=1)
    text = "\n".join(found_sentences({"candidates": cand}, {}, None))
    assert (
        "90 SAE latents on layers [0, 1, 2], of those active on at least 1 harmful train prompts, point most along "
        "it; ablating"
    ) in text
    cand.update(n_silent=None, min_active=None)  # a folder saved before either
    assert "point most along it; ablating" in "\n".join(found_sentences({"candidates": cand}, {}, None))
