"""Feature cards: what each feature a run found responds to, measured on the run's own prompts.

A card is made for every feature in some prompt's minimal set (greedy), among the FM's top
features of a prompt (rank < FM_TOP), or in the awakened set H of redundancy. Each card holds:
- where it was found: in how many minimal sets, its best FM rank, in how many prompts' H;
- its decoder cosine with the refusal direction r̂ (the quantity candidates ranks by);
- how often it fires on the eval harmful and harmless prompts, and its largest activation;
- its top-activating contexts: the `n_contexts` eval prompts where it peaks highest (one context
  per prompt), each as ±`window` tokens of the formatted prompt with the peak token in [[ ]];
- its effect when ablated alone at the run's coefficient c, on every dissected prompt: the mean
  change of the refusal score and the fraction of prompts it flips by the run's criterion;
- its Neuronpedia page for real SAEs, and its planted role on the organism (added by the caller).

Everything here is computed from the model, the SAEs and the stage results; nothing is read back
from a report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import nnsight
import polars as pl
import torch

from . import interventions
from .backends import run_chunks
from .engine import AblationEngine, Feature, by_layer
from .errors import NonFiniteError
from .saes import decoder_cosines

log = logging.getLogger(__name__)

FM_TOP = 5  # a prompt's FM top features with rank below this count as found
N_CONTEXTS = 5
WINDOW = 6  # tokens of context on each side of the peak token

CARD_SCHEMA = pl.Schema(
    {
        "layer": pl.Int64(),
        "feature": pl.Int64(),
        "label": pl.Utf8(),  # "L{layer}/F{feature}"
        "n_minimal": pl.Int64(),  # dissected prompts whose 1-minimal set holds it
        "n_dissected": pl.Int64(),  # prompts greedy dissected
        "fm_best_rank": pl.Int64(),  # best rank among the FM's top features of a prompt; null: not there
        "n_fm_top": pl.Int64(),  # FM-dissected prompts where it ranks below FM_TOP
        "n_in_h": pl.Int64(),  # prompts whose awakened set H holds it
        "cosine": pl.Float64(),  # cos(decoder row, r̂)
        "fires_harmful": pl.Float64(),  # fraction of eval harmful prompts where it is ever > 0
        "fires_harmless": pl.Float64(),
        "max_activation": pl.Float64(),  # over every token of the eval prompts
        "top_contexts": pl.List(pl.Utf8),  # ±WINDOW tokens, the peak token in [[ ]]
        "top_activations": pl.List(pl.Float64),  # parallel to top_contexts
        "top_sources": pl.List(pl.Utf8),  # "harmful:12" (eval set : prompt index), parallel
        "coefficient": pl.Float64(),  # c of the single-feature ablation (f ← c·f)
        "criterion": pl.Utf8(),  # flip criterion of alone_flip_rate
        "alone_score_change": pl.Float64(),  # mean Δ refusal score, ablated alone, over dissected prompts
        "alone_flip_rate": pl.Float64(),  # fraction of dissected prompts it flips alone; null: judge criterion
        "neuronpedia": pl.Utf8(),  # null for SAEs without a Neuronpedia page (the organism)
        "role": pl.Utf8(),  # planted role (organism only), else null
        "role_share": pl.Float64(),
        "role_peak": pl.Utf8(),  # the tag most of its top activations share, when the role is not it (ground_truth)
        "role_plain_share": pl.Float64(),  # fraction of harmless eval prompts without planted words it fires on
        # the word groups (harm categories, "composition") on most of whose words it fires
        "role_cue_categories": pl.List(pl.Utf8()),
    }
)


def label(feature: Feature) -> str:
    return f"L{feature[0]}/F{feature[1]}"


def feature_activations(
    model, saes, features: Sequence[Feature], instructions: Sequence[str], edits=(), batch_size: int = 32
) -> list[torch.Tensor]:
    """Activations of `features` on each prompt: a list of [T_i, F] (unpadded, position 0 = BOS; all 0
    there when saes.skip_first_token).

    Reads the (optionally edited) residual of each needed layer through `interventions.apply`'s
    capture, then encodes it with the sliced SAE of that layer's features.
    """
    feats = [(int(a), int(b)) for a, b in features]
    if not feats:  # nothing found (e.g. no prompt was dissected): [T_i, 0] per prompt, no forward pass
        mask = model.tokenize(list(instructions)).attention_mask
        return [torch.zeros(int(n), 0) for n in mask.sum(-1).tolist()]
    groups = by_layer(feats)
    slices = {
        layer: saes.slice(layer, [feats[c][1] for c in cols]).to(model.device, torch.float32)
        for layer, cols in groups.items()
    }
    layers = list(groups)
    batch = model.tokenize(list(instructions))

    def one(i0: int, i1: int) -> tuple[int, int, torch.Tensor]:
        chunk = batch.rows(i0, i1)
        with torch.no_grad(), model.lm.trace(**chunk.model_inputs(model.device), logits_to_keep=1):
            caps = interventions.apply(
                model, interventions.rows(list(edits), i0, i1), chunk.attention_mask, capture=layers
            )
            # one saved tensor: nnsight hands back saved values, not containers holding them
            resid = nnsight.save(torch.stack([caps[layer] for layer in layers]))  # [n_layers, B, T, d]
        return i0, i1, resid

    out: list[torch.Tensor] = []
    for i0, i1, resid in run_chunks(model, len(batch), batch_size, one):
        mask = batch.rows(i0, i1).attention_mask
        acts = torch.zeros(*mask.shape, len(feats))
        for k, layer in enumerate(layers):  # the slices follow resid's device (SlicedSAE.encode)
            acts[..., groups[layer]] = slices[layer].encode(resid[k].float()).float().cpu()
        for r in range(mask.shape[0]):
            n = int(mask[r].sum())
            row = acts[r, acts.shape[1] - n :]
            if saes.skip_first_token:  # an SAE that never saw the first token is not read there
                row[0] = 0.0
            out.append(row)
    return out


def max_activations(
    model,
    saes,
    batch,
    edits: Sequence,
    batch_size: int,
    layers: Sequence[int] | None = None,
    latents: dict[int, list[int]] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer, each latent's max over the real positions [N, width] and its value at <bos>
    [N, width], under `edits`. With saes.skip_first_token the first token is not read: left out of
    the max, NaN at <bos>. latents: layer → the latent indices to read there (the columns, in that
    order); default every latent of the layer.

    Each layer's latents are encoded from its residual before that layer's own edits, as an edit
    at that layer reads them: a latent reads what the layers below (edited or not) wrote, not the
    push of an edit of its own layer.
    """
    read = list(saes.layers if layers is None else layers)
    edit_layers = {layer for e in edits for layer in e.layers}

    def one(i0: int, i1: int) -> tuple[int, int, torch.Tensor]:
        """The residuals [len(read), B, T, d] of the read layers, each before that layer's edits."""
        chunk = batch.rows(i0, i1)
        chunk_edits = interventions.rows(edits, i0, i1)
        got = []
        with torch.no_grad(), model.lm.trace(**chunk.model_inputs(model.device), logits_to_keep=1):
            for layer in sorted(set(read) | edit_layers):
                if layer in read:
                    got.append(interventions.apply(model, [], chunk.attention_mask, capture=[layer])[layer])
                here = [
                    e for e in chunk_edits if isinstance(e, interventions.FeatureEdit) and layer in e.layers
                ]
                if here:
                    interventions.apply(model, here, chunk.attention_mask)
            resid = nnsight.save(torch.stack(got))  # one saved tensor; stays on the device locally
        return i0, i1, resid

    # The residuals come back and are encoded here, one layer at a time (its slice made once, for
    # every chunk): a remote job ships only sliced SAEs, and all layers at once would copy every
    # SAE (GBs).
    chunks = [(batch.rows(i0, i1).attention_mask.to(resid.device), resid)
              for i0, i1, resid in run_chunks(model, len(batch), batch_size, one)]  # fmt: skip
    maxes: dict[int, list[torch.Tensor]] = {layer: [] for layer in read}
    at_bos: dict[int, list[torch.Tensor]] = {layer: [] for layer in read}
    for k, layer in enumerate(sorted(read)):
        cols = None if latents is None else latents[layer]
        sae = saes.slice(layer, cols).to(chunks[0][1].device if chunks else model.device, torch.float32)
        for mask, resid in chunks:
            f = sae.encode(resid[k].float())  # [B, T, width]
            # the real positions; with saes.skip_first_token, not the first, which the SAE never saw
            real = interventions.position_mask("all", mask, 0, mask.shape[1], saes.skip_first_token)
            assert real is not None  # the prompt forward always has a mask
            maxes[layer].append(f.masked_fill(~real[..., None], float("-inf")).amax(1).cpu())
            bos = f[torch.arange(mask.shape[0], device=f.device), interventions.first_column(mask)].cpu()
            at_bos[layer].append(torch.full_like(bos, math.nan) if saes.skip_first_token else bos)
    out_max = {layer: torch.cat(v) for layer, v in maxes.items()}
    out_bos = {layer: torch.cat(v) for layer, v in at_bos.items()}
    for layer, t in out_max.items():
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"non-finite SAE activations at layer {layer}")
    return out_max, out_bos


def eval_activations(
    model, saes, features: Sequence[Feature], prompts, batch_size: int = 32
) -> dict[str, list[torch.Tensor]]:
    """feature_activations of `features` on the eval prompts: {"harmful": [...], "harmless": [...]}.
    The cards and the planted roles read the same activations, computed once."""
    sets = {"harmful": prompts.eval_harmful.instructions, "harmless": prompts.eval_harmless.instructions}
    return {
        name: feature_activations(model, saes, features, texts, batch_size=batch_size)
        for name, texts in sets.items()
    }


def token_offsets(model, instruction: str) -> tuple[str, list[tuple[int, int]]]:
    """The formatted prompt and each token's character span in it (unpadded order; the BOS that
    tokenize() adds to a template without one gets (0, 0))."""
    text = model.format([instruction])[0]
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    ids = model.tokenize([instruction]).input_ids[0].tolist()
    if len(ids) == len(offsets) + 1:  # tokenize() added the one BOS the template lacked
        offsets = [(0, 0), *offsets]
    if len(ids) != len(offsets):
        raise ValueError("token offsets do not line up with the tokenized prompt")
    return text, offsets


def context(model, instruction: str, position: int, window: int = WINDOW) -> str:
    """±window tokens of the formatted prompt around `position`, that token in [[ ]]; newlines as ⏎."""
    text, offsets = token_offsets(model, instruction)
    lo, hi = max(0, position - window), min(len(offsets), position + window + 1)
    a, b = offsets[position]
    if b > a:
        token = text[a:b]
    else:  # a special token the text does not spell (the BOS tokenize() added)
        token = model.tokenizer.convert_ids_to_tokens(
            model.tokenize([instruction]).input_ids[0, position].item()
        )
    start, end = offsets[lo][0], max(offsets[hi - 1][1], b)
    out = text[start:a] + f"[[{token}]]" + text[b:end]
    return (("…" if lo > 0 else "") + out + ("…" if hi < len(offsets) else "")).replace("\n", "⏎")


def found_features(greedy, fm=None, redundancy=None) -> dict[Feature, dict]:
    """Every feature in a minimal set, the FM's top features or H, with where it was found:
    {feature: {n_minimal, fm_best_rank, n_fm_top, n_in_h}}, in a fixed order (minimal-set count,
    then FM, then H, then layer and index)."""
    found: dict[Feature, dict] = {}

    def entry(f) -> dict:
        key = (int(f[0]), int(f[1]))
        return found.setdefault(key, {"n_minimal": 0, "fm_best_rank": None, "n_fm_top": 0, "n_in_h": 0})

    for m in greedy.minimal_sets.values() if greedy is not None else []:
        for f in m:
            entry(f)["n_minimal"] += 1
    if fm is not None and fm.top_features.height:
        top = fm.top_features.filter(pl.col("rank") < FM_TOP)
        for r in top.iter_rows(named=True):
            e = entry((r["layer"], r["feature"]))
            e["n_fm_top"] += 1
            e["fm_best_rank"] = r["rank"] if e["fm_best_rank"] is None else min(e["fm_best_rank"], r["rank"])
    if redundancy is not None and redundancy.awakened.height:
        h = redundancy.awakened
        if "ablation" in h.columns:
            h = h.filter(pl.col("ablation") == "strong")
        if "in_h" in h.columns:
            h = h.filter(pl.col("in_h"))
        counts = h.group_by(["layer", "feature"]).agg(pl.col("prompt_idx").n_unique().alias("n"))
        for r in counts.iter_rows(named=True):
            entry((r["layer"], r["feature"]))["n_in_h"] = int(r["n"])
    order = sorted(
        found,
        key=lambda f: (-found[f]["n_minimal"], -found[f]["n_fm_top"], -found[f]["n_in_h"], f),
    )
    return {f: found[f] for f in order}


def cosines_of(saes, features: Sequence[Feature], direction: torch.Tensor) -> list[float]:
    """cos(decoder row, r̂) of each feature, the very values the candidates stage ranks by."""
    out = [0.0] * len(features)
    for layer, cols in by_layer(features).items():
        cos = decoder_cosines(direction, saes[layer].W_dec)
        for c in cols:
            out[c] = float(cos[features[c][1]])
    return out


def single_ablations(
    model, saes, features: Sequence[Feature], instructions: Sequence[str], coefficient: float, flip,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Each feature ablated alone (f ← c·f at every position) on each prompt: the change of the
    refusal score [P, F], and whether it flips the prompt by `flip` [P, F] (None for the judge
    criterion, which needs generations)."""
    n = len(features)
    engine = AblationEngine(model, saes, features, value=coefficient, batch_size=batch_size)
    masks = torch.cat([torch.zeros(1, n, dtype=torch.bool), torch.eye(n, dtype=torch.bool)])
    outs = engine.scores_many([(model.tokenize([text]), masks) for text in instructions], what="flip")
    scores = torch.stack([o[:, 0].float().cpu() for o in outs])  # [P, 1 + F]
    change = scores[:, 1:] - scores[:, :1]
    if flip.name == "judge":
        return change, None
    margins = torch.stack([flip.margin(o.float().cpu()) for o in outs])
    return change, margins[:, 1:] < 0


def top_contexts(
    model, acts: dict[str, list[torch.Tensor]], instructions: dict[str, Sequence[str]], col: int,
    n: int = N_CONTEXTS, window: int = WINDOW,
) -> list[tuple[float, str, str]]:  # fmt: skip
    """The `n` prompts where feature column `col` peaks highest, one context per prompt:
    (peak activation, context with the peak token in [[ ]], "set:prompt index")."""
    peaks = []
    for name, rows in acts.items():
        for i, a in enumerate(rows):
            peak = float(a[:, col].max())
            if peak > 0:
                peaks.append((peak, name, i, int(a[:, col].argmax())))
    peaks.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [
        (peak, context(model, instructions[name][i], t, window), f"{name}:{i}")
        for peak, name, i, t in peaks[:n]
    ]


def feature_cards(
    model, saes, prompts, direction, greedy, fm=None, redundancy=None, *, coefficient: float, flip,
    roles: pl.DataFrame | None = None, acts: dict[str, list[torch.Tensor]] | None = None, batch_size: int = 32,
) -> pl.DataFrame:  # fmt: skip
    """One card (CARD_SCHEMA row) per feature of a minimal set, the FM's top features or H.

    roles: the planted role of each feature (ground_truth.feature_roles), on the organism only.
    acts: eval_activations of the found features (in found_features order), if already computed.
    """
    found = found_features(greedy, fm, redundancy)
    feats = list(found)
    if not feats:
        return pl.DataFrame([], schema=CARD_SCHEMA)
    sets = {"harmful": prompts.eval_harmful.instructions, "harmless": prompts.eval_harmless.instructions}
    if acts is None:
        acts = eval_activations(model, saes, feats, prompts, batch_size)
    cosines = cosines_of(saes, feats, direction.direction)
    dissected = sorted(greedy.minimal_sets)
    if dissected:
        texts = [prompts.eval_harmful.instructions[i] for i in dissected]
        change, flipped = single_ablations(model, saes, feats, texts, coefficient, flip, batch_size)
    role_of = {(r["layer"], r["feature"]): r for r in (roles.to_dicts() if roles is not None else [])}
    rows = []
    for j, f in enumerate(feats):
        tops = top_contexts(model, acts, sets, j)
        fires = {
            name: sum(float(a[:, j].max()) > 0 for a in rows_) / max(len(rows_), 1)
            for name, rows_ in acts.items()
        }
        role = role_of.get(f, {})
        rows.append({
            "layer": f[0], "feature": f[1], "label": label(f), **found[f], "n_dissected": len(dissected),
            "cosine": cosines[j], "fires_harmful": fires["harmful"], "fires_harmless": fires["harmless"],
            "max_activation": max((float(a[:, j].max()) for rows_ in acts.values() for a in rows_), default=0.0),
            "top_contexts": [c for _, c, _ in tops], "top_activations": [a for a, _, _ in tops],
            "top_sources": [s for _, _, s in tops], "coefficient": float(coefficient), "criterion": flip.name,
            "alone_score_change": float(change[:, j].mean()) if dissected else None,
            "alone_flip_rate": float(flipped[:, j].float().mean()) if dissected and flipped is not None else None,
            "neuronpedia": saes.neuronpedia_url(*f), "role": role.get("role"), "role_share": role.get("role_share"),
            "role_peak": role.get("peak_tag") if role.get("peak_tag") != role.get("role") else None,
            "role_plain_share": role.get("plain_share"), "role_cue_categories": role.get("cue_categories"),
        })  # fmt: skip
    return pl.DataFrame(rows, schema=CARD_SCHEMA)
