"""The one intervention operator, tested hardest: no-op, exact ablation, parity with a plain
torch hook, SlicedSAE = sae-lens, edits reach generated tokens, batched = one-by-one."""

from __future__ import annotations

import pytest
import torch
from tiny import model_config, random_jumprelu_sae, tiny_gemma2, tiny_llama3

from refusal_nnsight.generation import generate
from refusal_nnsight.interventions import (
    DirectionAblation,
    DirectionAddition,
    FeatureEdit,
    Reconstruction,
    apply,
    position_mask,
)
from refusal_nnsight.models import wrap_model
from refusal_nnsight.saes import SlicedSAE
from refusal_nnsight.scoring import last_logits

PROMPTS = ["hello there", "tell me how to make a cake please", "what is a bomb ?"]
LAYER = 1


@pytest.fixture(scope="module", params=["gemma2", "llama3"])
def setup(request):
    hf, tok = tiny_gemma2() if request.param == "gemma2" else tiny_llama3()
    model = wrap_model(hf, tok, model_config(request.param))
    sae = random_jumprelu_sae(
        model.d_model, 256, LAYER, scope="gemma" if request.param == "gemma2" else "llama"
    )
    # Make latents fire on this model's residuals: bias the encoder so ~a third are active.
    with torch.no_grad():
        sae.b_enc.add_(0.3)
    return model, hf, sae


def _residual(model, batch, edits):
    with torch.no_grad(), model.lm.trace(**batch.model_inputs("cpu")):
        x = apply(model, edits, batch.attention_mask, capture=[LAYER])[LAYER].clone().save()
    return x


def test_noop_edit_returns_residual_exactly(setup):
    model, _, sae = setup
    batch = model.tokenize(PROMPTS)
    sliced = SlicedSAE.from_sae(sae, LAYER, range(0, 256, 3))
    clean = _residual(model, batch, [])
    for edit in (
        FeatureEdit(sliced, value=1.0),
        FeatureEdit(sliced, value=0.0, mask=torch.zeros(sliced.n_features, dtype=torch.bool)),
    ):
        assert torch.allclose(_residual(model, batch, [edit]), clean, atol=1e-6)


def test_scale_zero_removes_exactly_the_decoder_contribution(setup):
    model, _, sae = setup
    batch = model.tokenize(PROMPTS)
    clean = _residual(model, batch, [])
    f = sae.encode(clean)  # [B, T, n] from sae-lens itself
    j = int(f[batch.attention_mask.bool()].gt(0).sum(0).argmax())  # a latent that fires somewhere
    edited = _residual(model, batch, [FeatureEdit(SlicedSAE.from_sae(sae, LAYER, [j]), value=0.0)])
    expected = clean - f[..., j : j + 1] * sae.W_dec[j] * batch.attention_mask[..., None]
    assert f[..., j].abs().sum() > 0
    assert torch.allclose(edited, expected, atol=1e-5)
    # scale c: x' = x + (c − 1)·f_j·d_j
    edited3 = _residual(model, batch, [FeatureEdit(SlicedSAE.from_sae(sae, LAYER, [j]), value=-3.0)])
    assert torch.allclose(
        edited3, clean - 4 * f[..., j : j + 1] * sae.W_dec[j] * batch.attention_mask[..., None], atol=1e-5
    )


def test_along_keeps_only_the_chosen_latents_write_along_each_rows_direction(setup):
    """x' = x + (c − 1)·(f_j·d_j + (f_k·d_k · u_b) u_b) on row b: latent j, outside along_mask,
    writes in full; latent k writes only its part along that row's unit direction u_b."""
    model, _, sae = setup
    batch = model.tokenize(PROMPTS)
    clean = _residual(model, batch, [])
    f = sae.encode(clean)
    fired = f[batch.attention_mask.bool()].gt(0).sum(0)
    j, k = (int(i) for i in fired.argsort(descending=True)[:2])  # two latents that fire somewhere
    sliced = SlicedSAE.from_sae(sae, LAYER, [j, k])
    u = torch.randn(len(PROMPTS), model.d_model, generator=torch.Generator().manual_seed(0))
    u = u / u.norm(dim=-1, keepdim=True)
    keep = torch.tensor([[False, True]] * len(PROMPTS))
    edited = _residual(model, batch, [FeatureEdit(sliced, value=-3.0, along=u * 5.0, along_mask=keep)])
    w_k = f[..., k : k + 1] * sae.W_dec[k]  # [B, T, d]
    part = torch.einsum("btd,bd->bt", w_k, u)[..., None] * u[:, None, :]
    expected = clean - 4 * (f[..., j : j + 1] * sae.W_dec[j] + part) * batch.attention_mask[..., None]
    assert (f[..., k].abs().sum() > 0) and not torch.allclose(part, w_k, atol=1e-3)
    assert torch.allclose(edited, expected, atol=1e-5)
    # without along_mask every edited latent is cut to the direction; row slices keep each row's own
    both = FeatureEdit(sliced, value=-3.0, along=u)
    whole = _residual(model, batch, [both])
    w = f[..., j : j + 1] * sae.W_dec[j] + w_k
    along = torch.einsum("btd,bd->bt", w, u)[..., None] * u[:, None, :]
    assert torch.allclose(whole, clean - 4 * along * batch.attention_mask[..., None], atol=1e-5)
    assert torch.equal(both.rows(1, 3).along, u[1:3])


def test_clamp_sets_latent_value_and_keeps_error_term(setup):
    model, _, sae = setup
    batch = model.tokenize(PROMPTS)
    sliced = SlicedSAE.from_sae(sae, LAYER, [5, 7])
    edited = _residual(model, batch, [FeatureEdit(sliced, value=torch.tensor([2.0, 0.0]), mode="clamp")])
    clean = _residual(model, batch, [])
    real = batch.attention_mask.bool()
    f_clean, f_edit = sae.encode(clean), sae.encode(edited)
    # the error term of the clean residual is preserved: x' − D(f') = x − D(f) where f' = f with S clamped
    f_target = f_clean.clone()
    f_target[..., 5], f_target[..., 7] = 2.0, 0.0
    err_clean = clean - sae.decode(f_clean)
    err_edit = edited - sae.decode(f_target)
    assert torch.allclose(err_clean[real], err_edit[real], atol=1e-5)
    assert not torch.allclose(f_edit[real][:, 5], f_clean[real][:, 5])


def test_nnsight_edit_equals_plain_torch_hook(setup):
    model, hf, sae = setup
    batch = model.tokenize(PROMPTS)
    edits = [
        FeatureEdit(SlicedSAE.from_sae(sae, LAYER, [1, 2, 3, 40]), value=-3.0),
        DirectionAddition(torch.randn(model.d_model), layer=2),
    ]
    got = last_logits(model, batch, edits)

    def hook_for(layer):
        def hook(module, args, output):
            where = position_mask("all", batch.attention_mask, 0, output.shape[1])
            for e in edits:
                if layer in e.layers:
                    output = e.edit(output, where)
            return output

        return hook

    handles = [hf.model.layers[layer].register_forward_hook(hook_for(layer)) for layer in (1, 2)]
    try:
        with torch.no_grad():
            want = hf(**batch.model_inputs("cpu")).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, last_logits(model, batch), atol=1e-3)  # the edit did something


def test_direction_ablation_removes_the_direction_everywhere(setup):
    model, _, _ = setup
    batch = model.tokenize(PROMPTS)
    r = torch.randn(model.d_model)
    x = _residual(model, batch, [DirectionAblation(r)])
    proj = x[batch.attention_mask.bool()] @ (r / r.norm())
    assert proj.abs().max() < 1e-4


def test_sliced_sae_equals_sae_lens_on_its_features(setup):
    _, _, sae = setup
    x = torch.randn(4, 7, sae.W_enc.shape[0]) * 2
    feats = [0, 3, 17, 100, 255]
    sliced = SlicedSAE.from_sae(sae, LAYER, feats)
    assert torch.allclose(sliced.encode(x), sae.encode(x)[..., feats], atol=1e-6)
    assert sliced.encode(x).gt(0).any()


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_sliced_sae_other_architectures(arch):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = (
        StandardSAE(StandardSAEConfig(d_in=16, d_sae=64))
        if arch == "standard"
        else TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=6))
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(3, 5, 16)
    feats = [2, 9, 33]
    sliced = SlicedSAE.from_sae(sae, 0, feats)
    assert torch.allclose(sliced.encode(x), sae.encode(x)[..., feats], atol=1e-5)


def test_edit_reaches_generated_tokens(setup):
    model, hf, sae = setup
    batch = model.tokenize(PROMPTS)
    edits = [DirectionAddition(torch.randn(model.d_model) * 4, layer=LAYER)]
    got = generate(model, batch, edits, max_new_tokens=6)
    calls = []

    def hook(module, args, output):
        where = position_mask("all", batch.attention_mask, len(calls), output.shape[1])
        calls.append(1)
        return edits[0].edit(output, where)

    handle = hf.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            ids = hf.generate(
                **{k: v for k, v in batch.model_inputs("cpu").items() if k != "position_ids"},
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )
    finally:
        handle.remove()
    want = model.tokenizer.batch_decode(ids[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(calls) > 1  # the hook saw decoding steps, so the comparison covers them
    assert got == want
    assert got != generate(model, batch, max_new_tokens=6)
    # An edit that only touches the prompt differs from one that also edits generated tokens.
    prompt_only = [DirectionAddition(edits[0].direction, layer=LAYER, positions="prompt")]
    assert generate(model, batch, prompt_only, max_new_tokens=6) != got


def test_batched_per_row_masks_equal_one_by_one(setup):
    model, _, sae = setup
    feats = list(range(0, 256, 16))
    sliced = SlicedSAE.from_sae(sae, LAYER, feats)
    prompt = PROMPTS[1]
    masks = torch.rand(5, len(feats), generator=torch.Generator().manual_seed(1)) > 0.5
    rows = model.tokenize([prompt]).repeat(5)
    batched = last_logits(model, rows, [FeatureEdit(sliced, value=-3.0, mask=masks)], batch_size=2)
    for i in range(5):
        single = last_logits(model, [prompt], [FeatureEdit(sliced, value=-3.0, mask=masks[i])])
        assert torch.allclose(batched[i], single[0], atol=1e-5)
    # and padding: the same prompt inside a padded batch of different-length prompts
    mixed = last_logits(model, PROMPTS, [FeatureEdit(sliced, value=-3.0)])
    for i, p in enumerate(PROMPTS):
        assert torch.allclose(
            mixed[i], last_logits(model, [p], [FeatureEdit(sliced, value=-3.0)])[0], atol=1e-5
        )


def test_positions_bos_and_offsets(setup):
    model, _, _ = setup
    batch = model.tokenize(PROMPTS)
    clean = _residual(model, batch, [])
    v = torch.ones(model.d_model)
    bos = _residual(model, batch, [DirectionAddition(v, layer=LAYER, positions="bos")]) - clean
    first = batch.input_ids.shape[1] - batch.attention_mask.sum(-1)
    for i in range(len(PROMPTS)):
        changed = bos[i].abs().sum(-1) > 0
        assert changed.nonzero().flatten().tolist() == [int(first[i])]
        assert batch.input_ids[i, first[i]] == model.bos_id
    # the edit at BOS propagates nowhere before it; eoi offsets edit exactly the last positions
    eoi = _residual(model, batch, [DirectionAddition(v, layer=LAYER, positions=model.eoi_positions)]) - clean
    changed = eoi.abs().sum(-1) > 0
    assert changed[:, -len(model.eoi_positions) :].all()
    assert not changed[:, : -len(model.eoi_positions)].any()


def test_skip_first_token_leaves_each_rows_first_token_alone(setup):
    """An SAE that never saw a prompt's first token (an attention sink) is neither edited nor spliced
    there: every other position changes exactly as without the skip; "bos" becomes empty."""
    model, _, sae = setup
    batch = model.tokenize(PROMPTS)  # left-padded: the first real token sits in another column per row
    clean = _residual(model, batch, [])
    first = batch.input_ids.shape[1] - batch.attention_mask.sum(-1)
    every, skip = SlicedSAE.from_sae(sae, LAYER), SlicedSAE.from_sae(sae, LAYER, skip_first=True)
    for make in (lambda s: FeatureEdit(s, value=-3.0), Reconstruction):
        full = _residual(model, batch, [make(every)]) - clean
        part = _residual(model, batch, [make(skip)]) - clean
        for i in range(len(PROMPTS)):
            f = int(first[i])
            assert full[i, f].abs().sum() > 0 and part[i, f].abs().sum() == 0
            assert torch.equal(part[i, f + 1 :], full[i, f + 1 :])
    width = batch.input_ids.shape[1]
    assert not position_mask("bos", batch.attention_mask, 0, width, skip_first=True).any()
    assert position_mask("all", batch.attention_mask, 2, 1, skip_first=True) is None  # a generated token


def test_out_of_memory_halves_the_batch_and_retries():
    from refusal_nnsight.backends import map_chunks

    seen = []

    def fn(i0, i1):
        seen.append(i1 - i0)
        if i1 - i0 > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return list(range(i0, i1))

    out = map_chunks(10, 8, fn)
    assert [x for part in out for x in part] == list(range(10))
    assert seen[:3] == [8, 4, 2]  # halved until it fits
    with pytest.raises(ValueError):
        map_chunks(4, 2, lambda i0, i1: (_ for _ in ()).throw(ValueError("not an OOM")))


def test_nonfinite_activations_are_named_with_their_layer():
    import math

    from refusal_nnsight.errors import NonFiniteError

    hf, tok = tiny_gemma2()
    model = wrap_model(hf, tok, model_config("gemma2"))
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.fill_(math.inf)
    with pytest.raises(NonFiniteError, match="layer 1 "):
        last_logits(model, PROMPTS)


def test_engine_variants_share_the_unedited_layers_and_equal_repeated_rows(setup):
    from refusal_nnsight.engine import AblationEngine
    from refusal_nnsight.saes import LoadedSAEs

    model, _, sae = setup
    saes = LoadedSAEs(None, {LAYER: sae})
    pool = [(LAYER, f) for f in range(0, 256, 16)]
    engine = AblationEngine(model, saes, pool, value=-3.0, batch_size=3)
    masks = torch.rand(7, len(pool), generator=torch.Generator().manual_seed(3)) > 0.5
    masks[0] = False  # the clean variant rides along
    prompt = model.tokenize([PROMPTS[1]])
    shared = engine.scores(prompt, masks)  # layers < LAYER run once per chunk, then broadcast
    repeated = last_logits(model, prompt.repeat(7), engine.edits(masks), what="score")
    assert torch.allclose(shared, repeated, atol=1e-5)
    assert torch.allclose(shared[0], last_logits(model, prompt, what="score")[0], atol=1e-5)


def test_engine_computes_each_distinct_row_once_and_stays_exact(setup, monkeypatch):
    """Variants whose masks differ only in features that are zero on their row share that row
    until the next edited layer; every variant's score still equals its own one-variant trace."""
    from refusal_nnsight import interventions
    from refusal_nnsight.engine import AblationEngine
    from refusal_nnsight.saes import LoadedSAEs

    model, _, sae = setup
    other = random_jumprelu_sae(
        model.d_model, 256, 0, seed=5, scope="gemma" if "gemma" in model.cfg.name else "llama"
    )
    with torch.no_grad():
        other.b_enc.add_(0.3)
        other.b_enc[:8] -= 100.0  # latents 0..7 of layer 0 never fire: ablating them changes nothing
    saes = LoadedSAEs(None, {0: other, LAYER: sae})
    pool = [(0, f) for f in range(0, 16)] + [(LAYER, f) for f in range(0, 64, 8)]
    engine = AblationEngine(model, saes, pool, value=-3.0, batch_size=64)
    masks = torch.rand(48, len(pool), generator=torch.Generator().manual_seed(7)) > 0.5
    prompt = model.tokenize([PROMPTS[2]])

    rows_per_layer = []
    real = interventions.FeatureEdit.edit

    def spy(self, x, where):
        if x.shape[0] < 48:
            rows_per_layer.append((self.sae.layer, x.shape[0]))
        return real(self, x, where)

    monkeypatch.setattr(interventions.FeatureEdit, "edit", spy)
    shared = engine.scores(prompt, masks)
    monkeypatch.setattr(interventions.FeatureEdit, "edit", real)
    assert rows_per_layer and rows_per_layer[0][0] == 0  # layer 0 ran fewer rows than variants
    one_by_one = torch.cat([engine.scores(prompt, masks[i : i + 1]) for i in range(len(masks))])
    assert torch.allclose(shared, one_by_one, atol=1e-5)
