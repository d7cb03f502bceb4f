"""validate's table and verdict, on rows made up here (running the pipeline five times is the
command's job, not the test suite's)."""

from __future__ import annotations

import json

import polars as pl

from refusal_nnsight.organism import validate


def _row(seed: int, **changes) -> dict:
    row = {"seed": seed, "direction_jailbreak": 1.0, "direction_kl": 0.05, "direction_fallback": False,
           "all_candidates_jailbreak": 0.95, "one_minimal_rate": 1.0, "random_same_size_jailbreak": 0.0,
           "fm_heldout_accuracy": 0.95, "fm_beats_linear": True, "compositional_pair_found": True,
           "redundancy_found": True, "cue_recall": 1.0, "cue_precision": 0.9} | changes  # fmt: skip
    row["targets_met"] = {k: validate.meets(row.get(k), op, t) for k, (op, t) in validate.TARGETS.items()}
    return row


def test_every_target_is_checked_on_every_seed():
    good, bad = _row(0), _row(1, direction_kl=0.2, redundancy_found=None, cue_recall=0.5)
    assert all(good["targets_met"].values())
    assert [k for k, v in bad["targets_met"].items() if not v] == [
        "direction_kl",
        "redundancy_found",
        "cue_recall",
    ]


def test_table_has_a_row_per_figure_and_min_median_max(tmp_path):
    text = validate.write_table([_row(0), _row(1, direction_kl=0.2)], tmp_path)
    line = next(ln for ln in text.splitlines() if ln.startswith("| direction_kl |"))
    assert line.split("|")[3:8] == [" 0.05 ", " 0.2 ", " 0.05 ", " 0.125 ", " 0.2 "]
    assert "| targets_met |  | yes | no |" in text
    frame = pl.read_parquet(tmp_path / "validate.parquet")
    assert frame["seed"].to_list() == [0, 1] and frame["targets_met"].to_list() == [True, False]


def test_table_names_the_machine_each_seed_was_built_on(tmp_path):
    """A seed's build is exact on one kind of CPU only: the table says which, '—' where the
    manifest predates the record."""
    from refusal_nnsight.organism.check import describe_machine

    here = {"arch": "x86_64", "cpu": "AMD EPYC", "cpu_capability": "AVX512"}
    rows = [_row(0, built_on=describe_machine(None)), _row(1, built_on=describe_machine(here))]
    text = validate.write_table(rows, tmp_path)
    assert "| built_on |  | — | x86_64 AMD EPYC (AVX512) |  |  |  |" in text
    assert pl.read_parquet(tmp_path / "validate.parquet")["built_on"].to_list() == [
        "—",
        "x86_64 AMD EPYC (AVX512)",
    ]
    # a virtual machine's model name hides the generation; a build that recorded it says it
    zen4 = {**here, "cpu_id": "AuthenticAMD family 25 model 17 stepping 1"}
    assert describe_machine(zen4) == "x86_64 AMD EPYC (AVX512; AuthenticAMD family 25 model 17 stepping 1)"


def test_table_names_the_weights_each_column_comes_from(tmp_path):
    """Two tables agree on a seed only if its weights do: the row holds the hash of the organism's
    files, which one changed weight byte changes and the manifest (build time, machine) does not."""
    root = tmp_path / "organism"
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"\x00\x01\x02\x03")
    manifest = {"built_on": {"arch": "x86_64", "cpu": "AMD EPYC", "cpu_capability": "AVX512"}}
    (root / "manifest.json").write_text('{"created_at": "2026-12-01"}')
    first = validate.build_identity(root, manifest)
    assert first["built_on"] == "x86_64 AMD EPYC (AVX512)" and len(first["content_hash"]) == 16
    (root / "manifest.json").write_text('{"created_at": "2026-12-02"}')
    assert validate.build_identity(root, manifest) == first
    (root / "model" / "model.safetensors").write_bytes(b"\x00\x01\x02\x04")
    second = validate.build_identity(root, manifest)
    assert second["content_hash"] != first["content_hash"]
    text = validate.write_table([_row(0, **first), _row(1, **second)], tmp_path)
    assert f"| content_hash |  | {first['content_hash']} | {second['content_hash']} |  |  |  |" in text


def test_figures_are_read_from_the_summary_by_dotted_key():
    summary = {"ground_truth": {"cue_recall": 0.5}, "greedy": {}}
    assert validate._get(summary, "ground_truth.cue_recall") == 0.5
    assert validate._get(summary, "greedy.one_minimal_rate") is None  # not measured stays null


def test_scopes_follow_the_organisms_planted_layers():
    """all layers; the layers before the refusal decision; the cue layer with redundancy scanned
    at the backup layer — each a valid config."""
    from refusal_nnsight.cli import compose
    from refusal_nnsight.validation import validate as check_config

    runs = validate._runs({"cue_layer": 1, "backup_layer": 2, "decision_layer": 3})
    assert runs["cue"] == [
        "search.candidates.layers=[1]",
        "search.candidates.top_k=30",
        "search.redundancy.layers=[2]",
    ]
    for overrides in runs.values():
        cfg = compose([*overrides, "run_dir=unused"])
        check_config(cfg)
    cue = compose([*runs["cue"], "run_dir=unused"]).search
    assert cue.candidates.layers == [1] and cue.redundancy.layers == [2]
    harm = compose([*runs["harm"], "run_dir=unused"]).search
    assert harm.candidates.layers == {"before_layer": 3} and harm.candidates.top_k == 30
    assert (
        harm.candidates.per_layer
    )  # which layer's candidates undo the others' (all_candidates_without_layer0_flip)


def test_overrides_reach_every_scope_after_its_own_and_are_named_in_the_table(monkeypatch, tmp_path):
    """A setting measured across seeds: each scope's run gets the user's overrides after its own,
    so search.candidates.top_k=40 replaces the harm and cue scopes' 30; the table's first line
    names them. An override of what validate sets itself (the organism, the run folder) is
    refused, not silently lost."""
    import pytest

    from refusal_nnsight import pipeline
    from refusal_nnsight.errors import UserError
    from refusal_nnsight.organism import build

    layers = {"cue_layer": 1, "backup_layer": 2, "decision_layer": 3}
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "manifest.json").write_text(json.dumps({"model": layers}))
    monkeypatch.setattr(build, "ensure_organism", lambda recipe, seed: tmp_path / "org")
    monkeypatch.setattr(
        validate, "build_identity", lambda root, manifest: {"built_on": "—", "content_hash": "x"}
    )
    seen = {}
    monkeypatch.setattr(
        pipeline, "run", lambda cfg: seen.setdefault(cfg.run_dir.rsplit("/", 1)[-1], cfg) and {}
    )
    row = validate.run_seed(
        "default", 3, tmp_path / "out", ["search.candidates.top_k=40", "search.fm.n_masks=64"]
    )
    assert set(seen) == {"all_layers", "harm", "cue"} and row["seed"] == 3
    assert all(cfg.search.fm.n_masks == 64 and cfg.search.candidates.top_k == 40 for cfg in seen.values())
    assert seen["harm"].search.candidates.per_layer and seen["cue"].search.redundancy.layers == [2]
    assert all(cfg.model.organism_seed == 3 for cfg in seen.values())
    text = validate.write_table([_row(0)], tmp_path, ["search.candidates.top_k=40"])
    assert text.startswith("every run with: `search.candidates.top_k=40`\n\n| figure |")
    assert validate.write_table([_row(0)], tmp_path).startswith("| figure |")
    for bad in ("model.organism_seed=2", "run_dir=/tmp/x", "search.fm"):
        with pytest.raises(UserError):
            validate.check_overrides([bad])
    validate.check_overrides(["+search.fm.extra_active=4", "search.coefficient=-3"])


def test_every_row_names_a_figure_the_pipeline_writes():
    """A misspelt dotted key would read null on every seed, as "not measured", and a target on it
    would fail for the wrong reason. Every row's key resolves in the checked-in smoke summary (a
    real pipeline run, held to the code by test_expected_summary), up to per-layer figures, whose
    parent the one-layer smoke run writes as null."""
    from pathlib import Path

    summary = json.loads((Path(__file__).parent / "expected" / "smoke_summary.json").read_text())
    for name, (_, path) in validate.FIGURES.items():
        *parent, last = path.split(".")
        holder = validate._get(summary, ".".join(parent)) if parent else summary
        if last.isdigit() and holder is None:  # {layer: figure}, null where one layer is searched
            assert ".".join(parent) in {"candidates.layer_without_flip_rate", "candidates.layer_without_jailbreak_rate",
                                        "candidates.layer_kept_activation"}, name  # fmt: skip
            continue
        assert isinstance(holder, dict) and last in holder, f"{name}: {path} is not in a summary"
