"""`refusal-nnsight-organism validate`: the findings across organism seeds, not on one build.

For each seed: take that organism (seeds 0-4 of 'default' ship with the package; any other is
built once and cached), then run the whole pipeline three times on it,
with its own splits — over every SAE layer (`search=default`, the paper's scope), over the
layers before refusal execution (harm), and at the layer where the organism plants its cues, the
redundancy scan at the layer of its backup detectors (cue: the method pointed at the right
layers, which tests what it recovers there, not whether it finds those layers). One row per seed holds each stage's figure and
the planted-truth scores; the table (Parquet + markdown) adds min / median / max, and every
target is checked on every seed. Hydra overrides after the options (`validate --seeds 0-4 --out DIR
search.candidates.top_k=40`) go to every run, after the scope's own: the table then measures that
setting on the same seeds and targets. The last line on stdout is one JSON object:
{"per_seed": [{"seed", <figures>, "targets_met"}], "all_met", "overrides", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from ..errors import UserError
from .check import describe_continued, describe_machine, meets

log = logging.getLogger(__name__)

# figure -> (run, dotted key in that run's summary.json)
FIGURES: dict[str, tuple[str, str]] = {
    "direction_layer": ("harm", "direction.layer"),
    "direction_fallback": ("harm", "direction.fallback"),
    "direction_jailbreak": ("harm", "evaluate.direction_ablation_jailbreak_rate"),
    "direction_kl": ("harm", "evaluate.direction_kl"),
    "all_candidates_jailbreak": ("harm", "evaluate.candidates_ablated_jailbreak_rate"),
    # the same check by the flip criterion, and without layer 0's candidates (search.candidates.per_layer)
    "all_candidates_flip": ("harm", "candidates.all_ablated_flip_rate"),
    "all_candidates_without_layer0_flip": ("harm", "candidates.layer_without_flip_rate.0"),
    # ... generated and judged: counted where the judge and the criterion agree
    "all_candidates_without_layer0_jailbreak": ("harm", "candidates.layer_without_jailbreak_rate.0"),
    # with every candidate ablated, layer 1's and 2's candidates' activation over their clean one
    "all_candidates_layer1_kept_activation": ("harm", "candidates.layer_kept_activation.1"),
    "all_candidates_layer2_kept_activation": ("harm", "candidates.layer_kept_activation.2"),
    # per searched layer, the candidates closer to r̂ than 95% of random directions' closest latents
    "candidates_layer0_beyond_null": ("harm", "candidates.layer_beyond_null.0"),
    "candidates_layer1_beyond_null": ("harm", "candidates.layer_beyond_null.1"),
    "candidates_layer2_beyond_null": ("harm", "candidates.layer_beyond_null.2"),
    # candidates that fire on no harmful eval prompt (a dead latent can point along r̂): their edit
    # changes nothing there
    "candidates_silent": ("harm", "candidates.n_silent"),
    "criterion_judge_agreement": ("harm", "greedy.criterion_judge_agreement"),
    "one_minimal_rate": ("harm", "greedy.one_minimal_rate"),
    "median_set_size": ("harm", "greedy.median_one_minimal_set_size"),
    # the latent in the most minimal sets, and the fraction of dissected prompts whose set holds it
    "top_feature": ("harm", "greedy.top_feature"),
    "top_feature_share": ("harm", "greedy.top_feature_share"),
    # minimal-set memberships whose latent is silent on its clean prompt, woken by the other members' edits
    "woken_member_share": ("harm", "greedy.woken_member_share"),
    "minimal_jailbreak": ("harm", "evaluate.minimal_jailbreak_rate"),
    "minimal_zero_ablation_jailbreak": ("harm", "evaluate.minimal_zero_ablation_jailbreak_rate"),
    "random_same_size_jailbreak": ("harm", "evaluate.random_same_size_jailbreak_rate"),
    "fm_heldout_accuracy": ("harm", "fm.heldout_accuracy"),
    "fm_linear_heldout_accuracy": ("harm", "fm.linear_heldout_accuracy"),
    # the FM beats the linear model: a one-sided exact sign test on the held-out masks only one labels right
    "fm_beats_linear": ("harm", "fm.beats_linear"),
    "fm_beats_linear_p": ("harm", "fm.beats_linear_p"),
    # what the test had to go on: the held-out masks of every prompt, and the median pool they vary
    "fm_heldout_masks": ("harm", "fm.n_heldout_masks"),
    "fm_median_pool_size": ("harm", "fm.median_pool_size"),
    "classifier_heldout_accuracy": ("harm", "fm.classifier_heldout_accuracy"),
    "compositional_pair_found": ("harm", "ground_truth.compositional_pair_found"),
    "redundancy_found": ("harm", "ground_truth.redundancy_found"),
    "redundancy_jailbreak_gain": ("harm", "ground_truth.redundancy_jailbreak_gain"),
    # the weak (zero-ablation) test's three rates: M, M ∪ H, and M ∪ C (the control, not woken)
    "redundancy_m_jailbreak": ("harm", "redundancy.m_weak_jailbreak_rate"),
    "redundancy_m_plus_h_jailbreak": ("harm", "redundancy.m_plus_h_weak_jailbreak_rate"),
    "redundancy_m_plus_control_jailbreak": ("harm", "redundancy.m_plus_control_weak_jailbreak_rate"),
    # one-sided sign tests on the same prompts: M ∪ H against M alone, and against M ∪ C
    "redundancy_gain_p": ("harm", "redundancy.m_plus_h_weak_gain_p"),
    "redundancy_control_p": ("harm", "redundancy.m_plus_h_weak_control_p"),
    # of the weak H's latents, each ablated with M alone, the share that lowers the refusal score
    "h_holding_share": ("harm", "redundancy.h_holding_share"),
    # whether H (weak ablation) holds the planted backup's latent, on the dissected cue prompts
    "backup_in_h": ("harm", "ground_truth.backup_in_h_rate"),
    # the planted backup's largest coordinate after the cue word (1 = fully awake) clean, with M, and with
    # M ∪ H, ablated at the weak coefficient: whether a hydra found is the planted one
    "backup_clean": ("harm", "ground_truth.backup_clean"),
    "backup_under_m": ("harm", "ground_truth.backup_under_m"),
    "backup_under_m_h": ("harm", "ground_truth.backup_under_m_h"),
    # on those prompts, the share still refused (refusal score > 0) under M, under M ∪ H, and under
    # M ∪ H with H's write cut to its part along the prompt's planted backup: whether H's latents
    # hold the backup and the rest of their write restores the refusal
    "refused_under_m": ("harm", "ground_truth.refused_under_m"),
    "refused_under_m_h": ("harm", "ground_truth.refused_under_m_h"),
    "refused_under_m_h_backup_part": ("harm", "ground_truth.refused_under_m_h_backup_part"),
    "cue_recall": ("harm", "ground_truth.cue_recall"),
    # cue_recall's denominator: greedy dissects only prompts that all candidates flip, so a category
    # none of whose prompts flip drops out of it
    "cue_categories_dissected": ("harm", "ground_truth.cue_categories_dissected"),
    # recall over every planted category the model refuses, those never dissected counted as missed
    "cue_recall_planted": ("harm", "ground_truth.cue_recall_planted"),
    # the same categories with a cue feature among the candidates: the ceiling the ranking sets on cue recall
    "cue_candidate_recall": ("harm", "ground_truth.cue_candidate_recall"),
    # ... and over every planted category the model refuses: above cue_recall_planted, the ranking
    # offered a cue that greedy never reached
    "cue_candidate_recall_planted": ("harm", "ground_truth.cue_candidate_recall_planted"),
    "cue_precision": ("harm", "ground_truth.cue_precision"),
    # the minimal-set memberships whose latent has its own prompt's planted role (its category's cue,
    # or the composition), where cue_precision counts any cue, whatever prompt's set holds it
    "own_cue_precision": ("harm", "ground_truth.own_cue_precision"),
    # minimal-set latents that peak on one group's words but fire on most words of another group (a
    # category's cue words, or the harm verbs and person words)
    "generic_features": ("harm", "ground_truth.generic_features"),
    "all_layers_median_set_size": ("all_layers", "greedy.median_one_minimal_set_size"),
    "all_layers_top_feature_share": ("all_layers", "greedy.top_feature_share"),
    "all_layers_cue_precision": ("all_layers", "ground_truth.cue_precision"),
    "all_layers_refusal_features": ("all_layers", "ground_truth.refusal_features"),
    "cue_all_candidates_jailbreak": ("cue", "evaluate.candidates_ablated_jailbreak_rate"),
    "cue_candidates_silent": ("cue", "candidates.n_silent"),
    "cue_median_set_size": ("cue", "greedy.median_one_minimal_set_size"),
    "cue_top_feature_share": ("cue", "greedy.top_feature_share"),
    "cue_fm_heldout_accuracy": ("cue", "fm.heldout_accuracy"),
    "cue_fm_linear_heldout_accuracy": ("cue", "fm.linear_heldout_accuracy"),
    "cue_fm_beats_linear": ("cue", "fm.beats_linear"),
    "cue_compositional_pair_found": ("cue", "ground_truth.compositional_pair_found"),
    "cue_cue_recall": ("cue", "ground_truth.cue_recall"),
    "cue_cue_categories_dissected": ("cue", "ground_truth.cue_categories_dissected"),
    "cue_cue_recall_planted": ("cue", "ground_truth.cue_recall_planted"),
    "cue_cue_candidate_recall_planted": ("cue", "ground_truth.cue_candidate_recall_planted"),
    "cue_cue_precision": ("cue", "ground_truth.cue_precision"),
    "cue_h_size": ("cue", "redundancy.h_size"),
    "cue_m_zero_ablation_jailbreak": ("cue", "redundancy.m_weak_jailbreak_rate"),
    "cue_m_plus_h_zero_ablation_jailbreak": ("cue", "redundancy.m_plus_h_weak_jailbreak_rate"),
    "cue_m_plus_control_zero_ablation_jailbreak": ("cue", "redundancy.m_plus_control_weak_jailbreak_rate"),
    "cue_redundancy_found": ("cue", "ground_truth.redundancy_found"),
    "cue_h_holding_share": ("cue", "redundancy.h_holding_share"),
    "cue_backup_in_h": ("cue", "ground_truth.backup_in_h_rate"),
    "cue_backup_clean": ("cue", "ground_truth.backup_clean"),
    "cue_backup_under_m": ("cue", "ground_truth.backup_under_m"),
    "cue_backup_under_m_h": ("cue", "ground_truth.backup_under_m_h"),
    "cue_refused_under_m": ("cue", "ground_truth.refused_under_m"),
    "cue_refused_under_m_h": ("cue", "ground_truth.refused_under_m_h"),
    "cue_refused_under_m_h_backup_part": ("cue", "ground_truth.refused_under_m_h_backup_part"),
    "cue_random_same_size_jailbreak": ("cue", "evaluate.random_same_size_jailbreak_rate"),
}

# figure -> (comparison, target), checked on every seed
TARGETS: dict[str, tuple[str, float]] = {
    "direction_jailbreak": (">=", 0.9),
    "direction_kl": ("<=", 0.1),
    "direction_fallback": ("==", False),
    "all_candidates_jailbreak": (">=", 0.9),
    "one_minimal_rate": (">=", 1.0),
    "random_same_size_jailbreak": ("<=", 0.1),
    "fm_heldout_accuracy": (">=", 0.9),
    "fm_beats_linear": ("==", True),
    "compositional_pair_found": ("==", True),
    "redundancy_found": ("==", True),
    "cue_recall": (">=", 0.8),
    "cue_precision": (">=", 0.8),
}


def _runs(layers: dict) -> dict[str, list[str]]:
    """The three scopes, from the organism's planted layers (manifest "model"): every SAE layer
    (the paper's search); harm detection — the layers before the refusal decision; and the cue
    layer, with redundancy scanned at the backup layer. 30 candidates per layer in the last two:
    they search one to three layers, and the cue, verb and person features of six categories
    are spread over several latents each."""
    return {
        "all_layers": ["search=default"],
        "harm": [
            f"search.candidates.layers={{before_layer:{layers['decision_layer']}}}",
            "search.candidates.top_k=30",
            "search.candidates.per_layer=true",
        ],
        "cue": [
            f"search.candidates.layers=[{layers['cue_layer']}]",
            "search.candidates.top_k=30",
            f"search.redundancy.layers=[{layers['backup_layer']}]",
        ],
    }


def _get(summary: dict, dotted: str):
    value = summary
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def build_identity(root: Path, manifest: dict) -> dict[str, str]:
    """Which build a seed's column describes. A build is exact on one kind of CPU only, so a seed
    rebuilt elsewhere may be another network: `built_on` names the machine that trained it and
    `content_hash` its files as they are now (store.content_hash), which a reader compares with
    another table's to know whether the two columns come from the same weights."""
    from .store import content_hash

    machine = describe_machine(manifest.get("built_on"))
    if manifest.get("continued"):  # later steps run on the shipped build elsewhere (store.py)
        machine += f"; {describe_continued(manifest['continued'])}"
    return {"built_on": machine, "content_hash": content_hash(root)}


# what each run of a seed is already given: a user's override of these would describe another run
_OWN_KEYS = ("model.organism_recipe", "model.organism_seed", "run_dir")


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override validate sets itself on each run (the organism, the run folder)."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if "=" not in o or key in _OWN_KEYS:
            raise UserError(
                f"validate override {o!r}: give KEY=VALUE, and not {', '.join(_OWN_KEYS)} "
                "(use --recipe, --seeds and --out)"
            )


def run_seed(recipe: str, seed: int, out: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The pipeline on one organism seed, in every scope; returns its row of figures. `overrides`
    (Hydra, KEY=VALUE) go to every scope's run after the scope's own, so they win over them: the
    table then measures that setting."""
    from .. import pipeline
    from ..artifacts import read_json
    from ..cli import compose
    from .build import ensure_organism

    root = ensure_organism(recipe, seed)
    manifest = read_json(root / "manifest.json")
    summaries = {}
    for name, scope in _runs(manifest["model"]).items():
        cfg = compose([*scope, *overrides, f"model.organism_recipe={recipe}", f"model.organism_seed={seed}",
                       f"run_dir={out / f'seed{seed}' / name}"])  # fmt: skip
        summaries[name] = pipeline.run(cfg)
    row: dict = {"seed": seed, **build_identity(root, manifest)}
    for fig, (run, key) in FIGURES.items():
        row[fig] = _get(summaries[run], key)
    for fig in ("all_layers_refusal_features", "generic_features"):  # labels -> how many
        if isinstance(row[fig], list):
            row[fig] = len(row[fig])
    row["targets_met"] = {k: meets(row.get(k), op, t) for k, (op, t) in TARGETS.items()}
    return row


def write_table(rows: list[dict], out: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """validate.parquet and validate.md in `out`; returns the markdown (a line naming the overrides
    every run was given comes first, where there are any)."""
    import polars as pl

    from ..artifacts import write_parquet, write_text

    flat = [{k: v for k, v in r.items() if k != "targets_met"} | {"targets_met": all(r["targets_met"].values())}
            for r in rows]  # fmt: skip
    write_parquet(out / "validate.parquet", pl.DataFrame(flat))
    cols = [c for c in flat[0] if c != "seed"]
    lines = ["| figure | target | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | min | median | max |",
             "|---|---|" + "---|" * (len(rows) + 3)]  # fmt: skip
    for c in cols:
        vals = [r.get(c) for r in flat]
        nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        stats = [_fmt(min(nums)), _fmt(statistics.median(nums)), _fmt(max(nums))] if nums else ["", "", ""]
        target = " ".join(map(str, TARGETS[c])) if c in TARGETS else ""
        lines.append(
            f"| {c} | {target} | " + " | ".join(_fmt(v) for v in vals) + " | " + " | ".join(stats) + " |"
        )
    if overrides:
        lines = ["every run with: " + " ".join(f"`{o}`" for o in overrides), "", *lines]
    text = "\n".join(lines) + "\n"
    write_text(out / "validate.md", text)
    return text


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main(args: argparse.Namespace) -> int:
    from .recipe import organism_recipe

    overrides = list(args.overrides)
    check_overrides(overrides)
    for seed in args.seeds:
        organism_recipe(args.recipe, seed)  # planted truth to validate against, before any build
    start = time.time()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        log.info("validate: organism '%s' seed %d", args.recipe, seed)
        rows.append(run_seed(args.recipe, seed, out, overrides))
    text = write_table(rows, out, overrides)
    print(text)
    result = {"per_seed": rows, "all_met": all(all(r["targets_met"].values()) for r in rows),
              "overrides": overrides, "seconds": round(time.time() - start, 1)}  # fmt: skip
    print(json.dumps(result))
    return 0 if result["all_met"] else 1
