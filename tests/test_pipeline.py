"""The whole pipeline on the small organism (experiment=smoke): summary.json has every key other
tools read, the report and figures exist, and a rerun of the same run_dir resumes."""

from __future__ import annotations

import json

import pytest

from refusal_nnsight import pipeline

SUMMARY_KEYS = [
    "evaluate.baseline_harmful_refusal_rate",
    "evaluate.baseline_harmless_refusal_rate",
    "direction.layer",
    "direction.position",
    "direction.bypass_score",
    "direction.induce_score",
    "direction.kl",
    "evaluate.direction_ablation_jailbreak_rate",
    "evaluate.direction_ablation_jailbreak_rate_n",
    "evaluate.direction_actadd_harmless_refusal_rate",
    "candidates.n_features",
    "candidates.all_ablated_flip_rate",
    "evaluate.candidates_ablated_jailbreak_rate",
    "greedy.n_prompts",
    "greedy.median_one_minimal_set_size",
    "greedy.median_smallest_set_size",
    "greedy.criterion_judge_agreement",
    "greedy.one_minimal_rate",
    "greedy.jailbreak_rate",
    "evaluate.random_same_size_jailbreak_rate",
    "evaluate.minimal_jailbreak_rate",
    "evaluate.minimal_zero_ablation_jailbreak_rate",
    "greedy.forward_median_set_size",
    "fm.n_masks_per_prompt",
    "fm.n_masks_total",
    "fm.n_synergy_pairs",
    "fm.classifier_heldout_accuracy",
    "fm.classifier_linear_heldout_accuracy",
    "fm.heldout_accuracy",
    "fm.linear_heldout_accuracy",
    "fm.heldout_r2",
    "fm.linear_heldout_r2",
    "fm.top_pair_confirmed_rate",
    "redundancy.n_awakened",
    "redundancy.m_jailbreak_rate",
    "redundancy.m_plus_h_jailbreak_rate",
    "redundancy.reinject_refusal_rate",
    "redundancy.bos_clamp_jailbreak_change",
    "ground_truth.cue_recall",
    "ground_truth.cue_recall_planted",
    "ground_truth.cue_precision",
    "ground_truth.refusal_features",
    "ground_truth.compositional_pair_found",
    "ground_truth.redundancy_found",
    "ground_truth.redundancy_jailbreak_gain",
    "ground_truth.backup_in_h_rate",
    "ground_truth.backup_under_m",
    "ground_truth.backup_under_m_h",
    "timing.total_s",
    "timing.direction_s",
    "timing.candidates_s",
    "timing.greedy_s",
    "timing.fm_s",
    "timing.redundancy_s",
    "timing.evaluate_s",
]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        assert part in d, f"summary.json lacks {dotted}"
        d = d[part]
    return d


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(smoke_run):
    cfg, run_dir, summary = smoke_run
    summary = json.loads(json.dumps(summary))  # a copy: the fixture is shared
    for key in SUMMARY_KEYS:
        _get(summary, key)
    assert summary["evaluate"]["baseline_harmful_refusal_rate"] > 0.5
    assert summary["greedy"]["one_minimal_rate"] == 1.0
    report = (run_dir / "report.md").read_text()
    assert report.strip()
    # null, not 0, for what was not measured: every null a stage writes has its reason in the notes
    for stage in ("candidates", "greedy", "fm", "redundancy", "evaluate"):
        for key, value in summary[stage].items():
            if value is None and not key.endswith("_n"):
                assert f"- {stage}.{key}: " in report, f"{stage}.{key} is null without a reason"
    assert list((run_dir / "figures").glob("*.png"))
    for stage in cfg.stages:
        assert (run_dir / stage / "done.json").exists()
    # resume: every stage is loaded, the numbers are the same
    again = pipeline.run(cfg)
    again.pop("timing")
    # the fixture's summary is shared with other tests: compared without its timings, not mutated
    assert json.loads(json.dumps(again)) == {k: v for k, v in summary.items() if k != "timing"}


def test_default_run_folder_is_runs_model_timestamp(small_organism, tmp_path, monkeypatch, capsys):
    from cli_runner import run_cli

    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["experiment=smoke", "stages=[direction]"], monkeypatch, capsys)
    assert code == 0, err
    (run,) = (tmp_path / "runs" / "organism").iterdir()
    assert (run / "summary.json").exists() and (run / ".hydra" / "config.yaml").exists()
