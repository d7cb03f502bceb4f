"""The one intervention operator: every stage edits the residual stream through `apply`.

Three edit kinds, each a pure-torch `edit(x, positions) -> x'` on a layer's residual
x [B, T, d] (the output of `model.layers[L]`, sae-lens `blocks.L.hook_resid_post`):

* `FeatureEdit` — SAE latents with the error term kept (as in arXiv 2509.09708):
  f = E(x), f'_S = c·f_S ("scale") or v ("clamp"), x' = x + (f' − f)_S · W_dec[S]. Unedited
  latents and the SAE error ε = x − D(f) are untouched, and only the |S| sliced columns are
  computed. `mask` [B, S] picks, per batch row, which features are edited — that is how many
  ablation variants of one prompt run as one batched forward. `along` [B, d] (with `along_mask`
  [B, S]) keeps only the component of the chosen latents' write along each row's direction.
* `DirectionAblation` — Arditi's x ← x − (x·r̂)r̂ at every layer's residual (the input of layer
  0 and every layer output).
* `DirectionAddition` — Arditi's activation addition x ← x + α·r at one layer.
* `Reconstruction` — x ← D(E(x)), the SAE splice without error term (SAE faithfulness checks).

Positions: "all" (prompt and generated tokens), "prompt", "generated", "bos" (the first real
token of each left-padded row), or a list of negative offsets from the end of the prompt
(e.g. the eoi positions [-5..-1]). `apply` is called inside an nnsight trace, or on every step of
`tracer.all()` in generate; the same `edit` runs in a plain torch hook for the parity tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from .saes import SlicedSAE

Positions = Literal["all", "prompt", "generated", "bos"] | tuple[int, ...] | list[int]


def position_mask(
    positions: Positions, attention_mask: torch.Tensor, step: int, width: int, skip_first: bool = False
) -> torch.Tensor | None:
    """[B, width] bool of the positions to edit at generation `step` (0 = the prompt forward).

    Returns None for "everything" (the cheap common case). Left padding is excluded from the
    prompt forward so pad positions never change. `skip_first` also leaves each row's first real
    token alone (an SAE that never saw it: saes.skip_first_token), so "bos" is then empty.
    """
    out = _position_mask(positions, attention_mask, step, width)
    if not skip_first or step != 0:  # generated tokens are never a prompt's first token
        return out
    out = (attention_mask.bool() if out is None else out).clone()
    out[torch.arange(out.shape[0], device=out.device), first_column(attention_mask).to(out.device)] = False
    return out


def first_column(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] long: the column of each left-padded row's first real token (its BOS, where it has one)."""
    return (attention_mask.shape[1] - attention_mask.sum(-1)).long()


def _position_mask(
    positions: Positions, attention_mask: torch.Tensor, step: int, width: int
) -> torch.Tensor | None:
    prompt_step = step == 0
    if positions == "all":
        return attention_mask.bool() if prompt_step else None
    if positions == "prompt" or positions == "generated":
        on = prompt_step == (positions == "prompt")
        if not on:
            return torch.zeros(attention_mask.shape[0], width, dtype=torch.bool, device=attention_mask.device)
        return attention_mask.bool() if prompt_step else None
    out = torch.zeros(attention_mask.shape[0], width, dtype=torch.bool, device=attention_mask.device)
    if not prompt_step:
        return out  # bos / prompt offsets exist only in the prompt forward
    if positions == "bos":
        first = first_column(attention_mask)
        out[torch.arange(out.shape[0]), first] = True
        return out
    offsets = torch.as_tensor(list(positions), dtype=torch.long)
    if (offsets >= 0).any():
        raise ValueError("position offsets are negative, counted from the end of the prompt (-1 = last)")
    out[:, width + offsets.to(out.device)] = True
    return out


EditMode = Literal["scale", "clamp"]


@dataclass
class FeatureEdit:
    """Scale (f ← c·f) or clamp (f ← v) SAE latents S at `sae.layer`, error term kept."""

    sae: SlicedSAE
    value: float | torch.Tensor = 0.0  # scalar, [S] or [B, S]: the scale c or the clamp value v
    mode: EditMode = "scale"
    mask: torch.Tensor | None = None  # [S] or [B, S] bool: features edited per row; None = all of S
    positions: Positions = "all"
    # [d] or [B, d]: keep only the component along this direction of the write of the latents in
    # `along_mask` ([S] or [B, S] bool; None = every edited latent). None = the whole write. Which
    # part of an ablation's effect runs along a known direction (the organism's planted backups).
    along: torch.Tensor | None = None
    along_mask: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        return [self.sae.layer]

    def rows(self, i0: int, i1: int) -> FeatureEdit:
        """The edit restricted to batch rows i0..i1 (per-row masks/values are sliced)."""

        def cut(t):
            return t[i0:i1] if isinstance(t, torch.Tensor) and t.dim() == 2 else t

        return replace(
            self,
            value=cut(self.value),
            mask=cut(self.mask),
            along=cut(self.along),
            along_mask=cut(self.along_mask),
        )

    def edit(self, x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, d] → x + (f' − f)·W_dec[S] at the positions `where` [B, T] (None = all)."""
        sae = self.sae
        f = sae.encode(x)  # [B, T, S]
        value = self.value
        if isinstance(value, torch.Tensor):  # per feature [S] or per row [B, S]
            value = value.to(device=f.device, dtype=f.dtype)
            value = value[:, None, :] if value.dim() == 2 else value
        # scale: f' − f = (c − 1)·f; clamp: f' − f = v − f. A Python scalar c stays on the host:
        # no host→device copy (a synchronising one) per layer and step.
        delta = f * (value - 1) if self.mode == "scale" else value - f
        delta = _latent_mask(delta, self.mask)
        if where is not None:
            delta = delta * where[..., None].to(delta.dtype)
        write = sae.decode_delta(delta)  # [B, T, d]
        if self.along is not None:
            u = self.along.to(device=write.device, dtype=write.dtype)
            u = (u / u.norm(dim=-1, keepdim=True)).expand(write.shape[0], -1)  # [B, d]
            cut = sae.decode_delta(_latent_mask(delta, self.along_mask))
            write = write - cut + torch.einsum("btd,bd->bt", cut, u)[..., None] * u[:, None, :]
        return x + write.to(x.dtype)


def _latent_mask(delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """delta [B, T, S] with the latents outside `mask` ([S] or per row [B, S]; None = all) zeroed."""
    if mask is None:
        return delta
    m = mask.to(device=delta.device, dtype=delta.dtype)  # no copy when already placed (AblationEngine)
    return delta * (m[:, None, :] if m.dim() == 2 else m)


@dataclass
class DirectionAblation:
    """Project the unit direction out of the residual: x ← x − (x·r̂)r̂ (Arditi et al. 2024)."""

    direction: torch.Tensor  # [d]
    layer_list: Sequence[int] | None = None  # None = every layer, plus the input of layer 0
    positions: Positions = "all"

    def layers_of(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layer_list is None else list(self.layer_list)

    def rows(self, i0: int, i1: int) -> DirectionAblation:
        return self

    def edit(self, x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        r = self.direction.to(device=x.device, dtype=torch.float32)
        r = r / r.norm()
        proj = (x.float() @ r)[..., None] * r  # [B, T, d]
        if where is not None:
            proj = proj * where[..., None]
        return (x.float() - proj).to(x.dtype)


@dataclass
class DirectionAddition:
    """Add a vector to one layer's residual: x ← x + coeff·r (activation addition)."""

    direction: torch.Tensor  # [d], not normalised: the mean difference itself
    layer: int
    coeff: float = 1.0
    positions: Positions = "all"

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def rows(self, i0: int, i1: int) -> DirectionAddition:
        return self

    def edit(self, x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        add = self.coeff * self.direction.to(device=x.device, dtype=x.dtype)
        if where is None:
            return x + add
        return x + where[..., None].to(x.dtype) * add


@dataclass
class Reconstruction:
    """Replace the residual by the SAE's reconstruction x̂ = D(E(x)) (error term dropped).

    Not an ablation: it measures how faithful an SAE is ("splice agreement", FVU in context).
    `sae` must be a full-width SlicedSAE (all latents).
    """

    sae: SlicedSAE
    positions: Positions = "all"

    @property
    def layers(self) -> list[int]:
        return [self.sae.layer]

    def rows(self, i0: int, i1: int) -> Reconstruction:
        return self

    def edit(self, x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        x_hat = self.sae.decode(self.sae.encode(x)).to(x.dtype)
        if where is None:
            return x_hat
        return torch.where(where[..., None], x_hat, x)


Edit = FeatureEdit | DirectionAblation | DirectionAddition | Reconstruction


def edits_by_layer(edits: Sequence[Edit], n_layers: int) -> tuple[list[Edit], dict[int, list[Edit]]]:
    """(edits of layer 0's input, {layer: edits of that layer's output}) in application order."""
    pre: list[Edit] = []
    out: dict[int, list[Edit]] = {}
    for e in edits:
        if isinstance(e, DirectionAblation):
            if e.layer_list is None:
                pre.append(e)
            targets = e.layers_of(n_layers)
        else:
            targets = e.layers
        for layer in targets:
            if not 0 <= layer < n_layers:
                raise ValueError(f"edit at layer {layer}, but the model has layers 0..{n_layers - 1}")
            out.setdefault(layer, []).append(e)
    return pre, dict(sorted(out.items()))


def begin_forward(
    model, edits: Sequence[Edit], attention_mask: torch.Tensor, step: int
) -> tuple[list[Edit], dict[int, list[Edit]], torch.Tensor, dict]:
    """What every forward through the operator starts with: the pre-edits, the edits by layer, the prompt mask
    on the model's device and an empty position-mask cache, with the every-layer direction
    ablations already applied to layer 0's input (the pre-edits). One device copy of the mask per
    forward, and one position mask per position spec, shared by every layer (per-layer
    host→device copies would serialise the GPU stream)."""
    pre, by_layer = edits_by_layer(edits, model.n_layers)
    mask = attention_mask.to(model.device)
    where_cache: dict = {}
    if pre:
        first = model.layers()[0]
        first.input = edit_all(pre, first.input, mask, step, where_cache)
    return pre, by_layer, mask, where_cache


def apply(
    model,
    edits: Sequence[Edit],
    attention_mask: torch.Tensor,
    step: int = 0,
    capture: Sequence[int] = (),
) -> dict[int, torch.Tensor]:
    """Apply `edits` inside the current nnsight trace (or generation step) of `model`.

    `model` is a LoadedModel; `attention_mask` [B, T_prompt] is the batch's prompt mask, used to
    place "bos"/offset positions and to keep left padding untouched. Modules are visited in
    forward order, as nnsight requires, so reads of residuals go through `capture`: the edited
    residual [B, T, d] of each captured layer is returned (not saved; save what you keep).
    Many edit variants of one prompt go through `variants.apply_variants`, the ablation
    engine's strategy, built on these same edits.
    """
    _, by_layer, mask, where_cache = begin_forward(model, edits, attention_mask, step)
    layers = model.layers()
    captured: dict[int, torch.Tensor] = {}
    for layer in sorted(set(by_layer) | set(capture)):
        module = layers[layer]
        if layer in by_layer:
            module.output = edit_all(by_layer[layer], module.output, mask, step, where_cache)
        if layer in capture:
            captured[layer] = module.output
    return captured


def edit_all(
    edits: Sequence[Edit], x: torch.Tensor, attention_mask: torch.Tensor, step: int, cache: dict
) -> torch.Tensor:
    for e in edits:
        x = e.edit(x, where_mask(e, x.shape[1], attention_mask, step, cache))
    return x


def where_mask(
    e: Edit, width: int, attention_mask: torch.Tensor, step: int, cache: dict
) -> torch.Tensor | None:
    """position_mask of `e`, made once per (positions, width, skip) and shared by every layer's edits."""
    skip = bool(getattr(getattr(e, "sae", None), "skip_first", False))
    key = (e.positions if isinstance(e.positions, str) else tuple(e.positions), width, skip)
    if key not in cache:
        cache[key] = position_mask(e.positions, attention_mask, step, width, skip)
    return cache[key]


def rows(edits: Sequence[Edit], i0: int, i1: int) -> list[Edit]:
    """Restrict every edit's per-row masks/values to batch rows i0..i1."""
    return [e.rows(i0, i1) for e in edits]
