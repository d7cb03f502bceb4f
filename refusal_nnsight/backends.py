"""Where the traces run: this machine (`local`), NDIF (`ndif`), or NDIF's request path checked
in-process (`ndif_check`).

Every forward pass of every stage goes through `run_chunks(model, n, batch_size, fn)`, where
`fn(i0, i1)` is one nnsight trace over rows i0..i1 that returns saved values:

* local — one trace per chunk, the chunk halved and retried on out-of-memory, a progress bar.
* ndif — all the chunks of one call (one stage step: "score these prompts under this edit",
  "these 64 ablation variants of one prompt", "generate these completions") go into ONE
  `model.session(remote=True)` job: one queue wait, one upload of the sliced SAEs. The client
  model is built on the meta device from its repo id; the session body runs on the server, so
  `LoadedModel.device` resolves to the server's device there. The toolkit's modules are
  registered with `nnsight.register` (an installed package is not shipped otherwise), SAEs travel
  as `SlicedSAE`s holding only the features a step edits, and the key comes from `NDIF_API_KEY`
  or nnsight's own config — it is read by nnsight and never written by the toolkit.
* ndif_check — the same sessions, through nnsight's real client serialization
  (`RemoteBackend._serialize`, `finalize`), deserialized in-process while an import blocker
  refuses every package the NDIF server lacks (nnsight's `remote="local"` alone misses
  helpers of installed packages). The client model is a meta model, exactly as with
  NDIF; the "server" holds the real weights. The pipeline's summary equals the local one.
"""

from __future__ import annotations

import importlib.abc
import io
import linecache
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import BackendConfig, ModelConfig
from .errors import UserError

log = logging.getLogger(__name__)

# What an NDIF server has installed that a request may import (its published environment), plus
# the libraries those import while unpickling; everything else must travel by value.
SERVER_PACKAGES = frozenset({
    "torch", "numpy", "transformers", "accelerate", "einops", "nnsight", "peft", "huggingface_hub",
    "tokenizers", "safetensors", "greenlet", "cloudpickle", "zstandard", "pydantic", "yaml",
    "typing_extensions",
})  # fmt: skip


# ---------------------------------------------------------------------------------- chunks


# How an allocation failure reads: CUDA's OutOfMemoryError, torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory", c10/core/impl/alloc_cpu.cpp), an NDIF job's
# error text, or Python's MemoryError.
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(err: BaseException | None) -> bool:
    """Out of memory on the accelerator or the CPU, however nnsight (or an NDIF job) wrapped it."""
    while err is not None:
        text = str(err).lower()
        if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(t in text for t in _OOM_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _too_big(where: str) -> UserError:
    return UserError(
        f"out of memory {where} even at batch size 1; shorten the prompts (data.max_tokens), "
        "use fewer SAE layers (sae.layers), or a machine with more memory"
    )


def map_chunks(
    n: int, batch_size: int, fn: Callable[[int, int], object], progress: str | None = None
) -> list:
    """[fn(i0, i1) for consecutive row chunks], halving the chunk size on out-of-memory and
    retrying instead of failing (the pipeline's many-variant forwards size themselves)."""
    out: list = []
    i0, size = 0, max(1, batch_size)
    quiet = progress is None or bool(os.environ.get("TQDM_DISABLE"))  # as tqdm's own default does
    with tqdm(total=n, desc=progress, disable=quiet, leave=False) as bar:
        while i0 < n:
            i1 = min(i0 + size, n)
            try:
                out.append(fn(i0, i1))
            except Exception as err:
                if not is_oom(err):
                    raise
                if size == 1:
                    raise _too_big("on this machine") from None
                size = max(1, size // 2)
                log.warning("out of memory at batch size %d; retrying with %d", i1 - i0, size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            bar.update(i1 - i0)
            i0 = i1
    return out


def run_chunks(
    model, n: int, batch_size: int, fn: Callable[[int, int], object], progress: str | None = None
) -> list:
    """[fn(i0, i1) per chunk of ≤ batch_size rows], where fn runs one trace: locally chunk by
    chunk, remotely as one session job (resubmitted at half the chunk size on out-of-memory)."""
    return run_tasks(model, [(n, fn)], batch_size, progress)[0]


def run_tasks(
    model,
    tasks: Sequence[tuple[int, Callable[[int, int], object]]],
    batch_size: int,
    progress: str | None = None,
) -> list[list]:
    """run_chunks for several (n, fn) tasks at once: locally one after another (each chunked as
    run_chunks does), remotely ALL in one session job — e.g. the next greedy step of every prompt."""
    remote: Remote | None = model.remote
    if remote is None:
        return [map_chunks(n, batch_size, fn, progress) for n, fn in tasks]
    size = max(1, batch_size)
    while True:
        spans = [(t, i0, min(i0 + size, n)) for t, (n, _) in enumerate(tasks) for i0 in range(0, n, size)]
        try:
            outs = remote.job(model, spans, [fn for _, fn in tasks], progress)
        except UserError:
            raise
        except Exception as err:
            if is_oom(err) and size == 1:
                raise _too_big(f"in the {remote.kind} job") from None
            if not is_oom(err):
                raise remote.failure(err) from None
            size = max(1, size // 2)
            log.warning("%s job out of memory; resubmitting with batch size %d", remote.kind, size)
            continue
        per_task: list[list] = [[] for _ in tasks]
        for (t, _, _), out in zip(spans, outs, strict=True):
            per_task[t].append(out)
        return per_task


def _session_job(model, spans: list[tuple[int, int, int]], fns: list, backend) -> list:
    """One session: the loop below runs where the model is (the body is shipped as source)."""
    import nnsight

    with model.lm.session(backend=backend):
        outs = list()
        for t, i0, i1 in spans:
            outs.append(fns[t](i0, i1))
        outs = nnsight.save(outs)
    return outs


# ---------------------------------------------------------------------------------- remote


@dataclass
class Remote:
    """A remote target: makes one nnsight backend per job and counts what was sent."""

    kind: str  # ndif | ndif_check
    make_backend: Callable[[], object]
    jobs: int = 0
    payload_bytes: int = 0

    def job(self, model, spans, fns, progress: str | None) -> list:
        backend = self.make_backend()
        if progress:
            log.info("%s job: %s (%d chunks)", self.kind, progress, len(spans))
        with torch.no_grad():
            outs = _session_job(model, spans, fns, backend)
        self.jobs += 1
        self.payload_bytes += int(getattr(backend, "payload_bytes", 0) or 0)
        return outs

    def failure(self, err: BaseException) -> UserError:
        """A failed job as one line: the server's last error line, not its traceback (which goes
        to the log at debug level: `hydra.verbose=refusal_nnsight`)."""
        log.debug("%s job failed", self.kind, exc_info=err)
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else type(err).__name__
        if self.kind == "ndif_check":
            return UserError(f"the ndif_check job failed on the mock server: {last}")
        return UserError(f"the NDIF job failed ({type(err).__name__}): {last}")


def shipped_modules() -> None:
    """Register the toolkit for by-value pickling: an installed package's helpers are pickled by
    reference otherwise, and the server cannot import them."""
    import nnsight

    nnsight.register("refusal_nnsight")


def in_process_ndif(server_lm):
    """nnsight's RemoteBackend with its network step replaced by an in-process strict server.

    `_serialize` and `finalize` are nnsight's own (what NDIF receives and what the client
    unpacks); deserialization runs with every non-server module hidden from `sys.modules` and an
    import blocker in place, so a helper that was not registered fails here as it would on NDIF.
    """
    from nnsight.intervention.backends.remote import RemoteBackend

    class InProcessNDIF(RemoteBackend):
        def __init__(self):
            super().__init__("mock:{}", host="http://mock.invalid")  # a real key queries the Hub
            self.payload_bytes = 0

        def request(self, request, tracer):
            blob = self._serialize(tracer)
            self.payload_bytes = len(blob)
            # deserialize() writes the block's source into linecache under the caller's file
            # name; in-process that would clobber the real file: snapshot and restore it.
            fname = tracer.info.frame.f_code.co_filename
            saved = linecache.cache.get(fname)
            try:
                srv = _strict_deserialize(blob, server_lm, self.compress)
            finally:
                if saved is not None:
                    linecache.cache[fname] = saved
                else:
                    linecache.cache.pop(fname, None)
            return self.finalize(_execute(srv, self.compress))

    return InProcessNDIF()


def _strict_deserialize(blob: bytes, server_lm, compress: bool):
    from cloudpickle import cloudpickle as cloudpickle_impl
    from nnsight.schema.request import RequestModel

    def allowed(name: str) -> bool:
        root = name.split(".")[0]
        return root in SERVER_PACKAGES or root in sys.stdlib_module_names

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if allowed(name):
                return None
            raise ModuleNotFoundError(f"[ndif_check] {name!r} is not installed on the NDIF server")

    persistent = server_lm._remoteable_persistent_objects()
    hidden = {n: m for n, m in sys.modules.items() if not allowed(n) and n != "__main__"}
    for name in hidden:
        del sys.modules[name]
    blocker = Block()
    sys.meta_path.insert(0, blocker)
    # A server is another process: classes shipped by value are rebuilt there. In-process,
    # cloudpickle would find the client's own class by its tracker id and overwrite its methods
    # with the shipped copies; rebuild them as fresh classes instead.
    track = cloudpickle_impl._lookup_class_or_track
    cloudpickle_impl._lookup_class_or_track = lambda tracker_id, class_def: class_def
    try:
        return RequestModel.deserialize(blob, persistent, compress=compress)
    finally:
        cloudpickle_impl._lookup_class_or_track = track
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


def _execute(srv, compress: bool) -> bytes:
    """Run the deserialized request and pack its saves as the server does (torch.save, zstd)."""
    from nnsight.tracing import tracer as _t

    _t.inc()
    try:
        srv.execute(srv.info.code)
        saves = _t._saves()
        result = {k: v for k, v in srv.info.frame.f_locals.items() if id(v) in saves}
    finally:
        _t.dec()
    buf = io.BytesIO()
    torch.save(result, buf)
    data = buf.getvalue()
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    return data


# ---------------------------------------------------------------------------------- loading


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` (a proxy is trusted to work)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub(mcfg: ModelConfig) -> None:
    """A hub model that is neither cached nor downloadable fails at once, in one line (the hub
    client would retry its connection for most of a minute first). Cached but offline: the
    cache is used without asking the hub (HF_HUB_OFFLINE for this process)."""
    from pathlib import Path

    import huggingface_hub.constants as hub
    from huggingface_hub import try_to_load_from_cache

    repo = mcfg.repo_id
    if mcfg.source != "hf" or not repo or Path(repo).expanduser().is_dir():
        return
    cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    if hub.HF_HUB_OFFLINE:
        online = False
    else:
        online = _hub_reachable(hub.ENDPOINT)
        if not online and cached:
            log.info("the hub (%s) is unreachable; loading %s from the local cache", hub.ENDPOINT, repo)
            hub.HF_HUB_OFFLINE = True
    if not cached and not online:
        why = "HF_HUB_OFFLINE is set" if hub.HF_HUB_OFFLINE else f"{hub.ENDPOINT} is unreachable"
        raise UserError(
            f"model '{repo}' is not in the local Hugging Face cache and {why}; on a machine with hub access run "
            f"`hf download {repo}` (gated: accept the licence, set HF_TOKEN), then copy the cache here or point HF_HOME at it"
        )


def load_model(mcfg: ModelConfig, bcfg: BackendConfig, path: str | Path | None = None):
    """The LoadedModel of `mcfg` on backend `bcfg`: local weights (from `path`, a local folder such
    as the organism's, or mcfg.repo_id), or a meta model for NDIF."""
    from .models import load_model as load_local

    if bcfg.name != "ndif":  # NDIF's own checks (key, host, model) come first there
        check_hub(mcfg)
    if bcfg.name == "local":
        return load_local(mcfg, path)
    if bcfg.name == "ndif_check":
        return _load_ndif_check(mcfg, path)
    if bcfg.name == "ndif":
        return _load_ndif(mcfg, bcfg)
    raise UserError(f"unknown backend '{bcfg.name}'; choose local, ndif or ndif_check")


def _meta_model(path_or_repo: str, mcfg: ModelConfig):
    """An nnsight TransformersModel on the meta device: config and tokenizer, no weights."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from .models import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(path_or_repo, trust_remote_code=mcfg.trust_remote_code)
    return TransformersModel(
        path_or_repo,
        tokenizer=tokenizer,
        task="text-generation",  # a local path cannot be asked for its task
        dispatch=False,
        dtype=DTYPES[mcfg.dtype],
        trust_remote_code=mcfg.trust_remote_code,
        **({"attn_implementation": mcfg.attn_implementation} if mcfg.attn_implementation else {}),
    )


def _load_ndif_check(mcfg: ModelConfig, path: str | Path | None = None):
    from .models import load_hf, wrap_lm, wrap_model

    hf_model, tokenizer = load_hf(mcfg, path)
    server = wrap_model(hf_model, tokenizer, mcfg)  # the "server": real weights, this process
    client = wrap_lm(_meta_model(str(server.lm._module.name_or_path), mcfg), mcfg)
    shipped_modules()
    client.remote = Remote("ndif_check", lambda: in_process_ndif(server.lm))
    return client


def _load_ndif(mcfg: ModelConfig, bcfg: BackendConfig):
    from nnsight import CONFIG

    from .models import _hf_missing, wrap_lm

    if mcfg.source != "hf" or not mcfg.repo_id:
        raise UserError(
            f"backend=ndif runs models NDIF hosts, named by a hub repo id; model '{mcfg.name}' has none "
            "(use backend=ndif_check to check the remote path on the organism)"
        )
    if bcfg.host:
        CONFIG.API.HOST = bcfg.host
    if not CONFIG.API.APIKEY:
        raise UserError(
            "no NDIF API key: set NDIF_API_KEY or run `python -c 'import nnsight; nnsight.login()'` "
            "(the key is never read from, or written to, the toolkit's configs)"
        )
    _check_running(mcfg.repo_id, CONFIG.API.HOST)
    check_hub(mcfg)  # the meta model still needs the config and tokenizer from the hub
    try:
        lm = _meta_model(mcfg.repo_id, mcfg)
    except (OSError, ValueError) as err:
        raise _hf_missing(mcfg.repo_id, err) from None
    model = wrap_lm(lm, mcfg)
    shipped_modules()
    model.remote = Remote("ndif", lambda: lm._remote_backend(True, blocking=True, job_id=None, verbose=False))
    return model


def _check_running(repo_id: str, host: str) -> None:
    """Fail in one line, before any job, when NDIF is unreachable or does not run the model."""
    import nnsight
    from nnsight import ndif

    try:
        ndif._get("/status", timeout=(5.0, 15.0))
    except Exception as err:
        raise UserError(
            f"cannot reach NDIF at {host} ({type(err).__name__}); check NDIF_HOST and the network"
        ) from None
    try:
        running = nnsight.is_model_running(repo_id)
    except Exception as err:
        raise UserError(
            f"could not check whether NDIF runs '{repo_id}' ({type(err).__name__}: {err})"
        ) from None
    if not running:
        raise UserError(
            f"NDIF at {host} is not running '{repo_id}' now; see `python -c 'import nnsight; print(nnsight.status())'` "
            "or run locally with backend=local"
        )
