"""Model and SAE layer: family facts as data, one BOS, real-format SAE loaders, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fake_hub import add_gemma_scope, add_llama_scope
from tiny import model_config, tiny_gemma2, tiny_llama3

from refusal_nnsight.config import SAEConfig
from refusal_nnsight.errors import UserError
from refusal_nnsight.models import load_model, wrap_model
from refusal_nnsight.saes import SlicedSAE, load_saes


@pytest.mark.parametrize("family", ["gemma2", "llama3"])
def test_family_facts_come_from_the_template(family):
    hf, tok = tiny_gemma2() if family == "gemma2" else tiny_llama3()
    model = wrap_model(hf, tok, model_config(family))
    text = model.format(["hello there"])[0]
    if family == "gemma2":
        assert text == "<bos><start_of_turn>user\nhello there<end_of_turn>\n<start_of_turn>model\n"
        assert tok.convert_ids_to_tokens(model.eoi_ids) == [
            "<end_of_turn>",
            "\n",
            "<start_of_turn>",
            "model",
            "\n",
        ]
    else:
        assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert tok.convert_ids_to_tokens(model.eoi_ids)[:3] == [
            "<|eot_id|>",
            "<|start_header_id|>",
            "assistant",
        ]
    assert model.eoi_positions == list(range(-len(model.eoi_ids), 0))
    batch = model.tokenize(["hello there", "tell me how to make a cake please"])
    for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        assert int((row == model.bos_id).sum()) == 1  # exactly one BOS
        assert row[mask.bool()][0] == model.bos_id
        assert row[-len(model.eoi_ids) :].tolist() == model.eoi_ids
    assert batch.attention_mask[0, 0] == 0  # left padding
    assert model.refusal_ids == [tok.convert_tokens_to_ids("I")]


def test_double_bos_is_refused():
    hf, tok = tiny_gemma2()
    cfg = dataclasses.replace(model_config("gemma2"), chat_template="{{ bos_token }}" + tok.chat_template)
    with pytest.raises(UserError, match="BOS"):
        wrap_model(hf, tok, cfg)


def test_bad_family_facts_are_one_line_errors():
    hf, tok = tiny_gemma2()
    with pytest.raises(UserError, match="d_model"):
        wrap_model(hf, tok, dataclasses.replace(model_config("gemma2"), d_model=2304))
    with pytest.raises(UserError, match="residual_module"):
        wrap_model(hf, tok, dataclasses.replace(model_config("gemma2"), residual_module="model.blocks"))


def test_uncached_real_model_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = dataclasses.replace(model_config("gemma2"), repo_id="google/gemma-2-2b-it")
    with pytest.raises(UserError) as err:
        load_model(cfg)
    msg = str(err.value)
    assert "google/gemma-2-2b-it" in msg and "download" in msg and "\n" not in msg


LLAMA_SCOPE = SAEConfig(
    name="llama_scope_8x", source="pretrained", release="llama_scope_lxr_8x", sae_id="l{layer}r_8x"
)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.slow
def test_gemma_scope_format_loads_through_from_pretrained(fake_hub):
    """A random JumpReLU SAE in Gemma Scope's params.npz format, real loader, real shapes."""
    params = add_gemma_scope(fake_hub, 0, "layer_0/width_16k/average_l0_105")
    hf, tok = tiny_gemma2(n_layers=1, d=2304)
    model = wrap_model(hf, tok, dataclasses.replace(model_config("gemma2", n_layers=1, d=2304)))
    cfg = SAEConfig(name="gemma_scope_16k", source="pretrained", release="gemma-scope-2b-pt-res-canonical",
                    sae_id="layer_{layer}/width_16k/canonical", neuronpedia="gemma-2-2b/{layer}-gemmascope-res-16k")  # fmt: skip
    saes = load_saes(cfg, model)
    sae = saes[0]
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert torch.equal(sae.threshold, torch.from_numpy(params["threshold"]))
    x = torch.randn(3, 2304)
    # Gemma Scope's reference encoder: z·H(z − θ), z = x W_enc + b_enc (no b_dec subtraction)
    z = x @ torch.from_numpy(params["W_enc"]) + torch.from_numpy(params["b_enc"])
    ref = z * (z > torch.from_numpy(params["threshold"]))
    feats = [0, 5, 16383]
    assert torch.allclose(SlicedSAE.from_sae(sae, 0, feats).encode(x), ref[:, feats], atol=1e-5)
    assert saes.neuronpedia_url(0, 7) == "https://www.neuronpedia.org/gemma-2-2b/0-gemmascope-res-16k/7"


def test_llama_scope_format_loads_through_from_pretrained(fake_hub):
    add_llama_scope(fake_hub, 1, d_in=64, d_sae=256)
    hf, tok = tiny_llama3()
    model = wrap_model(hf, tok, model_config("llama3"))
    cfg = dataclasses.replace(LLAMA_SCOPE, layers=[1])
    saes = load_saes(cfg, model)
    assert saes.layers == [1] and saes.width(1) == 256
    # the scalar threshold is broadcast to every latent
    assert saes[1].threshold.unique().numel() == 1


def test_sae_errors_are_one_line(fake_hub, tmp_path):
    hf, tok = tiny_llama3()
    model = wrap_model(hf, tok, model_config("llama3"))
    cfg = dataclasses.replace(LLAMA_SCOPE, layers=[7])
    with pytest.raises(UserError, match="out of range"):
        load_saes(cfg, model)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_saes(dataclasses.replace(cfg, layers=[2]), model)  # not in the fake cache
    add_llama_scope(fake_hub, 2, d_in=32, d_sae=128)
    with pytest.raises(UserError, match="d_in=32"):
        load_saes(dataclasses.replace(cfg, layers=[2]), model)
    with pytest.raises(UserError, match="no sae-lens SAE"):
        load_saes(SAEConfig(source="disk", path=str(tmp_path / "missing_{layer}"), layers=[0]), model)


def test_sae_hook_must_match_its_layer(tmp_path):
    from tiny import random_jumprelu_sae

    hf, tok = tiny_gemma2()
    model = wrap_model(hf, tok, model_config("gemma2"))
    sae = random_jumprelu_sae(64, 128, layer=2)
    sae.save_model(str(tmp_path / "layer_1"))  # saved as if it were layer 1's
    with pytest.raises(UserError, match="reads layer 2"):
        load_saes(SAEConfig(source="disk", path=str(tmp_path / "layer_{layer}"), layers=[1]), model)
    sae.cfg.metadata.hook_name = "blocks.1.hook_mlp_out"
    sae.save_model(str(tmp_path / "layer_1"))
    with pytest.raises(UserError, match="not a residual-stream output"):
        load_saes(SAEConfig(source="disk", path=str(tmp_path / "layer_{layer}"), layers=[1]), model)


def test_skip_first_token_follows_what_the_saes_were_trained_on(tmp_path):
    """sae.skip_first_token: null means a tuned build's SAEs (trained without the first token) skip
    it and every other SAE edits it, as the paper does; an explicit value always wins."""
    import json

    from refusal_nnsight.saes import skip_first_token

    tuned, organism = tmp_path / "tuned", tmp_path / "organism"
    for folder, kind in ((tuned, "tuned"), (organism, "organism")):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"kind": kind}))
    assert skip_first_token(SAEConfig(), tuned) is True
    assert skip_first_token(SAEConfig(), organism) is False
    assert skip_first_token(SAEConfig(skip_first_token=False), tuned) is False
    assert skip_first_token(SAEConfig(source="pretrained", release="r", sae_id="s"), None) is False
    assert skip_first_token(SAEConfig(source="pretrained", skip_first_token=True), None) is True
