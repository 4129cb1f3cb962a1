"""Seeds for the fuzzers: a tiny GGUF model and its expert store, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgemoe.testing import synth

SEEDS = Path(__file__).resolve().parent / "seeds"
# The bounded runs in the normal suite; tools/fuzz_long.py sets EDGEMOE_FUZZ_EXAMPLES much higher.
EXAMPLES = int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "0")) or None


def examples(default: int) -> int:
    return EXAMPLES or default


@pytest.fixture(scope="session")
def seed_gguf(tmp_path_factory) -> Path:
    return synth.write_model(synth.SynthSpec.tiny("qwen3moe"), tmp_path_factory.mktemp("seed") / "tiny.gguf")


@pytest.fixture(scope="session")
def seed_store(seed_gguf, tmp_path_factory) -> Path:
    from edgemoe.store.convert import convert

    return convert(seed_gguf, tmp_path_factory.mktemp("seedstore") / "tiny.edgemoe", progress=False)
