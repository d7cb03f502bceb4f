"""Greedy generation under an intervention that reaches every generated token."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import nnsight
import torch

from . import interventions
from .backends import run_chunks, run_tasks
from .interventions import Edit
from .models import Batch, LoadedModel


def generate(
    model: LoadedModel,
    prompts: Batch | Sequence[str],
    edits: Sequence[Edit] = (),
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    progress: str | None = None,
) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of each prompt under `edits`.

    Edits apply on the prompt forward and on every decoding step (`tracer.all()`); positions
    such as "bos" or eoi offsets exist only in the prompt forward.
    """
    batch = prompts if isinstance(prompts, Batch) else model.tokenize(list(prompts))
    n, one = _generate_task(model, batch, edits, max_new_tokens or model.cfg.max_new_tokens)
    return _decode(model, run_chunks(model, n, batch_size, one, progress))


def generate_many(
    model: LoadedModel,
    requests: Sequence[tuple[Batch, Sequence[Edit]]],
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> list[list[str]]:
    """generate() of each (batch, edits) request; on a remote backend all requests are ONE job."""
    max_new = max_new_tokens or model.cfg.max_new_tokens
    outs = run_tasks(model, [_generate_task(model, b, e, max_new) for b, e in requests], batch_size)
    return [_decode(model, parts) for parts in outs]


def _decode(model: LoadedModel, parts: list[torch.Tensor]) -> list[str]:
    tok = model.tokenizer
    return [text for ids in parts for text in tok.batch_decode(ids.cpu(), skip_special_tokens=True)]


def _generate_task(model: LoadedModel, batch: Batch, edits: Sequence[Edit], max_new: int):
    """(n rows, fn(i0, i1) → the chunk's new token ids): one generate trace per chunk."""

    def one(i0: int, i1: int) -> torch.Tensor:
        chunk = batch.rows(i0, i1)
        with warnings.catch_warnings(), torch.no_grad():
            # An open tracer.all() loop ends by nnsight's "was never reached" warning, by design.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            ids = _generate_chunk(model, chunk, interventions.rows(edits, i0, i1), max_new)
        return ids[:, chunk.input_ids.shape[1] :]  # the new tokens; decoded here, not where the model is

    return len(batch), one


def _generate_chunk(model: LoadedModel, chunk: Batch, edits: Sequence[Edit], max_new: int) -> torch.Tensor:
    inputs = chunk.model_inputs(model.device)
    inputs.pop("position_ids")  # generate derives positions from the attention mask itself
    with model.lm.generate(
        max_new_tokens=max_new, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
    ) as tracer:
        with tracer.invoke(**inputs):
            if edits:
                for step in tracer.all():
                    interventions.apply(model, edits, chunk.attention_mask, step=step)
        with tracer.invoke():
            ids = nnsight.save(tracer.result)
    return ids
