"""Stage 1b — candidate SAE features (stage 1 of arXiv 2509.09708, step 4; Yeo, Prakash et al. 2025).

For each searched SAE layer (`cfg.layers`: all, a list, a range, or the layers before the last
fraction, as Arditi et al. prune the last 20% — the layers before refusal execution), the cosine
between the unit refusal direction r̂ and every unit decoder row; the top-k per layer form the
candidate set C. Then a check on the harmful eval prompts: ablating all of C (scale c at every
position, error term kept) should flip, by the flip criterion, each prompt the model refuses at
baseline (by the same criterion); the prompts where it does not are reported, because later
stages cannot find a minimal subset of a set that does not work.

A latent that is 0 on a prompt stays 0 when scaled, so a candidate that fires on no harmful eval
prompt edits nothing there (`n_silent` counts them; `active_prompts` in the table). A trained SAE
holds dead latents whose decoder rows can still point along r̂, and they take places among the top
k. `min_active` ranks only the latents active on at least that many harmful train prompts (0, the
default, ranks every latent, as the paper does).

With `per_layer`, the same check per searched layer L: L's candidates alone, and C without L's
(`layers.parquet`), so a layer whose candidates undo the others' shows as "without L flips more".
It also says why one can: an edit scales each latent as its SAE reads it from the residual that
the edits below have already changed, so ablating all of C can silence a layer's candidates
before their own edit acts (`kept_activation`: their activation with all of C ablated, as a share
of their clean activation). Each variant is also generated and judged (`per_layer_judged`, on by
default), so that its jailbreak rate counts a prompt where the judge and the criterion agree that
it stops refusing (the flip rates are the criterion's alone, as greedy's search reads it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl
import torch

from ..artifacts import StageDir, read_json, read_parquet, saved_before, write_json, write_parquet
from ..config import CandidatesConfig
from ..data import Prompts
from ..engine import AblationEngine, Feature, latents_by_layer
from ..errors import NonFiniteError, UserError
from ..features import max_activations
from ..generation import generate_many
from ..judges import Judge
from ..models import Batch, LoadedModel
from ..saes import LoadedSAEs, decoder_cosines
from ..scoring import Criterion, flips
from .direction import DirectionResult, select_layers

log = logging.getLogger(__name__)


def top_cosine_features(
    direction: torch.Tensor, W_dec: torch.Tensor, k: int, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [k] and cosines [k] of the decoder rows (W_dec [n, d]) most aligned with `direction` [d].

    Signed cosine, largest first: a latent whose decoder points along +r̂ writes refusal.
    Ties keep the lower index (stable sort), so the ranking is deterministic. Zero rows get 0.
    allowed: [n] bool, the latents that may be ranked (fewer than k when fewer are allowed).
    """
    cos = decoder_cosines(direction, W_dec)
    order = torch.sort(cos, descending=True, stable=True).indices
    if allowed is not None:
        order = order[allowed.to(order.device)[order]]
    order = order[: min(k, W_dec.shape[0])]
    return order, cos[order]


# the per-layer rates counted where the judge and the flip criterion agree (null when not judged)
JUDGED_KEYS = ("layer_alone_jailbreak_rate", "layer_without_jailbreak_rate", "layer_jailbreak_rate_n")
# A candidate stands out from the null when fewer than this share of random directions have a
# latent as close as it is (the null_p column; layer_beyond_null counts them per layer)
NULL_LEVEL = 0.05
# the random directions' seed: the same directions on every run and machine; not 0, which test SAEs
# and users seed with
NULL_SEED = 1_000_003
NULL_CHUNK = 64  # random directions per decoder product


def null_cosines(W_dec: torch.Tensor, n_directions: int) -> torch.Tensor:
    """[n_directions]: for each of n random unit directions (isotropic, from a generator seeded
    NULL_SEED), the cosine of its closest decoder row (W_dec [n, d]): how close the first candidate
    of a direction that carries no information would be."""
    W = W_dec.detach().float()
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(NULL_SEED)
    rand = torch.randn(n_directions, W.shape[1], generator=gen)
    rand = (rand / rand.norm(dim=-1, keepdim=True)).to(W.device)
    parts = [(W @ rand[i : i + NULL_CHUNK].T).amax(dim=0).cpu() for i in range(0, n_directions, NULL_CHUNK)]
    return torch.cat(parts)


def null_p(cos: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """[k] share of the random directions (null [n], from `null_cosines`) whose closest latent is at
    least as close to them as each candidate (cos [k]) is to r̂, counting the candidate itself, so
    never below 1 / (n + 1). Compared with the closest latent, not the one at the candidate's own
    rank: the latents ranked below a few aligned ones are the best of the rest, which a rank-matched
    null would call aligned. A candidate beyond it is aligned whatever the layer's width (the test
    holds over all of the layer's latents at once).

    The directions are isotropic. Where a dictionary's rows crowd into a subspace, a direction inside
    it, as r̂ (a difference of residual means) is, finds closer latents than an isotropic one does,
    so this null is lenient there: it may call a candidate aligned that a direction drawn like the
    residuals would find as close. "Not beyond the null" is the safer of its two readings."""
    n = null.numel()
    return ((null[None, :] >= cos[:, None]).sum(1) + 1).double() / (n + 1)


def cosine_table(
    direction: torch.Tensor,
    saes: LoadedSAEs,
    k: int,
    layers: list[int] | None = None,
    null_directions: int = 0,
    allowed: dict[int, torch.Tensor] | None = None,
) -> pl.DataFrame:
    """layer, feature, cosine, rank_in_layer, null_p, neuronpedia: the top-k features of every
    searched SAE layer. null_p compares each with `null_directions` random directions (null when
    0): a candidate no closer to r̂ than a random direction's closest latent is to it may be there
    by its rank alone, not by its alignment with r̂. allowed: layer → [width] bool, the latents
    that may be ranked there (default all); the null then draws its closest latent from them too."""
    rows = []
    for layer in saes.layers if layers is None else layers:
        pool = None if allowed is None else allowed[layer]
        idx, cos = top_cosine_features(direction, saes[layer].W_dec, k, pool)
        if not torch.isfinite(cos).all():
            raise NonFiniteError(f"non-finite decoder cosine at layer {layer}; check the SAE weights")
        ps: list[float | None] = [None] * len(idx)
        if null_directions and len(idx):
            W_dec = (
                saes[layer].W_dec if pool is None else saes[layer].W_dec[pool.to(saes[layer].W_dec.device)]
            )
            ps = null_p(cos, null_cosines(W_dec, null_directions)).tolist()
        for rank, (f, c, p) in enumerate(zip(idx.tolist(), cos.tolist(), ps, strict=True)):
            rows.append({"layer": layer, "feature": f, "cosine": c, "rank_in_layer": rank, "null_p": p,
                         "neuronpedia": saes.neuronpedia_url(layer, f)})  # fmt: skip
    schema = {
        "layer": pl.Int64,
        "feature": pl.Int64,
        "cosine": pl.Float64,
        "rank_in_layer": pl.Int64,
        "null_p": pl.Float64,
        "neuronpedia": pl.Utf8,
    }
    return pl.DataFrame(rows, schema=schema)


@dataclass
class CandidatesResult:
    """The candidate set C and the all-of-C ablation check on the harmful eval prompts."""

    # layer, feature, cosine, rank_in_layer, null_p, neuronpedia, active_prompts (C in this order):
    # active_prompts, how many harmful eval prompts the latent fires on (> 0 at some position), clean
    table: pl.DataFrame
    # prompt_idx, instruction, clean_score, all_ablated_score, clean_first_token_margin,
    # all_ablated_first_token_margin, refused (clean, by the criterion), jailbroken (all of C, by the criterion)
    prompts: pl.DataFrame
    coefficient: float  # scale c applied to the ablated latents
    criterion: str  # flip criterion that decided `refused` and `jailbroken`
    score_threshold: float  # its τ (used by criterion=score)
    layers: list[int]  # the SAE layers searched
    notes: dict[str, str] = field(default_factory=dict)  # summary key → why it is None
    # layer, n_features, n_refused, alone_flip_rate, without_flip_rate, kept_activation
    # (search.candidates.per_layer)
    by_layer: pl.DataFrame | None = None
    # the latents ranked were those active on at least this many harmful train prompts (0: all)
    min_active: int = 0

    @property
    def features(self) -> list[Feature]:
        """C as (layer, feature) pairs, in table order (by layer, then cosine rank)."""
        return list(zip(self.table["layer"].to_list(), self.table["feature"].to_list(), strict=True))

    @property
    def flip_criterion(self) -> Criterion:
        """The criterion this stage decided flips with; later stages of the library API reuse it."""
        return Criterion(self.criterion, self.score_threshold)

    @property
    def refused(self) -> list[int]:
        """Indices of the harmful eval prompts refused at baseline (clean s > 0)."""
        return self.prompts.filter(pl.col("refused"))["prompt_idx"].to_list()

    def summary(self) -> dict:
        """The all-of-C check by the flip criterion; its judged counterpart (on generations) is
        evaluate.candidates_ablated_jailbreak_rate. Rates count only prompts refused at baseline."""
        refused = self.prompts.filter(pl.col("refused"))
        n = refused.height
        flipped = int(refused["jailbroken"].sum()) if n else None
        return {
            "n_features": self.table.height,
            "layers": list(self.layers),
            "coefficient": self.coefficient,
            "criterion": self.criterion,
            "score_threshold": self.score_threshold,
            "n_refused_eval": n,
            "all_ablated_flip_rate": None if flipped is None else flipped / n,
            "all_ablated_flip_rate_n": n,
            "n_not_flipped": None if flipped is None else n - flipped,
            "cosine_max": max(self.table["cosine"].to_list()) if self.table.height else None,
            "min_active": self.min_active,
            # candidates that fire on no harmful eval prompt: scaling them edits nothing there
            "n_silent": int((self.table["active_prompts"] == 0).sum())
            if "active_prompts" in self.table.columns
            else None,
            # per searched layer (str keys): the flip rate with only its candidates ablated, and without them
            "layer_alone_flip_rate": self._by_layer("alone_flip_rate"),
            "layer_without_flip_rate": self._by_layer("without_flip_rate"),
            # the same variants generated and judged: prompts the judge and the criterion agree stop
            # refusing, over the layer_jailbreak_rate_n prompts both read as refused on the clean run
            "layer_alone_jailbreak_rate": self._by_layer("alone_jailbreak_rate"),
            "layer_without_jailbreak_rate": self._by_layer("without_jailbreak_rate"),
            "layer_jailbreak_rate_n": self._judged_n(),
            # per searched layer: its candidates' activation with all of C ablated / clean
            "layer_kept_activation": self._by_layer("kept_activation"),
            # per searched layer: how many of its candidates stand out from random directions' rankings
            "layer_beyond_null": self._beyond_null(),
        }

    def _beyond_null(self) -> dict[str, int] | None:
        if "null_p" not in self.table.columns or self.table["null_p"].null_count():  # off, or saved before
            return None
        by = self.table.group_by("layer", maintain_order=True).agg((pl.col("null_p") <= NULL_LEVEL).sum())
        return {str(layer): int(n) for layer, n in by.iter_rows()}

    def _judged_n(self) -> int | None:
        if self.by_layer is None or "n_refused_judged" not in self.by_layer.columns:
            return None
        return int(self.by_layer["n_refused_judged"][0])

    def _by_layer(self, column: str) -> dict[str, float | None] | None:
        if self.by_layer is None or column not in self.by_layer.columns:  # saved before the column
            return None
        return {str(r["layer"]): r[column] for r in self.by_layer.to_dicts()}

    def save(self, out: StageDir) -> None:
        """candidates.parquet, prompts.parquet, candidates.json; done.json last."""
        write_parquet(out.file("candidates.parquet"), self.table)
        write_parquet(out.file("prompts.parquet"), self.prompts)
        if self.by_layer is not None:
            write_parquet(out.file("layers.parquet"), self.by_layer)
        write_json(out.file("candidates.json"), {**self.summary(), "notes": self.notes})
        out.mark_done()

    @classmethod
    def load(cls, out: StageDir) -> CandidatesResult:
        info = read_json(out.file("candidates.json"))
        layered = read_parquet(out.file("layers.parquet")) if out.file("layers.parquet").exists() else None
        notes = saved_before(dict(info["notes"]), layered, "kept_activation", ("layer_kept_activation",),
                             "candidates", "the kept activation was measured")  # fmt: skip
        notes = saved_before(notes, layered, "alone_jailbreak_rate", JUDGED_KEYS, "candidates",
                             "the per-layer variants were judged")  # fmt: skip
        table = read_parquet(out.file("candidates.parquet"))
        notes = saved_before(notes, table, "null_p", ("layer_beyond_null",), "candidates",
                             "candidates were compared with random directions")  # fmt: skip
        notes = saved_before(notes, table, "active_prompts", ("n_silent",), "candidates",
                             "the candidates' activity was counted")  # fmt: skip
        return cls(
            table,
            read_parquet(out.file("prompts.parquet")),
            float(info["coefficient"]),
            str(info["criterion"]),
            float(info["score_threshold"]),
            [int(layer) for layer in info["layers"]],
            notes,
            layered,
            int(info.get("min_active", 0)),  # a folder saved before the setting ranked every latent
        )


def all_ablated_check(
    model: LoadedModel,
    engine: AblationEngine,
    batch: Batch,
    instructions: list[str],
    batch_size: int,
    criterion: Criterion,
    judge: Judge | None = None,
) -> pl.DataFrame:
    """Clean and all-of-C-ablated (every feature of `engine`, at its value) score, first-token
    margin and criterion verdict of each prompt (`batch`: `instructions` tokenized)."""
    ones = torch.ones(len(batch), engine.size, dtype=torch.bool)
    runs = {
        name: flips(model, batch, edits, criterion, batch_size, judge, instructions)
        for name, edits in (("clean", []), ("all_ablated", engine.edits(ones)))
    }
    (cs, cm, cflip), (as_, am, aflip) = runs["clean"], runs["all_ablated"]
    return pl.DataFrame({
        "prompt_idx": list(range(len(batch))), "instruction": list(instructions),
        "clean_score": cs.double().tolist(), "all_ablated_score": as_.double().tolist(),
        "clean_first_token_margin": cm.double().tolist(), "all_ablated_first_token_margin": am.double().tolist(),
        "refused": (~cflip).tolist(), "jailbroken": aflip.tolist(),
    })  # fmt: skip


def by_layer_check(
    model: LoadedModel,
    saes: LoadedSAEs,
    engine: AblationEngine,
    batch: Batch,
    instructions: list[str],
    refused: list[bool],
    batch_size: int,
    criterion: Criterion,
    clean: dict[int, torch.Tensor],
    judge: Judge | None = None,
) -> pl.DataFrame:
    """Per layer L of the engine's features: the flip rate, over the `refused` prompts, with only
    L's features ablated (alone) and with all features but L's (without); and the share of their
    clean activation L's features keep with all features ablated (kept_activation). clean: the
    features' clean activations on `batch` (`clean_activations`).

    With a judge, every variant is also generated and judged: the jailbreak rates count a prompt
    where the judge and the criterion agree that it stops refusing, over the prompts both read as
    refused on the clean run (n_refused_judged); without one those columns are left out.
    """
    layer_of = torch.tensor([layer for layer, _ in engine.pool])
    keep = torch.tensor(refused, dtype=torch.bool)
    layers = sorted(set(layer_of.tolist()))
    # each ablated column set once: with two layers, "without L" is the other alone
    variants: dict[tuple[bool, ...], torch.Tensor] = {}
    for layer in layers:
        for cols in (layer_of == layer, layer_of != layer):
            variants.setdefault(tuple(cols.tolist()), cols)
    edits = {key: engine.edits(cols.expand(len(batch), -1)) for key, cols in variants.items()}
    flipped = {
        key: flips(model, batch, e, criterion, batch_size, judge, instructions)[2] for key, e in edits.items()
    }
    jailbroken, judged_base = _judged(
        model, batch, instructions, edits, flipped, keep, batch_size, criterion, judge
    )

    def rate(verdicts: dict[tuple[bool, ...], torch.Tensor] | None, base: torch.Tensor, cols: torch.Tensor):
        if verdicts is None or not base.any():
            return None
        return float(verdicts[tuple(cols.tolist())][base].float().mean())

    everything = engine.edits(torch.ones(len(batch), engine.size, dtype=torch.bool))
    kept = kept_activation(model, saes, batch, engine.pool, everything, keep, batch_size, clean)
    rows = []
    for layer in layers:
        alone, without = layer_of == layer, layer_of != layer
        row = {"layer": layer, "n_features": int(alone.sum()), "n_refused": int(keep.sum()),
               "alone_flip_rate": rate(flipped, keep, alone), "without_flip_rate": rate(flipped, keep, without),
               "kept_activation": kept[layer]}  # fmt: skip
        if judged_base is not None:
            row |= {"n_refused_judged": int(judged_base.sum()),
                    "alone_jailbreak_rate": rate(jailbroken, judged_base, alone),
                    "without_jailbreak_rate": rate(jailbroken, judged_base, without)}  # fmt: skip
        rows.append(row)
    schema = {"layer": pl.Int64, "n_features": pl.Int64, "n_refused": pl.Int64,
              "alone_flip_rate": pl.Float64, "without_flip_rate": pl.Float64,
              "kept_activation": pl.Float64}  # fmt: skip
    if judged_base is not None:
        schema |= {"n_refused_judged": pl.Int64, "alone_jailbreak_rate": pl.Float64,
                   "without_jailbreak_rate": pl.Float64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _judged(
    model: LoadedModel,
    batch: Batch,
    instructions: list[str],
    edits: dict[tuple[bool, ...], list],
    flipped: dict[tuple[bool, ...], torch.Tensor],
    keep: torch.Tensor,
    batch_size: int,
    criterion: Criterion,
    judge: Judge | None,
) -> tuple[dict[tuple[bool, ...], torch.Tensor] | None, torch.Tensor | None]:
    """(per variant, the prompts the judge and the criterion agree stop refusing; the prompts both
    read as refused on the clean run), or (None, None) without a judge. Under the judge criterion
    the flips are already the judge's verdicts."""
    if judge is None:
        return None, None
    if criterion.name == "judge":
        return flipped, keep
    keys = list(edits)
    texts = generate_many(model, [(batch, [])] + [(batch, edits[k]) for k in keys], None, batch_size)
    base = keep & torch.tensor(judge.refused(instructions, texts[0]), dtype=torch.bool)
    answered = [~torch.tensor(judge.refused(instructions, t), dtype=torch.bool) for t in texts[1:]]
    return {k: flipped[k] & a for k, a in zip(keys, answered, strict=True)}, base


def kept_activation(
    model: LoadedModel,
    saes: LoadedSAEs,
    batch: Batch,
    features: Sequence[Feature],
    edits: Sequence,
    keep: torch.Tensor,
    batch_size: int,
    clean: dict[int, torch.Tensor],
) -> dict[int, float | None]:
    """layer → Σ over the `keep` prompts and the layer's `features` of each latent's largest
    activation under `edits`, over the same sum on the clean run (None where that is 0); clean:
    the features' clean activations on `batch` (`clean_activations`).

    Each layer is read before its own edit, as that edit reads it: 1 where nothing below is
    edited, below 1 where the edits below silence the layer's features (an edit scales what is
    there, so a silenced feature's edit changes little), above 1 where they raise them.
    """
    latents = latents_by_layer(features)
    layers = list(latents)
    edited, _ = max_activations(model, saes, batch, edits, batch_size, layers, latents)
    out: dict[int, float | None] = {}
    for layer in layers:
        base = float(clean[layer][keep].clamp(min=0).sum())
        out[layer] = float(edited[layer][keep].clamp(min=0).sum()) / base if base > 0 else None
    return out


def active_latents(
    model: LoadedModel, saes: LoadedSAEs, prompts: Prompts, layers: list[int], cfg: CandidatesConfig
) -> dict[int, torch.Tensor]:
    """layer → [width] bool: the latents active (> 0 at some position, clean) on at least
    cfg.min_active of the harmful train prompts, the pool search.candidates.min_active ranks."""
    train = prompts.train_harmful.instructions
    if cfg.min_active > len(train):
        raise UserError(
            f"search.candidates.min_active={cfg.min_active} exceeds the {len(train)} harmful train prompts"
        )
    acts, _ = max_activations(model, saes, model.tokenize(train), [], cfg.batch_size, layers)
    allowed = {layer: (acts[layer] > 0).sum(0) >= cfg.min_active for layer in layers}
    log.info("candidates: ranking the latents active on >= %d of %d harmful train prompts: %s", cfg.min_active,
             len(train), {layer: int(a.sum()) for layer, a in allowed.items()})  # fmt: skip
    return allowed


def clean_activations(
    model: LoadedModel, saes: LoadedSAEs, batch: Batch, features: Sequence[Feature], batch_size: int
) -> dict[int, torch.Tensor]:
    """layer → [N, the layer's features in latents_by_layer order]: each feature's largest clean
    activation on each of the batch's prompts, read once for the activity count and kept_activation."""
    latents = latents_by_layer(features)
    return max_activations(model, saes, batch, [], batch_size, list(latents), latents)[0]


def prompts_active(clean: dict[int, torch.Tensor], features: Sequence[Feature]) -> list[int]:
    """For each feature, how many prompts it fires on (> 0 at some position), from `clean_activations`."""
    latents = latents_by_layer(features)
    return [int((clean[layer][:, latents[layer].index(f)] > 0).sum()) for layer, f in features]


def run(
    model: LoadedModel,
    saes: LoadedSAEs,
    direction: DirectionResult,
    prompts: Prompts,
    cfg: CandidatesConfig,
    out: StageDir,
    coefficient: float,
    criterion: Criterion,
    judge: Judge | None = None,
) -> CandidatesResult:
    """Top-k decoder cosines per searched SAE layer → C; check that ablating C (scale
    `coefficient`) flips the harmful eval prompts by `criterion` (judge: generations judged).

    The caller saves (`result.save(out)`), as for every stage.
    """
    layers = select_layers(cfg.layers, list(saes.layers), model.n_layers, "search.candidates.layers")
    allowed = active_latents(model, saes, prompts, layers, cfg) if cfg.min_active else None
    table = cosine_table(direction.direction, saes, cfg.top_k, layers, cfg.null_directions, allowed)
    if not table.height:
        raise UserError(f"no latent of layers {layers} is active on {cfg.min_active} harmful train prompts; "
                        "lower search.candidates.min_active")  # fmt: skip
    log.info("candidates: %d features over SAE layers %s (max cosine %.3f)",
             table.height, layers, max(table["cosine"].to_list()))  # fmt: skip
    features = list(zip(table["layer"], table["feature"], strict=True))
    instructions = prompts.eval_harmful.instructions
    batch = model.tokenize(instructions)
    clean = clean_activations(model, saes, batch, features, cfg.batch_size)
    table = table.with_columns(active_prompts=pl.Series(prompts_active(clean, features), dtype=pl.Int64))
    engine = AblationEngine(model, saes, features, value=coefficient, batch_size=cfg.batch_size)
    check = all_ablated_check(model, engine, batch, instructions, cfg.batch_size, criterion, judge)
    any_refused = bool(check["refused"].any())
    notes: dict[str, str] = {}
    if not any_refused:
        why = f"no harmful eval prompt is refused at baseline by the {criterion.name} criterion"
        notes.update(all_ablated_flip_rate=why, n_not_flipped=why)
    layered = None
    why_not = None
    # the judge criterion's flips are the judge's verdicts already: nothing extra to generate
    judged = cfg.per_layer_judged or criterion.name == "judge"
    if not cfg.per_layer:
        why_not = "search.candidates.per_layer is off"
    elif len(layers) < 2:
        why_not = "one SAE layer was searched: its candidates alone are all of C"
    elif not any_refused:
        why_not = notes["all_ablated_flip_rate"]
    else:
        layered = by_layer_check(model, saes, engine, batch, instructions, check["refused"].to_list(),
                                 cfg.batch_size, criterion, clean, judge if judged else None)  # fmt: skip
        log.info("candidates by layer: %s", layered.to_dicts())
    if why_not is not None:
        notes.update(
            layer_alone_flip_rate=why_not, layer_without_flip_rate=why_not, layer_kept_activation=why_not
        )
        notes.update(dict.fromkeys(JUDGED_KEYS, why_not))
    elif judge is None:
        notes.update(
            dict.fromkeys(JUDGED_KEYS, "no judge was given: the per-layer variants were not generated")
        )
    elif not judged:
        notes.update(dict.fromkeys(
            JUDGED_KEYS, "search.candidates.per_layer_judged is off: the per-layer variants were not generated"
        ))  # fmt: skip
    if not cfg.null_directions:
        notes["layer_beyond_null"] = "search.candidates.null_directions is 0"
    result = CandidatesResult(table, check, coefficient, criterion.name, criterion.threshold, layers, notes,
                              layered, cfg.min_active)  # fmt: skip
    missed = check.filter(pl.col("refused") & ~pl.col("jailbroken"))
    if missed.height:
        log.warning("ablating all %d candidates (c=%g) leaves %d refused harmful eval prompts refused, e.g. %r",
                    table.height, coefficient, missed.height, missed["instruction"][0])  # fmt: skip
    log.info("candidates: %s", result.summary())
    return result
