"""The organism's planted mechanisms: fixed residual directions, token labels, training interventions.

A model trained on (request -> answer) pairs alone learns whatever circuit is easiest, and on a
small grammar that is one late feature that reads the whole request: the search then finds the
refusal decision and nothing upstream of it. Here the mechanism is planted instead, by training
with the interventions the toolkit later applies, the way interchange-intervention training
plants a causal structure (Geiger et al. 2022, "Inducing Causal Structure for Interpretable
Neural Networks", arXiv 2112.00826):

    layer `cue_layer` (early)     u_c  fires on every cue word of harm category c (6 categories);
                                  v    on the compositional harm verbs ("kill", "shoot", ...);
                                  q    on the person words ("neighbor", "boss", ...).
    layer `backup_layer` (middle) b_c  the backup detector of category c: dormant (0) while the cue
                                  word is present, awake on the prompt's tokens after the cue word
                                  when the word is cut.
    layer `decision_layer`        R    at the post-instruction (eoi) positions: the refusal decision.
    later layers                  read R and write the refusal or the compliant answer.

Each direction is written with strength `strength` at its positions and 0 elsewhere (an MSE loss
on its projection), and the training batches carry the interventions whose outcome the method
claims to detect, each with its answer:

    cue word scaled by 0 (cut)        -> still refuses: b_c wakes and carries the cue (redundancy)
    cue word scaled by -1 or -3       -> complies (the paper's steering coefficients)
    cue word and b_c scaled by 0      -> complies
    v or q scaled by 0 or -3          -> a compositional request complies (harm = verb AND person)
    R projected out at every layer    -> complies; harmless answers unchanged (Arditi's ablation,
                                         which edits the input of layer 0 as well)
    R projected out from the decision layer on -> complies
    R projected out before the decision layer -> a harmful request still refuses: the lean of u_c,
                                         v and q on R (below) is not what carries the harm, their
                                         own parts are (so a latent along R that fires on every
                                         harm word, which an SAE learns, steers nothing alone)
    R added at the decision layer     -> a harmless request is refused (Arditi's induce test)

A cue condition u scales u_c at the cue layer on every token, and the cue word's whole residual:
at layer 0 on the rows whose token ids sum to an even number, at the cue layer on the others (a
coin fixed by the row's tokens, which draws nothing from the training generator). A word scaled
whole at the cue layer has its u_c coordinate scaled by u once, with the rest of the word. The backup is planted on the tokens after the cue word,
not on it: an SAE cut of the cue word removes everything the word carries, and only layer 0's
attention to the raw embeddings, which no SAE edit reaches, can carry the cue past the cut.

u_c, v and q share a component along R (cosines `cue_cosine` and `composition_cosine` of the
recipe): harm features in real models point partly along the refusal direction, which is why the
paper ranks SAE features by their decoder cosine with it. The shared component is also one an SAE
can learn as a latent of its own, firing on every harm word (one "harm" latent that steers every
category): the cues lean less than the verb and person so that each category's own latent, not
that shared one, carries most of its cue. b_c and R are orthogonal to each other and to every other direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import grammar
from .recipe import OrganismRecipe

# Condition names (one per training row). "clean" carries no intervention.
CONDITIONS = ("clean", "u_zero", "u_neg", "ub_zero", "vq_ablate", "r_all", "r_late", "r_add", "r_early")


@dataclass(frozen=True)
class Directions:
    """Unit directions in the residual stream (d_model), fixed by the organism's seed."""

    refusal: torch.Tensor  # R [d]
    cue: torch.Tensor  # u [n_categories, d]
    backup: torch.Tensor  # b [n_categories, d]
    verb: torch.Tensor  # v [d]
    person: torch.Tensor  # q [d]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"refusal": self.refusal, "cue": self.cue, "backup": self.backup,
                "verb": self.verb, "person": self.person}  # fmt: skip


def categories() -> tuple[str, ...]:
    """The harm categories with planted cue features, in a fixed order."""
    return tuple(grammar.CUE_ACTS)


def make_directions(d_model: int, seed: int, cue_cosine: float = OrganismRecipe.cue_cosine,
                    composition_cosine: float = OrganismRecipe.composition_cosine) -> Directions:  # fmt: skip
    """R, six cue directions, six backups, the verb and person directions from one seeded QR.

    u_c = cue_cosine * R + sqrt(1 - cue_cosine^2) * e_c, and likewise v and q with
    `composition_cosine`; the defaults are the default recipe's."""
    for name, c in (("cue_cosine", cue_cosine), ("composition_cosine", composition_cosine)):
        if not 0 < c < 1:
            raise ValueError(f"{name}={c} must lie in (0, 1)")
    n = len(categories())
    need = 1 + n + 2 + n  # R, e_c (cue), e_v, e_q, b_c
    if need > d_model:
        raise ValueError(f"d_model={d_model} is too small for {need} orthogonal planted directions")
    gen = torch.Generator().manual_seed(10_000 + seed)
    q, _ = torch.linalg.qr(torch.randn(d_model, need, generator=gen, dtype=torch.float64))
    basis = q.T.float()  # [need, d], orthonormal rows
    r, e_cue, e_v, e_q, b = basis[0], basis[1 : 1 + n], basis[1 + n], basis[2 + n], basis[3 + n :]

    def lean(e: torch.Tensor, c: float) -> torch.Tensor:
        return c * r + math.sqrt(1 - c * c) * e

    return Directions(
        r, lean(e_cue, cue_cosine), b, lean(e_v, composition_cosine), lean(e_q, composition_cosine)
    )


def directions_of(recipe) -> Directions:
    """The planted directions of an `OrganismRecipe`."""
    return make_directions(recipe.d_model, recipe.seed, recipe.cue_cosine, recipe.composition_cosine)


@dataclass(frozen=True)
class TokenLabels:
    """Per vocabulary id: which planted feature the token carries ([V] tensors)."""

    cue_category: torch.Tensor  # index into categories(), -1 if not a cue word
    verb: torch.Tensor  # bool: a compositional harm verb
    person: torch.Tensor  # bool: a person word of the compositional pairs

    def category_of(self, prompt_ids: Sequence[int]) -> int:
        """The harm category of the cue word in a prompt (-1 if it has none); the grammar puts at
        most one category's cue words in an act."""
        cats = self.cue_category[torch.tensor(prompt_ids)]
        found = cats[cats >= 0]
        return int(found[0]) if len(found) else -1


def cue_words() -> dict[str, str]:
    """cue word -> harm category (the explicit cue words of `grammar.CUE_ACTS`)."""
    return {word: cat for cat, acts in grammar.CUE_ACTS.items() for _, word in acts}


def token_labels(tok) -> TokenLabels:
    """Label every vocabulary piece ("▁bomb" and "bomb" alike) by the word it spells."""
    cats = {c: i for i, c in enumerate(categories())}
    words = cue_words()
    persons = {head for _, head in grammar.PERSONS}
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1
    cue = torch.full((n,), -1, dtype=torch.long)
    verb = torch.zeros(n, dtype=torch.bool)
    person = torch.zeros(n, dtype=torch.bool)
    for piece, i in vocab.items():
        word = piece.removeprefix("▁")
        if word in words:
            cue[i] = cats[words[word]]
        verb[i] = word in grammar.HARM_VERBS
        person[i] = word in persons
    return TokenLabels(cue, verb, person)


@dataclass
class RowEdits:
    """Per-row interventions of one batch, applied as forward hooks on the decoder layers.

    scale[name]: [B] factor on the component along that direction (1 = untouched); the cue and
    backup factors act on the row's own category (`category` [B], -1 = none).
    """

    category: torch.Tensor  # [B]
    u: torch.Tensor  # [B] scale of u_c at cue_layer
    b: torch.Tensor  # [B] scale of b_c at backup_layer
    v: torch.Tensor  # [B] scale of v at cue_layer
    q: torch.Tensor  # [B] scale of q at cue_layer
    r_from: torch.Tensor  # [B] first layer with R projected out of its output (0: input too; n_layers: none)
    r_add_at: torch.Tensor  # [B] layer at whose output `strength`*R is added (-1 = none)
    # [B, T] 1.0 on the cue-word tokens, whose whole residual u scales (None: u_c alone); `with_cue_words`
    word: torch.Tensor | None = None
    # [B] bool: the word is scaled at layer 0, else at the cue layer
    word_at_first: torch.Tensor | None = None
    # [B] R is projected out of layers r_from..r_until-1 only (None: every layer from r_from on)
    r_until: torch.Tensor | None = None

    @classmethod
    def uniform(cls, category: torch.Tensor, n_layers: int, u: float = 1.0, b: float = 1.0, v: float = 1.0,
                q: float = 1.0, r_from: int | None = None, r_add: int = -1,
                r_until: int | None = None) -> RowEdits:  # fmt: skip
        """The same edit on every row (defaults: none; r_from=None never projects R out, r_until=None
        projects it out to the last layer)."""
        n = len(category)

        def full(x: float) -> torch.Tensor:
            return torch.full((n,), x)

        r_from = n_layers if r_from is None else r_from
        return cls(category, full(float(u)), full(float(b)), full(float(v)), full(float(q)),
                   full(r_from), full(r_add), r_until=None if r_until is None else full(r_until))  # fmt: skip


def after_cue(is_cue: torch.Tensor, n_eoi: int = 0) -> torch.Tensor:
    """[..., T] bool: the tokens after a sequence's first cue token that are not cue tokens
    themselves (where the backup is planted), from `is_cue` [..., T] bool. With `n_eoi`, the
    sequences end in that many eoi positions, which are left out."""
    after = (is_cue.long().cumsum(-1) > 0) & ~is_cue
    if n_eoi:
        after[..., -n_eoi:] = False
    return after


def with_cue_words(edits: RowEdits, ids: torch.Tensor, labels: TokenLabels) -> RowEdits:
    """`edits` with its cue condition applied to the cue words of `ids` [B, T] (the padded batch
    the hooks will see) as well: each row's cue-word tokens, and whether its word is cut at layer 0
    (an even sum of its token ids) or at the cue layer."""
    edits.word = (labels.cue_category[ids] >= 0).float()
    edits.word_at_first = ids.sum(-1) % 2 == 0
    return edits


def _scale_along(h: torch.Tensor, direction: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """h [B, T, d] with its component along unit `direction` ([d] or [B, d]) scaled by `scale`
    ([B] per row, or [B, T] per token)."""
    d = direction if direction.dim() == 2 else direction.expand(h.shape[0], -1)
    proj = torch.einsum("btd,bd->bt", h, d)
    scale = scale[:, None] if scale.dim() == 1 else scale
    return h + ((scale - 1) * proj)[..., None] * d[:, None, :]


def install_hooks(model, dirs: Directions, edits: RowEdits, layers: Sequence[int], strength: float,
                  store: dict[int, torch.Tensor]) -> list:  # fmt: skip
    """Hooks on model.model.layers[L] that apply `edits`; each layer's pre-edit output goes to store[L]."""
    cue_layer, backup_layer = layers[0], layers[1]
    has_cat = edits.category >= 0
    cat = edits.category.clamp(min=0)

    def word_rows(layer: int) -> torch.Tensor | None:
        """[B] bool: the rows whose cue word is scaled at this layer's output (None: none)."""
        if edits.word is None or edits.word_at_first is None or layer not in (0, cue_layer):
            return None
        if cue_layer == 0:
            return torch.ones_like(edits.word_at_first)
        return edits.word_at_first if layer == 0 else ~edits.word_at_first

    def hook(module, args, output, layer: int):
        store[layer] = output
        h = output
        rows = word_rows(layer)
        # (a cached generation step sees one new token: the prompt's cue words are behind it)
        word = (
            edits.word
            if rows is not None and edits.word is not None and h.shape[:2] == edits.word.shape
            else None
        )
        if layer == cue_layer:
            ones = torch.ones_like(edits.u)
            u = torch.where(has_cat, edits.u, ones)
            if word is not None:  # a word scaled whole here has its u_c scaled by that, once
                assert rows is not None  # word is only set where rows is
                u = torch.where((rows[:, None] & (word > 0)), 1.0, u[:, None])  # [B, T]
            h = _scale_along(h, dirs.cue[cat], u)
            h = _scale_along(h, dirs.verb, edits.v)
            h = _scale_along(h, dirs.person, edits.q)
        if layer == backup_layer:
            h = _scale_along(h, dirs.backup[cat], torch.where(has_cat, edits.b, torch.ones_like(edits.b)))
        zero_r = (edits.r_from <= layer) & (True if edits.r_until is None else layer < edits.r_until)
        zero_r = zero_r.float()
        h = _scale_along(h, dirs.refusal, 1 - zero_r)
        add = (edits.r_add_at == layer).float() * strength
        h = h + add[:, None, None] * dirs.refusal
        if word is not None:
            assert rows is not None
            s = torch.where(rows, edits.u, torch.ones_like(edits.u))
            h = h * (1 + (s[:, None] - 1) * word)[..., None]
        return h

    from_input = (edits.r_from <= 0).float()  # Arditi's ablation edits the input of layer 0 too

    def pre_hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = _scale_along(h, dirs.refusal, 1 - from_input)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    return [model.model.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)] + [
        block.register_forward_hook(lambda m, a, o, layer=i: hook(m, a, o, layer))
        for i, block in enumerate(model.model.layers)
    ]


def save_directions(dirs: Directions, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dirs.as_dict().items()}, str(path))


def load_directions(path) -> Directions:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return Directions(t["refusal"], t["cue"], t["backup"], t["verb"], t["person"])


def planted_backup(root) -> tuple[int, dict[str, torch.Tensor], float] | None:
    """(the backup layer, category -> unit backup direction, the planted strength) of the organism
    built at `root`; None for a build without planted truth (a tuned real model)."""
    from .store import planted_path, read_manifest

    path = planted_path(root)
    if not path.exists():
        return None
    manifest = read_manifest(root)
    directions = dict(zip(categories(), load_directions(path).backup, strict=True))
    return (
        int(manifest["model"]["backup_layer"]),
        directions,
        float(manifest["recipe_fields"]["plant_strength"]),
    )
