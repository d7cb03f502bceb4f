"""The ablation engine's strategy for many edit variants of ONE prompt in one forward.

`apply_variants` runs the prompt's row once up to the first edited layer and broadcasts it to
the V variant rows there: the unedited layers below are computed once, not V times (attention
masks and rotary tables of batch 1 broadcast over the V rows). On CPU, when every edit is a
scale FeatureEdit with per-row masks (the engine's), variants that are still identical are
computed as one row until they diverge (`_apply_shared`). Both paths use the operator's own
edits (`interventions.edit_all`), so each variant's residual is the one it would have alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .interventions import Edit, FeatureEdit, begin_forward, edit_all, where_mask


def apply_variants(model, edits: Sequence[Edit], attention_mask: torch.Tensor, n_variants: int) -> None:
    """Apply `edits` (their masks have one row per variant) to `n_variants` copies of the one
    prompt of the current trace (`attention_mask` [1, T])."""
    pre, by_layer, mask, where_cache = begin_forward(model, edits, attention_mask, 0)
    layers = model.layers()
    # Row sharing needs the group count on the host at every edited layer (torch.unique), a sync
    # that would stall an accelerator's stream; it is measured on CPU only, so it runs there only.
    if n_variants > 1 and mask.device.type == "cpu" and not pre and _shareable(by_layer):
        _apply_shared(model, by_layer, mask, 0, where_cache, n_variants)
        return
    expand_at = min(by_layer) if by_layer else model.n_layers - 1
    for layer in sorted(set(by_layer) | {expand_at}):
        module = layers[layer]
        if layer == expand_at:
            x = module.output
            x = x.expand(n_variants, *x.shape[1:])
            module.output = edit_all(by_layer.get(layer, ()), x, mask, 0, where_cache)
        else:
            module.output = edit_all(by_layer[layer], module.output, mask, 0, where_cache)


def _shareable(by_layer: dict[int, list[Edit]]) -> bool:
    """One scale FeatureEdit per edited layer, per-row masks, one value for all rows."""
    for edits in by_layer.values():
        if len(edits) != 1 or not isinstance(edits[0], FeatureEdit):
            return False
        e = edits[0]
        if e.mode != "scale" or e.mask is None or e.mask.dim() != 2 or e.along is not None:
            return False
        if isinstance(e.value, torch.Tensor) and e.value.dim() == 2:
            return False
    return bool(by_layer)


def _apply_shared(model, by_layer: dict, mask: torch.Tensor, step: int, cache: dict, n_variants: int) -> dict:
    """V edit variants of ONE prompt row, each distinct residual computed once.

    Below the first edited layer every variant is the prompt's own row. At each edited layer,
    a feature that is zero at every edited position of a row contributes (c − 1)·0 = 0 under a
    scale edit, so variants on the same row whose masks differ only in such features stay
    identical: they are one row until the next edited layer. Rows are regrouped at every edited
    layer (by their row so far and their effective mask) and gathered back to the V variants at
    the last layer. Exact: each variant's residual is the one it would have on its own.
    """
    layers = model.layers()
    last = model.n_layers - 1
    row_of = None  # [V]: the row each variant rides in
    for layer in sorted({*by_layer, last}):
        module = layers[layer]
        x = module.output
        if row_of is None:  # the first edited layer: one row for all variants
            row_of = torch.zeros(n_variants, dtype=torch.long, device=x.device)
        if layer in by_layer:
            (e,) = by_layer[layer]
            where = where_mask(e, x.shape[1], mask, step, cache)
            active = e.sae.encode(x) != 0  # [R, T, S]
            if where is not None:
                active = active & where[..., None]
            m = e.mask.to(x.device).bool()
            effective = m & active.any(dim=1)[row_of]  # [V, S]: the features that change something
            groups, row_of = torch.unique(
                torch.cat([row_of[:, None], effective.long()], 1), dim=0, return_inverse=True
            )
            x = replace(e, mask=groups[:, 1:].bool()).edit(x[groups[:, 0]], where)  # one row per group
        if layer == last:
            x = x[row_of]
        module.output = x
    return {}
