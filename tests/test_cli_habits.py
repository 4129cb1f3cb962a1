"""Habits llama.cpp and Ollama users bring to the CLI (issue 17): --version, -c/-n spellings, info with
-m or no model, a one-line option error with a hint, the training-context warning, calibrate on
the bundled model."""

from __future__ import annotations

import json

import pytest
from conftest import edgemoe_cli as cli

import edgemoe
from edgemoe.api import bundled_model_path
from edgemoe.cli import build_parser
from edgemoe.devices.bench import _parser as bench_parser


def test_version():
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"edgemoe {edgemoe.__version__}"


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["run", "--ctx", "x", "hi"], "edgemoe run --help"),
        (["run", "--no-such-option", "hi"], "edgemoe run --help"),
        ([], "edgemoe --help"),
        (["chat", "--top-k", "many"], "edgemoe chat --help"),
        (["bench", "m.gguf", "--profile", "p", "--decode-tokens", "x"], "edgemoe bench --help"),
    ],
)
def test_an_option_error_is_one_line_with_a_hint(argv, hint):
    p = cli(*argv)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "usage:" not in p.stderr, p.stderr
    assert p.stderr.startswith("edgemoe: error: ") and f"(see `{hint}`)" in p.stderr


def test_llama_cpp_spellings_parse():
    p = build_parser()
    a = p.parse_args(["run", "-c", "512", "-n", "7", "hi"])
    assert (a.ctx, a.max_tokens) == (512, 7)
    for cmd in ("chat", "serve", "eval", "calibrate"):
        extra = ["--text", "t"] if cmd in ("eval", "calibrate") else []
        assert p.parse_args([cmd, "-c", "256", *extra]).ctx == 256
    assert p.parse_args(["chat", "-n", "5"]).max_tokens == 5
    assert p.parse_args(["profile", "-m", "m.gguf", "-n", "64"]).tokens == 64
    assert bench_parser().parse_args(["m.gguf", "--profile", "p", "-n", "9"]).decode_tokens == 9


def test_info_takes_m_or_nothing():
    bundled = cli("info")
    assert bundled.returncode == 0, bundled.stderr
    assert "shakespeare-moe.gguf" in bundled.stdout and "qwen3moe" in bundled.stdout
    path = str(bundled_model_path())
    assert cli("info", "-m", path).stdout == cli("info", path).stdout == bundled.stdout


def test_ctx_beyond_the_training_context_warns():
    p = cli("run", "-c", "2048", "-n", "2", "--temperature", "0", "hi")
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if "training context" in ln]
    assert line.startswith("edgemoe: warning: ") and "n_ctx 2048" in line and "1024" in line
    quiet = cli("run", "-c", "1024", "-n", "2", "--temperature", "0", "hi")
    assert "training context" not in quiet.stderr


def test_calibrate_defaults_to_the_bundled_model(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 60)
    p = cli("calibrate", "--text", str(text), "--tokens", "128", "--window", "64", env={"EDGEMOE_CACHE": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    (saved,) = (tmp_path / "stores").glob("shakespeare-moe-*.edgemoe/calibration.json")
    assert str(saved) in p.stdout
    assert len(json.loads(saved.read_text())["betas"]) == 4
