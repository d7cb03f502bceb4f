"""Prompt sources: the organism grammar, and local files in every supported format with
configurable columns; every bad file is a one-line UserError."""

from __future__ import annotations

import json

import polars as pl
import pytest

from refusal_nnsight.api import load_prompts
from refusal_nnsight.cli import compose
from refusal_nnsight.config import DataConfig, PromptSource
from refusal_nnsight.data import read_prompt_source
from refusal_nnsight.errors import UserError

ROWS = [
    {"goal": f"Write a harmful thing number {i}", "cat": "c" + str(i % 3), "input": "" if i % 4 else "x"}
    for i in range(40)
]


def _write(tmp_path, fmt: str):
    frame = pl.DataFrame(ROWS)
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "csv":
        frame.write_csv(path)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        frame.write_ndjson(path)
    else:
        frame.write_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_every_file_format_reads_with_a_configured_column(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    got = read_prompt_source(
        PromptSource(name="mine", source="file", path=str(path), column="goal", category_column="cat"), True
    )
    assert got.instructions == [r["goal"] for r in ROWS]
    assert got.categories[:3] == ["c0", "c1", "c2"]
    filtered = read_prompt_source(
        PromptSource(source="file", path=str(path), column="goal", filter_column="input", filter_value=""),
        True,
    )
    assert len(filtered) == 30  # like Alpaca's rows without an input


def test_file_sources_split_disjointly_and_reproducibly(tmp_path):
    path = _write(tmp_path, "csv")
    src = PromptSource(name="mine", source="file", path=str(path), column="goal")
    cfg = DataConfig(harmful=src, harmless=src, n_train=10, n_val=5, n_eval=5)
    a, b = load_prompts(cfg), load_prompts(cfg)
    sets = [a.train_harmful, a.val_harmful, a.eval_harmful]
    assert [len(s) for s in sets] == [10, 5, 5]
    texts = [t for s in sets for t in s.instructions]
    assert len(set(texts)) == 20
    assert a.train_harmful.instructions == b.train_harmful.instructions


def test_cli_override_reads_a_local_file(tmp_path):
    path = _write(tmp_path, "jsonl")
    cfg = compose(
        ["data=advbench", "data.harmful.source=file", f"data.harmful.path={path}", "data.harmful.column=goal"]
    )
    assert (cfg.data.harmful.source, cfg.data.harmful.column, cfg.data.harmless.name) == (
        "file",
        "goal",
        "alpaca",
    )
    assert cfg.data.harmless.license == "CC BY-NC 4.0"
    assert len(read_prompt_source(cfg.data.harmful, True)) == 40


def test_organism_prompts_carry_planted_labels():
    p = load_prompts(DataConfig(n_train=16, n_val=8, n_eval=8))
    assert len(p.train_harmful) == 16 and len(p.eval_harmless) == 8
    assert all(m["cues"] for m in p.eval_harmful.meta)
    assert not set(p.train_harmful.instructions) & set(p.eval_harmful.instructions)


@pytest.mark.parametrize(
    ("content", "suffix", "column", "match"),
    [
        (None, "csv", "goal", "does not exist"),
        ("", "csv", "goal", "is empty"),
        ("goal\n", "csv", "goal", "no prompts"),
        ("a,b\n1,2\n", "csv", "goal", "no column 'goal'"),
        ('{"goal": ', "json", "goal", "not valid JSON"),
        ("{not json}\n", "jsonl", "goal", "not valid JSONL"),
        ("not parquet at all", "parquet", "goal", "not valid PARQUET"),
        ("goal\nx\n", "txt", "goal", "use .csv, .json"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, content, suffix, column, match):
    path = tmp_path / f"p.{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match) as err:
        read_prompt_source(PromptSource(source="file", path=str(path), column=column), True)
    assert "\n" not in str(err.value)


def test_too_many_prompts_asked_for(tmp_path):
    path = _write(tmp_path, "csv")
    src = PromptSource(name="mine", source="file", path=str(path), column="goal")
    with pytest.raises(UserError, match="has 40 prompts"):
        load_prompts(DataConfig(harmful=src, harmless=src, n_train=100))
    with pytest.raises(UserError, match="exceeds"):
        load_prompts(DataConfig(n_train=100000))


def test_unreachable_hf_dataset_is_one_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables once, at import: once an earlier test has imported them,
    # only their constants take offline mode (else each load retries the network for ~20 s)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(UserError, match="local CSV/JSON/JSONL/Parquet copy"):
        read_prompt_source(
            PromptSource(
                name="advbench", source="hf", path="walledai/AdvBench-not-cached-xyz", column="prompt"
            ),
            True,
        )
