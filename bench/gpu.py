"""GPU benchmark: the batched ablation engine on Gemma-2-2B- and Llama-3.1-8B-shaped models.

One script for one H100-class GPU, ≤ 5 minutes. Random bf16 weights (no download), random
JumpReLU SAEs shaped like Gemma Scope 65k (all 26 layers) and Llama Scope 32k (all 32 layers),
10 candidate features per layer. Through the toolkit's own code (AblationEngine → FeatureEdit →
nnsight trace) it times a greedy step (every single-feature removal of the candidate set) and
FM mask evaluation (random masks), against the plain HF forward at the same batch size, raw torch
forward hooks doing the same edit, and one variant per trace (the reference way). Prints one JSON
object per model and writes them to $OUT/gpu_results.json when OUT is set.

Needs only torch, transformers, nnsight and this repo (no sae-lens). `--small` runs tiny shapes
on the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import gemma2_tokenizer, llama3_tokenizer  # noqa: E402  (chat templates of the real families)

from refusal_nnsight.config import ModelConfig, SAEConfig  # noqa: E402
from refusal_nnsight.engine import AblationEngine  # noqa: E402
from refusal_nnsight.interventions import position_mask  # noqa: E402
from refusal_nnsight.models import Batch, wrap_model  # noqa: E402
from refusal_nnsight.saes import LoadedSAEs, SlicedSAE  # noqa: E402

SHAPES = {
    "gemma2_2b": dict(family="gemma2", layers=26, d=2304, d_sae=65536, kw=dict(
        vocab_size=256000, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=8192, sliding_window=4096, attn_implementation="eager")),
    "llama31_8b": dict(family="llama3", layers=32, d=4096, d_sae=32768, kw=dict(
        vocab_size=128256, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rope_theta=500000.0)),
}  # fmt: skip
SMALL = {
    "gemma2_2b": dict(layers=3, d=64, d_sae=512, kw=dict(vocab_size=512, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=128, attn_implementation="eager")),
    "llama31_8b": dict(layers=3, d=64, d_sae=256, kw=dict(vocab_size=512, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256)),
}  # fmt: skip


class PoolSAEs(LoadedSAEs):
    """Per layer only the pool's features, sliced from a full random SAE that is then freed
    (the engine never needs more; keeping 26 full 65k SAEs would cost ~15 GB)."""

    def __init__(self, slices: dict[int, SlicedSAE]):
        super().__init__(SAEConfig(name="random"), {})
        self.slices = slices

    @property
    def layers(self) -> list[int]:
        return sorted(self.slices)

    def slice(self, layer: int, features=None) -> SlicedSAE:
        s = self.slices[layer]
        pos = [s.features.tolist().index(f) for f in features]
        return SlicedSAE(layer, s.features[pos], s.W_enc[:, pos], s.b_enc[pos], s.W_dec[pos], s.b_dec,
                         s.threshold[pos], False, "jumprelu")  # fmt: skip


def build(name: str, small: bool, device: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    spec = {**SHAPES[name], **(SMALL[name] if small else {})}
    gemma = SHAPES[name]["family"] == "gemma2"
    tok = gemma2_tokenizer() if gemma else llama3_tokenizer()
    cfg_cls, model_cls = (Gemma2Config, Gemma2ForCausalLM) if gemma else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(hidden_size=spec["d"], num_hidden_layers=spec["layers"], pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **spec["kw"])  # fmt: skip
    dtype = torch.float32 if small else torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        hf = model_cls(cfg).eval()
    torch.set_default_dtype(default)
    mcfg = ModelConfig(name=name, source="hf", family=SHAPES[name]["family"], n_layers=spec["layers"], d_model=spec["d"],
                       dtype="float32" if small else "bfloat16", device=device,
                       attn_implementation=spec["kw"].get("attn_implementation"))  # fmt: skip
    model = wrap_model(hf, tok, mcfg)
    # random JumpReLU SAEs, one layer at a time: slice 10 features, free the rest
    g = torch.Generator(device=device).manual_seed(1)
    slices, pool = {}, []
    for layer in range(spec["layers"]):
        d, n = spec["d"], spec["d_sae"]
        sae = SimpleNamespace(
            W_enc=torch.randn(d, n, device=device, dtype=dtype, generator=g) / d**0.5,
            W_dec=torch.randn(n, d, device=device, dtype=dtype, generator=g) / d**0.5,
            b_enc=torch.zeros(n, device=device, dtype=dtype), b_dec=torch.zeros(d, device=device, dtype=dtype),
            threshold=torch.full((n,), 0.01, device=device, dtype=dtype), cfg=None,
        )  # fmt: skip
        feats = torch.randperm(n, generator=torch.Generator().manual_seed(layer))[:10].sort().values
        slices[layer] = SlicedSAE.from_sae(sae, layer, feats)
        pool += [(layer, int(f)) for f in feats]
        del sae
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    return model, hf, PoolSAEs(slices), pool, weights


def timed(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn()."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, small: bool, device: str, batch: int, seq: int, reps: int) -> dict:
    model, hf, saes, pool, weights = build(name, small, device)
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(100, vocab, (1, seq), generator=g)
    ids[0, 0] = model.bos_id
    prompt = Batch(ids, torch.ones_like(ids))
    engine = AblationEngine(model, saes, pool, value=-3.0, batch_size=batch)
    F = engine.size
    rows = prompt.repeat(batch)
    masks = torch.rand(batch, F, generator=g) < 0.5
    edits = engine.edits(masks)
    inputs = rows.model_inputs(model.device)

    def plain():
        with torch.no_grad():
            hf(**inputs, logits_to_keep=1)

    where = position_mask("all", rows.attention_mask.to(model.device), 0, seq)

    def hooked():
        handles = []
        for layer in sorted({layer for layer, _ in pool}):

            def hook(mod, args, out, layer=layer):
                for e in edits:
                    if e.sae.layer == layer:
                        out = e.edit(out, where)
                return out

            handles.append(hf.model.layers[layer].register_forward_hook(hook))
        try:
            plain()
        finally:
            for h in handles:
                h.remove()

    def empty_trace():
        with torch.no_grad(), model.lm.trace(**inputs, logits_to_keep=1):
            model.lm.output.logits[:, -1].sum().save()

    def batched():
        engine.scores(prompt, masks)

    greedy_masks = ~torch.eye(F, dtype=torch.bool)  # every single-feature removal of C: one greedy step
    fm_masks = torch.rand(4 * batch, F, generator=g) < torch.rand(4 * batch, 1, generator=g)
    one = masks[:1]

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_plain = timed(plain, device, reps)
    t_hook = timed(hooked, device, reps)
    t_empty = timed(empty_trace, device, reps)
    t_batched = timed(batched, device, reps)
    t_greedy = timed(lambda: engine.scores(prompt, greedy_masks), device, max(1, reps // 3), warmup=1)
    t_fm = timed(lambda: engine.scores(prompt, fm_masks), device, max(1, reps // 3), warmup=1)
    t_loop = timed(lambda: engine.scores(prompt, one), device, reps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    result = {
        "model": name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "batch": batch, "seq": seq, "layers": len(saes.layers), "pool_features": F, "d_sae": SHAPES[name]["d_sae"] if not small else None,
        "plain_rows_per_s": batch / t_plain,
        "hook_vps": batch / t_hook,
        "batched_vps": batch / t_batched,
        "greedy_step_vps": F / t_greedy,
        "fm_masks_vps": len(fm_masks) / t_fm,
        "loop_vps": 1 / t_loop,
        "batched_over_plain": t_plain / t_batched,
        "batched_over_loop": (batch / t_batched) / (1 / t_loop),
        "nnsight_over_hooks": t_batched / t_hook,
        "empty_trace_over_plain": t_empty / t_plain,
        "weights_gb": weights / 2**30,
        "peak_gb": None if peak is None else peak / 2**30,
        "peak_over_weights_gb": None if peak is None else (peak - weights) / 2**30,
    }  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--models", default="gemma2_2b,llama31_8b")
    args = ap.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    results = []
    for name in args.models.split(","):
        t = time.perf_counter()
        r = bench(name, args.small, device, args.batch, args.seq, args.reps)
        r["seconds"] = time.perf_counter() - t
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        results.append(r)
        if device == "cuda":
            torch.cuda.empty_cache()  # the model of this shape is gone with bench()'s frame
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
