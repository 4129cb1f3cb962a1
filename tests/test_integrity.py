"""Every byte of a store that changes a result is checked (issue 17): dense.gguf's tensors and
header, the shards' headers, the manifest's fields. `edgemoe verify` and the loader agree: what
one calls damage the other refuses (`edgemoe run`: one `edgemoe: error:` line, exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest
from conftest import edgemoe_cli

import edgemoe
from edgemoe.store import format as store_format
from edgemoe.store.convert import convert
from edgemoe.store.reader import StoreReader
from edgemoe.store.verify import verify


@pytest.fixture(scope="module")
def clean_store(tiny_store) -> Path:
    return tiny_store


@pytest.fixture
def store(clean_store, tmp_path) -> Path:
    return Path(shutil.copytree(clean_store, tmp_path / "copy.edgemoe"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return edgemoe_cli(*args, env={"PYTHONWARNINGS": "ignore"})


def flip(path: Path, pos: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ mask]))


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return int(t.data_offset), int(t.data_offset) + int(t.n_bytes)


def assert_refused(st: Path, *words: str) -> None:
    """verify: DAMAGED with a line holding all words; `edgemoe run`: exit 2, one error line with them."""
    rep = verify(st)
    assert not rep.ok and any(all(w in d for w in words) for d in rep.damages), rep.damages
    r = run_cli("run", "-m", str(st), "-n", "2", "--temperature", "0", "hello")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error: "), r.stderr
    assert all(w in lines[0] for w in words) and "convert the model again" in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("tensor", ["blk.0.attn_q.weight", "output_norm.weight", "token_embd.weight"])
def test_flipped_byte_in_a_dense_tensor(store, tensor):
    """A weight in memory (attn_q, a norm) or left in the file (token_embd: read by rows)."""
    dense = store / "dense.gguf"
    a, b = tensor_range(dense, tensor)
    flip(dense, (a + b) // 2)
    assert_refused(store, str(dense), f"tensor {tensor}: checksum mismatch")


def test_flipped_byte_in_dense_metadata(store, clean_store):
    """A hyperparameter's value (rope.freq_base) and, separately, a token of the vocabulary."""
    dense = store / "dense.gguf"
    data = dense.read_bytes()
    key = b"qwen3moe.rope.freq_base"
    flip(dense, data.index(key) + len(key) + 4 + 3, 0x01)  # after the key: its type (u32), the float's top byte
    assert_refused(store, str(dense), "header checksum mismatch", "metadata")
    shutil.copyfile(clean_store / "dense.gguf", dense)
    assert verify(store).ok
    flip(dense, data.index(b"tokenizer.ggml.tokens") + 200, 0x01)
    assert_refused(store, str(dense), "header checksum mismatch")


def test_flipped_byte_in_a_shard_header(store, clean_store):
    """verify called this damage and the loader ran on: now both refuse it."""
    shard = store / "experts-001.gguf"
    flip(shard, shard.read_bytes().index(b"blk.1.exp.3") + 6, 0x01)  # an expert tensor's name
    assert_refused(store, str(shard), "header checksum mismatch")
    shutil.copyfile(clean_store / "experts-001.gguf", shard)
    flip(shard, 30, 0x01)  # in the key-value section
    assert_refused(store, str(shard), "header checksum mismatch")


def test_padding_changes_nothing_and_is_not_damage(store):
    """The alignment padding between dense tensors and between experts is read by nothing: a flip
    there is no damage to verify and the model loads (the two agree here too)."""
    dense = store / "dense.gguf"
    ranges = sorted(tensor_range(dense, t.name) for t in gguf.GGUFReader(dense).tensors)
    gaps = [a for (_, a), (b, _) in zip(ranges, ranges[1:]) if b > a]  # the tiny model's tensors have none
    gaps += [ranges[-1][1]] if dense.stat().st_size > ranges[-1][1] else []  # after the last one
    for g in gaps:
        flip(dense, g)
    m = json.loads((store / "manifest.json").read_text())
    e0, e1 = m["experts"][0][0], m["experts"][0][1]
    end0 = e0["offset"] + e0["plane_offsets"][-1]
    assert e1["offset"] > end0
    flip(store / "experts-000.gguf", end0)
    assert verify(store).ok
    with edgemoe.load(store, progress=False) as model:
        model.logits([1, 2, 3])


def test_every_dense_tensor_and_shard_header_is_recorded(clean_store):
    m = json.loads((clean_store / "manifest.json").read_text())
    names = {t.name for t in gguf.GGUFReader(clean_store / "dense.gguf").tensors}
    assert set(m["dense"]["tensors"]) == names
    assert m["dense"]["header_bytes"] == min(tensor_range(clean_store / "dense.gguf", n)[0] for n in names)
    for layer, entries in enumerate(m["experts"]):
        assert m["shard_headers"][layer]["bytes"] == entries[0]["offset"] == 4096
    assert m["manifest_xxh3"] == store_format.manifest_checksum(m)


def test_a_manifest_field_that_changes_results_is_checked(build_model, tmp_path):
    """A native store's source types: Q4_K and Q4_0 experts have the same plane sizes, so an edit
    of one into the other passes every structural check and would decode the planes wrongly."""
    st = convert(build_model("qwen3moe", "Q4_K_M"), tmp_path / "n.edgemoe", scheme="native", progress=False)
    m = json.loads((st / "manifest.json").read_text())
    assert m["scheme"]["types"][0]["gate"] == "Q4_K"
    m["scheme"]["types"][0]["gate"] = "Q4_0"
    (st / "manifest.json").write_text(json.dumps(m))
    assert_refused(st, str(st / "manifest.json"), "checksum mismatch")


def _as_format_1(st: Path) -> None:
    m = json.loads((st / "manifest.json").read_text())
    for k in ("dense", "shard_headers", "manifest_xxh3"):
        del m[k]
    m["format_version"] = 1
    (st / "manifest.json").write_text(json.dumps(m))


def test_a_format_1_store_is_refused_with_what_to_do(store):
    """Format 1 had no checksums of dense.gguf: refused (as llama.cpp refuses a GGUF version it no
    longer reads), with the command that converts it again; never run unchecked."""
    _as_format_1(store)
    assert_refused(store, str(store / "manifest.json"), "format version 1", "--force")
    with pytest.raises(edgemoe.EdgeMoEError, match="format version 1 has no checksums"):
        StoreReader(store)


def test_the_cache_converts_a_format_1_store_again(build_model, tmp_path, monkeypatch):
    """A store the cache made for a GGUF (a budget given) in an older format is converted again
    on its next use, not refused: the user never named it."""
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))
    src = build_model("qwen3moe")
    with edgemoe.load(src, memory_budget="2GB", quality="max", progress=False) as m:
        st = m.store_path
        a = m.logits([1, 2, 3])
    _as_format_1(st)
    with edgemoe.load(src, memory_budget="2GB", quality="max", progress=False) as m:
        assert m.store_path == st
        assert (m.logits([1, 2, 3]) == a).all()
    assert json.loads((st / "manifest.json").read_text())["format_version"] == store_format.FORMAT_VERSION
