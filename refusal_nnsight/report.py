"""report.md: the file a person reads first.

In order: what produced the run (model weights, SAEs, toolkit version and commit, command line,
seed); what was found, in plain sentences generated from the numbers, each pointing at its
table or figure; a card for every found feature (features.parquet); the figures, each with a
caption saying how to read it; how the edit and a flip are defined and the like-with-like rates;
the numbers of each stage; the settings; why each null is null; where every table lives.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from .artifacts import STAGES, RunFolder, read_json, write_text
from .figures import FIGURES, write_figures

log = logging.getLogger(__name__)

FULL_CARDS = 12  # features shown as full cards; the rest as one table row each
TABLE_CARDS = 30  # rows of that table; every card is in features.parquet


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _skips_first_token(prov: dict) -> bool:
    """Whether the run's SAEs never saw a prompt's first token, so no edit or read touched it."""
    return bool((prov.get("sae") or {}).get("skip_first_token"))


def write_report(run: RunFolder, summary: dict, results: dict[str, Any], cfg_dict: dict) -> Path:
    """Write run.report (report.md) and the figures; return the report's path."""
    figures = write_figures(run, results)
    search = cfg_dict.get("search") or {}
    cards = results.get("features")
    prov = read_json(run.provenance) if run.provenance.is_file() else {}
    lines = [f"# refusal_nnsight run: {(cfg_dict.get('model') or {}).get('name', '?')}", ""]
    if summary.get("status"):
        lines += [f"**Status:** {summary['status']}", ""]
    lines += _provenance(summary, cfg_dict, prov)
    lines += ["## What we found", ""] + found_sentences(summary, results, cards) + [""]
    lines += ["## Feature cards", ""] + _cards(cards) + [""]
    lines += ["## Figures", ""]
    for spec in FIGURES:
        note = figures.get(spec.name)
        rel = run.figure(spec.name).relative_to(run.root).as_posix()
        if note:
            lines += [f"- **{spec.what}**: {note}"]
        else:
            lines += [
                f"### {spec.what[:1].upper()}{spec.what[1:]}",
                "",
                f"![{spec.name}]({rel})",
                "",
                spec.caption,
                "",
            ]
    lines += [""] + _findings(summary, results, search, _skips_first_token(prov))
    lines += ["## Numbers by stage", ""] + _numbers(summary)
    lines += _settings(run, cfg_dict, search, summary)
    lines += ["## Notes", ""] + _notes(results)
    lines += ["", "## Where the tables live", ""]
    for stage in STAGES:
        folder = run.stage(stage).path
        files = (
            sorted(p.relative_to(run.root).as_posix() for p in folder.glob("*") if p.is_file())
            if folder.exists()
            else []
        )
        lines.append(f"- {stage}: " + (", ".join(f"`{f}`" for f in files) if files else "no files"))
    if run.features.is_file():
        lines.append(f"- feature cards: `{run.features.name}`")
    path = write_text(run.report, "\n".join(lines) + "\n")
    log.info("report: %s", path)
    return path


def _provenance(summary: dict, cfg_dict: dict, prov: dict) -> list[str]:
    """The head: which weights, which SAEs, which code, which command, which seed."""
    m, s = cfg_dict.get("model") or {}, cfg_dict.get("sae") or {}
    org = summary.get("organism")
    if org:
        what = "a real model safety-tuned by" if org.get("kind") == "tuned" else "the model organism,"
        weights = (
            f"{what} recipe `{org['recipe']}`, seed {org['seed']}, recipe hash `{org['recipe_hash']}`, "
            f"weights hash `{org['content_hash']}`{' (the build shipped with the package)' if org['shipped'] else ''}"
        )
    elif m.get("source") == "gguf":
        g = prov.get("model") or {}
        weights = f"GGUF file `{m.get('gguf_file')}` from `{m.get('gguf_path')}`, sha256 `{g.get('gguf_sha256')}`, de-quantized"
    elif m.get("repo_id"):
        rev = (prov.get("model") or {}).get("revision")
        weights = f"`{m['repo_id']}`" + (f" at revision `{rev}`" if rev else " (revision not recorded)")
    else:
        weights = f"`{m.get('path') or m.get('source') or '?'}`"
    sae = s.get("release") or s.get("path") or s.get("source")
    tool = prov.get("toolkit") or {}
    lines = [
        f"- **model:** `{m.get('name')}`: {weights}; {m.get('dtype')}",
        f"- **SAEs:** `{s.get('name')}`: {sae}{' / ' + s['sae_id'] if s.get('sae_id') else ''}; "
        f"layers {s.get('layers') or 'all'}"
        + (
            "; no edit or read touches a prompt's first token (the SAEs never saw it)"
            if _skips_first_token(prov)
            else ""
        ),
    ]
    if tool:
        commit = tool.get("git_commit") or "not a git checkout"
        lines.append(f"- **toolkit:** refusal_nnsight {tool.get('version')}, commit `{commit}`")
    if prov.get("command"):
        lines.append(f"- **command:** `{prov['command']}`")
    lines.append(
        f"- **seed:** {cfg_dict.get('seed')}"
        + (f"; started {prov['started_utc']}" if prov.get("started_utc") else "")
    )
    if prov.get("packages"):
        lines.append("- **packages:** " + ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v))
    return lines + [""]


def _rate(value, n) -> str:
    """'0.94 (30 of 32)' from a rate and its denominator; 'not measured' for None."""
    if value is None:
        return "not measured"
    if n and abs(value * n - round(value * n)) < 1e-6:
        return f"{round(value * n)} of {n} ({_fmt(value)})"
    if n:  # an average (over random draws, say), not a count of these n
        return f"{_fmt(value)} on average over {n}"
    return _fmt(value)


def _draws_per_prompt(evaluate) -> int:
    """Random same-size sets drawn per prompt in an evaluate result (1 when unknown)."""
    sets = getattr(evaluate, "random_sets", None)
    if sets is None or not sets.height:
        return 1
    return int(sets["draw"].n_unique())


def _anchor(label: str) -> str:
    """The heading id GitHub gives '### L3/F708' (lower case, punctuation dropped)."""
    return "#" + "".join(ch for ch in label.lower() if ch.isalnum() or ch in "-_")


def _by_layer(c: dict) -> str:
    """The candidates' per-layer check as a sentence ("" when it was not run)."""
    alone, without = c.get("layer_alone_flip_rate"), c.get("layer_without_flip_rate")
    if not alone or not without:
        return ""
    n, everything = c.get("all_ablated_flip_rate_n"), c.get("all_ablated_flip_rate")
    out = f" Per searched layer, the refused prompts flipped by its candidates alone and by all candidates but its: {_alone_without(alone, without, n)}."
    more = [layer for layer in alone if everything is not None and (without.get(layer) or 0) > everything]
    if more:
        counts = ", ".join(f"layer {layer} {_rate(without[layer], n)}" for layer in more)
        out += f" Leaving a layer out flips more than ablating every candidate ({_rate(everything, n)}): {counts}."
    return out + _judged_layers(c) + _kept(c.get("layer_kept_activation"))


def _judged_layers(c: dict) -> str:
    """The per-layer variants generated and judged, as a sentence ("" when not judged)."""
    alone, without = c.get("layer_alone_jailbreak_rate"), c.get("layer_without_jailbreak_rate")
    if not alone or not without:
        return ""
    n = c.get("layer_jailbreak_rate_n")
    if n == c.get("all_ablated_flip_rate_n") and (alone, without) == (
        c.get("layer_alone_flip_rate"),
        c.get("layer_without_flip_rate"),
    ):  # a jailbreak is a flip the judge reads as answered: equal counts are the same prompts
        return " Generated and judged, these variants jailbreak the same prompts: the judge reads every prompt they flip as answered."
    return (
        f" Generated and judged, the prompts the judge and the criterion agree stop refusing, of the {n} "
        f"both read as refused on the clean run: {_alone_without(alone, without, n)}."
    )


def _alone_without(alone: dict, without: dict, n) -> str:
    """'layer 0 4 of 4 (1) alone, 0 of 4 (0) without it; …' from per-layer rates over n prompts."""
    return "; ".join(
        f"layer {layer} {_rate(alone[layer], n)} alone, {_rate(without.get(layer), n)} without it"
        for layer in alone
    )


def _beyond_null(c: dict, candidates: Any) -> str:
    """How many of each layer's candidates stand out from random directions' rankings ("" when not measured)."""
    beyond = c.get("layer_beyond_null")
    if not beyond or candidates is None:
        return ""
    from .stages.candidates import NULL_LEVEL

    k = dict(candidates.table.group_by("layer").len().iter_rows())
    parts = "; ".join(f"layer {layer} {n} of {k[int(layer)]}" for layer, n in beyond.items())
    return (
        f" Candidates closer to r̂ than the closest latent of {1 - NULL_LEVEL:.0%} of random directions is to "
        f"them (`null_p` ≤ {NULL_LEVEL:g}): {parts}; the others are no closer than a direction carrying no "
        "information would find latents, so their rank, not their alignment, may have put them in C."
    )


# Below this share of their clean activation, a layer's candidates count as silenced by the edits below
SILENCED = 0.5


def _kept(kept: dict | None) -> str:
    """The per-layer kept activation as a sentence, naming the silenced layers ("" when not measured)."""
    if not kept:
        return ""
    shares = "; ".join(
        f"layer {layer} {v:.2f}"
        if v is not None
        else f"layer {layer} not measured (inactive on these prompts)"
        for layer, v in kept.items()
    )
    out = (
        f" With every candidate ablated, each layer's candidates keep this share of their clean activation, "
        f"read as their own edit reads it (after the edits below): {shares}."
    )
    silenced = [layer for layer, v in kept.items() if v is not None and v < SILENCED]
    if silenced:
        which = (
            f"layer {silenced[0]}"
            if len(silenced) == 1
            else f"layers {', '.join(silenced[:-1])} and {silenced[-1]}"
        )
        out += (
            f" The edits below silence the candidates of {which}: an edit scales what its latent holds, "
            "so theirs changes little once the layers below are edited."
        )
    return out


def _criterion_vs_judge(candidates: Any, evaluate: Any) -> str:
    """How the judge's verdicts on the all-of-C generations (evaluate) compare with the flip
    criterion's, on the same refused prompts ("" when either is missing). The criterion reads the
    first token; greedy dissects only the prompts it flips, so where the judge disagrees greedy
    leaves prompts out that were jailbroken."""
    if candidates is None or evaluate is None or not hasattr(evaluate, "completions"):
        return ""
    col = evaluate.jailbreak_column
    done = evaluate.completions.filter(pl.col("condition") == "candidates_ablated")
    if col not in done.columns or not done.height:
        return ""
    both = candidates.prompts.filter(pl.col("refused")).join(
        done.select("prompt_idx", "response", col), on="prompt_idx", how="inner"
    )
    if not both.height:
        return ""
    judged = int(both[col].sum())
    stay = both.filter(~pl.col("jailbroken") & pl.col(col))
    out = (f" Judged on their generations (evaluate), the same ablation jailbreaks {judged} of "
           f"{both.height} of them")  # fmt: skip
    if stay.height:
        example = stay["response"][0].strip()
        out += (f"; on {stay.height} the criterion counts a refusal where the judge finds compliance (e.g. "
                f"“{example[:60]}”), and greedy leaves those prompts out")  # fmt: skip
    gone = both.filter(pl.col("jailbroken") & ~pl.col(col)).height
    if gone:
        out += f"; on {gone} the criterion counts a flip the judge does not"
    return out + "."


def found_sentences(summary: dict, results: dict, cards: pl.DataFrame | None) -> list[str]:
    """Plain sentences generated from the numbers, each pointing at its table or figure."""
    d, c, g, fm, red, ev, gt = (summary.get(k) or {} for k in
                                ("direction", "candidates", "greedy", "fm", "redundancy", "evaluate", "ground_truth"))  # fmt: skip
    coef = ev.get("coefficient", g.get("coefficient"))
    out = []
    if d:
        fb = " It is a fallback: no candidate passed the filters." if d.get("fallback") else ""
        kl = ev.get("direction_kl", d.get("kl"))
        if kl is not None and kl >= 1.0:
            fb += (f" A harmless KL of {_fmt(kl)} nats moves the harmless next-token distributions far: these "
                   "jailbreaks may be the model breaking rather than its refusal removed.")  # fmt: skip
        jail = _rate(
            ev.get("direction_ablation_jailbreak_rate"), ev.get("direction_ablation_jailbreak_rate_n")
        )
        out.append(
            f"- **Refusal direction.** The difference-in-means direction chosen at layer {d.get('layer')}, eoi "
            f"position {d.get('position')}, jailbreaks {jail} baseline-refused harmful eval prompts when "
            f"ablated, at harmless KL {_fmt(kl)}.{fb} "
            "([figure](#direction-selection), `direction/`)"
        )
    if c:
        out.append(
            f"- **Candidates.** {c.get('n_features')} SAE latents on layers {c.get('layers')}{_pool(c)} point most "
            f"along it{_silent(c)}; ablating all of them (c = {_fmt(c.get('coefficient'))}) flips "
            f"{_rate(c.get('all_ablated_flip_rate'), c.get('all_ablated_flip_rate_n'))} refused prompts by the "
            f"`{c.get('criterion')}` criterion."
            f"{_criterion_vs_judge(results.get('candidates'), results.get('evaluate'))}{_by_layer(c)}"
            f"{_beyond_null(c, results.get('candidates'))} "
            "([figure](#candidate-features), "
            "`candidates/candidates.parquet`)"
        )
    if g.get("n_prompts"):
        out.append(
            f"- **Minimal sets.** Greedy dissected {g['n_prompts']} prompts. Their 1-minimal sets have median size "
            f"{_fmt(g.get('median_one_minimal_set_size'))} (smallest verified sets: median "
            f"{_fmt(g.get('median_smallest_set_size'))}); {_pct(g.get('one_minimal_rate'))} were verified "
            f"1-minimal. Ablated at c = {_fmt(coef)} they jailbreak "
            f"{_rate(ev.get('minimal_jailbreak_rate'), ev.get('minimal_jailbreak_rate_n'))} generations (judge and criterion agreeing); "
            f"zero-ablated (c = 0), {_rate(ev.get('minimal_zero_ablation_jailbreak_rate'), ev.get('minimal_zero_ablation_jailbreak_rate_n'))}. "
            "([figure](#minimal-sets-per-prompt), `greedy/sets.parquet`)"
        )
    if cards is not None and cards.height and g.get("n_prompts"):
        out += _typical(cards, g, max(c.get("layers") or [-1]))
    if c and not g.get("n_prompts"):
        out.append(
            "- **Nothing dissected.** Greedy needs prompts that ablating every candidate flips; none was, so "
            "there are no minimal sets, and the random baseline, the interactions and redundancy were not "
            "measured (null in summary.json)."
        )
        return out
    if "random_same_size_jailbreak_rate" in ev or ev.get("random_same_size_jailbreak_rate_n"):
        rate, n = ev.get("random_same_size_jailbreak_rate"), ev.get("random_same_size_jailbreak_rate_n")
        draws = _draws_per_prompt(results.get("evaluate"))
        if draws > 1 and rate is not None and n:  # the rate is over every draw: count draws, not prompts
            what = f"{_rate(rate, n * draws)} of their draws ({draws} per prompt) on the same {n} prompts"
        else:
            what = f"{_rate(rate, n)} of the same prompts"
        out.append(
            f"- **Random baseline.** Random sets of the same sizes, from the same layers, jailbreak {what}. "
            "([figure](#evaluation), `evaluate/comparison.parquet`)"
        )
    if fm:
        acc, lin = fm.get("heldout_accuracy"), fm.get("linear_heldout_accuracy")
        r2, lr2 = fm.get("heldout_r2"), fm.get("linear_heldout_r2")
        beats, p = fm.get("beats_linear"), fm.get("beats_linear_p")
        test = (
            f" (sign test on the {fm['fm_only_right'] + fm['linear_only_right']} held-out masks that only one "
            f"of them labels right: {fm['fm_only_right']} to {fm['linear_only_right']}, p = {_fmt(p)})"
            if p is not None
            else ""
        )
        if acc is None or lin is None:
            verdict = "could not be compared with the linear model (no held-out masks)"
        elif beats or (beats is None and acc > lin):  # a run saved before the sign test: accuracies alone
            verdict = f"predicts held-out flips better than the linear model{test}, so the interactions add something"
        elif acc > lin:
            verdict = (
                f"predicts held-out flips a little better than the linear model, but not significantly{test}: "
                "the interactions add nothing that these masks can show"
            )
        elif r2 is not None and lr2 is not None and r2 > lr2:
            verdict = (
                "explains the held-out refusal score better than the linear model but does not predict flips "
                "better: the interactions shape the score, not the decision"
            )
        else:
            verdict = f"does not beat the linear model on held-out masks{test}: the interactions add nothing measurable"
        out.append(
            f"- **Interactions.** On {fm.get('n_prompts')} prompts the factorization machine {verdict} "
            f"(accuracy {_fmt(acc)} vs {_fmt(lin)}, pooled over the held-out masks; R² of the refusal score "
            f"{_fmt(r2)} vs {_fmt(lr2)}, the mean over prompts of each prompt's held-out R²). "
            f"{_fmt(fm.get('n_confirmed_pairs'))} of its top pairs were confirmed causally "
            f"(synergy {_fmt(fm.get('n_synergy_pairs'))}, redundant {_fmt(fm.get('n_redundant_pairs'))}, "
            f"suppression {_fmt(fm.get('n_suppression_pairs'))}). ([figure](#fm-vs-linear), `fm/interactions.parquet`)"
        )
    if red:
        from .stages.redundancy import gain_significant  # the stage's own rule for its sign tests

        weak, weak_h = red.get("m_weak_jailbreak_rate"), red.get("m_plus_h_weak_jailbreak_rate")
        control = red.get("m_plus_control_weak_jailbreak_rate")
        if weak is None or weak_h is None:
            verdict = "whether ablating H as well jailbreaks more was not measured"
        elif weak_h > weak and control is not None and control >= weak_h:
            verdict = (f"ablating H as well raises the jailbreak rate from {_fmt(weak)} to {_fmt(weak_h)}, but as "
                       f"many latents that were already active raise it to {_fmt(control)}: no redundancy found")  # fmt: skip
        elif weak_h > weak and control is None:
            verdict = (f"ablating H as well raises the jailbreak rate from {_fmt(weak)} to {_fmt(weak_h)}; the "
                       "control (as many latents that were already active) was not measured, so whether H is "
                       "redundancy or just more latents is not known")  # fmt: skip
        elif weak_h > weak and red.get("m_plus_h_weak_gain_p") is None:
            verdict = (f"ablating H as well raises the jailbreak rate from {_fmt(weak)} to {_fmt(weak_h)} (as many "
                       f"latents that were already active: {_fmt(control)}); whether that is more than chance was "
                       "not tested (a run folder from before the sign tests), so it is not called redundancy")  # fmt: skip
        elif weak_h > weak and not gain_significant(red):
            verdict = (f"ablating H as well raises the jailbreak rate from {_fmt(weak)} to {_fmt(weak_h)} (as many "
                       f"latents that were already active: {_fmt(control)}), but a sign test on the same prompts "
                       f"does not separate that from chance (one-sided p = {_fmt(red.get('m_plus_h_weak_gain_p'))} "
                       f"against M alone, {_fmt(red.get('m_plus_h_weak_control_p'))} against the control; level "
                       f"{_fmt(red.get('gain_significance'))}): no redundancy found")  # fmt: skip
        elif weak_h > weak:
            verdict = (f"ablating H as well raises the jailbreak rate from {_fmt(weak)} to {_fmt(weak_h)} (as many "
                       f"latents that were already active: {_fmt(control)}; one-sided sign-test p = "
                       f"{_fmt(red.get('m_plus_h_weak_gain_p'))} against M alone, "
                       f"{_fmt(red.get('m_plus_h_weak_control_p'))} against the control): redundancy found")  # fmt: skip
        else:
            verdict = f"ablating H as well does not raise the jailbreak rate ({_fmt(weak)} → {_fmt(weak_h)}): no redundancy found"
        out.append(
            f"- **Redundancy.** Ablating each minimal set woke {_fmt(red.get('n_awakened'))} dormant latents per "
            f"prompt on average; H, the strongest of them, holds {_fmt(red.get('h_size'))} (on "
            f"{_fmt(red.get('n_prompts_with_h'))} of {_fmt(red.get('n_prompts'))} prompts). With M "
            f"ablated weakly {_weak_scale(red)}, {verdict}.{_holding_sentence(red)} "
            "([figure](#awakened-latents), `redundancy/tests.parquet`)"
        )
    if gt and any(v is not None for v in gt.values()):
        refusal, generic = gt.get("refusal_features"), gt.get("generic_features")
        out.append(
            f"- **Against the planted truth.** Cue recall {_fmt(gt.get('cue_recall'))} (the share of the "
            f"{_fmt(gt.get('cue_categories_dissected'))} harm categories of the dissected prompts whose own cue "
            f"feature was found on a prompt of that category; {_fmt(gt.get('cue_candidate_recall'))} have one among the "
            f"candidates, the most the later stages could find); cue recall over all "
            f"{_fmt(gt.get('cue_categories_planted'))} planted categories the model refuses, those never "
            f"dissected counted as missed: {_fmt(gt.get('cue_recall_planted'))}{_undissected(gt)}; cue precision "
            f"{_fmt(gt.get('cue_precision'))} (the minimal-set features that sit on one category's cue or the "
            f"composition), {_fmt(gt.get('own_cue_precision'))} of the minimal-set memberships of cue and "
            f"compositional prompts on that prompt's own cue or composition; refusal-decision features in "
            f"minimal sets: {', '.join(refusal) if refusal else 'none'}; "
            f"generic features in minimal sets (firing on most words of several categories, or of a category "
            f"and of the harm verbs and person words): "
            f"{', '.join(generic) if generic else 'none'}; compositional pair found: "
            f"{_fmt(gt.get('compositional_pair_found'))}; redundancy found: {_fmt(gt.get('redundancy_found'))}."
            + _backup_sentence(gt, red)
        )
    return out or ["- Nothing was found: no stage after the direction ran."]


def _holding_sentence(red: dict) -> str:
    """How many of H's latents hold the refusal, each ablated with M alone."""
    share, n = red.get("h_holding_share"), red.get("h_holding_n")
    if share is None or not n:
        return ""
    k = round(share * n)
    tol = red.get("holding_tolerance") or 0.0
    by, rest = (
        (f" by more than {tol:g}", f"raise it or move it by {tol:g} or less")
        if tol
        else ("", "raise it or leave it")
    )
    lower = "lowers" if k == 1 else "lower"
    return (
        f" Ablated one at a time with M (same c), {k} of H's {n} latents {lower} the refusal score{by}, as a "
        f"feature that holds the refusal would; the other {n - k} {rest} (`effect` in "
        "`redundancy/awakened.parquet`)."
    )


def _weak_scale(red: dict) -> str:
    """Where the redundancy test's weak ablation scales M ("at c = 0", or each prompt's edge)."""
    weak, steps = red.get("weak_coefficient"), red.get("weak_steps") or 1
    if steps <= 1 or red.get("weak_coefficient_median") is None:
        return f"at c = {_fmt(weak)}"
    return (
        f"at each prompt's edge (the strongest of {steps} scales from c = {_fmt(weak)} toward c = "
        f"{_fmt(red.get('coefficient'))} before the first at which M alone jailbreaks it; median c = "
        f"{_fmt(red.get('weak_coefficient_median'))}, strongest {_fmt(red.get('weak_coefficient_strongest'))})"
    )


def _pool(c: dict) -> str:
    """The latents the candidates were ranked among, where search.candidates.min_active restricted them."""
    n = c.get("min_active")
    return f", of those active on at least {n} harmful train prompts," if n else ""


def _silent(c: dict) -> str:
    """How many candidates fire on no harmful eval prompt: scaled, a latent that is 0 stays 0, so
    those edit nothing there, and |C| is not the number of latents the ablation acts through."""
    n = c.get("n_silent")
    return f" ({n} of them fire on no harmful eval prompt, so their edit changes nothing there)" if n else ""


def _undissected(gt: dict) -> str:
    """The planted categories greedy never dissected (ablating all candidates flipped none of their
    prompts, or those it flipped fell beyond greedy.max_prompts), named after the recall that counts
    them as missed, and whether the candidates offered their cues (so the loss lies after the ranking)."""
    missed = gt.get("cue_categories_undissected")
    offered = gt.get("cue_candidate_recall_planted")
    among = (
        f"; share of the {_fmt(gt.get('cue_categories_planted'))} with a cue feature among the candidates: "
        f"{_fmt(offered)}"
        if offered is not None
        else ""
    )
    return f" (never dissected: {', '.join(missed)}{among})" if missed else ""


def _backup_sentence(gt: dict, red: dict) -> str:
    """Whether H holds the planted backup (the scan's recall), beside whether ablating H flips."""
    rate, n = gt.get("backup_in_h_rate"), gt.get("backup_in_h_n")
    if rate is None or not n:
        return ""
    out = (
        f" The planted backup's latent (the backup layer's latent closest to its direction, cosine ≥ "
        f"{_fmt(gt.get('backup_min_cosine'))}) is in H on {round(rate * n)} of the {n} dissected prompts with "
        f"a cue word (M ablated {_weak_scale(red)})."
    )
    clean, m, m_h = gt.get("backup_clean"), gt.get("backup_under_m"), gt.get("backup_under_m_h")
    if clean is None or m is None or m_h is None:
        return out
    out += (
        f" On those prompts the planted backup itself (its largest coordinate after the cue word, 1 = fully awake, "
        f"mean) is {_fmt(clean)} clean, {_fmt(m)} with M ablated and {_fmt(m_h)} with M and H ablated (same c)"
    )
    if m <= clean:
        return out + ": M's ablation does not wake it, so no hydra found here is the planted one."
    return (
        out
        + f": H removes {_fmt((m - m_h) / (m - clean))} of what M's ablation woke."
        + _backup_part_sentence(gt)
    )


def _backup_part_sentence(gt: dict) -> str:
    """Whether H's part along the planted backup removes the refusal that its whole write leaves."""
    n = gt.get("backup_under_ablation_n")
    shares = [gt.get(k) for k in ("refused_under_m", "refused_under_m_h", "refused_under_m_h_backup_part")]
    if not n or any(v is None for v in shares):
        return ""
    m, m_h, part = (round(v * n) for v in shares)
    out = (
        f" Still refused (refusal score > 0) on those {n} prompts: {m} with M ablated, {m_h} with M and H, and "
        f"{part} with M and H when each H latent writes only its part along the prompt's planted backup"
    )
    if part < m_h:
        return out + (
            f": {m_h - part} more stay refused under H's whole write than under its backup part, so the rest of "
            "what H's latents write holds refusal that the planted backup's removal lifts."
        )
    return out + "."


def _typical(cards: pl.DataFrame, greedy: dict, last: int) -> list[str]:
    """The most frequent minimal-set features, and the trivial explanations checked against them
    (greedy: the greedy summary: the dissected prompts, and the members the other members' edits wake)."""
    n_prompts = greedy["n_prompts"]
    minimal = cards.filter(pl.col("n_minimal") > 0).sort(
        ["n_minimal", "layer", "feature"], descending=[True, False, False]
    )
    if minimal.height == 0:
        return []
    parts = []
    for r in minimal.head(3).iter_rows(named=True):
        ctx = r["top_contexts"][0] if r["top_contexts"] else None
        role = f", role {r['role']}" if r["role"] else ""
        where = f", peaks on `{_code(ctx)}`" if ctx else ", never fires on the eval prompts"
        parts.append(
            f"[{r['label']}]({_anchor(r['label'])}) (in {r['n_minimal']} of {n_prompts} sets{role}{where})"
        )
    top = minimal.row(0, named=True)
    n_last = minimal.filter(pl.col("layer") == last).height
    n_refusal = minimal.filter(pl.col("role") == "refusal").height
    checks = [
        f"the most frequent feature is in {top['n_minimal']} of {n_prompts} sets",
        f"{n_last} of the {minimal.height} distinct minimal-set features lie in the last searched layer ({last})",
    ]
    if minimal["role"].is_not_null().any():
        checks.append(f"{n_refusal} fire mainly on the refusal decision itself (role refusal)")
    harmless = minimal.filter(pl.col("fires_harmless") >= 0.5).height
    checks.append(f"{harmless} fire on at least half of the harmless prompts too")
    share, n = greedy.get("woken_member_share"), greedy.get("woken_member_n")
    if share is not None and n:
        checks.append(
            f"{round(share * n)} of the {n} memberships are latents silent on their clean prompt, woken only by "
            "the other members' edits (their own edit pushes where the prompt never went)"
        )
    return [
        "- **What the minimal sets are made of.** Most frequent: "
        + "; ".join(parts)
        + ". ([cards](#feature-cards))",
        "- **The trivial explanations, checked.** " + _sentence("; ".join(checks)),
    ]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _pct(value) -> str:
    return "not measured" if value is None else f"{value:.0%}"


def _code(text: str) -> str:
    return text.replace("`", "ˋ").replace("|", "¦")


def _cards(cards: pl.DataFrame | None) -> list[str]:
    if cards is None or cards.height == 0:
        return ["No feature was found (greedy did not run or found no minimal set)."]
    lines = [
        f"{cards.height} features were found (in a minimal set, among the FM's top features, or in H); every "
        f"card is in `features.parquet`. Contexts are the eval prompts where the feature peaks highest, "
        f"± the tokens around the peak token, which is in [[ ]]. The single-feature ablation uses "
        f"c = {_fmt(cards['coefficient'][0])} on every dissected prompt.",
        "",
    ]
    full = cards.filter((pl.col("n_minimal") > 0) | pl.col("fm_best_rank").is_not_null()).head(FULL_CARDS)
    for r in full.iter_rows(named=True):
        lines += _card(r)
    rest = cards.filter(~pl.col("label").is_in(full["label"].to_list()))
    if rest.height:
        lines += [
            f"The other {rest.height} features ({TABLE_CARDS} shown), mostly latents of H:",
            "",
            "| feature | in M / FM top / H | role | cos r̂ | ablated alone: Δ score, flips | top context |",
            "|---|---|---|---|---|---|",
        ]
        for r in rest.head(TABLE_CARDS).iter_rows(named=True):
            ctx = r["top_contexts"][0] if r["top_contexts"] else "(never fires)"
            lines.append(
                f"| {_linked(r)} | {r['n_minimal']} / {r['n_fm_top']} / {r['n_in_h']} | "
                f"{r['role'] or '—'} | {r['cosine']:.3f} | {_fmt(r['alone_score_change'])}, "
                f"{_fmt(r['alone_flip_rate'])} | `{_code(ctx)}` |"
            )
    return lines


def _linked(card: dict) -> str:
    """The card's label, linked to its Neuronpedia page where the SAEs have one."""
    return f"[{card['label']}]({card['neuronpedia']})" if card["neuronpedia"] else card["label"]


def _tag_place(tag: str | None) -> str:
    """Where a planted-role tag sits, in words: "cue:weapons words", "the post-instruction positions"."""
    from .ground_truth import REFUSAL_ROLE

    if tag in (None, "other"):
        return "no planted word"
    if tag == REFUSAL_ROLE:
        return "the post-instruction positions"
    return f"{tag} words"


def _card(r: dict) -> list[str]:
    found = [f"in {r['n_minimal']} of {r['n_dissected']} minimal sets"]
    if r["fm_best_rank"] is not None:
        found.append(f"FM top-{r['fm_best_rank'] + 1} (top 5 on {r['n_fm_top']} prompts)")
    if r["n_in_h"]:
        found.append(f"awakened (in H) on {r['n_in_h']} prompts")
    lines = [f"### {r['label']}", "", "- found: " + "; ".join(found)]
    from .ground_truth import GENERIC_ROLE, MOSTLY

    if r["role"] == "other" and r["role_share"] is not None and r["role_share"] < MOSTLY:
        # no tag holds the share a role needs: say where the most of its top activations fall
        lines.append(
            f"- planted role: **other**: no planted tag holds half of its 10 strongest activations "
            f"(the most, {r['role_share']:.0%}, are on {_tag_place(r.get('role_peak'))})"
        )
    elif r["role"] == GENERIC_ROLE:
        wide = r.get("role_cue_categories") or []
        cats = [c for c in wide if c != "composition"]
        groups = [f"the cue words of {len(cats)} harm categories ({', '.join(cats)})"] if cats else []
        if "composition" in wide:
            groups.append("the harm verbs and person words")
        lines.append(
            f"- planted role: **{GENERIC_ROLE}**: {r['role_share']:.0%} of its 10 strongest activations are on "
            f"{_tag_place(r.get('role_peak'))}, but it fires on at least half of {' and of '.join(groups)}: "
            "it reads what they share, not one category's cue"
        )
    elif r["role"] and r.get("role_peak"):
        lines.append(
            f"- planted role: **{r['role']}**: {r['role_share']:.0%} of its 10 strongest activations are on "
            f"{_tag_place(r['role_peak'])}, but it fires on {r['role_plain_share']:.0%} of the harmless eval "
            "prompts that hold no planted word, where no planted cue fires"
        )
    elif r["role"] == "dormant":
        lines.append("- planted role: **dormant**: it fires on none of the clean eval prompts")
    elif r["role"]:
        lines.append(
            f"- planted role: **{r['role']}** ({r['role_share']:.0%} of its 10 strongest activations are on "
            f"{_tag_place(r['role'])})"
        )
    if r["neuronpedia"]:
        lines.append(f"- Neuronpedia: {_linked(r)}")
    lines.append(
        f"- decoder cosine with r̂ {r['cosine']:.3f}; fires on {r['fires_harmful']:.0%} of harmful and "
        f"{r['fires_harmless']:.0%} of harmless eval prompts; largest activation {r['max_activation']:.3g}"
    )
    if r["alone_score_change"] is not None:
        flips = (
            "not decided (judge criterion)" if r["alone_flip_rate"] is None else f"{r['alone_flip_rate']:.0%}"
        )
        lines.append(
            f"- ablated alone (c = {_fmt(r['coefficient'])}): refusal score {r['alone_score_change']:+.3g} on average; "
            f"flips {flips} of the dissected prompts ({r['criterion']})"
        )
    if r["top_contexts"]:
        lines.append("- top contexts:")
        for ctx, act, src in zip(r["top_contexts"], r["top_activations"], r["top_sources"], strict=True):
            lines.append(f"  - `{_code(ctx)}` {act:.3g} ({src.replace(':', ' #')})")
    else:
        lines.append("- never fires on the eval prompts (dormant)")
    return lines + [""]


# summary keys that name the run rather than measure it (the head and "What was run" give them)
_NAMES = ("model", "sae", "data", "search", "organism", "timing", "status")


def _numbers(summary: dict) -> list[str]:
    """One small table per stage, results only."""
    lines = []
    order = [*STAGES, "ground_truth", *sorted(summary)]
    for section in dict.fromkeys(k for k in order if k in summary):
        values = summary[section]
        if section in _NAMES or not isinstance(values, dict):
            continue
        lines += [f"**{section}**", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flat(values)]
        lines.append("")
    return lines


def _settings(run: RunFolder, cfg_dict: dict, search: dict, summary: dict) -> list[str]:
    d = cfg_dict.get("data") or {}
    m = cfg_dict.get("model") or {}
    judge = (cfg_dict.get("judge") or {}).get("name")
    per_stage = "; ".join(f"{k}: {_inline(v)}" for k, v in search.items() if isinstance(v, dict))
    lines = [
        "## What was run",
        "",
        f"- data `{d.get('name')}`: n_train={d.get('n_train')}, n_val={d.get('n_val')}, "
        f"n_eval={d.get('n_eval')} per class, seed={d.get('seed')}",
        f"- search preset `{search.get('name')}`, judge `{judge}`, max_new_tokens={m.get('max_new_tokens')}, "
        f"stages: {', '.join(cfg_dict.get('stages') or [])}",
        f"- every setting: `{run.config.name}`; per stage: {per_stage}",
    ]
    timing = summary.get("timing") or (read_json(run.timing) if run.timing.exists() else {})
    if timing:
        lines.append(
            "- wall time (s): " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in timing.items())
        )
    return lines + [""]


def _inline(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


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


def _findings(summary: dict, results: dict, search: dict, skip_first: bool = False) -> list[str]:
    """What the edit is, what a flip is, and the figures that answer the method's questions:
    both coefficients, like-with-like rates, smallest sets, FM pair kinds, the prompt classifier.
    `skip_first`: the SAEs never saw a prompt's first token, so no edit touches it."""
    g, fm, ev, red = (summary.get(k) or {} for k in ("greedy", "fm", "evaluate", "redundancy"))
    c = search.get("coefficient", ev.get("coefficient", g.get("coefficient")))
    lines = ["## How it was measured", ""]
    if c is not None:
        where = "at every position but each prompt's first token" if skip_first else "at every position"
        lines.append(
            f"- Edit: every SAE ablation scales the chosen latents by c = {_fmt(c)} (f_i ← c·f_i, the SAE error "
            f"term kept, {where}){' — negative steering, not only removal' if c < 0 else ''}."
        )
    rd = search.get("redundancy") or {}
    if red:
        clamp = (
            "its <bos> clamp was not run (the SAEs never saw the first token)"
            if skip_first
            else f"its <bos> clamp sets the {rd.get('bos_features', 'awakened')} latents to "
            f"{_fmt(rd.get('bos_clamp_value', 0.0))} at <bos> only"
        )
        lines.append(f"- Redundancy's weak ablation scales M {_weak_scale(red)}; {clamp}.")
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
        split = ev.get("judge_criterion_disagreements")
        parted = ("" if split is None else f" They part on {split} of the {ev.get('judge_criterion_disagreements_n')} "
                  "generated rows.")  # fmt: skip
        lines += ["### Jailbreak rates, like with like", "",
                  "A jailbreak counts where the generation judge finds no refusal and the flip criterion "
                  f"(`{ev.get('criterion')}`) reads a flip; the judge's rate alone stands beside it.{parted} Each "
                  "rate counts only prompts refused at baseline (clean generation, by both); n = those prompts. "
                  "Rates in one block are measured on the same prompts.", "",
                  "| prompt set | condition | jailbreak rate | judge alone | n |", "|---|---|---|---|---|"]  # fmt: skip
        table = getattr(results.get("evaluate"), "comparison", None)
        for r in table.iter_rows(named=True) if isinstance(table, pl.DataFrame) else []:
            lines.append(f"| {r['prompt_set']} | {r['condition']} | {_fmt(r['jailbreak_rate'])} | "
                         f"{_fmt(r.get('judge_jailbreak_rate'))} | {r['n']} |")  # fmt: skip
        lines += ["", f"- Minimal sets at c = {_fmt(c)}: {_fmt(ev.get('minimal_jailbreak_rate'))}; at c = 0 "
                  f"(zero-ablation): {_fmt(ev.get('minimal_zero_ablation_jailbreak_rate'))} "
                  f"(n = {_fmt(ev.get('minimal_jailbreak_rate_n'))}).", ""]  # fmt: skip
    if g.get("n_prompts"):
        lines += ["### Minimal and smallest sets", "",
                  f"- 1-minimal sets (backward elimination): median size {_fmt(g.get('median_one_minimal_set_size'))}; "
                  f"smallest verified set (backward or forward): median {_fmt(g.get('median_smallest_set_size'))}, "
                  f"smaller than the 1-minimal set on {_fmt(g.get('n_smallest_below_one_minimal'))} of "
                  f"{g['n_prompts']} prompts.", ""]  # fmt: skip
    if fm:
        kinds = ", ".join(
            f"{k} {_fmt(fm.get(f'n_{k}_pairs'))}" for k in ("synergy", "redundant", "suppression")
        )
        lines += ["### Interactions and the prompt classifier", "",
                  f"- Confirmed FM pairs: {_fmt(fm.get('n_confirmed_pairs'))} ({kinds}).",
                  f"- Masks: {_fmt(fm.get('n_masks_per_prompt'))} per prompt, {_fmt(fm.get('n_masks_total'))} in total.",
                  f"- Prompt classifier (harmful vs harmless from the pool features' max-pooled activations), held-out "
                  f"accuracy: FM {_fmt(fm.get('classifier_heldout_accuracy'))}, linear "
                  f"{_fmt(fm.get('classifier_linear_heldout_accuracy'))} (n = {_fmt(fm.get('classifier_n_heldout'))}).",
                  ""]  # fmt: skip
    return lines if len(lines) > 3 else []
