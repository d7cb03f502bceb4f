"""A fake Hugging Face cache holding SAEs in the real release formats (Gemma Scope's
params.npz, Llama Scope's hyperparams.json + checkpoints/final.safetensors), so that
`sae_lens.SAE.from_pretrained` runs its real loaders offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

COMMIT = "0" * 40


def _snapshot(cache: Path, repo_id: str) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def add_gemma_scope(
    cache: Path,
    layer: int,
    path: str,
    d_in: int = 2304,
    d_sae: int = 16384,
    seed: int = 0,
    plant: torch.Tensor | None = None,
) -> dict:
    """Gemma Scope residual SAE, as google/gemma-scope-2b-pt-res stores it (per-latent threshold).
    `plant` [d_in]: latent 0 reads and writes exactly this direction."""
    g = np.random.default_rng(seed)
    W_dec = g.standard_normal((d_sae, d_in), dtype=np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    if plant is not None:
        W_dec[0] = (plant / plant.norm()).numpy()
    params = {
        "W_enc": (W_dec.T * 0.5).astype(np.float32),
        "W_dec": W_dec,
        "b_enc": (g.standard_normal(d_sae) * 0.05).astype(np.float32),
        "b_dec": (g.standard_normal(d_in) * 0.01).astype(np.float32),
        "threshold": (g.random(d_sae) * 0.2).astype(np.float32),
    }
    target = _snapshot(cache, "google/gemma-scope-2b-pt-res") / path
    target.mkdir(parents=True, exist_ok=True)
    np.savez(target / "params.npz", **params)
    return params


def add_llama_scope(
    cache: Path,
    layer: int,
    d_in: int = 64,
    d_sae: int = 256,
    seed: int = 0,
    avg_norm: float = 8.0,
    plant: torch.Tensor | None = None,
) -> dict:
    """Llama Scope residual SAE, as fnlp/Llama3_1-8B-Base-LXR-8x stores it (scalar threshold).
    `plant` [d_in]: latent 0 reads and writes exactly this direction."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    if plant is not None:
        W_dec[0] = plant / plant.norm()
    state = {
        "encoder.weight": (W_dec * 0.5).contiguous(),  # [d_sae, d_in]; loader transposes to W_enc
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.05,
        "decoder.weight": W_dec.T.contiguous(),  # [d_in, d_sae]
        "decoder.bias": torch.randn(d_in, generator=g) * 0.01,
    }
    folder = _snapshot(cache, "fnlp/Llama3_1-8B-Base-LXR-8x") / f"Llama3_1-8B-Base-L{layer}R-8x"
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "checkpoints" / "final.safetensors"))
    hyper = {
        "d_model": d_in,
        "d_sae": d_sae,
        "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "jump_relu_threshold": 0.1,
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "norm_activation": "dataset-wise",
        "top_k": 50,
        "sparsity_include_decoder_norm": True,
    }
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    return state
