"""`refusal-nnsight-organism check`: is the organism a faithful stand-in for a refusing chat model?

Measured on held-out test prompts through the toolkit's own loaders and operator:
refusal rates judged from greedy generations (harmful, harmless, look-alikes); per-layer SAE
fraction of variance unexplained and L0 on test-prompt residuals; splice agreement = fraction of
prompts whose refuse/comply decision (refusal-score sign) survives replacing one layer's
residual by its SAE reconstruction (worst layer). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

log = logging.getLogger(__name__)


def measure(recipe: str = "default", max_prompts: int | None = None) -> dict:
    from ..artifacts import read_json
    from ..config import ModelConfig, SAEConfig
    from ..generation import generate
    from ..interventions import Reconstruction, apply
    from ..judges import SubstringJudge
    from ..models import load_model
    from ..saes import load_saes
    from ..scoring import refusal_scores
    from .grammar import load_split
    from .store import ensure_organism

    root = ensure_organism(recipe)
    model = load_model(ModelConfig(source="organism", organism_recipe=recipe, device="cpu"))
    saes = load_saes(SAEConfig(), model)
    test = load_split("test")[:max_prompts] if max_prompts else load_split("test")
    texts = [p.text for p in test]
    judge = SubstringJudge()
    refused = torch.tensor(judge.refused(texts, generate(model, texts, batch_size=64, progress="generate")))
    harmful = torch.tensor([p.harmful for p in test])
    lookalike = torch.tensor([p.kind == "lookalike" for p in test])
    harmless = ~harmful & ~lookalike

    batch = model.tokenize(texts)
    fvu, l0 = {}, {}
    xs: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes.layers}
    for i0 in range(0, len(batch), 64):
        chunk = batch.rows(i0, min(i0 + 64, len(batch)))
        with torch.no_grad(), model.lm.trace(**chunk.model_inputs(model.device)):
            got = apply(model, [], chunk.attention_mask, capture=saes.layers)
            stacked = torch.stack([got[layer] for layer in saes.layers]).cpu().save()  # [L, B, T, d]
        for i, layer in enumerate(saes.layers):
            xs[layer].append(stacked[i][chunk.attention_mask.bool()].float())
    full = {layer: saes.slice(layer) for layer in saes.layers}
    for layer in saes.layers:
        x = torch.cat(xs[layer])
        with torch.no_grad():
            f = full[layer].encode(x)
            x_hat = f @ full[layer].W_dec + full[layer].b_dec
        fvu[layer] = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        l0[layer] = float((f > 0).float().sum(-1).mean())

    clean = refusal_scores(model, batch, batch_size=64) > 0
    agreement = {}
    for layer in saes.layers:
        spliced = refusal_scores(model, batch, [Reconstruction(full[layer])], batch_size=64) > 0
        agreement[layer] = float((spliced == clean).float().mean())

    manifest = read_json(root / "manifest.json")
    return {
        "recipe": recipe,
        "n_test": len(test),
        "harmful_refusal_rate": float(refused[harmful].float().mean()),
        "harmless_refusal_rate": float(refused[harmless].float().mean()),
        "lookalike_refusal_rate": float(refused[lookalike].float().mean()),
        "sae_fvu_by_layer": [round(fvu[layer], 4) for layer in saes.layers],
        "sae_fvu_max": max(fvu.values()),
        "sae_l0_mean": sum(l0.values()) / len(l0),
        "splice_agreement": min(agreement.values()),
        "build_seconds": manifest.get("build_seconds"),
    }


def main(args: argparse.Namespace | None = None) -> None:
    recipe = getattr(args, "recipe", "default") if args is not None else "default"
    result = measure(recipe)
    print(json.dumps(result))
