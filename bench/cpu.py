"""CPU benchmark on the organism (`make bench`): the batched ablation engine against one
variant per trace (the reference way) and the plain forward at the same batch size, plus the
organism pipeline's peak RSS. The last line is one JSON object:
loop_vps, batched_vps, plain_vps, batched_over_loop, batched_over_plain, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from refusal_nnsight.api import load_model, load_saes
from refusal_nnsight.config import ModelConfig, SAEConfig
from refusal_nnsight.engine import AblationEngine

PROMPT = "How do I build a bomb?"


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def engine_figures(batch: int, reps: int) -> dict:
    import refusal_nnsight as rn

    model = load_model(ModelConfig(device="cpu"))
    saes = load_saes(model, SAEConfig())
    g = torch.Generator().manual_seed(0)
    # The pool the pipeline ablates: the candidates stage's top-10 features per layer by decoder
    # cosine with the refusal direction. The engine's cost depends on it (a feature that is zero
    # on a variant's row is computed once for all the variants that differ only in it).
    prompts = rn.load_prompts()
    direction = rn.find_direction(model, prompts)
    pool = rn.candidate_features(model, saes, direction, prompts).features
    engine = AblationEngine(model, saes, pool, value=-3.0, batch_size=batch)
    prompt = model.tokenize([PROMPT])
    masks = torch.rand(batch, engine.size, generator=g) < 0.5
    rows = prompt.repeat(batch).model_inputs(model.device)
    hf = model.lm._module

    def plain():
        with torch.no_grad():
            hf(**rows, logits_to_keep=1)

    n_loop = 32
    t_loop = _median_seconds(lambda: [engine.scores(prompt, masks[i : i + 1]) for i in range(n_loop)], reps)
    t_batched = _median_seconds(lambda: engine.scores(prompt, masks), reps)
    t_plain = _median_seconds(plain, reps)
    return {
        "loop_vps": n_loop / t_loop,
        "batched_vps": batch / t_batched,
        "plain_vps": batch / t_plain,
        "pool_features": engine.size,
        "batch": batch,
        "threads": torch.get_num_threads(),
    }


def pipeline_peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of one organism pipeline run, in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "refusal_nnsight.cli", f"run_dir={Path(tmp) / 'run'}", *args]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-pipeline", action="store_true", help="do not run the pipeline for peak RSS")
    ap.add_argument(
        "pipeline_args", nargs="*", help="overrides for the pipeline run (default: the organism defaults)"
    )
    args = ap.parse_args()
    fig = engine_figures(args.batch, args.reps)
    print(f"one variant per trace : {fig['loop_vps']:9.1f} variants/s")
    print(
        f"batched engine        : {fig['batched_vps']:9.1f} variants/s  (batch {args.batch}, {fig['pool_features']} pool features)"
    )
    print(f"plain forward         : {fig['plain_vps']:9.1f} rows/s")
    fig["batched_over_loop"] = fig["batched_vps"] / fig["loop_vps"]
    fig["batched_over_plain"] = fig["batched_vps"] / fig["plain_vps"]
    fig["peak_rss_mb"] = None if args.skip_pipeline else pipeline_peak_rss_mb(args.pipeline_args)
    print(f"batched / loop = {fig['batched_over_loop']:.1f}   batched / plain = {fig['batched_over_plain']:.2f}   "
          f"pipeline peak RSS = {fig['peak_rss_mb']} MB")  # fmt: skip
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
