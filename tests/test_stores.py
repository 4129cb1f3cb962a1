"""Stores on disk as a user meets them (issue 17): `edgemoe run -m m.gguf --budget B` uses the store
`edgemoe convert` wrote beside the model, or the cache's store for the same content (a touched,
copied or renamed file finds it; a changed one does not); `edgemoe stores` lists them and --rm
removes one; an unwritable destination is one line and exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import edgemoe_cli


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return edgemoe_cli(*args, env={"EDGEMOE_CACHE": str(cache)})


def run(model: Path, cache: Path) -> subprocess.CompletedProcess:
    p = cli("run", "-m", str(model), "--budget", "300MiB", "-n", "4", "--temperature", "0", "hi", cache=cache)
    assert p.returncode == 0, p.stderr
    return p


def cached(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "stores").glob("*.edgemoe"))


@pytest.fixture
def model(build_model, tmp_path) -> Path:
    dst = tmp_path / "m.gguf"
    shutil.copyfile(build_model("qwen3moe", "Q8_0"), dst)
    return dst


def test_run_uses_the_store_convert_wrote_beside_the_model(model, tmp_path):
    cache = tmp_path / "cache"
    p = cli("convert", str(model), cache=cache)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.edgemoe" / "manifest.json").is_file()
    r = run(model, cache)
    assert "converting" not in r.stderr and cached(cache) == []


def test_the_cache_store_is_found_by_content(model, tmp_path):
    cache = tmp_path / "cache"
    first = run(model, cache)
    assert "converting" in first.stderr
    assert len(cached(cache)) == 1
    os.utime(model, (1, 1))  # touch: same content
    renamed = tmp_path / "elsewhere" / "renamed.gguf"
    renamed.parent.mkdir()
    shutil.copyfile(model, renamed)
    for m in (model, renamed):
        r = run(m, cache)
        assert "converting" not in r.stderr, r.stderr
        assert r.stdout == first.stdout
    assert len(cached(cache)) == 1
    # a changed file is another model: its own store
    data = bytearray(model.read_bytes())
    data[-100] ^= 0x01
    model.write_bytes(bytes(data))
    assert "converting" in run(model, cache).stderr
    assert len(cached(cache)) == 2


def test_stores_lists_and_removes(model, tmp_path):
    cache = tmp_path / "cache"
    assert cli("stores", cache=cache).stdout.startswith("no expert stores")
    assert cli("convert", str(model), cache=cache).returncode == 0
    run(model.with_name("m.gguf"), cache)
    shutil.copyfile(model, tmp_path / "other.gguf")
    data = bytearray((tmp_path / "other.gguf").read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "other.gguf").write_bytes(bytes(data))
    run(tmp_path / "other.gguf", cache)  # converted into the cache
    p = cli("stores", cache=cache)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["STORE", "SIZE", "SOURCE", "LAST", "USED"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    beside = str((tmp_path / "m.edgemoe").resolve())
    assert beside in rows and str(model.resolve()) in rows[beside] and "KiB" in rows[beside]
    (name,) = cached(cache)
    in_cache = next(k for k in rows if k.endswith(name))
    assert str((tmp_path / "other.gguf").resolve()) in rows[in_cache] and "(gone)" not in rows[in_cache]
    (tmp_path / "other.gguf").unlink()
    gone = {ln.split()[0]: ln for ln in cli("stores", cache=cache).stdout.splitlines()[1:]}
    assert "(gone)" in gone[in_cache] and "(gone)" not in gone[beside]
    rm = cli("stores", "--rm", name.removesuffix(".edgemoe"), "--rm", str(tmp_path / "m.edgemoe"), cache=cache)
    assert rm.returncode == 0, rm.stderr
    assert cached(cache) == [] and not (tmp_path / "m.edgemoe").exists()
    assert cli("stores", cache=cache).stdout.startswith("no expert stores")
    bad = cli("stores", "--rm", "nope", cache=cache)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope: no such expert store" in bad.stderr


@pytest.mark.parametrize("where", ["output", "cache"])
def test_unwritable_destination_is_one_line(model, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    if where == "output":
        p = cli("convert", str(model), "-o", str(blocker / "x.edgemoe"), cache=tmp_path / "cache")
    else:
        p = cli("run", "-m", str(model), "--budget", "300MiB", "-n", "2", "hi", cache=blocker)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and str(blocker) in p.stderr and "cannot write" in p.stderr, p.stderr
    assert p.stdout == ""
