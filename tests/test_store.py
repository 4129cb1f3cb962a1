"""The expert store and the budgeted expert cache."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
from conftest import fixed_cache, random_ids

import edgemoe
from edgemoe.models import gguf_file
from edgemoe.quant import transcode
from edgemoe.runtime.cache import ExpertCache
from edgemoe.store import reader as store
from edgemoe.store.convert import convert


@pytest.fixture(scope="module")
def tiny_store(build_model, tmp_path_factory):
    src = build_model("qwen3moe", "F32", n_embd=128, n_ff_exp=128, n_expert=8, n_layer=2)
    return src, convert(src, tmp_path_factory.mktemp("stores") / "q3.edgemoe", progress=False)


def test_store_layout(tiny_store):
    src, st = tiny_store
    names = sorted(os.listdir(st))
    assert names == ["dense.gguf", "experts-000.gguf", "experts-001.gguf", "manifest.json"]
    man = json.loads((st / "manifest.json").read_text())
    assert man["format_version"] == store.FORMAT_VERSION and man["scheme"]["bits"] == [2, 4, 8]  # F32 source
    dense = gguf.GGUFReader(st / "dense.gguf")
    assert not any("_exps" in t.name for t in dense.tensors)
    assert "tokenizer.ggml.tokens" in dense.fields
    shard = gguf.GGUFReader(st / "experts-000.gguf")
    assert len(shard.tensors) == 8
    for t, e in zip(shard.tensors, man["experts"][0]):
        assert t.data_offset % store.ALIGNMENT == 0 and t.data_offset == e["offset"]
        assert len(e["checksums"]) == len(e["plane_offsets"]) - 1 == man["scheme"]["planes_for"]["8"]


def test_budget_changes_speed_not_results(tiny_store):
    """Every plane read: the logits are the same whatever the expert cache may hold."""
    _, st = tiny_store
    ids = random_ids(24, 256, seed=4)
    with edgemoe.load(st, quality="max", kv_type="f32", n_ctx=128) as m:
        full = m.logits(ids)
        fixed_cache(m)
        cache = m._experts.cache
        total = cache.capacity
        assert m.stats().cache.evictions == 0
        for cap in (m.memory_plan.min_cache, total // 4, (3 * total) // 5):
            cache.set_capacity(cap)
            cache.clear()
            np.testing.assert_array_equal(m.logits(ids), full)
            s = m.stats().cache
            assert s.cache_bytes <= cap
        assert s.evictions + s.downgrades > 0  # the small capacities really were tight


def test_store_defaults_to_lossless_max(tiny_store):
    """Experts streamed from a store run at "max" unless a lossy quality is asked for: every
    plane of every chosen expert, nothing skipped, the GGUF's own result; the stats say so."""
    src, st = tiny_store
    ids = random_ids(16, 256, seed=7)
    with edgemoe.load(st, kv_type="f32", n_ctx=64) as m:
        assert m.quality == edgemoe.runtime.policy.DEFAULT == "max"
        out = m.logits(ids)
        s = m.stats()
        assert (s.quality, s.lossless) == ("max", True)
        assert s.cache.skipped == 0 and set(s.cache.uses_by_bits) == {8}  # F32 source: widths 2,4,8
    with edgemoe.load(st, quality="max", kv_type="f32", n_ctx=64) as m:
        np.testing.assert_array_equal(m.logits(ids), out)
    with edgemoe.load(src, memory_budget="4GiB", kv_type="f32", n_ctx=64, progress=False) as m:  # converted
        assert m.store_path is not None and m.quality == "max" and m.stats().lossless
    with edgemoe.load(src, kv_type="f32", n_ctx=64) as m:  # in place
        assert m.store_path is None and (m.stats().quality, m.stats().lossless) == ("max", True)
    for kw, name in (
        (dict(quality="fast"), "fast"),
        (dict(quality="balanced"), "balanced"),
        (dict(quality="1,1"), "1,1"),
        (dict(bits=4), "max at 4 bits"),
    ):
        with edgemoe.load(st, kv_type="f32", n_ctx=64, **kw) as m:
            s = m.stats()
            assert (s.quality, s.lossless) == (name, False), kw
            m.set_quality("max")
            assert m.stats().lossless is ("bits" not in kw)


def test_token_embedding_is_read_from_the_file(tiny_store, monkeypatch):
    """A store's dense weights are copied into memory except the token embedding (separate from
    the output layer): its rows are read from dense.gguf per token, not charged to the budget,
    and the logits are those of the embedding held in memory."""
    _, st = tiny_store
    ids = random_ids(12, 256, seed=7)
    emb = gguf.GGUFReader(st / "dense.gguf")
    emb_bytes = next(int(t.n_bytes) for t in emb.tensors if t.name == "token_embd.weight")
    with monkeypatch.context() as mp:
        mp.setattr(gguf_file, "embedding_on_disk", lambda gf: ())
        with edgemoe.load(st, quality="max", kv_type="f32", n_ctx=64) as ref:
            assert not ref._file.on_disk
            want = ref.logits(ids)
    with edgemoe.load(st, quality="max", kv_type="f32", n_ctx=64) as m:
        assert "token_embd.weight" in m._file.on_disk
        assert m.memory_plan.dense == (st / "dense.gguf").stat().st_size - emb_bytes
        np.testing.assert_array_equal(m.logits(ids), want)
        with pytest.raises(edgemoe.EdgeMoEError, match="out of range"):
            m._file.read_rows("token_embd.weight", np.array([10**6]))


def test_too_small_budget_is_refused_with_the_minimum(tiny_store):
    _, st = tiny_store
    with pytest.raises(edgemoe.EdgeMoEError, match="minimum that works is"):
        edgemoe.load(st, memory_budget="20MB")


def test_gguf_with_budget_is_converted_once(build_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))
    src = build_model("olmoe", "F32", n_embd=128, n_ff_exp=128, n_head_kv=4)
    with edgemoe.load(src, memory_budget="2GB", quality="max", progress=False) as m:
        first = m.store_path
        a = m.logits([1, 2, 3])
    assert first.parent == tmp_path / "cache" / "stores" and store.is_store(first)
    mtime = (first / "manifest.json").stat().st_mtime_ns
    with edgemoe.load(src, memory_budget="2GB", quality="max", progress=False) as m:
        assert m.store_path == first
        np.testing.assert_array_equal(m.logits([1, 2, 3]), a)
    assert (first / "manifest.json").stat().st_mtime_ns == mtime


def test_top_width_reproduces_a_4bit_source(build_model, tmp_path):
    """Q4_0 source into 2,3,4: stored as matquant-sym (offsets implied, half a bit per weight less
    than matquant), the 4-bit level gives the source's weights back exactly, and the lower widths
    are usable (error grows as bits go)."""
    from edgemoe.quant import nested
    from edgemoe.store.reader import StoreReader

    src = build_model("qwen3moe", "Q4_0", n_embd=256, n_ff_exp=256)
    st = convert(src, tmp_path / "q4.edgemoe", progress=False)
    r = StoreReader(st)
    sch = r.schemes[0]
    assert (r.scheme_name, r.bits) == ("matquant-sym", (2, 3, 4))
    assert r.plane_size(0, 0) < nested.SCHEMES["matquant"]((2, 3, 4), 32).plane_nbytes(256, 256)[0] * 3
    g = gguf.GGUFReader(src)
    tensors = {t.name: t for t in g.tensors}
    for layer, e in [(0, 0), (1, 3)]:
        bufs = [np.empty(n, np.uint8) for n in r.plane_sizes(layer)]
        r.read_planes(layer, e, 0, bufs)
        for mat, n_out, n_in in [("gate", r.n_ff_exp, r.n_embd), ("down", r.n_embd, r.n_ff_exp)]:
            planes = r.matrix_planes(bufs, layer)[mat]
            ref = gguf.quants.dequantize(
                np.asarray(tensors[f"blk.{layer}.ffn_{mat}_exps.weight"].data[e]), gguf.GGMLQuantizationType.Q4_0
            )
            np.testing.assert_array_equal(sch.dequantize(planes, n_out, n_in), ref)
            errs = [np.abs(sch.dequantize(planes[:k], n_out, n_in) - ref).mean() for k in (1, 2)]
            assert errs[0] > errs[1] > 0
    r.close()
    ids = random_ids(24, 256, seed=6)
    with edgemoe.load(src, kv_type="f32") as m:
        ref_logits = m.logits(ids)
    errs = {}
    for bits in (2, 3, 4):
        with edgemoe.load(st, quality="max", kv_type="f32", bits=bits) as m:
            errs[bits] = float(np.abs(m.logits(ids) - ref_logits).max() / ref_logits.std())
    assert errs[4] < errs[3] < errs[2]
    assert errs[4] < 0.05  # same weights; only llama.cpp-style activation rounding differs


# ---- damaged stores ---------------------------------------------------------------------


def _copy_store(st, dst):
    import shutil

    shutil.copytree(st, dst)
    return dst


def test_flipped_byte_is_caught(tiny_store, tmp_path):
    _, st = tiny_store
    bad = _copy_store(st, tmp_path / "bad.edgemoe")
    man = json.loads((bad / "manifest.json").read_text())
    off = man["experts"][1][3]["offset"] + 10
    with open(bad / "experts-001.gguf", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(edgemoe.EdgeMoEError, match=r"experts-001\.gguf: checksum mismatch in layer 1 expert 3"):
        with edgemoe.load(bad, progress=False) as m:
            for k in range(20):
                m.logits(random_ids(16, 256, seed=k))


def test_truncated_and_missing_shards(tiny_store, tmp_path):
    _, st = tiny_store
    bad = _copy_store(st, tmp_path / "trunc.edgemoe")
    with open(bad / "experts-001.gguf", "r+b") as f:
        f.truncate(os.path.getsize(bad / "experts-001.gguf") // 2)
    with pytest.raises(edgemoe.EdgeMoEError, match=r"experts-001\.gguf: truncated shard"):
        with edgemoe.load(bad) as m:
            for k in range(20):
                m.logits(random_ids(16, 256, seed=k))
    gone = _copy_store(st, tmp_path / "gone.edgemoe")
    os.unlink(gone / "experts-000.gguf")
    with pytest.raises(edgemoe.EdgeMoEError, match=r"experts-000\.gguf: cannot open expert shard"):
        edgemoe.load(gone)


def test_other_format_version(tiny_store, tmp_path):
    _, st = tiny_store
    bad = _copy_store(st, tmp_path / "v99.edgemoe")
    man = json.loads((bad / "manifest.json").read_text())
    man["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(edgemoe.EdgeMoEError, match="format version 99"):
        edgemoe.load(bad)


def test_interrupted_conversion_leaves_nothing(build_model, tmp_path, monkeypatch):
    from edgemoe.quant import nested

    src = build_model("qwen3moe", "F32", n_embd=128, n_ff_exp=128)
    calls = {"n": 0}
    orig = nested.MatQuant.encode

    def failing(self, w, act_scale=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return orig(self, w, act_scale)

    monkeypatch.setattr(nested.MatQuant, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "x.edgemoe", progress=False)
    assert os.listdir(tmp_path) == []


# ---- the cache itself --------------------------------------------------------------------


class FakeReader:
    """Plane reads without a file: lets the cache's accounting be checked exactly."""

    n_layer, n_planes = 2, 3

    def __init__(self):
        self.reads = []

    def plane_sizes(self, layer):
        return [100 * (p + 1) for p in range(self.n_planes)]

    def read_new(self, layer, expert, first, n):
        self.reads.append((layer, expert, first, n))
        return [np.empty(self.plane_sizes(layer)[p], np.uint8) for p in range(first, first + n)]


def test_cache_lru_upgrade_downgrade():
    r = FakeReader()
    c = ExpertCache(r, 1200, "lru")  # one full expert = 600 bytes
    c.get(0, 0, 3)
    c.get(0, 1, 1)
    c.get(0, 1, 3)  # upgrade: reads planes 1..2 only
    assert r.reads[-1] == (0, 1, 1, 2)
    layer0 = c.state().layers[0]
    assert layer0.partial_hits == 1 and layer0.upgrades == 1
    c.get(0, 0, 3)  # hit; expert 1 is now least recent
    c.get(1, 5, 1)  # needs 100 bytes: expert 1 drops its top plane
    assert c.resident(0, 1) == 2 and c.state().layers[0].downgrades == 1
    assert c.nbytes <= c.capacity
    for k in range(30):
        c.get(k % 2, k, 3)
        assert c.nbytes <= c.capacity
    assert sum(s.evictions for s in c.state().layers) > 0


def test_cache_lfu_keeps_the_frequent_expert():
    r = FakeReader()
    c = ExpertCache(r, 1200, "lfu")
    for _ in range(5):
        c.get(0, 0, 3)
    c.get(0, 1, 3)
    c.get(0, 2, 3)  # must evict: LFU drops expert 1 (used once), not expert 0
    assert c.resident(0, 0) > 0 and c.resident(0, 1) < 3


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("gpt-oss", dict(n_embd=128, n_ff_exp=128)),
        ("deepseek2", dict(n_layer=3, n_leading_dense=1, n_embd=128, n_ff_exp=128)),
        ("qwen2moe", dict(n_embd=128, n_ff_exp=128)),
    ],
)
def test_store_runs_every_architecture(build_model, tmp_path, arch, kw):
    """Expert biases, gpt-oss's activation, dense leading layers and shared experts survive conversion:
    at 8 bits the store gives the source model's predictions."""
    from conftest import kl_per_position

    src = build_model(arch, "F32", **kw)
    st = convert(src, tmp_path / "s.edgemoe", progress=False)
    ids = random_ids(32, 256, seed=8)
    with edgemoe.load(src, kv_type="f32") as m:
        ref = m.logits(ids)
    with edgemoe.load(st, quality="max", kv_type="f32") as m:
        ours = m.logits(ids)
        assert m.stats().cache.hits > 0  # the experts came from the store (preloaded at load)
    assert np.median(kl_per_position(ours, ref)) <= 0.01
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_set_budget_on_a_loaded_model(tiny_store):
    _, st = tiny_store
    ids = random_ids(16, 256, seed=12)
    with edgemoe.load(st, quality="max", kv_type="f32") as m:
        full = m.logits(ids)
        fixed_cache(m)
        plan = m.memory_plan
        small = m.set_budget(plan.minimum_budget)
        assert small.cache_capacity == plan.min_cache and m.stats().cache.cache_bytes <= plan.min_cache
        np.testing.assert_array_equal(m.logits(ids), full)
        assert m.stats().budget_bytes == plan.minimum_budget
        with pytest.raises(edgemoe.EdgeMoEError, match="minimum that works"):
            m.set_budget(plan.minimum_budget - 1)
        with pytest.raises(edgemoe.EdgeMoEError, match="quality"):
            m.set_quality("ultra")


def test_full_width_q4_experts_run_on_ggml_blocks(build_model, tmp_path):
    """A Q4_0 source's store at full width is transcoded to ggml blocks that hold the source's
    exact weights: Q4_0 in the repacked layout of ggml's gemv (kernels.pack) where the kernels
    exist, else Q4_1 (same values); the planes are freed; evicted whole, never downgraded."""
    from edgemoe.quant import kernels

    QT = gguf.GGMLQuantizationType
    src = build_model("qwen3moe", "Q4_0", n_embd=256, n_ff_exp=256)
    st = convert(src, tmp_path / "q4.edgemoe", progress=False)
    with edgemoe.load(st, quality="max", kv_type="f32", preload=False) as m:  # every resident expert has been used
        exp = m._experts
        assert exp.q41
        m.logits(random_ids(8, 256, seed=1))
        state = exp.cache.state()
        (layer, expert), held = next((k, h) for k, h in state.held.items() if h.fast)
        assert all(p.size == 0 for p in exp.cache.planes(layer, expert, held.n_planes))
        assert held.nbytes == held.buffer_bytes <= exp.reader.expert_bytes(exp.n_planes)
        assert state.nbytes == sum(v.nbytes for v in state.held.values())
        src_t = {t.name: t for t in gguf.GGUFReader(src).tensors}[f"blk.{layer}.ffn_gate_exps.weight"]
        ref = gguf.quants.dequantize(np.asarray(src_t.data[expert]), QT.Q4_0)
        w = exp.cache.fast(layer, expert)["gate"]
        assert w.packed == kernels.can_pack_shape(QT.Q4_0, 256)
        got = gguf.quants.dequantize(kernels.unpack(w), w.qtype)
        np.testing.assert_array_equal(got, ref)
        bufs = [np.empty(n, np.uint8) for n in exp.reader.plane_sizes(0)]
        exp.reader.read_planes(0, 1, 0, bufs)
        per = exp.reader.matrix_planes(bufs, 0)["up"]
        q41 = transcode.q41_blocks(exp.scheme, per, 256, 256)
        fw = transcode.fast_weight(exp.scheme, per, 256, 256, "up")
        np.testing.assert_array_equal(
            gguf.quants.dequantize(kernels.unpack(fw), fw.qtype), gguf.quants.dequantize(q41, QT.Q4_1)
        )
        x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
        np.testing.assert_allclose(
            kernels.matmul(fw, x),
            kernels.matmul(kernels.QWeight(kernels.unpack(fw), fw.qtype, 256), x),
            rtol=1e-5,
            atol=1e-5,
        )
        kernel, transcode._q4_211 = transcode._q4_211, None
        try:  # the numpy route: same Q4_1 bytes
            np.testing.assert_array_equal(transcode.q41_blocks(exp.scheme, per, 256, 256), q41)
            assert transcode.fast_weight(exp.scheme, per, 256, 256, "up").qtype == QT.Q4_1
        finally:
            transcode._q4_211 = kernel
        cache = exp.cache
        before = sum(s.downgrades for s in cache.state().layers)
        cache.set_capacity(cache.nbytes - 1)
        assert sum(s.downgrades for s in cache.state().layers) == before  # fast entries go whole


def test_direct_reads_give_the_planes_buffered_reads_give(build_model, tmp_path, monkeypatch):
    """With every plane read by O_DIRECT (DIRECT_MIN 0; the whole pages around each plane, most
    planes starting mid-page), read_new gives the bytes read_planes gives, for every run of
    planes; where O_DIRECT is refused (EINVAL) it reads buffered from then on; a damaged plane is
    still an error naming it."""
    import errno
    import os

    from edgemoe.store import reader as reader_mod

    monkeypatch.setattr(reader_mod, "DIRECT_MIN", 0)
    src = build_model("qwen3moe", "Q4_K_M", n_embd=256, n_ff_exp=256)
    st = convert(src, tmp_path / "d.edgemoe", progress=False)
    r = reader_mod.StoreReader(st)
    if r._direct_fd(0) is None:
        pytest.skip(f"{tmp_path}: this filesystem does not take O_DIRECT")
    for layer, e in [(0, 0), (1, r.n_expert // 2), (1, r.n_expert - 1)]:
        sizes = r.plane_sizes(layer)
        want = [np.empty(n, np.uint8) for n in sizes]
        r.read_planes(layer, e, 0, want)
        for first in range(r.n_planes):
            for n in range(1, r.n_planes - first + 1):
                got = r.read_new(layer, e, first, n)
                assert [g.tobytes() for g in got] == [w.tobytes() for w in want[first : first + n]]
    assert None not in r._direct_fds.values()  # read directly throughout
    real = os.preadv

    def refuse(fd, bufs, off):
        if fd in r._direct_fds.values():
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", refuse)
    got = r.read_new(0, 1, 0, r.n_planes)
    assert r._direct_fds[0] is None
    monkeypatch.setattr(os, "preadv", real)
    want = [np.empty(n, np.uint8) for n in r.plane_sizes(0)]
    r.read_planes(0, 1, 0, want)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
    r.close()
    loc = reader_mod.StoreReader(st).locations[1][2]
    with open(st / reader_mod.shard_name(1), "r+b") as f:  # damage plane 1 of layer 1, expert 2
        f.seek(loc.offset + loc.plane_offsets[1] + 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    r = reader_mod.StoreReader(st)
    with pytest.raises(edgemoe.EdgeMoEError, match="checksum mismatch in layer 1 expert 2 plane 1"):
        r.read_new(1, 2, 0, r.n_planes)
    r.close()
