"""The search cores of stage 2 (greedy), free of any model: pure generators driven by a score function.

Each core yields batched requests (masks [V, F] bool over the candidate pool) and is sent the
answers [V]: "flip" requests get the flip criterion's margin (< 0 where the variant flips, i.e.
the model stops refusing), "score" requests the refusal score. `drive` answers them with one
function, as the tests' planted oracles do; `greedy.run` drives every prompt's search in
lock-step and answers each round with the ablation engine.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch

from ..engine import Feature
from ..errors import NonFiniteError

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # masks [V, F] bool → refusal scores [V]
Step = dict  # one trajectory entry: step, action, index (pool column), score, size
# The search cores are generators: they yield a request ("flip", masks [V, F]) — the flip
# criterion's margin, < 0 where the variant flips — or ("score", masks [V, F]) — the refusal score —
# and are sent the answer [V]. `drive` answers both with one function (the tests' planted oracles);
# greedy.run answers the next request of every prompt together (one NDIF job).
Request = tuple[str, torch.Tensor]
Steps = Generator[Request, torch.Tensor, Any]


def label(feature: Feature) -> str:
    """(layer, latent) → "L{layer}/F{latent}", the feature's name in every table."""
    return f"L{feature[0]}/F{feature[1]}"


def _ask(masks: torch.Tensor, kind: str = "flip") -> Generator[Request, torch.Tensor, list[float]]:
    """Request the flip margins (or kind="score": refusal scores) of `masks` [V, F]; check and
    return them as floats."""
    s = yield (kind, masks.bool())
    if s.shape != (masks.shape[0],):
        raise ValueError(f"score function returned shape {tuple(s.shape)} for {masks.shape[0]} masks")
    if not torch.isfinite(s).all():
        raise NonFiniteError("non-finite refusal score under an ablation mask")
    return [float(v) for v in s.tolist()]


def drive(steps: Steps, score: ScoreFn):
    """Run a search core to its end, answering each flip and score request with `score`."""
    try:
        kind, payload = next(steps)
        while True:
            if kind not in ("flip", "score"):
                raise ValueError(f"drive() answers flip and score requests only, got {kind!r}")
            kind, payload = steps.send(score(payload))
    except StopIteration as done:
        return done.value


def backward_minimal(
    score: ScoreFn, start: torch.Tensor, order: Sequence[int], max_passes: int = 10
) -> tuple[torch.Tensor, list[Step]]:
    """backward_minimal_steps answered by `score` (see there)."""
    return drive(backward_minimal_steps(start, order, max_passes), score)


def verify_one_minimal(score: ScoreFn, mask: torch.Tensor) -> bool:
    """verify_one_minimal_steps answered by `score`."""
    return drive(verify_one_minimal_steps(mask), score)


def forward_greedy(score: ScoreFn, pool_mask: torch.Tensor) -> tuple[torch.Tensor, list[Step]]:
    """forward_greedy_steps answered by `score`."""
    return drive(forward_greedy_steps(pool_mask), score)


def effect_order(score: ScoreFn, start: torch.Tensor) -> tuple[list[int], list[float], float]:
    """effect_order_steps answered by `score`."""
    return drive(effect_order_steps(start), score)


def backward_minimal_steps(
    start: torch.Tensor, order: Sequence[int], max_passes: int = 10
) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, list[Step]]]:
    """Backward elimination from the ablated set `start` [F] bool, trying features in `order`.

    Sequential semantics: for f in order, drop f if (current set ∖ {f}) still flips (margin < 0).
    Batched by speculation: one score call evaluates the cumulative removals of the next features
    (cur∖{t0}, cur∖{t0,t1}, …); every prefix that still jailbreaks is exactly the state the
    sequential loop would reach, so all of them up to the first failure are dropped, the failing
    feature is kept, and the next call speculates from the feature after it. A pass costs
    (#kept + 1) calls instead of one per feature. Passes repeat until one drops nothing (at most
    `max_passes`): ablation effects are not monotone, and a feature kept early can become
    removable later; a pass that drops nothing has tested every kept feature against the final
    set, which is what makes M 1-minimal (checked in one call of all single
    removals after each pass that dropped something). Start features missing from `order` are tried last.
    Returns (M [F] bool, trajectory); if `start` itself does not jailbreak, M = start.
    """
    cur = start.clone().bool().flatten()
    seq = [i for i in dict.fromkeys([*order, *range(cur.numel())]) if cur[i]]
    s0 = (yield from _ask(cur[None]))[0]
    traj: list[Step] = [{"step": 0, "action": "start", "index": None, "score": s0, "size": int(cur.sum())}]
    if s0 >= 0:
        return cur, traj
    step = 0
    for _ in range(max_passes):
        todo = [i for i in seq if cur[i]]
        dropped = False
        while todo:
            variants = cur.repeat(len(todo), 1)
            for k, i in enumerate(todo):  # row k: cur without todo[0..k]
                variants[k:, i] = False
            s = yield from _ask(variants)
            step += 1
            fail = next((k for k, v in enumerate(s) if v >= 0), None)
            n_drop = len(todo) if fail is None else fail
            for k in range(n_drop):
                cur[todo[k]] = False
                traj.append(
                    {
                        "step": step,
                        "action": "remove",
                        "index": todo[k],
                        "score": s[k],
                        "size": int(cur.sum()),
                    }
                )
            dropped = dropped or n_drop > 0
            if fail is None:
                break
            traj.append(
                {
                    "step": step,
                    "action": "keep",
                    "index": todo[fail],
                    "score": s[fail],
                    "size": int(cur.sum()),
                }
            )
            todo = todo[fail + 1 :]
        if not dropped:
            break
        # Converged if no single removal from the new set jailbreaks: one call instead of a pass.
        kept = cur.nonzero().flatten()
        singles = cur.repeat(len(kept), 1)
        singles[torch.arange(len(kept)), kept] = False
        if len(kept) == 0 or all(v >= 0 for v in (yield from _ask(singles))):
            break
    return cur, traj


def verify_one_minimal_steps(mask: torch.Tensor) -> Generator[Request, torch.Tensor, bool]:
    """M flips (margin < 0) and restoring any one of its features (ablating M ∖ {f}) gives margin ≥ 0.

    One batched call: M itself plus its |M| one-feature restorations.
    """
    mask = mask.bool().flatten()
    idx = mask.nonzero().flatten()
    variants = mask.repeat(len(idx) + 1, 1)
    variants[torch.arange(1, len(idx) + 1), idx] = False
    s = yield from _ask(variants)
    return s[0] < 0 and all(v >= 0 for v in s[1:])


def forward_greedy_steps(
    pool_mask: torch.Tensor,
) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, list[Step]]]:
    """Forward greedy over `pool_mask` [F] bool: add the feature that lowers the margin most until it flips.

    One batched call per step (every one-feature extension of the current set; the empty set
    rides along in the first). Stops when s < 0 or the pool is exhausted; the caller reads the
    last trajectory score to see whether it jailbroke. Returns (mask [F] bool, trajectory).
    """
    avail = pool_mask.clone().bool().flatten()
    cur = torch.zeros_like(avail)
    traj: list[Step] = []
    step = 0
    while avail.any():
        idx = avail.nonzero().flatten()
        variants = cur.repeat(len(idx), 1)
        variants[torch.arange(len(idx)), idx] = True
        if not traj:
            s = yield from _ask(torch.cat([cur[None], variants]))
            traj.append({"step": 0, "action": "start", "index": None, "score": s[0], "size": 0})
            if s[0] < 0:
                return cur, traj
            s = s[1:]
        else:
            s = yield from _ask(variants)
        step += 1
        k = min(range(len(s)), key=lambda j: (s[j], j))  # ties → lowest pool column
        cur[idx[k]], avail[idx[k]] = True, False
        traj.append(
            {"step": step, "action": "add", "index": int(idx[k]), "score": s[k], "size": int(cur.sum())}
        )
        if s[k] < 0:
            break
    return cur, traj


def effect_order_steps(
    start: torch.Tensor,
) -> Generator[Request, torch.Tensor, tuple[list[int], list[float], float]]:
    """Order for removal: least single-feature effect first (the strongest is kept longest).

    effect_i = s(nothing ablated) − s(only i ablated), one batched call. Returns (order over the
    start features, effects [F] with NaN outside start, the clean score s(nothing ablated)).
    """
    start = start.bool().flatten()
    idx = start.nonzero().flatten().tolist()
    masks = torch.zeros(len(idx) + 1, start.numel(), dtype=torch.bool)
    masks[torch.arange(1, len(idx) + 1), torch.tensor(idx, dtype=torch.long)] = True
    s = yield from _ask(masks, "score")
    effects = [float("nan")] * start.numel()
    for k, i in enumerate(idx):
        effects[i] = s[0] - s[k + 1]
    return sorted(idx, key=lambda i: (effects[i], i)), effects, s[0]
