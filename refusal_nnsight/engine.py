"""The batched ablation engine: many edit variants of one prompt in one forward pass.

A pool is an ordered list of SAE features (layer, index). A variant is a boolean mask over the
pool (True = edit that feature). `AblationEngine` builds one `FeatureEdit` per layer whose
per-row mask selects each variant's features, repeats the prompt's row once per variant, and
reads only the refusal score at the last position. Greedy, fm, redundancy and evaluate all go
through it, so their cost is (#variants / batch size) forwards instead of #variants traces.
Within a forward, the prompt's row runs once up to the first edited layer, and on CPU variants
that are still identical (masks differing only in features that are zero on their row) are
computed as one row until they diverge (variants.apply_variants).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .interventions import EditMode, FeatureEdit, Positions
from .models import Batch, LoadedModel
from .saes import LoadedSAEs
from .scoring import refusal_scores, refusal_scores_many

Feature = tuple[int, int]  # (layer, latent index)


def latents_by_layer(features: Iterable[Feature]) -> dict[int, list[int]]:
    """layer → the distinct latent indices of `features` at that layer, ascending (layers ascending)."""
    out: dict[int, set[int]] = {}
    for layer, latent in features:
        out.setdefault(int(layer), set()).add(int(latent))
    return {layer: sorted(out[layer]) for layer in sorted(out)}


def row_edits(
    saes: LoadedSAEs,
    rows: Sequence[dict[Feature, float]],
    device,
    mode: EditMode = "scale",
    positions: Positions = "all",
) -> list[FeatureEdit]:
    """One FeatureEdit per layer from per-row {feature: value} (scale c or clamp v) maps.

    Rows may edit different features with different values (M at −3 and H at +2 in one edit),
    so every latent of a layer is encoded from the same pre-edit residual.
    """
    edits = []
    for layer, feats in latents_by_layer(f for row in rows for f in row).items():
        col = {f: j for j, f in enumerate(feats)}
        value = torch.zeros(len(rows), len(feats))
        mask = torch.zeros(len(rows), len(feats), dtype=torch.bool)
        for i, row in enumerate(rows):
            for (lay, f), v in row.items():
                if lay == layer:
                    value[i, col[f]], mask[i, col[f]] = v, True
        sae = saes.slice(layer, feats).to(device, torch.float32)
        edits.append(FeatureEdit(sae, value=value, mode=mode, mask=mask, positions=positions))
    return edits


def by_layer(features: Sequence[Feature]) -> dict[int, list[int]]:
    """layer → the columns (indices into `features`) of that layer's features, layers ascending."""
    out: dict[int, list[int]] = {}
    for col, (layer, _) in enumerate(features):
        out.setdefault(int(layer), []).append(col)
    return dict(sorted(out.items()))


@dataclass
class AblationEngine:
    model: LoadedModel
    saes: LoadedSAEs
    pool: Sequence[Feature]
    value: float  # scale c (mode=scale) or clamp value (mode=clamp): every ablation states it
    mode: EditMode = "scale"
    positions: Positions = "all"
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.pool = [(int(layer), int(f)) for layer, f in self.pool]
        # per layer: (sliced SAE over that layer's pool features, their columns in the pool)
        self._layers = {
            layer: (
                self.saes.slice(layer, [self.pool[c][1] for c in cols]).to(self.model.device, torch.float32),
                torch.tensor(cols, dtype=torch.long),
            )
            for layer, cols in by_layer(self.pool).items()
        }

    @property
    def size(self) -> int:
        return len(self.pool)

    def edits(self, masks: torch.Tensor) -> list[FeatureEdit]:
        """masks [V, F] (or [F]) bool over the pool → one FeatureEdit per layer with per-row masks."""
        masks = masks.to(self.model.device, torch.bool)  # placed once, reused by every layer
        if masks.shape[-1] != self.size:
            raise ValueError(f"mask width {masks.shape[-1]} != pool size {self.size}")
        return [
            FeatureEdit(
                sae,
                value=self.value,
                mode=self.mode,
                mask=masks[..., cols.to(masks.device)],
                positions=self.positions,
            )
            for sae, cols in self._layers.values()
        ]

    def scores(self, prompt: str | Batch, masks: torch.Tensor, progress: str | None = None) -> torch.Tensor:
        """Refusal score [V] of one prompt under each of V mask variants [V, F]."""
        batch = prompt if isinstance(prompt, Batch) else self.model.tokenize([prompt])
        if len(batch) != 1:
            raise ValueError("scores() takes one prompt; use scores_rows for one variant per prompt")
        masks = masks.reshape(-1, self.size)
        # One prompt row up to the first edited layer, then broadcast to the V variants: the
        # unedited layers below it run once per chunk instead of once per variant.
        return refusal_scores(
            self.model, batch, self.edits(masks), self.batch_size, progress, variants=masks.shape[0]
        )

    def scores_many(
        self, requests: Sequence[tuple[Batch, torch.Tensor]], what: str = "score"
    ) -> list[torch.Tensor]:
        """scores() of several (one-prompt batch, masks [V, F]) requests: each computed exactly as
        scores() computes it; on a remote backend all of them travel as ONE job. what="flip"
        gives [V, 2] per request: (refusal score, first-token margin), for a flip `Criterion`."""
        masks = [m.reshape(-1, self.size) for _, m in requests]
        asks = [(batch, self.edits(m), m.shape[0]) for (batch, _), m in zip(requests, masks, strict=True)]
        return refusal_scores_many(self.model, asks, self.batch_size, what=what)

    def scores_rows(
        self, prompts: Sequence[str] | Batch, masks: torch.Tensor, progress: str | None = None
    ) -> torch.Tensor:
        """Refusal score [N] of N prompts, prompt i under its own mask masks[i] ([N, F])."""
        batch = prompts if isinstance(prompts, Batch) else self.model.tokenize(list(prompts))
        return refusal_scores(
            self.model, batch, self.edits(masks.reshape(len(batch), self.size)), self.batch_size, progress
        )

    def mask_of(self, features: Sequence[Feature]) -> torch.Tensor:
        """[F] bool mask selecting `features` (each must be in the pool)."""
        index = {f: i for i, f in enumerate(self.pool)}
        m = torch.zeros(self.size, dtype=torch.bool)
        for f in features:
            m[index[(int(f[0]), int(f[1]))]] = True
        return m
