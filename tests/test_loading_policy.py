"""Only safetensors, JSON and Parquet are read back; any torch.load uses weights_only=True;
trust_remote_code stays off unless a config asks for it."""

from __future__ import annotations

import re
from pathlib import Path

from refusal_nnsight.cli import compose

SOURCES = sorted((Path(__file__).resolve().parent.parent / "refusal_nnsight").rglob("*.py"))


def test_no_pickle_and_torch_load_only_with_weights_only():
    assert SOURCES
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|joblib|dill)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path


def test_trust_remote_code_is_off_in_every_model_config():
    for name in ("organism", "gemma2_2b_it", "llama31_8b_it"):
        assert compose([f"model={name}"]).model.trust_remote_code is False
