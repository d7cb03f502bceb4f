"""SAEs of the residual stream: load them with sae-lens, slice them to plain torch.

`load_saes` returns sae-lens SAE objects keyed by layer, each checked against the model (width,
layer range, the module its hook reads). `SlicedSAE` holds only the columns/rows of a feature
subset as plain tensors — no sae-lens import — so interventions on |S| features cost O(|S|·d)
and can travel to a remote server.

sae-lens is imported lazily (~14 s): only where SAEs are loaded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import SAEConfig
from .errors import UserError

log = logging.getLogger(__name__)

# sae-lens hook names of residual SAEs → the layer whose output they read
# (`blocks.{L}.hook_resid_post` is the output of transformer block L).
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


@dataclass
class SlicedSAE:
    """Encoder columns, biases, thresholds and decoder rows of features S of one SAE.

    encode(x)[..., j] equals sae-lens's `encode(x)[..., features[j]]` for JumpReLU and ReLU
    ("standard") SAEs. TopK SAEs cannot be sliced (which latents survive depends on all of
    them), so `topk_full` carries the full encoder and encode runs it in full.
    """

    layer: int
    features: torch.Tensor  # [S] long: indices into the SAE's latents
    W_enc: torch.Tensor  # [d, S]
    b_enc: torch.Tensor  # [S]
    W_dec: torch.Tensor  # [S, d]
    b_dec: torch.Tensor  # [d]
    threshold: torch.Tensor | None  # [S] (JumpReLU), None for ReLU
    apply_b_dec_to_input: bool = False
    architecture: str = "jumprelu"  # jumprelu | standard | topk
    topk_full: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (W_enc [d,n], b_enc [n], k)
    # leave each prompt's first token unedited (LoadedSAEs.skip_first_token): interventions.position_mask
    skip_first: bool = False

    @property
    def n_features(self) -> int:
        return int(self.features.numel())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] → latent activations of S [..., S], computed in the weights' dtype.

        The weights follow x to its device (a no-op when they are there already): inside a
        remote session the slices arrive on the CPU and the residual lives on the server's GPU.
        """
        dev = x.device
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec.to(dev)
        if self.architecture == "topk":
            assert self.topk_full is not None  # from_sae keeps the full encoder of a TopK SAE
            W, b, k = self.topk_full
            pre = x @ W.to(dev) + b.to(dev)
            top = pre.topk(k, dim=-1)
            full = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            return full[..., self.features.to(dev)]
        pre = x @ self.W_enc.to(dev) + self.b_enc.to(dev)
        if self.threshold is None:
            return torch.relu(pre)
        return torch.relu(pre) * (pre > self.threshold.to(dev))

    def decode_delta(self, delta_f: torch.Tensor) -> torch.Tensor:
        """[..., S] change of latents → [..., d] change of the residual (decoder is linear)."""
        return delta_f @ self.W_dec.to(delta_f.device)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[..., S] latents → [..., d] reconstruction from S alone (all latents: x̂ = D(f))."""
        return f @ self.W_dec.to(f.device) + self.b_dec.to(f.device)

    def to(self, device=None, dtype=None) -> SlicedSAE:
        def mv(t):
            return (
                None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            )

        topk = None
        if self.topk_full is not None:
            topk = (mv(self.topk_full[0]), mv(self.topk_full[1]), self.topk_full[2])
        return SlicedSAE(
            self.layer, self.features.to(device), mv(self.W_enc), mv(self.b_enc), mv(self.W_dec),
            mv(self.b_dec), mv(self.threshold), self.apply_b_dec_to_input, self.architecture, topk, self.skip_first,
        )  # fmt: skip

    @classmethod
    def from_sae(
        cls, sae, layer: int, features: Sequence[int] | torch.Tensor | None = None, skip_first: bool = False
    ) -> SlicedSAE:
        """Slice a sae-lens SAE (or anything with W_enc/W_dec/b_enc/b_dec[/threshold]) to `features`.

        features=None keeps every latent (a full-width plain-torch SAE, e.g. for redundancy scans).
        """
        arch = architecture_of(sae)
        n = sae.W_dec.shape[0]
        idx = torch.arange(n) if features is None else torch.as_tensor(features, dtype=torch.long).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise UserError(f"feature index out of range for the layer-{layer} SAE (width {n})")
        idx_d = idx.to(sae.W_dec.device)

        def take(t: torch.Tensor, dim: int) -> torch.Tensor:
            """A copy of t's entries at idx along dim. When every latent is kept, the whole tensor
            copied once: a gather over every index and then a copy took twice as long on a 65k-wide
            SAE. (Indexing, not index_select, which is ~500x slower on a column-major W_enc.)"""
            t = t.detach()
            if features is None:
                return t.clone(memory_format=torch.contiguous_format)
            return (t[:, idx_d] if dim == 1 else t[idx_d]).clone()

        with torch.no_grad():
            thr = getattr(sae, "threshold", None)
            topk = None
            if arch == "topk":
                topk = (sae.W_enc.detach().clone(), sae.b_enc.detach().clone(), int(sae.cfg.k))
            return cls(
                layer=layer,
                features=idx,
                W_enc=take(sae.W_enc, 1),
                b_enc=take(sae.b_enc, 0),
                W_dec=take(sae.W_dec, 0),
                b_dec=sae.b_dec.detach().clone(),
                threshold=None if (thr is None or arch != "jumprelu") else take(thr, 0),
                apply_b_dec_to_input=bool(getattr(sae.cfg, "apply_b_dec_to_input", False)),
                architecture=arch,
                topk_full=topk,
                skip_first=skip_first,
            )


def decoder_cosines(direction: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """cos(decoder row, direction) of every latent: W_dec [n, d], direction [d] → [n] on the CPU.

    Always over the whole decoder, computed where it lives (no copy of a 65k-wide decoder to the
    host): a product over a gathered subset of rows can round differently (its buffer's alignment
    picks the BLAS kernel), so every caller indexes this one vector. Zero rows get 0.
    """
    W = W_dec.detach().float()
    r = direction.detach().to(W.device, torch.float32)
    return ((W @ r) / (W.norm(dim=-1).clamp_min(1e-12) * r.norm().clamp_min(1e-12))).cpu()


def architecture_of(sae) -> str:
    cfg = getattr(sae, "cfg", None)
    arch = (
        cfg.architecture() if cfg is not None and callable(getattr(cfg, "architecture", None)) else "jumprelu"
    )
    if arch not in ("jumprelu", "standard", "topk"):
        raise UserError(
            f"SAE architecture '{arch}' is not supported; use a JumpReLU, ReLU (standard) or TopK SAE"
        )
    if arch == "topk" and getattr(cfg, "rescale_acts_by_decoder_norm", False):
        raise UserError(
            "TopK SAEs with rescale_acts_by_decoder_norm are not supported; fold the decoder norm first"
        )
    return arch


def hook_layer(sae) -> int | None:
    """The residual layer an SAE reads, from its sae-lens metadata (hook_name or hf_hook_name)."""
    meta = sae.cfg.metadata
    hook = getattr(meta, "hook_name", None) or ""
    m = _HOOK_RE.match(hook)
    if m:
        return int(m.group(1))
    hf = getattr(meta, "hf_hook_name", None) or ""
    m = re.match(r"^model\.layers\.(\d+)$", hf)
    return int(m.group(1)) if m else None


@dataclass
class LoadedSAEs:
    """SAEs by layer, with the config they came from."""

    cfg: SAEConfig
    saes: dict[int, Any]  # layer → sae_lens.SAE
    # Edits and reads leave each prompt's first token alone (resolved sae.skip_first_token)
    skip_first_token: bool = False

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    def __getitem__(self, layer: int):
        return self.saes[layer]

    def width(self, layer: int) -> int:
        return int(self.saes[layer].W_dec.shape[0])

    def slice(self, layer: int, features=None) -> SlicedSAE:
        return SlicedSAE.from_sae(self.saes[layer], layer, features, self.skip_first_token)

    def neuronpedia_url(self, layer: int, feature: int) -> str | None:
        """Neuronpedia page of a real SAE feature, None for the organism."""
        if not self.cfg.neuronpedia:
            return None
        return f"https://www.neuronpedia.org/{self.cfg.neuronpedia.format(layer=layer)}/{feature}"


def organism_sae_layers(organism_dir: Path) -> list[int]:
    """The layers an organism build trained an SAE for (its saes/layer_N folders)."""
    return sorted(int(p.name.removeprefix("layer_")) for p in (organism_dir / "saes").glob("layer_*"))


def _load_one(cfg: SAEConfig, layer: int, organism_dir: Path | None, device: str, dtype: str):
    from sae_lens import SAE

    if cfg.source == "organism":
        assert organism_dir is not None  # load_saes resolves it for source=organism
        path = organism_dir / "saes" / f"layer_{layer}"
        if not path.exists():
            have = organism_sae_layers(organism_dir)
            raise UserError(f"the organism has no SAE at layer {layer}; its SAEs are at layers {have}")
        return SAE.load_from_disk(str(path), device=device, dtype=dtype)
    if cfg.source == "disk":
        if not cfg.path:
            raise UserError("sae.source=disk needs sae.path, a folder template with {layer}")
        path = Path(cfg.path.format(layer=layer)).expanduser()
        if not (path / "cfg.json").exists():
            raise UserError(f"no sae-lens SAE at {path} (expected cfg.json + sae_weights.safetensors)")
        return SAE.load_from_disk(str(path), device=device, dtype=dtype)
    if not (cfg.release and cfg.sae_id):
        raise UserError("sae.source=pretrained needs sae.release and sae.sae_id (a template with {layer})")
    sae_id = cfg.sae_id.format(layer=layer)
    try:
        return SAE.from_pretrained(cfg.release, sae_id, device=device, dtype=dtype)
    except ValueError as err:
        raise UserError(
            f"sae-lens does not know SAE {cfg.release}/{sae_id}: {str(err).splitlines()[0]}"
        ) from None
    except OSError as err:
        raise UserError(
            f"SAE {cfg.release}/{sae_id} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(err).__name__}); on a machine with hub access run sae_lens.SAE.from_pretrained('{cfg.release}', "
            f"'{sae_id}') once, or save it with save_model and use sae=disk"
        ) from None


def load_saes(cfg: SAEConfig, model, organism_dir: Path | None = None) -> LoadedSAEs:
    """Load one SAE per configured layer and check it fits `model` (a LoadedModel). sae=organism
    reads `organism_dir`/saes, the folder of the organism `model` is (resolved by the caller)."""
    dtype = cfg.dtype or model.cfg.dtype
    if cfg.source == "organism":
        if model.cfg.source != "organism":
            raise UserError(
                "sae=organism only fits model=organism; pick the SAEs of your model (e.g. sae=gemma_scope_16k)"
            )
        if organism_dir is None:
            raise UserError(
                "sae=organism: load them through refusal_nnsight.load_saes, or give the organism's folder "
                "(refusal_nnsight.organism.resolve.organism_root)"
            )
    if cfg.layers is not None:
        layers = list(cfg.layers)
    elif cfg.source == "organism":  # every layer the build trained an SAE for
        assert organism_dir is not None
        layers = organism_sae_layers(organism_dir)
    else:
        layers = list(range(model.n_layers))
    if not layers:
        raise UserError("sae.layers is empty; give at least one layer")
    for layer in layers:
        if not 0 <= layer < model.n_layers:
            raise UserError(
                f"layer {layer} is out of range: model '{model.cfg.name}' has layers 0..{model.n_layers - 1}"
            )
    saes = {}
    for layer in layers:
        sae = _load_one(cfg, layer, organism_dir, str(model.device), dtype).eval()
        check_sae(sae, layer, model)
        saes[layer] = sae
    return LoadedSAEs(cfg, saes, skip_first_token(cfg, organism_dir))


def skip_first_token(cfg: SAEConfig, organism_dir: Path | None) -> bool:
    """sae.skip_first_token, or (null) what the SAEs were trained on.

    A tuned build's SAEs never saw a prompt's first token: it is an attention sink whose residual
    is ~150 times the others' (Sun et al. 2024, arXiv 2402.17762), and on it such an SAE fires
    ~1000 latents at up to ~30 times their usual size. Scaling those by c would wreck the sink and
    "jailbreak" by breaking the model. Every other SAE edits every position, as arXiv 2509.09708 does.
    """
    if cfg.skip_first_token is not None:
        return cfg.skip_first_token
    if cfg.source != "organism" or organism_dir is None:
        return False
    manifest = organism_dir / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("kind") == "tuned"


def check_sae(sae, layer: int, model) -> None:
    """Width, hook and normalisation checks; each failure is one UserError line."""
    d_in = int(sae.W_enc.shape[0])
    if d_in != model.d_model:
        raise UserError(
            f"the layer-{layer} SAE has d_in={d_in} but the model's d_model is {model.d_model}; use the SAEs of this model"
        )
    read = hook_layer(sae)
    if read is None:
        hook = sae.cfg.metadata.hook_name
        raise UserError(
            f"the layer-{layer} SAE hooks '{hook}', which is not a residual-stream output (blocks.L.hook_resid_post)"
        )
    if not 0 <= read < model.n_layers:
        raise UserError(
            f"the SAE hook module model.layers.{read} does not exist (model has {model.n_layers} layers); "
            "use SAEs trained on this model"
        )
    if read != layer:
        raise UserError(
            f"the SAE configured for layer {layer} reads layer {read} (hook {sae.cfg.metadata.hook_name})"
        )
    norm = getattr(sae.cfg, "normalize_activations", "none") or "none"
    if norm != "none":
        raise UserError(
            f"the layer-{layer} SAE expects normalize_activations='{norm}'; fold the scale into its weights first"
        )
    architecture_of(sae)
