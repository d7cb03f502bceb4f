"""The smoke run on the shipped small organism reproduces a checked-in summary.json (timings
aside), so drift across machines or library versions is caught, not discovered in a paper."""

from __future__ import annotations

import json
import math
from pathlib import Path

EXPECTED = Path(__file__).parent / "expected" / "smoke_summary.json"


# The held-out R² of a fit is held to this, relative. The smoke run's FM (256 masks of one prompt,
# 150 epochs, still improving at the last) amplifies last-bit differences in the refusal scores it
# is fit to. At c = -3, on one AVX2 AMD EPYC, its R² was 0.62172 with torch's AVX2 kernels, 0.62173
# with its baseline ones (ATEN_CPU_CAPABILITY=default) and 0.62202 with MKL's compatible path
# (MKL_CBWR=COMPATIBLE), against 0.62310 on an AVX-512 machine (2.2e-3 relative); the default run's
# FM on the default organism moved as much (0.78562, 0.78690, 0.78665), its accuracies not at all.
# The file now holds that AVX2 machine's run at c = -1 (R² 0.76270; 0.76258 with the baseline kernels).
R2_REL_TOL = 1e-2


def _diff(got, want, where: str = "") -> list[str]:
    """Paths where got and want differ; floats to 1e-3 relative: CPU kernels differ in the last bits
    from one instruction set to another, and a score change over many forwards amplifies that
    (~1e-5 between an AVX-512 machine and the one that wrote the file, 1.6e-4 on the direction's
    induce score on an AVX2 AMD EPYC); a held-out R² to R2_REL_TOL. Counts, sets and verdicts must
    still be equal."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in want if k not in got]
        out += [f"{where}.{k}: unexpected" for k in got if k not in want]
        return out + [d for k in want if k in got for d in _diff(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, float) and isinstance(got, float):
        rel = R2_REL_TOL if where.endswith("r2") else 1e-3
        return [] if math.isclose(got, want, rel_tol=rel, abs_tol=1e-9) else [f"{where}: {got} != {want}"]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [
            d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _diff(g, w, f"{where}[{i}]")
        ]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def test_smoke_summary_equals_the_checked_in_one(smoke_run):
    _, _, summary = smoke_run
    got = {k: v for k, v in summary.items() if k != "timing"}
    want = json.loads(EXPECTED.read_text())
    assert not _diff(got, want), "\n".join(_diff(got, want)[:20])


def test_the_comparison_catches_a_changed_figure():
    want = {"greedy": {"median": 1.0, "n": 3, "sets": ["L0/F1"]}}
    assert not _diff(json.loads(json.dumps(want)), want)
    assert _diff({"greedy": {"median": 1.01, "n": 3, "sets": ["L0/F1"]}}, want)
    assert _diff({"greedy": {"median": 1.0, "n": 3, "sets": ["L0/F2"]}}, want)
    assert _diff({"greedy": {"median": 1.0, "n": 3}}, want)
    r2 = {"fm": {"heldout_r2": 0.6231, "heldout_accuracy": 0.9}}
    assert not _diff({"fm": {"heldout_r2": 0.6217, "heldout_accuracy": 0.9}}, r2)  # a fit's R², to 1e-2
    assert _diff({"fm": {"heldout_r2": 0.60, "heldout_accuracy": 0.9}}, r2)
    assert _diff({"fm": {"heldout_r2": 0.6231, "heldout_accuracy": 0.902}}, r2)  # anything else, to 1e-3
