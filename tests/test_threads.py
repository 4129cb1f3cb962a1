"""Threads (issue 17): the default count (llama.cpp's), -t/--threads on every command that runs a
model and threads= in edgemoe.load (EDGEMOE_THREADS the fallback), bad values as one line; small
products on the calling thread alone, libgomp's passive waits; the first-run compile notice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import edgemoe_cli as cli

import edgemoe
from edgemoe.cli import build_parser
from edgemoe.options import load_options
from edgemoe.quant import kernels, threads

pytestmark = pytest.mark.skipif(kernels.BACKEND != "ggml", reason="the ggml kernels are not available")

# every command that runs a model, with the arguments it needs besides -t
COMMANDS = {
    "run": ["hi"],
    "chat": [],
    "serve": [],
    "eval": ["--text", "t.txt"],
    "calibrate": ["--text", "t.txt"],
    "profile": ["-m", "m.gguf", "--text", "t.txt"],
}


def _q8(n_out: int, n_in: int, seed: int = 0) -> kernels.QWeight:
    w = np.random.default_rng(seed).standard_normal((n_out, n_in)).astype(np.float32)
    return kernels.QWeight(kernels._lib.quantize(8, w), 8, n_in)


@pytest.fixture
def keep_threads(monkeypatch):
    """Whatever a test sets, kernels.THREADS is put back afterwards."""
    monkeypatch.setattr(kernels, "THREADS", kernels.THREADS)


# ---- the default ---------------------------------------------------------------------------------


def test_default_is_llama_cpps_physical_cores_within_the_affinity(monkeypatch):
    import psutil

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 6 if not logical else 12)
    assert threads.default_threads() == 6  # physical cores, not the 12 logical ones
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.default_threads() == 2  # never more than the process may run on
    # physical cores unknown: llama.cpp's fallback, all logical cores up to 4, half above
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    for logical, want in ((2, 2), (4, 4), (8, 4), (16, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda n=logical: n)
        assert threads.default_threads() == want, logical


def test_environment_variable_is_the_fallback(monkeypatch):
    monkeypatch.setenv("EDGEMOE_THREADS", "3")
    assert threads.env_threads() == 3
    monkeypatch.delenv("EDGEMOE_THREADS")
    assert threads.env_threads() == threads.default_threads()


# ---- setting it ----------------------------------------------------------------------------------


def test_load_threads_sets_the_kernels_thread_count(keep_threads):
    kernels.set_threads(2)
    with edgemoe.load(threads=1) as m:
        assert kernels.THREADS == 1
        m.logits([1, 2, 3])
        import numba

        assert numba.get_num_threads() == 1  # this thread's count, for the nested kernels' launches too
    with edgemoe.load(threads=2):
        assert kernels.THREADS == 2
    with edgemoe.load():  # not given: left as it is
        assert kernels.THREADS == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_load_refuses_a_bad_thread_count_naming_it(bad, keep_threads):
    with pytest.raises(edgemoe.EdgeMoEError, match=re.escape(f"threads must be a positive integer, got {bad!r}")):
        edgemoe.load(threads=bad)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_that_runs_a_model_takes_threads(command, tmp_path):
    ns = build_parser().parse_args([command, *COMMANDS[command], "-t", "3"])
    assert ns.threads == 3
    ns = build_parser().parse_args([command, *COMMANDS[command], "--threads", "1"])
    assert ns.threads == 1
    if command != "profile":
        assert load_options(ns)["threads"] == 1  # handed to edgemoe.load
    assert build_parser().parse_args([command, *COMMANDS[command]]).threads is None  # the fallback decides


def test_profile_model_runs_on_the_threads_it_is_given(monkeypatch, keep_threads):
    from edgemoe.devices import profiler

    seen = []

    def profile_model(*a, **k):
        seen.append(kernels.THREADS)
        return dict(recommendation=None, lossy_option=None)

    monkeypatch.setattr(profiler, "profile_model", profile_model)
    kernels.set_threads(2)
    args = build_parser().parse_args(["profile", "-m", "m.gguf", "--text", "t.txt", "-t", "1"])
    assert profiler.run_cli(args) == 0
    assert seen == [1]


def test_bench_hands_its_threads_to_both_engines(monkeypatch):
    from edgemoe.devices import bench

    args = bench._parser().parse_args(["m.gguf", "--profile", "p", "-t", "3"])
    assert args.threads == 3
    seen = []
    monkeypatch.setattr(
        bench.cgroup,
        "run_in",
        lambda cgs, cmd, **kw: seen.append(cmd) or SimpleNamespace(stdout="", stderr="", returncode=1),
    )
    args.timeout, args.prompt_tokens, args.decode_tokens = 5, 4, 4
    bench.run_engine("llama.cpp", "m.gguf", args)
    assert seen[0][seen[0].index("--threads") + 1] == "3"
    with pytest.raises(SystemExit) as e:
        bench._parser().parse_args(["m.gguf", "--profile", "p", "-t", "0"])
    assert e.value.code == 2


def test_run_with_threads_on_the_bundled_model():
    p = cli("run", "-t", "1", "-n", "4", "--temperature", "0", "To be")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


@pytest.mark.parametrize(
    "command, value", [(c, "0") for c in [*COMMANDS, "bench"]] + [("run", "-2"), ("run", "x"), ("run", "1.5")]
)
def test_a_bad_flag_is_one_line_naming_it(command, value):
    rest = ["m.gguf", "--profile", "p"] if command == "bench" else COMMANDS[command]
    p = cli(command, *rest, "-t", value)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "-t/--threads" in lines[0] and repr(value) in lines[0], p.stderr


def test_a_bad_environment_variable_is_one_line_naming_it():
    p = cli("run", "-n", "2", "hi", env={"EDGEMOE_THREADS": "0"})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["edgemoe: error: EDGEMOE_THREADS must be a positive integer, got '0'"]


# ---- how the threads run -------------------------------------------------------------------------


def test_small_products_run_on_the_calling_thread(monkeypatch, keep_threads):
    kernels.set_threads(2)
    small, big = _q8(256, 256), _q8(4096, 256)
    assert small.nbytes < kernels.PARALLEL_MIN_BYTES <= big.nbytes
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    ref_small, ref_big = kernels.matmul(small, x), kernels.matmul(big, x)
    launched = []
    real = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda kernel, args: launched.append(kernel) or real(kernel, args))
    np.testing.assert_array_equal(kernels.matmul(small, x), ref_small)
    assert launched == []  # no fork-join for 70 KB of weights
    np.testing.assert_array_equal(kernels.matmul(big, x), ref_big)
    assert launched == [kernels._ggml_mod.matmul_kernel]
    kernels.set_threads(1)
    kernels.matmul(big, x)
    assert len(launched) == 1  # one thread: never forked


@pytest.mark.parametrize("T", [1, 3, 5])
def test_the_one_thread_kernels_give_the_parallel_kernels_result(T, monkeypatch, keep_threads):
    kernels.set_threads(2)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    plain = _q8(64, 256, seed=T)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    packed = kernels.QWeight(kernels._lib.quantize(2, w), 2, 256)
    kernels.pack(packed)
    assert packed.packed
    for weight in (plain, packed):
        monkeypatch.setattr(kernels, "PARALLEL_MIN_BYTES", 1 << 40)
        one = kernels.matmul(weight, x)
        monkeypatch.setattr(kernels, "PARALLEL_MIN_BYTES", 0)
        np.testing.assert_array_equal(kernels.matmul(weight, x), one)


# ---- the compile notice --------------------------------------------------------------------------

COMPILE = """
import numpy as np
from edgemoe.quant import kernels
w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
q = kernels.QWeight(kernels._lib.quantize(8, w), 8, 64)
kernels.matmul(q, np.ones(64, np.float32))
kernels.matmul(q, np.ones((2, 64), np.float32))
"""


def test_compiling_kernels_is_announced_once_on_the_first_run_only(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def run() -> str:
        p = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stderr

    first = run()
    assert first.count("edgemoe: compiling kernels (first run only") == 1, first
    assert run() == ""  # loaded from the cache: nothing said
