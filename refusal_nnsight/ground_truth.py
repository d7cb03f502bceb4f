"""Planted-truth checks on the model organism: are the features we find the planted ones?

The organism's grammar records, for every prompt, the harm cue words and their character spans
(`meta["cues"]`, `meta["cue_spans"]`). A feature is "on the planted truth" when its strongest
activations fall on those cue tokens or on the refusal decision (the post-instruction eoi
positions of harmful prompts). Real datasets carry no cue metadata; every check then returns None.

Definitions (ours; the paper has no planted truth):
- top positions of a feature: its `k` largest activations (default 10) over all token positions
  of a prompt set (BOS and template tokens included — a feature that peaks on <bos> is not on
  the planted truth).
- "mostly": at least half of those top positions lie on cue tokens or harmful eoi positions.
- a token lies on a cue when its character offsets in the formatted prompt overlap a cue span.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import polars as pl
import torch

from .engine import Feature
from .features import FM_TOP, feature_activations, token_offsets
from .organism.planted import after_cue

log = logging.getLogger(__name__)

MOSTLY = 0.5  # fraction of a feature's top positions that must be on cue / eoi tokens
TOP_K = 10  # top positions per feature


def token_roles(model, instruction: str, cue_spans: Sequence[Sequence[int]]) -> list[int]:
    """Per token of the formatted prompt: index of the cue span it overlaps, or -1 (unpadded order)."""
    text, offsets = token_offsets(model, instruction)
    start = text.find(instruction.strip())  # the template trims the instruction
    roles = []
    for a, b in offsets:
        role = -1
        for k, (c, d) in enumerate(cue_spans):
            if a < start + d and start + c < b and b > a:
                role = k
                break
        roles.append(role)
    return roles


def _has_cues(prompt_set) -> bool:
    return bool(prompt_set.meta) and all("cue_spans" in m for m in prompt_set.meta)


def top_positions(model, saes, features: Sequence[Feature], prompts, k: int = TOP_K,
                  sets: Sequence[str] = ("harmful", "harmless"), acts=None) -> pl.DataFrame:  # fmt: skip
    """Each feature's k strongest activations over the eval prompt sets.

    Columns: feature (index into `features`), set, prompt_i, position (unpadded), activation,
    on_cue (token overlaps a planted cue span), on_eoi (an eoi position of a harmful prompt).
    acts: features.eval_activations of `features`, when the caller has them already.
    """
    rows = []
    pools = {"harmful": prompts.eval_harmful, "harmless": prompts.eval_harmless}
    acts_by_set = {
        name: acts[name]
        if acts is not None
        else feature_activations(model, saes, features, pools[name].instructions)
        for name in sets
    }
    n_eoi = len(model.eoi_positions)
    for j in range(len(features)):
        cand: list[tuple[float, str, int, int, int]] = []  # (activation, set, prompt, position, length)
        for name, acts in acts_by_set.items():
            for i, a in enumerate(acts):
                for t in a[:, j].nonzero().flatten().tolist():
                    cand.append((float(a[t, j]), name, i, t, a.shape[0]))
        cand.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
        for act, name, i, t, n in cand[:k]:
            ps = pools[name]
            on_cue = False
            if _has_cues(ps):
                on_cue = token_roles(model, ps.instructions[i], ps.meta[i]["cue_spans"])[t] >= 0
            on_eoi = name == "harmful" and t >= n - n_eoi
            rows.append({"feature": j, "set": name, "prompt_i": i, "position": t, "activation": act,
                         "on_cue": on_cue, "on_eoi": on_eoi})  # fmt: skip
    schema = {"feature": pl.Int64, "set": pl.Utf8, "prompt_i": pl.Int64, "position": pl.Int64,
              "activation": pl.Float64, "on_cue": pl.Boolean, "on_eoi": pl.Boolean}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def position_tags(model, prompt_set, i: int, n_tokens: int) -> list[str]:
    """What each token of prompt i stands for: its cue's role ("cue:<category>", "composition",
    "other"), "refusal" on the eoi positions of a harmful prompt, "" elsewhere (unpadded order)."""
    meta = prompt_set.meta[i]
    tags = [""] * n_tokens
    roles = meta.get("cue_roles") or ["other"] * len(meta["cue_spans"])
    for t, k in enumerate(token_roles(model, prompt_set.instructions[i], meta["cue_spans"])):
        if k >= 0:
            tags[t] = roles[k]
    if prompt_set.harmful:
        for t in range(n_tokens - len(model.eoi_positions), n_tokens):
            tags[t] = REFUSAL_ROLE
    return tags


REFUSAL_ROLE = "refusal"


def feature_roles(
    model, saes, features: Sequence[Feature], prompts, k: int = TOP_K, acts=None
) -> pl.DataFrame:
    """The role of each feature, from where its k strongest activations fall over the eval prompts.

    role: the tag (see `position_tags`) held by at least half of its top positions ("cue:<category>",
    "composition", "refusal"), "other" when no tag holds half, "dormant" when it never fires on the
    clean prompts (a backup feature that wakes only under ablation), "generic" when it peaks on cue
    or composition words but is not selective: it fires on at least half of the words of another
    group, a harm category's cue words or the harm verbs and person words together (for a cue
    latent, any other category or the composition; for the composition, any category). Such a
    latent reads what the groups share (on the organism, their common component along R), so it is
    not the cue of the one category its strongest activations happen to fall on, and a latent that
    peaks on fraud words but fires on every verb and person word steers compositional requests
    that hold no fraud word. A feature that fires on at
    least half of the plain harmless eval prompts (those holding no planted word: no cue word, harm
    verb or person word; look-alikes and compositional ones do hold them) is never a cue or the
    composition: the planted cue, verb and person directions are trained to 0 off their words, so
    such a feature reads something general that peaks on cue words (a latent along R does: every
    planted cue leans on R). Columns: layer, feature, role, role_share (fraction of top positions
    with that tag), n_top, plain_share (fraction of plain harmless eval prompts it fires on; null
    without any), peak_tag (the tag most of its top positions share, "other" for untagged ones,
    whether or not it holds half of them and before that check), cue_categories (the word groups,
    harm categories and "composition", on at least half of whose words, over the eval prompts, it
    fires).
    """
    feats = [(int(a), int(b)) for a, b in features]
    schema: dict[str, pl.DataType | type[pl.DataType]] = {
        "layer": pl.Int64,
        "feature": pl.Int64,
        "role": pl.Utf8,
        "role_share": pl.Float64,
        "n_top": pl.Int64,
        "plain_share": pl.Float64,
        "peak_tag": pl.Utf8,
        "cue_categories": pl.List(pl.Utf8),
    }
    if not feats or not _has_cues(prompts.eval_harmful):
        return pl.DataFrame([], schema=schema)
    if acts is None:
        acts = {
            "harmful": feature_activations(model, saes, feats, prompts.eval_harmful.instructions),
            "harmless": feature_activations(model, saes, feats, prompts.eval_harmless.instructions),
        }
    tops = top_positions(model, saes, feats, prompts, k, acts=acts)
    plain = [
        a for a, m in zip(acts["harmless"], prompts.eval_harmless.meta, strict=True) if not m.get("cue_spans")
    ]
    fires: list[float | None] = [None] * len(feats)  # no plain harmless prompt: the check does not apply
    if plain:
        fires = torch.stack([(a > 0).any(0) for a in plain]).float().mean(0).tolist()
    pools = {"harmful": prompts.eval_harmful, "harmless": prompts.eval_harmless}
    on_words = cue_word_rates(model, pools, acts)
    lengths: dict[tuple[str, int], list[str]] = {}
    rows = []
    for j, (layer, latent) in enumerate(feats):
        mine = tops.filter(pl.col("feature") == j).to_dicts()
        wide = sorted(c for c, rate in on_words.items() if rate[j] >= MOSTLY)
        if not mine:
            rows.append({"layer": layer, "feature": latent, "role": "dormant", "role_share": 0.0, "n_top": 0,
                         "plain_share": fires[j], "peak_tag": None, "cue_categories": wide})  # fmt: skip
            continue
        counts: dict[str, int] = {}
        for r in mine:
            key = (r["set"], r["prompt_i"])
            if key not in lengths:
                ps = pools[r["set"]]
                n = len(model.tokenize([ps.instructions[r["prompt_i"]]]).input_ids[0])
                lengths[key] = position_tags(model, ps, r["prompt_i"], n)
            tag = lengths[key][r["position"]] or "other"
            counts[tag] = counts.get(tag, 0) + 1
        tag, n = max(sorted(counts.items()), key=lambda kv: kv[1])
        share = n / len(mine)
        role = tag if share >= MOSTLY else "other"
        plain_share = fires[j]
        if _is_cue(role) and plain_share is not None and plain_share >= MOSTLY:
            log.info("L%d/F%d peaks on %s words but fires on %.0f%% of plain harmless prompts: role other",
                     layer, latent, role, 100 * plain_share)  # fmt: skip
            role = "other"
        others = [c for c in wide if c != role.removeprefix("cue:")]
        if _is_cue(role) and others:
            log.info("L%d/F%d peaks on %s words but fires on most words of %s: role %s",
                     layer, latent, role, ", ".join(others), GENERIC_ROLE)  # fmt: skip
            role = GENERIC_ROLE
        rows.append({"layer": layer, "feature": latent, "role": role, "role_share": share, "n_top": len(mine),
                     "plain_share": plain_share, "peak_tag": tag, "cue_categories": wide})  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


GENERIC_ROLE = "generic"


def cue_word_rates(model, pools: dict, acts: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """Per word group, the fraction of its word occurrences in the prompt sets on which each feature
    fires (on any token of the word): {group: [rate per feature]}. The groups are the harm
    categories (their cue words) and "composition" (the harm verbs and person words together).

    pools: {"harmful": PromptSet, "harmless": PromptSet}; acts: their per-prompt activations
    [tokens, features] (unpadded order). Look-alikes and harmless compositional requests hold
    these words too, and count."""
    fired: dict[str, list[torch.Tensor]] = {}
    for name, ps in pools.items():
        if not _has_cues(ps):
            continue
        for i, a in enumerate(acts[name]):
            meta = ps.meta[i]
            where = torch.tensor(token_roles(model, ps.instructions[i], meta["cue_spans"]))
            for k, role in enumerate(meta.get("cue_roles") or []):
                if _is_cue(role) and bool((where == k).any()):
                    fired.setdefault(role.removeprefix("cue:"), []).append((a[where == k] > 0).any(0))
    return {c: torch.stack(v).float().mean(0).tolist() for c, v in sorted(fired.items())}


def _is_cue(role: str) -> bool:
    return role.startswith("cue:") or role == "composition"


def ground_truth_summary(
    model,
    saes,
    prompts,
    greedy,
    fm=None,
    redundancy=None,
    roles: pl.DataFrame | None = None,
    backup: PlantedBackup | None = None,
    candidates: Sequence[Feature] | None = None,
    refused: Sequence[int] | None = None,
) -> tuple[dict, pl.DataFrame, dict]:
    """Planted-truth figures of a run (summary.json "ground_truth"), the role of each found feature,
    and why each null figure is null.

    found features: every minimal-set feature, plus the FM's top features (rank < FM_TOP per prompt).
    - cue_recall: of the harm categories of the dissected cue prompts, the fraction for which a
      prompt of that category has, in its own minimal set or its own FM top features, a feature of
      role cue:<that category> (None when no cue prompt was dissected). A category's cue counts only
      where its own prompts needed it, not where another category's prompts did;
    - cue_categories_dissected: how many categories that is (cue_recall's denominator). Greedy
      dissects only prompts that ablating all of C flips (the first greedy.max_prompts of them),
      so a category none of whose prompts flip under C is never dissected and drops out of
      cue_recall;
    - cue_recall_planted: the categories recovered as cue_recall counts them, over every category
      with a cue prompt among the eval harmful prompts the model refuses at baseline (`refused`,
      their indices; cue_categories_planted of them): recall over the planted truth, where a
      category that never reached greedy counts as missed (None without `refused`), and
      cue_categories_undissected names those categories;
    - cue_candidate_recall: of the same categories, the fraction for which some candidate (C, which
      every minimal set and the FM's pool are drawn from, unless search.fm.extra_active adds active
      latents outside C to the pool) has role cue:<that category>: the ceiling the candidate ranking
      puts on cue_recall (None without `candidates` or a dissected cue prompt). Below it, greedy or
      the FM passed over a cue C offered; at it, the ranking never offered the rest;
    - cue_candidate_recall_planted: the same over every planted category the model refuses (as
      cue_recall_planted counts them; None without `candidates` or `refused`). Where it exceeds
      cue_recall_planted, the ranking offered a category's cue that greedy never reached, either
      because ablating all of C left that category's prompts refused or because greedy's cap
      stopped before them;
    - cue_precision: of the distinct minimal-set features, the fraction whose role is a cue or the
      composition (a refusal-decision feature is a true finding, but not a harm cue; a generic one,
      firing on the cue words of several categories, is not one category's cue);
    - own_cue_precision: of the minimal-set memberships (prompt, feature) of the dissected cue and
      compositional prompts, the fraction whose feature has that prompt's own role: cue:<its
      category> on a cue prompt, composition on a compositional one. cue_precision counts a
      distinct feature once, whatever prompt's set holds it, so a fraud cue latent that flips
      compositional requests counts there as a planted cue; here it does not (None when no such
      prompt was dissected);
    - refusal_features, generic_features: the minimal-set features of role "refusal" and
      "generic", as labels;
    - compositional_pair_found, redundancy_found (+ redundancy_jailbreak_gain), backup_in_h_rate (+
      its _n and backup_min_cosine), backup_clean / backup_under_m / backup_under_m_h (+
      backup_under_ablation_n) and refused_under_m / refused_under_m_h /
      refused_under_m_h_backup_part (from `backup_under_ablation`): see their functions.

    backup: the organism's planted backup detectors, where the organism has them.
    roles: feature_roles of a superset of the found features, when the caller has them already
    (a feature's role does not depend on the other features it is computed with).
    candidates: the candidate set C (for cue_candidate_recall); refused: the indices of the eval
    harmful prompts refused at baseline, as the candidates stage decided (for cue_recall_planted).
    """
    ps = prompts.eval_harmful
    empty = {"cue_recall": None, "cue_categories_dissected": None, "cue_recall_planted": None,
             "cue_categories_planted": None, "cue_categories_undissected": None, "cue_candidate_recall": None,
             "cue_candidate_recall_planted": None, "cue_precision": None, "own_cue_precision": None,
             "refusal_features": None, "generic_features": None, "compositional_pair_found": None, "redundancy_found": None, "redundancy_jailbreak_gain": None,
             "backup_in_h_rate": None, "backup_in_h_n": None, "backup_min_cosine": None,
             "backup_clean": None, "backup_under_m": None, "backup_under_m_h": None,
             "backup_under_ablation_n": None, "refused_under_m": None, "refused_under_m_h": None,
             "refused_under_m_h_backup_part": None}  # fmt: skip
    notes: dict[str, str] = {}
    if not _has_cues(ps):
        why = "the prompts carry no planted truth (only the organism's grammar does)"
        return empty, feature_roles(model, saes, [], prompts), dict.fromkeys(empty, why)
    if greedy is None or not any(greedy.minimal_sets.values()):
        why = "greedy did not run or found no minimal set: nothing was found to score"
        return empty, feature_roles(model, saes, [], prompts), dict.fromkeys(empty, why)
    minimal = sorted({(int(a), int(b)) for m in greedy.minimal_sets.values() for a, b in m})
    own: dict[int, set[Feature]] = {
        int(i): {(int(a), int(b)) for a, b in m} for i, m in greedy.minimal_sets.items()
    }
    if fm is not None and len(fm.top_features):
        top = fm.top_features.filter(pl.col("rank") < FM_TOP)
        for i, a, b in zip(top["prompt_idx"], top["layer"], top["feature"], strict=True):
            own.setdefault(int(i), set()).add((int(a), int(b)))
    found = sorted(set().union(*own.values()))
    if roles is None:
        roles = feature_roles(model, saes, found, prompts)
    else:
        wanted = pl.DataFrame(found, schema={"layer": pl.Int64, "feature": pl.Int64}, orient="row")
        roles = wanted.join(roles, on=["layer", "feature"], how="left", maintain_order="left")
    role_of = {(r["layer"], r["feature"]): r["role"] for r in roles.to_dicts()}
    offered = sorted({(int(a), int(b)) for a, b in candidates or ()})
    missing = [f for f in offered if f not in role_of]
    if missing:  # a feature's role does not depend on the others it is computed with
        role_of.update({(r["layer"], r["feature"]): r["role"]
                        for r in feature_roles(model, saes, missing, prompts).to_dicts()})  # fmt: skip
    cue_prompts = [i for i in sorted(greedy.minimal_sets) if ps.meta[i]["kind"] == "cue"]
    present = sorted({ps.categories[i] for i in cue_prompts})
    recovered = {
        ps.categories[i] for i in cue_prompts if f"cue:{ps.categories[i]}" in {role_of[f] for f in own[i]}
    }
    out: dict[str, Any] = dict(empty)
    out["cue_recall"] = len(recovered) / len(present) if present else None
    out["cue_categories_dissected"] = len(present)
    if not present:
        notes["cue_recall"] = "no prompt with an explicit cue word was dissected"
    planted_cats: list[str] = []
    if refused is None:
        why = "the prompts refused at baseline were not given"
        notes.update(cue_recall_planted=why, cue_categories_planted=why, cue_categories_undissected=why)
    else:
        planted_cats = sorted({ps.categories[int(i)] for i in refused if ps.meta[int(i)]["kind"] == "cue"})
        out["cue_categories_planted"] = len(planted_cats)
        out["cue_categories_undissected"] = [c for c in planted_cats if c not in present]
        if planted_cats:
            out["cue_recall_planted"] = len(recovered & set(planted_cats)) / len(planted_cats)
        else:
            notes["cue_recall_planted"] = "the model refuses no eval prompt with an explicit cue word"
    offered_roles = {role_of[f] for f in offered}
    for key, cats, why_none in (("cue_candidate_recall", present, "cue_recall"),
                                ("cue_candidate_recall_planted", planted_cats, "cue_recall_planted")):  # fmt: skip
        if candidates is None:
            notes[key] = "the candidate set was not given"
        elif not cats:
            notes[key] = notes[why_none]
        else:
            out[key] = sum(f"cue:{c}" in offered_roles for c in cats) / len(cats)
    out["cue_precision"] = sum(_is_cue(role_of[f]) for f in minimal) / len(minimal)
    planted = {"cue": lambda i: f"cue:{ps.categories[i]}", "compositional": lambda i: "composition"}
    own_roles = [role_of[(int(a), int(b))] == planted[ps.meta[i]["kind"]](i)
                 for i, m in sorted(greedy.minimal_sets.items()) if ps.meta[i]["kind"] in planted for a, b in m]  # fmt: skip
    out["own_cue_precision"] = sum(own_roles) / len(own_roles) if own_roles else None
    if not own_roles:
        notes["own_cue_precision"] = "no cue or compositional prompt was dissected"
    out["refusal_features"] = [f"L{a}/F{b}" for a, b in minimal if role_of[(a, b)] == REFUSAL_ROLE]
    out["generic_features"] = [f"L{a}/F{b}" for a, b in minimal if role_of[(a, b)] == GENERIC_ROLE]
    pair = compositional_pair_found(fm, prompts, model, saes, roles=roles) if fm is not None else None
    out["compositional_pair_found"] = None if pair is None else bool(pair)
    if pair is None:
        notes["compositional_pair_found"] = "fm did not run, or dissected no compositional prompt"
    if redundancy is not None:
        out["redundancy_found"], out["redundancy_jailbreak_gain"] = redundancy_found(redundancy)
    if out["redundancy_found"] is None:
        why = "redundancy did not run, or ran no weak-ablation test with its control"
        notes.update(redundancy_found=why, redundancy_jailbreak_gain=why)
    for figures, why_not in (backup_in_h(redundancy, ps, saes, backup),
                             backup_under_ablation(model, saes, greedy, redundancy, ps, backup)):  # fmt: skip
        out.update(figures)
        if why_not:
            notes.update(dict.fromkeys(figures, why_not))
    return out, roles, notes


@dataclass(frozen=True)
class PlantedBackup:
    """The organism's backup detectors: the layer they are planted at, the residual layers the
    redundancy stage scanned, each harm category's unit direction [d], and the planted strength."""

    layer: int
    scanned: tuple[int, ...]
    directions: dict[str, torch.Tensor]
    strength: float  # the planted strength: the coordinate a fully awake backup writes


def backup_in_h(redundancy, ps, saes, backup: PlantedBackup | None) -> tuple[dict, str | None]:
    """Does the redundancy stage's awakened set H hold the planted backup? ({figures}, why null).

    The backup latent of a category is the latent of the SAE at the backup layer whose decoder row
    has the largest cosine with that category's planted backup direction (`backup_min_cosine`: the
    smallest of those cosines, how well the SAE represents the backups at all). backup_in_h_rate:
    of the dissected prompts with an explicit cue word, the fraction whose H at the weak ablation
    (the set the causal test ablates) holds the backup latent of the prompt's category. It
    separates "the scan finds the backup" from redundancy_found, "ablating it flips the prompt".
    """
    figures: dict[str, Any] = {"backup_in_h_rate": None, "backup_in_h_n": None, "backup_min_cosine": None}
    if backup is None:
        return figures, "the model plants no backup detectors (only the organism does)"
    if redundancy is None or not len(redundancy.tests):
        return figures, "redundancy did not run, or dissected no prompt"
    if backup.layer not in saes.layers or backup.layer not in backup.scanned:
        return figures, f"the redundancy stage did not scan the backup layer {backup.layer}"
    from .saes import decoder_cosines

    w_dec = saes.slice(backup.layer).W_dec
    best = {}
    for category, direction in backup.directions.items():
        cos = decoder_cosines(direction, w_dec)
        best[category] = (int(cos.argmax()), float(cos.max()))
    figures["backup_min_cosine"] = min(c for _, c in best.values())
    aw = redundancy.awakened
    h = aw.filter((pl.col("ablation") == "weak") & pl.col("in_h") & (pl.col("layer") == backup.layer))
    in_h = {(int(i), int(f)) for i, f in zip(h["prompt_idx"], h["feature"], strict=True)}
    dissected = sorted({int(i) for i in redundancy.tests["prompt_idx"]})
    cue = [i for i in dissected if ps.meta[i]["kind"] == "cue" and ps.categories[i] in best]
    if not cue:
        return figures, "no prompt with an explicit cue word was dissected"
    figures["backup_in_h_n"] = len(cue)
    figures["backup_in_h_rate"] = sum((i, best[ps.categories[i]][0]) in in_h for i in cue) / len(cue)
    return figures, None


def backup_under_ablation(
    model, saes, greedy, redundancy, ps, backup: PlantedBackup | None
) -> tuple[dict, str | None]:
    """Is the hydra the redundancy stage tests the planted backup? ({figures}, why null).

    redundancy_found says that ablating H as well as M flips more prompts; it does not say that H
    is the planted backup. Any refusal route that M's ablation leaves could pass. This follows the
    planted backup itself through the stage's weak conditions. On each dissected prompt with an
    explicit cue word: the residual at the backup layer (after that layer's edits, as the layers
    above read it), its largest coordinate along the prompt's category's backup direction over
    the instruction's tokens after the cue word (where the organism plants it: beyond the cue
    word, which an SAE cut of the word would take with it), in units of the planted strength
    (1 = fully awake), with
    - nothing edited (backup_clean),
    - M scaled by the prompt's weak scale, as the stage's m_weak condition (backup_under_m),
    - M and the weak H scaled by it (backup_under_m_h): the stage's m_plus_h_weak condition.
    Means over those prompts (backup_under_ablation_n of them). The planted hydra shows as
    backup_under_m well above backup_clean (M's ablation wakes it) and backup_under_m_h well below
    backup_under_m (H holds it). A jailbreak gain with the backup asleep under M, or left standing
    under M and H, is a hydra along another route.

    On the same prompts, the share still refused (refusal score > 0) under M (refused_under_m),
    under M and H (refused_under_m_h), and under M and H with each H latent's write cut to its
    component along the prompt's backup direction (refused_under_m_h_backup_part). An SAE latent
    writes more than one direction; where the backup part alone leaves the prompts complying and
    the whole write does not, the rest of what H's latents write holds the refusal: the scan found
    the planted backup, and its latents carry more than the backup.
    """
    keys = ("backup_clean", "backup_under_m", "backup_under_m_h", "backup_under_ablation_n",
            "refused_under_m", "refused_under_m_h", "refused_under_m_h_backup_part")  # fmt: skip
    figures: dict[str, Any] = dict.fromkeys(keys)
    if backup is None:
        return figures, "the model plants no backup detectors (only the organism does)"
    if redundancy is None or not len(redundancy.tests) or greedy is None:
        return figures, "redundancy did not run, or dissected no prompt"
    dissected = sorted({int(i) for i in redundancy.tests["prompt_idx"]})
    cue = [i for i in dissected if ps.meta[i]["kind"] == "cue" and ps.categories[i] in backup.directions]
    if not cue:
        return figures, "no prompt with an explicit cue word was dissected"
    import nnsight

    from . import interventions
    from .engine import row_edits
    from .scoring import refusal_scores

    weak = [redundancy.weak_at(i) for i in cue]  # each prompt's scale of M in the weak test
    aw = redundancy.awakened.filter((pl.col("ablation") == "weak") & pl.col("in_h"))
    h = {i: [(int(a), int(b)) for a, b in zip(g["layer"], g["feature"], strict=True)]
         for (i,), g in aw.group_by("prompt_idx")}  # fmt: skip
    m = [[(int(a), int(b)) for a, b in greedy.minimal_sets[i]] for i in cue]
    conditions = {
        "backup_clean": [{} for _ in cue],
        "backup_under_m": [dict.fromkeys(s, w) for s, w in zip(m, weak, strict=True)],
        "backup_under_m_h": [
            dict.fromkeys(s + h.get(i, []), w) for i, s, w in zip(cue, m, weak, strict=True)
        ],
    }
    texts = [ps.instructions[i] for i in cue]
    batch = model.tokenize(texts)
    width = batch.attention_mask.shape[1]
    n_eoi = len(model.eoi_positions)
    # each prompt's tokens after its cue word, before the eoi positions, in the batch's left-padded columns
    after = torch.zeros(len(cue), width, dtype=torch.bool)
    for row, text in enumerate(texts):
        roles = torch.tensor(token_roles(model, text, ps.meta[cue[row]]["cue_spans"])) >= 0
        assert len(roles) == int(batch.attention_mask[row].sum()), "offsets and tokens disagree"
        after[row, width - len(roles) :] = after_cue(roles, n_eoi)  # where the organism plants its backup
    read = after.any(1)  # prompts with a token after the cue word: the only ones averaged or counted
    if not read.any():
        return figures, "no dissected cue prompt has a token after its cue word"
    direction = torch.stack([backup.directions[ps.categories[i]] for i in cue]).float()  # [N, d]
    edits_of = {key: row_edits(saes, rows, model.device) for key, rows in conditions.items()}
    for key, edits in edits_of.items():
        with torch.no_grad(), model.lm.trace(**batch.model_inputs(model.device)):
            got = interventions.apply(model, edits, batch.attention_mask, capture=[backup.layer])
            resid = nnsight.save(got[backup.layer])
        coord = torch.einsum("btd,bd->bt", resid.float().cpu(), direction).masked_fill(~after, float("-inf"))
        figures[key] = float(coord.amax(1)[read].mean()) / backup.strength
    figures["backup_under_ablation_n"] = int(read.sum())
    in_h = [set(h.get(i, [])) for i in cue]
    refused = {
        "refused_under_m": edits_of["backup_under_m"],
        "refused_under_m_h": edits_of["backup_under_m_h"],
        "refused_under_m_h_backup_part": [
            replace(e, along=direction, along_mask=_columns(e, in_h)) for e in edits_of["backup_under_m_h"]
        ],
    }
    for key, edits in refused.items():
        scores = refusal_scores(model, batch, edits)
        figures[key] = float((scores.cpu()[read] > 0).float().mean())
    return figures, None


def _columns(edit, features: Sequence[set[Feature]]) -> torch.Tensor:
    """[B, S] bool: per row, which of the edit's latents (edit.sae.features) are in that row's set."""
    layer, cols = edit.sae.layer, [int(f) for f in edit.sae.features]
    return torch.tensor([[(layer, f) in row for f in cols] for row in features], dtype=torch.bool)


def redundancy_found(result) -> tuple[bool | None, float | None]:
    """(H non-empty and ablating M ∪ H jailbreaks more prompts than M alone and than M ∪ C, each
    by a one-sided sign test on the same prompts at the redundancy stage's SIGNIFICANCE, the gain
    over M alone). A gain of one prompt in 25 is not a finding: it needs five prompts gained and
    none lost, or more where some are lost.

    Measured at the redundancy stage's weak scale of M (weak_coefficient, or each prompt's edge
    with weak_steps > 1), where M alone need not jailbreak (at the greedy coefficient M
    jailbreaks by construction, so no gain is possible). C is the stage's control: as many
    latents at H's layers, active already on the clean run, so that "ablating more latents flips
    more" is not read as redundancy. None without the M and control tests (a
    redundancy stage saved before the control existed is not scored against a control of 0).
    """
    from .stages.redundancy import gain_significant, summarise

    # the stage's own rates and sign tests, over the prompts refused at baseline
    s = summarise(result.awakened, result.tests)
    if s["m_weak_jailbreak_rate"] is None or s["m_plus_control_weak_jailbreak_rate"] is None:
        return None, None
    in_h = result.awakened.filter(pl.col("in_h")) if "in_h" in result.awakened.columns else result.awakened
    gain = (s["m_plus_h_weak_jailbreak_rate"] or 0.0) - s["m_weak_jailbreak_rate"]
    return bool(len(in_h) > 0 and gain > 0 and gain_significant(s)), gain


def compositional_pair_found(
    result, prompts, model, saes, strict: bool = False, roles: pl.DataFrame | None = None
) -> int | None:
    """1 if a confirmed FM pair of a dissected compositional prompt joins its verb and its object.

    For each dissected harmful prompt of kind "compositional" (cues = verb, object head word), a
    confirmed pair counts when both its features have the role "composition" (`feature_roles`:
    most of their strongest activations over the eval prompts fall on harm verbs or person words,
    and they do not fire on most plain harmless prompts) and, on that prompt: strict — one peaks
    (its strongest activation) on the verb token and the other on the object token; loose
    (features less clean) — one fires (> 0) on the verb token and the other on the object token.
    Without the role check a cue feature of another category that fires weakly on both words
    would pass as the planted pair. 1 if any pair passes (only strictly when `strict`; logged with
    the criterion), 0 if none does, None when no compositional prompt was dissected or the
    prompts carry no cue metadata. roles: feature_roles of features the caller has already (the
    pairs' other features are computed here).
    """
    ps = prompts.eval_harmful
    if not _has_cues(ps):
        return None
    dissected = sorted(set(result.fit["prompt_idx"].to_list()))
    comp = [
        i
        for i in dissected
        if ps.meta[i].get("kind") == "compositional" and len(ps.meta[i]["cue_spans"]) >= 2
    ]
    if not comp:
        return None
    confirmed = result.interactions.filter(pl.col("prompt_idx").is_in(comp) & pl.col("confirmed"))
    pair_feats = sorted(
        {(int(a), int(b)) for a, b in zip(confirmed["layer_i"], confirmed["feature_i"], strict=True)}
        | {(int(a), int(b)) for a, b in zip(confirmed["layer_j"], confirmed["feature_j"], strict=True)}
    )
    known = [] if roles is None else roles.filter(pl.col("role").is_not_null()).to_dicts()
    role_of = {(int(r["layer"]), int(r["feature"])): r["role"] for r in known}
    missing = [f for f in pair_feats if f not in role_of]
    if missing:
        role_of |= {(int(r["layer"]), int(r["feature"])): r["role"]
                    for r in feature_roles(model, saes, missing, prompts).to_dicts()}  # fmt: skip
    for idx in comp:
        pairs = confirmed.filter(pl.col("prompt_idx") == idx).to_dicts()
        if not pairs:
            continue
        feats = sorted(
            {(p["layer_i"], p["feature_i"]) for p in pairs} | {(p["layer_j"], p["feature_j"]) for p in pairs}
        )
        col = {f: c for c, f in enumerate(feats)}
        instr = ps.instructions[idx]
        acts = feature_activations(model, saes, feats, [instr])[0]  # [T, F]
        on = torch.tensor(token_roles(model, instr, ps.meta[idx]["cue_spans"][:2]))

        for p in pairs:
            fi, fj = (p["layer_i"], p["feature_i"]), (p["layer_j"], p["feature_j"])
            if not role_of.get(fi) == role_of.get(fj) == "composition":
                log.info("FM pair %s × %s on prompt %d: roles %s × %s, not the composition", p["label_i"],
                         p["label_j"], idx, role_of.get(fi), role_of.get(fj))  # fmt: skip
                continue
            ci, cj = col[fi], col[fj]
            if {_peak_role(acts[:, ci], on), _peak_role(acts[:, cj], on)} == {0, 1}:
                log.info("compositional pair (strict) on prompt %d: %s × %s", idx, p["label_i"], p["label_j"])
                return 1
            fires = [[_fires(acts[:, c], on, r) for r in (0, 1)] for c in (ci, cj)]
            if not strict and ((fires[0][0] and fires[1][1]) or (fires[0][1] and fires[1][0])):
                log.info("compositional pair (loose) on prompt %d: %s × %s", idx, p["label_i"], p["label_j"])
                return 1
    return 0


def _peak_role(acts: torch.Tensor, roles: torch.Tensor) -> int:
    """Cue index (0 verb, 1 object, -1 none) of the token where `acts` [T] peaks; -1 if never active."""
    return int(roles[int(acts.argmax())]) if acts.max() > 0 else -1


def _fires(acts: torch.Tensor, roles: torch.Tensor, role: int) -> bool:
    """Whether `acts` [T] is > 0 on some token of cue `role`."""
    on = roles == role
    return bool(on.any() and acts[on].max() > 0)
