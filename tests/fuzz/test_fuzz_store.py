"""Fuzz the expert store: mutated manifest.json (edgemoe.store.format.check_manifest in front of
edgemoe.store.reader.StoreReader) and damaged shards (flipped bytes, truncation). Property: verify and the
reader agree, a damaged plane is always named, nothing but EdgeMoEError escapes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgemoe
from edgemoe.store.verify import verify

from .conftest import examples
from .targets import DELETE, check_store, checked_ranges, expert_ranges, manifest_paths, read_all, set_path

pytestmark = pytest.mark.timeout(300)

JUNK = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2,
            3,
            7,
            2**31,
            2**63,
            2**64,
            -(2**63),
            1.5,
            "",
            "x",
            "matquant",
            [],
            [0],
            [1, 2, 3],
            {},
            DELETE,
            4096,
            10**12,
        ]
    ),
    st.integers(-(2**70), 2**70),
    st.lists(st.integers(-10, 2**64), max_size=5),
)


@pytest.fixture(scope="module")
def manifest(seed_store):
    m = json.loads((seed_store / "manifest.json").read_text())
    return m, list(manifest_paths(m))


class Edit:
    def __init__(self, path, value):
        self.path, self.value = path, value

    def __repr__(self) -> str:
        return f"Edit({self.path!r}, {'DELETE' if self.value is DELETE else repr(self.value)[:60]})"


@settings(max_examples=examples(400), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzz_manifest(seed_store, manifest, tmp_path_factory, data):
    m0, paths = manifest
    m = json.loads(json.dumps(m0))
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths), JUNK), min_size=1, max_size=3))
    for p, v in edits:
        try:  # a copy: the same junk object put in twice could be made to contain itself
            m = set_path(m, p, v if v is DELETE else copy.deepcopy(v))
        except (KeyError, IndexError, TypeError):
            pass
    text = json.dumps(m)
    if data.draw(st.booleans()) and data.draw(st.booleans()):
        text = text[: data.draw(st.integers(0, len(text)))]
    root = tmp_path_factory.mktemp("man") / "s.edgemoe"
    shutil.copytree(seed_store, root)
    (root / "manifest.json").write_text(text)
    try:
        check_store(root, load_model=data.draw(st.integers(0, 9)) == 0)
    finally:
        shutil.rmtree(root)


def _data_end(root, name: str) -> int:
    """Where the bytes the store reads end in file `name` (before the closing alignment padding)."""
    if name.startswith("experts-"):
        layer = int(name[8:11])
        return max(b for (lay, e, p, a, b) in expert_ranges(root) if lay == layer)
    import gguf

    r = gguf.GGUFReader(root / name)
    return max((int(t.data_offset) + int(t.n_bytes) for t in r.tensors), default=0)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzz_shard_damage(seed_store, tmp_path_factory, data):
    """Flipped bits anywhere in a shard or dense.gguf, or a truncation: nothing but EdgeMoEError;
    a flip in a byte that changes a result (dense.gguf's header or tensors, a shard's header or
    planes) is damage to verify and refused by the loader, a flip in the padding between them is
    neither; a flip inside an expert's plane is named by verify (layer, expert, plane)."""
    root = tmp_path_factory.mktemp("shard") / "s.edgemoe"
    shutil.copytree(seed_store, root)
    try:
        files = sorted(p.name for p in root.glob("*.gguf"))  # dense.gguf and the shards
        name = data.draw(st.sampled_from(files))
        f = root / name
        buf = bytearray(f.read_bytes())
        truncate = data.draw(st.integers(0, 4)) == 0
        hit, meaningful = [], False
        if truncate:
            cut = data.draw(st.integers(0, len(buf) - 1))
            del buf[cut:]
            # a cut inside the alignment padding after the last expert's planes (or the last
            # tensor) removes nothing the store reads: the store stays whole
            truncate = cut < _data_end(root, name)
        else:
            flips = data.draw(
                st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 7)), min_size=1, max_size=6)
            )
            for pos, bit in flips:
                buf[pos] ^= 1 << bit
            old = f.read_bytes()
            changed = {pos for pos in {p for p, _ in flips} if buf[pos] != old[pos]}
            meaningful = any(a <= pos < b for a, b in checked_ranges(root, name) for pos in changed)
            if name.startswith("experts-"):
                layer = int(name[8:11])
                hit = [
                    (e, p)
                    for (lay, e, p, a, b) in expert_ranges(root)
                    if lay == layer and any(a <= pos < b for pos in changed)
                ]
        f.write_bytes(buf)
        outcome = check_store(root)
        rep = verify(root)
        if truncate or meaningful:
            assert outcome == "rejected" and not rep.ok
        elif not truncate:
            assert outcome == "ok" and rep.ok, rep.damages  # padding: nothing a result depends on
        for e, p in hit:
            assert any(f"layer {layer} expert {e} plane {p}: checksum mismatch" in d for d in rep.damages), (
                e,
                p,
                rep.damages,
            )
        if hit:
            with pytest.raises(edgemoe.EdgeMoEError):
                read_all(root)
    finally:
        shutil.rmtree(root)
