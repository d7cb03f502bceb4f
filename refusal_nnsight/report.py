"""report.md and the figures of a run: the file a person reads first (SPEC.md "Outputs of a run").

`write_report` writes what was run (model, SAEs, data sizes, settings), the headline numbers of
summary.json, where every table lives, the features found (linked to Neuronpedia for real SAEs)
and one figure per stage. Each figure function takes stage results and returns None when it
drew, or a one-line reason when there is nothing to draw; a stage that did not run is skipped
with a note. Figures use matplotlib's Agg canvas (no pyplot state, no display) and are written
through a temporary file + rename, like every other artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .artifacts import STAGES, RunFolder, atomic_write, read_json, write_text

log = logging.getLogger(__name__)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    # fixed metadata: no matplotlib version or date in the file, so reruns write the same bytes
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, metadata={"Software": None}))


def fig_direction(path: Path, direction) -> str | None:
    """Bypass score per (eoi position, layer); the chosen cell boxed, discarded cells crossed."""
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
        ax.add_patch(_box(j, i))
    ax.set(xticks=range(len(layers)), xticklabels=layers, yticks=range(len(positions)), yticklabels=positions,
           xlabel="layer", ylabel="eoi position", title="Refusal direction: bypass score (× = filtered, box = chosen)")  # fmt: skip
    fig.colorbar(im, ax=ax, label="mean refusal score, direction ablated")
    _save(fig, path)
    return None


def _box(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)


def fig_candidates(path: Path, candidates, greedy=None) -> str | None:
    """Decoder cosine with r̂ per layer: the candidate set C in red, features of some minimal set starred."""
    t = candidates.table
    if t.height == 0:
        return "the candidate table is empty"
    chosen = {(int(a), int(b)) for a, b in candidates.features}
    minimal = {(int(a), int(b)) for m in (greedy.minimal_sets.values() if greedy else []) for a, b in m}
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    rows = t.to_dicts()
    for group, color, label in ((False, "0.7", "other latents"), (True, "tab:red", "candidates C")):
        pts = [(r["layer"], r["cosine"]) for r in rows if ((r["layer"], r["feature"]) in chosen) == group]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=12, color=color, label=label)
    pts = [(r["layer"], r["cosine"]) for r in rows if (r["layer"], r["feature"]) in minimal]
    if pts:
        ax.scatter(
            *zip(*pts, strict=True), s=90, marker="*", color="gold", edgecolor="k", label="in a minimal set"
        )
    ax.set(xlabel="layer", ylabel="cos(decoder row, r̂)", title="Candidate features by decoder cosine")
    ax.set_xticks(sorted({r["layer"] for r in rows}))
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def fig_greedy(path: Path, greedy, max_prompts: int = 12) -> str | None:
    """Refusal score of each tested set vs step of backward elimination, one line per prompt."""
    t = greedy.trajectory
    if "method" in t.columns:
        t = t.filter(pl.col("method") == "backward")
    if t.height == 0:
        return "the greedy trajectory is empty"
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    col = "margin" if "margin" in t.columns else "score"
    for idx in sorted(set(t["prompt_idx"].to_list()))[:max_prompts]:
        p = t.filter(pl.col("prompt_idx") == idx).sort("step")
        ax.plot(p["step"].to_list(), p[col].to_list(), marker=".", lw=1, label=f"prompt {idx}")
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set(
        xlabel="step",
        ylabel="flip margin (< 0: the model stops refusing)",
        title="Greedy backward elimination",
    )
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return None


def fig_fm_fit(path: Path, fm) -> str | None:
    """Held-out R² (regression) and accuracy (classification) of the FM vs the linear model."""
    t = fm.fit
    panels = [(task, col) for task, col in (("regression", "heldout_r2"), ("classification", "heldout_accuracy"))
              if t.filter((pl.col("task") == task) & pl.col(col).is_not_null()).height]  # fmt: skip
    if not panels:
        return "no held-out metrics (heldout_fraction = 0?)"
    fig = Figure(figsize=(5 * len(panels), 3.5))
    for k, (task, col) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        part = t.filter(pl.col("task") == task)
        prompts = sorted(set(part["prompt_idx"].to_list()))
        for off, model, color in ((-0.2, "fm", "tab:blue"), (0.2, "linear", "tab:gray")):
            vals = [_first(part, idx, model, col) for idx in prompts]
            ax.bar([i + off for i in range(len(prompts))], vals, width=0.4, color=color, label=model)
        ax.set(
            xticks=range(len(prompts)),
            xticklabels=[f"p{i}" for i in prompts],
            ylabel=col,
            title=f"{task}: FM vs linear",
        )
        ax.legend(fontsize=8)
    _save(fig, path)
    return None


def _first(t: pl.DataFrame, idx: int, model: str, col: str) -> float:
    v = t.filter((pl.col("prompt_idx") == idx) & (pl.col("model") == model))[col].to_list()
    return float(v[0]) if v and v[0] is not None else 0.0


def fig_fm_interactions(path: Path, fm) -> str | None:
    """⟨v_i, v_j⟩ of the top pairs of one prompt's pool, as a symmetric heatmap."""
    t = fm.interactions
    if t.height == 0:
        return "the FM found no pairs"
    idx = sorted(set(t["prompt_idx"].to_list()))[0]
    t = t.filter(pl.col("prompt_idx") == idx)
    names = sorted({str(f) for f in t["feature_i"].to_list() + t["feature_j"].to_list()})
    grid = [[float("nan")] * len(names) for _ in names]
    for r in t.iter_rows(named=True):
        i, j = names.index(str(r["feature_i"])), names.index(str(r["feature_j"]))
        grid[i][j] = grid[j][i] = r["v_dot"]
    lim = max(abs(v) for row in grid for v in row if v == v) or 1.0
    fig = Figure(figsize=(0.5 * len(names) + 3, 0.5 * len(names) + 2))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set(
        xticks=range(len(names)), yticks=range(len(names)), title=f"FM interactions ⟨v_i, v_j⟩, prompt {idx}"
    )
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    return None


def fig_redundancy(path: Path, redundancy, top: int = 30) -> str | None:
    """Clean vs M-ablated max activation of the strongest awakened latents (H)."""
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
    labels = [f"p{r['prompt_idx']} L{r['layer']}/F{r['feature']}" for r in t.iter_rows(named=True)]
    y = list(range(len(labels)))
    fig = Figure(figsize=(7, 0.25 * len(labels) + 1.5))
    ax = fig.add_subplot()
    ax.barh([i - 0.2 for i in y], t["clean_max"].to_list(), height=0.4, color="tab:gray", label="clean")
    ax.barh(
        [i + 0.2 for i in y], t["ablated_max"].to_list(), height=0.4, color="tab:orange", label="M ablated"
    )
    ax.set(
        yticks=y, xlabel="max activation over the prompt", title="Redundancy: latents awakened by ablating M"
    )
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def fig_evaluate(path: Path, evaluate) -> str | None:
    """Judged jailbreak rate per harmful condition, and refusal rate per harmless condition."""
    t = evaluate.completions
    col = next((c for c in t.columns if c.startswith("is_jailbreak_")), None)
    if t.height == 0 or col is None:
        return "no completions"
    rates = t.group_by(["harmful", "condition"], maintain_order=True).agg(pl.col(col).cast(pl.Float64).mean())
    labels = [
        f"{c}: jailbreak" if h else f"{c}, harmless: refusal"
        for h, c in zip(rates["harmful"], rates["condition"], strict=True)
    ]
    vals = [v if h else 1 - v for h, v in zip(rates["harmful"], rates[col], strict=True)]
    fig = Figure(figsize=(7, 0.35 * len(labels) + 1.5))
    ax = fig.add_subplot()
    ax.barh(range(len(labels)), vals, color=["tab:red" if h else "tab:blue" for h in rates["harmful"]])
    ax.set(
        yticks=range(len(labels)), xlim=(0, 1), xlabel="rate", title="Evaluation (judge: " + col[13:] + ")"
    )
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    _save(fig, path)
    return None


# (figure name, what it shows, the stages it needs, the function)
FIGURES: list[tuple[str, str, tuple[str, ...], Callable]] = [
    ("direction_selection", "direction selection: bypass score per layer × eoi position", ("direction",),
     lambda p, r: fig_direction(p, r["direction"])),
    ("candidate_cosines", "decoder cosines per layer, candidates marked", ("candidates",),
     lambda p, r: fig_candidates(p, r["candidates"], r.get("greedy"))),
    ("greedy_trajectory", "greedy trajectory: refusal score vs step per prompt", ("greedy",),
     lambda p, r: fig_greedy(p, r["greedy"])),
    ("fm_fit", "FM vs linear on held-out masks", ("fm",), lambda p, r: fig_fm_fit(p, r["fm"])),
    ("fm_interactions", "FM interaction heatmap ⟨v_i, v_j⟩", ("fm",), lambda p, r: fig_fm_interactions(p, r["fm"])),
    ("redundancy", "redundancy: clean vs ablated activation of awakened latents", ("redundancy",),
     lambda p, r: fig_redundancy(p, r["redundancy"])),
    ("evaluate_rates", "jailbreak / refusal rate per condition", ("evaluate",),
     lambda p, r: fig_evaluate(p, r["evaluate"])),
]  # fmt: skip


def write_figures(run: RunFolder, results: dict[str, object]) -> dict[str, str | None]:
    """name → None (written to run.figure(name)) or the reason it was skipped."""
    notes: dict[str, str | None] = {}
    for name, _, needs, draw in FIGURES:
        missing = [s for s in needs if results.get(s) is None]
        if missing:
            notes[name] = f"skipped: stage {', '.join(missing)} did not run"
            continue
        try:
            reason = draw(run.figure(name), results)
        except Exception as err:  # a figure must never sink a finished run
            log.warning("figure %s failed: %s", name, err)
            reason = f"failed: {type(err).__name__}: {err}"
        notes[name] = None if reason is None else f"skipped: {reason}"
    return notes


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _linker(cfg_dict: dict) -> Callable[[int, int], str]:
    """'L{layer}/F{feature}', linked to Neuronpedia when the SAE config names its Neuronpedia id."""
    template = (cfg_dict.get("sae") or {}).get("neuronpedia")

    def link(layer: int, feature: int) -> str:
        label = f"L{layer}/F{feature}"
        if not template:
            return label
        from .config import SAEConfig
        from .saes import LoadedSAEs

        url = LoadedSAEs(SAEConfig(neuronpedia=template), {}).neuronpedia_url(layer, feature)
        return f"[{label}]({url})"

    return link


def write_report(run: RunFolder, summary: dict, results: dict[str, object], cfg_dict: dict) -> Path:
    """Write run.report (report.md) and the figures; return the report's path."""
    figures = write_figures(run, results)
    link = _linker(cfg_dict)
    m, s, d, search = (cfg_dict.get(k) or {} for k in ("model", "sae", "data", "search"))
    lines = [f"# refusal_nnsight run: {m.get('name', '?')}", ""]
    if summary.get("status"):
        lines += [f"**Status:** {summary['status']}", ""]
    org = summary.get("organism")
    src = m.get("repo_id") or (
        f"organism recipe '{org['recipe']}', seed {org['seed']}, recipe hash {org['recipe_hash']}, "
        f"weights {org['content_hash']}{' (shipped)' if org['shipped'] else ''}"
        if org
        else f"organism recipe '{m.get('organism_recipe')}'"
    )
    sae_src = s.get("release") or s.get("path") or s.get("source")
    lines += [
        "## What was run", "",
        f"- model: `{m.get('name')}` ({src}, {m.get('dtype')}, max_new_tokens={m.get('max_new_tokens')})",
        f"- SAEs: `{s.get('name')}` ({sae_src}{' / ' + s['sae_id'] if s.get('sae_id') else ''}), layers: {s.get('layers') or 'all'}",
        f"- data: `{d.get('name')}`: n_train={d.get('n_train')}, n_val={d.get('n_val')}, n_eval={d.get('n_eval')} per class, seed={d.get('seed')}",
        f"- search preset `{search.get('name')}`, judge `{(cfg_dict.get('judge') or {}).get('name')}`, seed {cfg_dict.get('seed')}, "
        f"stages: {', '.join(cfg_dict.get('stages') or [])}",
        f"- settings: see `{run.config.name}`; per-stage settings: "
        + "; ".join(f"{k}: {_inline(v)}" for k, v in search.items() if isinstance(v, dict)),
        "",
    ]  # fmt: skip
    lines += _findings(summary, results, search)
    lines += ["## Headline numbers", "", "| quantity | value |", "|---|---|"]
    lines += [
        f"| {k} | {_fmt(v)} |" for k, v in _flat(summary) if not k.startswith("timing.") and k != "status"
    ]
    timing = summary.get("timing") or (read_json(run.timing) if run.timing.exists() else {})
    if timing:
        lines += ["", "Wall time (s): " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in timing.items())]
    lines += ["", "## Figures", ""]
    for name, what, _, _ in FIGURES:
        note = figures.get(name)
        rel = run.figure(name).relative_to(run.root)
        lines.append(f"- {what}: {note}" if note else f"- {what}: `{rel}`\n\n  ![{name}]({rel})")
    lines += ["", "## Features", ""] + _features(results, link)
    lines += ["", "## Notes", ""] + _notes(results)
    lines += ["", "## Where the tables live", ""]
    for stage in STAGES:
        folder = run.stage(stage).path
        files = (
            sorted(p.relative_to(run.root).as_posix() for p in folder.glob("*") if p.is_file())
            if folder.exists()
            else []
        )
        lines.append(f"- {stage}: " + (", ".join(f"`{f}`" for f in files) if files else "no files"))
    path = write_text(run.report, "\n".join(lines) + "\n")
    log.info("report: %s", path)
    return path


def _inline(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _features(results: dict, link: Callable[[int, int], str]) -> list[str]:
    lines = []
    cand = results.get("candidates")
    if cand is not None and cand.table.height:
        top = cand.table.sort("cosine", descending=True).head(10)
        lines.append("Top candidates by decoder cosine: " + ", ".join(
            f"{link(r['layer'], r['feature'])} ({r['cosine']:.3f})" for r in top.iter_rows(named=True)))  # fmt: skip
    greedy = results.get("greedy")
    if greedy is not None:
        sets = greedy.minimal_sets
        lines.append(f"\nMinimal sets ({len(sets)} prompts; first 10):\n")
        for idx in sorted(sets)[:10]:
            lines.append(f"- prompt {idx}: " + (", ".join(link(a, b) for a, b in sets[idx]) or "(empty)"))
    red = results.get("redundancy")
    if red is not None and red.awakened.height:
        h = (
            red.awakened.filter(pl.col("ablation") == "strong")
            if "ablation" in red.awakened.columns
            else red.awakened
        )
        top = h.sort("ablated_max", descending=True).head(10)
        lines.append("\nStrongest awakened latents: " + ", ".join(
            f"{link(r['layer'], r['feature'])} (p{r['prompt_idx']}: {r['clean_max']:.2f} → {r['ablated_max']:.2f})"
            for r in top.iter_rows(named=True)))  # fmt: skip
    gt = results.get("ground_truth")
    if gt is not None and gt.roles.height:
        lines.append("\nRoles of the found features (planted truth; where their ten strongest activations fall): "
                     + ", ".join(f"{link(r['layer'], r['feature'])} {r['role']} ({r['role_share']:.0%})"
                                 for r in gt.roles.iter_rows(named=True)))  # fmt: skip
    return lines or ["(no feature-level stage ran)"]


def _notes(results: dict) -> list[str]:
    """Why each null in summary.json is null (every stage's `notes`), and the direction fallback."""
    lines = []
    direction = results.get("direction")
    if direction is not None and getattr(direction, "fallback", False):
        lines.append(f"- direction: no candidate passed the filters; fallback: {direction.fallback_reason}")
    for stage in ("candidates", "greedy", "fm", "redundancy", "evaluate", "ground_truth"):
        for key, why in (getattr(results.get(stage), "notes", None) or {}).items():
            lines.append(f"- {stage}.{key}: {why}")
    return lines or ["- none"]


CRITERIA = {
    "score": "the refusal score falls below the threshold τ calibrated on the val split",
    "first_token": "the greedy first token is no longer a refusal token",
    "judge": "the generation judge finds no refusal in the completion",
}


def _findings(summary: dict, results: dict, search: dict) -> list[str]:
    """What the edit is, what a flip is, and the figures that answer the method's questions:
    both coefficients, like-with-like rates, smallest sets, FM pair kinds, the prompt classifier."""
    g, fm, ev, red = (summary.get(k) or {} for k in ("greedy", "fm", "evaluate", "redundancy"))
    c = search.get("coefficient", ev.get("coefficient", g.get("coefficient")))
    lines = ["## What the edit and a flip are", ""]
    if c is not None:
        lines.append(
            f"- Edit: every SAE ablation scales the chosen latents by c = {_fmt(c)} (f_i ← c·f_i, the SAE error "
            f"term kept, at every position){' — negative steering, not only removal' if c < 0 else ''}."
        )
    rd = search.get("redundancy") or {}
    if red:
        lines.append(
            f"- Redundancy's weak ablation scales M by {_fmt(red.get('weak_coefficient'))}; its <bos> clamp sets the "
            f"{rd.get('bos_features', 'awakened')} latents to {_fmt(rd.get('bos_clamp_value', 0.0))} at <bos> only."
        )
    crit = g.get("criterion") or (search.get("greedy") or {}).get("criterion")
    if crit:
        tau = g.get("score_threshold", (summary.get("direction") or {}).get("score_threshold"))
        lines.append(f"- Flip criterion `{crit}`: a prompt flips when {CRITERIA.get(crit, crit)}"
                     f" (score threshold τ = {_fmt(tau)}).")  # fmt: skip
    if g.get("agreement_n"):
        lines.append(
            f"- Criterion–judge agreement on {g['agreement_n']} judged variants (M, its one-feature restorations, "
            f"the forward set): configured ({crit}) {_fmt(g.get('criterion_judge_agreement'))}, score "
            f"{_fmt(g.get('score_judge_agreement'))}, first_token {_fmt(g.get('first_token_judge_agreement'))}."
        )
    lines.append("")
    if ev:
        lines += ["## Jailbreak rates, like with like", "",
                  "Each rate counts only prompts refused at baseline (judged clean generation); n = those prompts. "
                  "Rates in one block are measured on the same prompts.", "",
                  "| prompt set | condition | jailbreak rate | n |", "|---|---|---|---|"]  # fmt: skip
        table = getattr(results.get("evaluate"), "comparison", None)
        for r in table.iter_rows(named=True) if isinstance(table, pl.DataFrame) else []:
            lines.append(f"| {r['prompt_set']} | {r['condition']} | {_fmt(r['jailbreak_rate'])} | {r['n']} |")
        lines += ["", f"- Minimal sets at c = {_fmt(c)}: {_fmt(ev.get('minimal_jailbreak_rate'))}; at c = 0 "
                  f"(zero-ablation): {_fmt(ev.get('minimal_zero_ablation_jailbreak_rate'))} "
                  f"(n = {_fmt(ev.get('minimal_jailbreak_rate_n'))}).", ""]  # fmt: skip
    if g.get("n_prompts"):
        lines += ["## Minimal and smallest sets", "",
                  f"- 1-minimal sets (backward elimination): median size {_fmt(g.get('median_one_minimal_set_size'))}; "
                  f"smallest verified set (backward or forward): median {_fmt(g.get('median_smallest_set_size'))}, "
                  f"smaller than the 1-minimal set on {_fmt(g.get('n_smallest_below_one_minimal'))} of "
                  f"{g['n_prompts']} prompts.", ""]  # fmt: skip
    if fm:
        kinds = ", ".join(
            f"{k} {_fmt(fm.get(f'n_{k}_pairs'))}" for k in ("synergy", "redundant", "suppression")
        )
        lines += ["## Interactions and the prompt classifier", "",
                  f"- Confirmed FM pairs: {_fmt(fm.get('n_confirmed_pairs'))} ({kinds}).",
                  f"- Masks: {_fmt(fm.get('n_masks_per_prompt'))} per prompt, {_fmt(fm.get('n_masks_total'))} in total.",
                  f"- Prompt classifier (harmful vs harmless from the pool features' max-pooled activations), held-out "
                  f"accuracy: FM {_fmt(fm.get('classifier_heldout_accuracy'))}, linear "
                  f"{_fmt(fm.get('classifier_linear_heldout_accuracy'))} (n = {_fmt(fm.get('classifier_n_heldout'))}).",
                  ""]  # fmt: skip
    return lines if len(lines) > 3 else []
