"""Fuzz the ONNX import: a small ONNX MoE decoder (tests/test_onnx.py's builder) with flipped bytes,
truncation, mutated initializer shapes and mutated config.json values. Property: edgemoe.store.convert
either writes a store or raises EdgeMoEError; nothing else escapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgemoe
from edgemoe.store.convert import convert
from edgemoe.testing import synth

from .conftest import examples

onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.timeout(300)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seed_onnx(tmp_path_factory) -> Path:
    import test_onnx

    d = tmp_path_factory.mktemp("onnxseed")
    return test_onnx.build_onnx(synth.SynthSpec.tiny("qwen3moe"), d / "model.onnx")


def _attempt(model_dir: Path, out: Path) -> None:
    try:
        convert(model_dir / "model.onnx", out, progress=False)
    except edgemoe.EdgeMoEError:
        return
    assert (out / "manifest.json").is_file()


def _copy(seed: Path, tmp: Path) -> Path:
    d = tmp / "m"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(seed.parent, d)
    for p in tmp.glob("out*"):
        shutil.rmtree(p, ignore_errors=True)
    return d


@settings(max_examples=examples(25), **SETTINGS)
@given(data=st.data())
def test_mutated_bytes(seed_onnx, tmp_path, data):
    d = _copy(seed_onnx, tmp_path)
    raw = bytearray((d / "model.onnx").read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    (d / "model.onnx").write_bytes(bytes(raw))
    _attempt(d, tmp_path / "out")


@settings(max_examples=examples(25), **SETTINGS)
@given(data=st.data())
def test_mutated_shapes_and_config(seed_onnx, tmp_path, data):
    d = _copy(seed_onnx, tmp_path)
    model = onnx.load(str(d / "model.onnx"))
    inits = list(model.graph.initializer)
    t = inits[data.draw(st.integers(0, len(inits) - 1), label="initializer")]
    if t.dims and data.draw(st.booleans(), label="reshape"):
        k = data.draw(st.integers(0, len(t.dims) - 1), label="dim")
        t.dims[k] = data.draw(st.sampled_from([0, 1, t.dims[k] + 1, 2 * t.dims[k], 2**31 - 1]), label="to")
    onnx.save(model, str(d / "model.onnx"))
    cfg = json.loads((d / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(cfg)), label="config key")
    cfg[key] = data.draw(st.sampled_from([cfg[key], None, 0, -1, 3, 2**40, "x", [], 1.5]), label="value")
    (d / "config.json").write_text(json.dumps(cfg))
    _attempt(d, tmp_path / "out")
