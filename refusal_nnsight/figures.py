"""The figures of a run: one or two per stage, each readable without the code.

Every figure has a title that says what it shows and a caption (in `FIGURES`) that says how to
read it; the report prints both. Axes that count things (prompts, features, layers) are integer;
legends sit outside the data. Each draw function takes stage results and returns None when it
drew, or a one-line reason when there is nothing to draw. Figures use matplotlib's Agg canvas (no
pyplot state, no display) and are written through a temporary file + rename, with no date or
version in the file, so reruns write the same bytes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .artifacts import RunFolder, atomic_write

log = logging.getLogger(__name__)

OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False}


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None}))


def _label(layer: int, feature: int) -> str:
    return f"L{layer}/F{feature}"


def fig_direction(path: Path, direction) -> str | None:
    t = direction.table
    if t.height == 0:
        return "the selection table is empty"
    positions = sorted(set(t["position"].to_list()))
    layers = sorted(set(t["layer"].to_list()))
    grid = [[float("nan")] * len(layers) for _ in positions]
    fig = Figure(figsize=(max(6, 0.35 * len(layers) + 2), 0.5 * len(positions) + 2))
    ax = fig.add_subplot()
    for r in t.iter_rows(named=True):
        i, j = positions.index(r["position"]), layers.index(r["layer"])
        grid[i][j] = r["bypass_score"] if r["bypass_score"] is not None else float("nan")
        if "kept" in r and r["kept"] is False:
            ax.plot(j, i, "x", color="white", ms=4)
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    if direction.position in positions and direction.layer in layers:
        i, j = positions.index(direction.position), layers.index(direction.layer)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set(xticks=range(len(layers)), xticklabels=layers, yticks=range(len(positions)), yticklabels=positions)
    ax.set(xlabel="layer", ylabel="eoi position (from the end)")
    ax.set_title("Refusal direction: harmful val refusal score with each candidate ablated", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean refusal score (lower: jailbreaks more)")
    _save(fig, path)
    return None


def fig_candidates(path: Path, candidates, greedy=None) -> str | None:
    t = candidates.table
    if t.height == 0:
        return "the candidate table is empty"
    chosen = {(int(a), int(b)) for a, b in candidates.features}
    minimal = {(int(a), int(b)) for m in (greedy.minimal_sets.values() if greedy else []) for a, b in m}
    from .stages.candidates import NULL_LEVEL

    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    rows = t.to_dicts()
    # candidates whose cosine a random direction's closest latent reaches are drawn hollow
    groups: list[tuple[Callable[[dict], bool], str, str]] = [(lambda r: True, "tab:red", "candidates C")]
    if "null_p" in t.columns and not t["null_p"].null_count():
        groups = [
            (
                lambda r: r["null_p"] <= NULL_LEVEL,
                "tab:red",
                f"candidates beyond the null (null_p ≤ {NULL_LEVEL:g})",
            ),
            (lambda r: r["null_p"] > NULL_LEVEL, "none", "candidates within it"),
        ]
    for keep, face, name in groups:
        pts = [(r["layer"], r["cosine"]) for r in rows if (r["layer"], r["feature"]) in chosen and keep(r)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=14, facecolor=face, edgecolor="tab:red", label=name)
    pts = [(r["layer"], r["cosine"]) for r in rows if (r["layer"], r["feature"]) in minimal]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.scatter(xs, ys, s=90, marker="*", color="gold", edgecolor="k", label="in a minimal set")
    ax.set(xlabel="layer", ylabel="cos(decoder row, r̂)")
    ax.set_title(
        "Candidates: the SAE latents whose decoder rows point along the refusal direction", fontsize=10
    )
    ax.set_xticks(sorted({r["layer"] for r in rows}))
    ax.legend(**OUTSIDE)
    _save(fig, path)
    return None


def fig_greedy_sets(path: Path, greedy, max_features: int = 30) -> str | None:
    sets = greedy.minimal_sets
    if not sets:
        return "greedy dissected no prompt"
    prompts = sorted(sets)
    counts = Counter(f for idx in prompts for f in sets[idx])
    if not counts:
        return "every minimal set is empty"
    feats = sorted(counts, key=lambda f: (-counts[f], f))[:max_features]
    grid = [[1.0 if f in sets[idx] else 0.0 for f in feats] for idx in prompts]
    fig = Figure(figsize=(max(5.0, 0.32 * len(feats) + 2.5), max(3.0, 0.2 * len(prompts) + 1.8)))
    ax = fig.add_subplot()
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_xticks(range(len(feats)), [_label(*f) for f in feats], rotation=90, fontsize=7)
    ax.set_yticks(range(len(prompts)), [f"p{i}" for i in prompts], fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, len(feats))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(prompts))], minor=True)
    ax.grid(which="minor", color="0.85", lw=0.5)
    ax.tick_params(which="minor", length=0)
    for y, idx in enumerate(prompts):  # |M| at the right of each row
        ax.text(len(feats) - 0.3, y, f" |M|={len(sets[idx])}", va="center", fontsize=6, clip_on=False)
    ax.set(xlabel="feature (most frequent first)", ylabel="dissected prompt")
    shown = "" if len(counts) <= max_features else f" ({max_features} most frequent of {len(counts)})"
    ax.set_title(f"Greedy: the features of each prompt's 1-minimal set{shown}", fontsize=10)
    _save(fig, path)
    return None


def fig_greedy_scores(path: Path, greedy) -> str | None:
    t = greedy.sets.sort("prompt_idx")
    if t.height == 0:
        return "greedy dissected no prompt"
    y = list(range(t.height))
    clean, final = t["clean_score"].to_list(), t["final_score"].to_list()
    fig = Figure(figsize=(7, max(3.0, 0.2 * t.height + 1.5)))
    ax = fig.add_subplot()
    for i, a, b in zip(y, clean, final, strict=True):
        ax.plot([a, b], [i, i], color="0.75", lw=1, zorder=1)
    ax.scatter(clean, y, s=18, color="0.4", label="nothing ablated", zorder=2)
    ax.scatter(final, y, s=18, color="tab:red", label="minimal set ablated", zorder=2)
    ax.axvline(greedy.score_threshold, color="k", lw=0.8, ls="--", label=f"τ = {greedy.score_threshold:.3g}")
    ax.set_yticks(y, [f"p{i}" for i in t["prompt_idx"].to_list()], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="refusal score  log p(refusal token) − log(1 − p)", ylabel="dissected prompt")
    ax.set_title(
        f"Greedy: each prompt's refusal score before and after (c = {greedy.coefficient:g})", fontsize=10
    )
    ax.legend(**OUTSIDE)
    _save(fig, path)
    return None


def fig_fm_fit(path: Path, fm) -> str | None:
    t = fm.fit
    panels = [
        (task, col)
        for task, col in (("regression", "heldout_r2"), ("classification", "heldout_accuracy"))
        if t.filter((pl.col("task") == task) & pl.col(col).is_not_null()).height
    ]
    if not panels:
        return "no held-out metrics (heldout_fraction = 0?)"
    fig = Figure(figsize=(4.5 * len(panels) + 1.5, 3.5))
    for k, (task, col) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        part = t.filter(pl.col("task") == task)
        prompts = sorted(set(part["prompt_idx"].to_list()))
        for off, model, color in ((-0.2, "fm", "tab:blue"), (0.2, "linear", "tab:gray")):
            vals = [_first(part, idx, model, col) for idx in prompts]
            ax.bar([i + off for i in range(len(prompts))], vals, width=0.4, color=color, label=model)
        what = "R² of the refusal score" if task == "regression" else "accuracy of the flip"
        ax.set(xticks=range(len(prompts)), xticklabels=[f"p{i}" for i in prompts], ylabel=f"held-out {what}")
        ax.set_title(f"FM vs linear: held-out {what}", fontsize=10)
    ax.legend(**OUTSIDE)
    _save(fig, path)
    return None


def _first(t: pl.DataFrame, idx: int, model: str, col: str) -> float:
    v = t.filter((pl.col("prompt_idx") == idx) & (pl.col("model") == model))[col].to_list()
    return float(v[0]) if v and v[0] is not None else 0.0


def fig_fm_interactions(path: Path, fm) -> str | None:
    t = fm.interactions
    if t.height == 0:
        return "the FM found no pairs"
    idx = sorted(set(t["prompt_idx"].to_list()))[0]
    t = t.filter(pl.col("prompt_idx") == idx)
    names = sorted({str(f) for f in t["label_i"].to_list() + t["label_j"].to_list()})
    grid = [[float("nan")] * len(names) for _ in names]
    for r in t.iter_rows(named=True):
        i, j = names.index(str(r["label_i"])), names.index(str(r["label_j"]))
        grid[i][j] = grid[j][i] = r["v_dot"]
    lim = max(abs(v) for row in grid for v in row if v == v) or 1.0
    fig = Figure(figsize=(0.5 * len(names) + 3.5, 0.5 * len(names) + 2))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"FM interactions ⟨v_i, v_j⟩ of the top pairs, prompt {idx}", fontsize=10)
    fig.colorbar(im, ax=ax, label="⟨v_i, v_j⟩ (refusal-score units)")
    _save(fig, path)
    return None


def fig_redundancy(path: Path, redundancy, top: int = 30) -> str | None:
    t = redundancy.awakened
    if "ablation" in t.columns:
        t = t.filter(pl.col("ablation") == "strong")
    if "in_h" in t.columns:
        t = t.filter(pl.col("in_h"))
    if t.height == 0:
        return "no latent woke up when the minimal sets were ablated"
    t = t.sort(
        ["ablated_max", "prompt_idx", "layer", "feature"], descending=[True, False, False, False]
    ).head(top)
    labels = [f"p{r['prompt_idx']} {_label(r['layer'], r['feature'])}" for r in t.iter_rows(named=True)]
    y = list(range(len(labels)))
    fig = Figure(figsize=(7.5, 0.25 * len(labels) + 1.5))
    ax = fig.add_subplot()
    ax.barh([i - 0.2 for i in y], t["clean_max"].to_list(), height=0.4, color="tab:gray", label="clean")
    ax.barh(
        [i + 0.2 for i in y], t["ablated_max"].to_list(), height=0.4, color="tab:orange", label="M ablated"
    )
    ax.set_yticks(y, labels, fontsize=7)
    ax.set(xlabel="largest activation over the prompt's tokens")
    ax.set_title(f"Redundancy: the {len(labels)} strongest latents woken by ablating M", fontsize=10)
    ax.invert_yaxis()
    ax.legend(**OUTSIDE)
    _save(fig, path)
    return None


def fig_evaluate(path: Path, evaluate) -> str | None:
    t = evaluate.completions
    col = next((c for c in t.columns if c.startswith("is_jailbreak_")), None)
    if t.height == 0 or col is None:
        return "no completions"
    bars: list[tuple[str, float, bool]] = []  # (label, rate, harmful)
    comparison = getattr(evaluate, "comparison", None)
    if isinstance(comparison, pl.DataFrame) and comparison.height:  # like with like: one prompt set per block
        for r in comparison.filter(pl.col("jailbreak_rate").is_not_null()).iter_rows(named=True):
            bars.append(
                (f"{r['prompt_set']} · {r['condition']}: jailbreak (n={r['n']})", r["jailbreak_rate"], True)
            )
    else:
        part = t.filter(pl.col("harmful"))
        for (cond,), g in part.group_by(["condition"], maintain_order=True):
            bars.append((f"{cond}: jailbreak (n={g.height})", float(g[col].cast(pl.Float64).mean()), True))
    rate = getattr(evaluate, "rate", None)
    for (cond,), g in t.filter(~pl.col("harmful")).group_by(["condition"], maintain_order=True):
        # refused where the judge and the flip criterion agree; a bare table has the judge's column alone
        if rate is None:
            refused: float | None = 1 - float(g[col].cast(pl.Float64).mean())
        else:  # None for a folder saved before the criterion's verdict: not measured, no bar
            refused = rate(cond, set(g["prompt_idx"].to_list()), harmful=False)
        if refused is not None:
            bars.append((f"harmless · {cond}: refusal (n={g.height})", refused, False))
    if not bars:
        return "no rate was measured (an evaluate folder saved before each row's flip-criterion verdict)"
    fig = Figure(figsize=(8, 0.3 * len(bars) + 1.6))
    ax = fig.add_subplot()
    y = range(len(bars))
    ax.barh(y, [b[1] for b in bars], color=["tab:red" if b[2] else "tab:blue" for b in bars])
    for i, (_, v, _) in enumerate(bars):
        ax.text(min(v, 1.0) + 0.01, i, f"{v:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, [b[0] for b in bars], fontsize=7)
    ax.set(xlim=(0, 1.1), xlabel="rate (judged generations, where the flip criterion agrees)")
    ax.set_title(f"Evaluation: jailbreak and refusal rates per condition (judge: {col[13:]})", fontsize=10)
    ax.invert_yaxis()
    _save(fig, path)
    return None


@dataclass(frozen=True)
class FigureSpec:
    name: str  # figures/<name>.png
    what: str  # what it shows, in a few words (the report's heading for it)
    caption: str  # how to read it, one line
    needs: tuple[str, ...]  # the stages it draws from
    draw: Callable[[Path, dict], str | None]


FIGURES: list[FigureSpec] = [
    FigureSpec(
        "direction_selection",
        "direction selection",
        "Each cell is the harmful val prompts' mean refusal score with that (layer, eoi position) candidate "
        "ablated: lower jailbreaks more. × marks a candidate the filters discarded; the red box is the chosen one.",
        ("direction",),
        lambda p, r: fig_direction(p, r["direction"]),
    ),
    FigureSpec(
        "candidate_cosines",
        "candidate features",
        "Each dot is an SAE latent at its layer, placed by the cosine of its decoder row with the refusal "
        "direction r̂. Red dots are the candidates C (top-k per searched layer): filled where fewer than 5% of "
        "random directions have a latent as close to them (null_p), hollow where a direction carrying no "
        "information finds one as close; stars ended in a minimal set.",
        ("candidates",),
        lambda p, r: fig_candidates(p, r["candidates"], r.get("greedy")),
    ),
    FigureSpec(
        "greedy_minimal_sets",
        "minimal sets per prompt",
        "Rows are the dissected prompts, columns the features of any minimal set (most frequent first). A dark "
        "cell means the feature is in that prompt's 1-minimal set; |M| at the right is the set's size.",
        ("greedy",),
        lambda p, r: fig_greedy_sets(p, r["greedy"]),
    ),
    FigureSpec(
        "greedy_scores",
        "refusal score before and after",
        "One row per dissected prompt: its refusal score with nothing ablated (grey) and with its minimal set "
        "ablated (red). The dashed line is the threshold τ calibrated on val: to its right the model refuses.",
        ("greedy",),
        lambda p, r: fig_greedy_scores(p, r["greedy"]),
    ),
    FigureSpec(
        "fm_fit",
        "FM vs linear",
        "Per FM-dissected prompt, on held-out ablation masks: how well the FM (blue) and a linear model on the "
        "same masks (grey) predict the refusal score and the flip. Interactions matter where blue beats grey.",
        ("fm",),
        lambda p, r: fig_fm_fit(p, r["fm"]),
    ),
    FigureSpec(
        "fm_interactions",
        "FM interactions",
        "⟨v_i, v_j⟩ of the FM's top pairs on one prompt. Red: ablating both raises the predicted refusal score "
        "more than the two alone add up to; blue: lowers it more. Blank pairs were not among the top pairs.",
        ("fm",),
        lambda p, r: fig_fm_interactions(p, r["fm"]),
    ),
    FigureSpec(
        "redundancy",
        "awakened latents",
        "For the strongest latents of H (prompt, feature): the largest activation on the clean prompt (grey; "
        "near 0 means dormant) and with the prompt's minimal set ablated (orange).",
        ("redundancy",),
        lambda p, r: fig_redundancy(p, r["redundancy"]),
    ),
    FigureSpec(
        "evaluate_rates",
        "evaluation",
        "Judged generations; a verdict counts where the judge and the flip criterion agree. Red bars: the "
        "fraction of baseline-refused harmful prompts jailbroken under each condition, per prompt set (all eval "
        "prompts, the dissected ones, the FM's); rates in one prompt set are measured on the same prompts. Blue "
        "bars: the fraction of harmless eval prompts refused.",
        ("evaluate",),
        lambda p, r: fig_evaluate(p, r["evaluate"]),
    ),
]


def write_figures(run: RunFolder, results: dict[str, object]) -> dict[str, str | None]:
    """name → None (written to run.figure(name)) or the reason it was skipped."""
    notes: dict[str, str | None] = {}
    for spec in FIGURES:
        missing = [s for s in spec.needs if results.get(s) is None]
        if missing:
            notes[spec.name] = f"skipped: stage {', '.join(missing)} did not run"
            continue
        try:
            reason = spec.draw(run.figure(spec.name), results)
        except Exception as err:  # a figure must never sink a finished run
            log.warning("figure %s failed: %s", spec.name, err)
            reason = f"failed: {type(err).__name__}: {err}"
        notes[spec.name] = None if reason is None else f"skipped: {reason}"
    return notes
