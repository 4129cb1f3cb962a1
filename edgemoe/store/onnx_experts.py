"""Experts as small ONNX graphs run by onnxruntime, derived from the nested planes.

An expert held at the full width of a matquant store whose top width is 4 or 8 bits is exactly
`w = s * q + m` per group (q the B-bit code, s and m fp16 per group); that is MatMulNBits with
bits = B, block_size = group, scales = s and float zero points zp = -m / s
(w = (q - zp) * scale). `expert_model` builds the SwiGLU expert (gate, up: MatMulNBits; SiLU;
down: MatMulNBits) from the planes in memory, so the store's planes stay the single source of
truth; `export_store` writes them as files (STORE/onnx/blk.L.exp.E.onnx) for other tools.

Which experts run on onnxruntime (docs/onnx.md has the figures): a session costs a fixed
creation time (graph build + session init + weight prepack) and then saves
(t_edgemoe - t_ort) per token row. `OnnxExperts` creates an expert's session once the rows routed to
it reach `min_rows` = creation / saving per row (measured by `measure`), keeps at most
`max_sessions` sessions (least recently used dropped), and otherwise leaves the expert on
edgemoe's kernels (numba nested planes; ggml Q4_1 for 4-bit group-32 stores, which are as fast).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..quant import nested
from .reader import MATRICES, expert_shapes

# tools/bench_onnx_experts.py on this project's x86 box, 1 thread, an OLMoE-shaped expert
# (2048 x 1024, group 32), ms per call of the whole expert for 1 / 16 / 64 rows: onnxruntime 4-bit
# 0.28 / 1.56 / 3.96, 8-bit 5.29 / 6.40 / 9.02; edgemoe numba planes 2.06 / 6.84 / 23.0 (4-bit),
# 3.07 / 12.8 / 41.0 (8-bit); ggml Q4_1 0.22 / 3.25 / 12.9; ggml Q4_0 repacked 0.14 / 0.66 / 2.64.
# A session costs ~17 ms to build and create. Hence onnxruntime for batches of min_batch rows or
# more (prefill), once an expert has been routed min_rows rows, never for experts in ggml's
# repacked Q4_0 form (StoreExperts.ffn).
DEFAULT_MIN_ROWS = 64  # rows (in batches) an expert must have been routed before it gets a session
DEFAULT_MIN_BATCH = 16
DEFAULT_MAX_SESSIONS = 64
# A session holds its graph's initializers and onnxruntime's prepacked copy of the MatMulNBits
# weights, and creating and dropping sessions leaves freed memory the allocator keeps. Resident
# bytes per live session over its initializer bytes in a fresh process, 10 live sessions after 200
# created and dropped (tools/bench_onnx_experts.py --churn): 1.9 at 4 bits, 2.7 at 8 bits on the
# expert above (2.9-3.1 on 1024 x 1024 experts). Charged against the memory budget at:
SESSION_OVERHEAD = {4: 3.25, 8: 3.25}
DEFAULT_POOL_SHARE = 0.25  # of the expert cache, for sessions, when the model has a budget


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgeMoEError("onnxruntime expert backend needs onnxruntime (pip install 'edgemoe[onnx]')") from None
    return ort


def supported(scheme: nested.Scheme) -> bool:
    return (
        isinstance(scheme, nested.MatQuant) and scheme.widths[-1] in (4, 8) and scheme.group in (16, 32, 64, 128, 256)
    )


def full_codes(scheme: nested.Scheme, planes: list[np.ndarray], n_out: int, n_in: int):
    """All planes of one matrix -> (B-bit codes uint8 [n_out, n_in], s, m float32 [n_out, G])."""
    q, s, m = scheme.codes(planes, n_out, n_in)
    return q, s.astype(np.float32), m.astype(np.float32)


def nbits_inputs(q: np.ndarray, s: np.ndarray, m: np.ndarray, bits: int, group: int):
    """MatMulNBits B [N, G, group*bits/8] (low bits first), scales [N, G], packed zero points 0
    (w = q * s) and the group offsets m^T [G, N], added as (group sums of x) @ m^T: onnxruntime's
    CPU kernel takes no float zero points at 8 bits, and -m/s is rarely an integer."""
    n, k = q.shape
    G = k // group
    per = 8 // bits
    qq = q.reshape(n, G, group // per, per)
    b = np.zeros(qq.shape[:-1], np.uint8)
    for j in range(per):
        b |= qq[..., j] << np.uint8(bits * j)
    zp = np.zeros((n, -(-G * bits // 8)), np.uint8)
    return b, s.astype(np.float32), zp, np.ascontiguousarray(m.astype(np.float32).T)


def codes_from_q41(blocks: np.ndarray, n_out: int, n_in: int):
    """ggml Q4_1 rows (what a 4-bit group-32 expert is transcoded to) -> (codes, s, m)."""
    b = np.asarray(blocks, dtype=np.uint8).reshape(n_out, n_in // 32, 20)
    s = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n_out, n_in)
    return q, s, m


def codes_for(se, i: int, e: int, planes: list[np.ndarray]) -> dict | None:
    """Full-width (codes, s, m) per matrix of a StoreExperts expert: from its planes, or from its
    Q4_1 form once the planes were transcoded (ggml path); None if not at full width."""
    sch = se.scheme
    if len(planes) != sch.n_planes:
        return None
    if planes[0].size:
        per = se.reader.matrix_planes(planes, i)
        return {m: full_codes(sch, per[m], *se.shapes[m]) for m in MATRICES}
    fast = se.cache.fast(i, e)
    if fast is None:
        return None
    return {m: codes_from_q41(fast[m].data, *se.shapes[m]) for m in MATRICES}


def expert_model(
    scheme: nested.Scheme,
    codes: dict,
    shapes: dict[str, tuple[int, int]],
    name: str = "expert",
    accuracy_level: int = 0,
):
    """The SwiGLU expert y = down(silu(gate(x)) * up(x)) as an onnx ModelProto (x: [T, n_embd]);
    codes: per matrix (B-bit codes, s, m), e.g. full_codes of its planes."""
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as onh

    bits, group = scheme.widths[-1], scheme.group
    inits, nodes = [], []
    for mat, src in (("gate", "x"), ("up", "x"), ("down", "h")):
        n, k = shapes[mat]
        b, sc, zp, mt = nbits_inputs(*codes[mat], bits, group)
        inits += [
            onh.from_array(b, f"{mat}.B"),
            onh.from_array(sc, f"{mat}.scales"),
            onh.from_array(zp, f"{mat}.zp"),
            onh.from_array(mt, f"{mat}.mT"),
            onh.from_array(np.array([-1, k // group, group]), f"{mat}.gshape"),
        ]
        if mat == "down":
            nodes.append(oh.make_node("Sigmoid", ["gate.y"], ["gate.sig"]))
            nodes.append(oh.make_node("Mul", ["gate.y", "gate.sig"], ["gate.silu"]))
            nodes.append(oh.make_node("Mul", ["gate.silu", "up.y"], ["h"]))
        nodes.append(
            oh.make_node(
                "MatMulNBits",
                [src, f"{mat}.B", f"{mat}.scales", f"{mat}.zp"],
                [f"{mat}.q"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=group,
                name=mat,
                accuracy_level=accuracy_level,
            )
        )
        nodes.append(oh.make_node("Reshape", [src, f"{mat}.gshape"], [f"{mat}.xg"]))
        nodes.append(oh.make_node("ReduceSum", [f"{mat}.xg", "axis_last"], [f"{mat}.xs"], keepdims=0))
        nodes.append(oh.make_node("MatMul", [f"{mat}.xs", f"{mat}.mT"], [f"{mat}.off"]))
        nodes.append(oh.make_node("Add", [f"{mat}.q", f"{mat}.off"], [f"{mat}.y"]))
    inits.append(onh.from_array(np.array([-1]), "axis_last"))
    D = shapes["gate"][1]
    g = oh.make_graph(
        nodes,
        name,
        [oh.make_tensor_value_info("x", TP.FLOAT, ["T", D])],
        [oh.make_tensor_value_info("down.y", TP.FLOAT, ["T", D])],
        inits,
    )
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])


class OnnxExperts:
    """The onnxruntime expert backend of StoreExperts (see the module docstring for the rule)."""

    default_pool_share = DEFAULT_POOL_SHARE

    def __init__(
        self,
        scheme: nested.Scheme,
        shapes: dict[str, tuple[int, int]],
        *,
        min_rows: int | None = None,
        min_batch: int = DEFAULT_MIN_BATCH,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        threads: int = 1,
    ):
        if not supported(scheme):
            raise EdgeMoEError(
                f"onnxruntime experts need a matquant store with top width 4 or 8 bits, "
                f"this one is {scheme.name} {','.join(map(str, scheme.widths))}"
            )
        self.ort = _ort()
        self.scheme = scheme
        self.shapes = shapes
        self.min_rows = DEFAULT_MIN_ROWS if min_rows is None else int(min_rows)
        self.min_batch = int(min_batch)
        self.max_sessions = int(max_sessions)
        self.threads = int(threads)
        self.sessions: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.rows: dict[tuple[int, int], int] = {}  # rows seen per expert (the rule's counter)
        self.created = 0
        self.create_s = 0.0
        self.bits = scheme.widths[-1]
        self.lock = threading.Lock()
        # bytes of the memory budget sessions may hold (set by the model from its expert cache;
        # None: no limit), and what the live sessions are charged (session_bytes each)
        self.pool_bytes: int | None = None
        self.charged: dict[tuple[int, int], int] = {}
        self.held_bytes = 0
        self.refused = 0  # sessions not created because the pool was full
        self._warm_up()

    def _warm_up(self) -> None:
        """One throwaway session of the real expert shapes: onnxruntime's one-time setup (its
        environment, thread pool, kernel registry) happens now, inside what the model measures
        as its runtime at load, not later inside the budget of the expert cache."""
        codes = {
            m: (
                np.zeros(s, np.uint8),
                np.ones((s[0], s[1] // self.scheme.group), np.float32),
                np.zeros((s[0], s[1] // self.scheme.group), np.float32),
            )
            for m, s in self.shapes.items()
        }
        sess = self._session(expert_model(self.scheme, codes, self.shapes, "warm_up"))
        sess.run(None, {"x": np.zeros((1, self.shapes["gate"][1]), np.float32)})

    def session_bytes(self, model) -> int:
        """What a session of this graph is charged against the budget."""
        from onnx.helper import tensor_dtype_to_np_dtype

        init = sum(
            int(np.prod(t.dims)) * tensor_dtype_to_np_dtype(t.data_type).itemsize for t in model.graph.initializer
        )
        return int(init * SESSION_OVERHEAD[self.bits])

    def _drop_lru(self) -> None:
        key, _ = self.sessions.popitem(last=False)
        self.held_bytes -= self.charged.pop(key, 0)

    def _session(self, model):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # no growing arena: memory a dropped session used goes back, so the pool bound holds
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        return self.ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def wants(self, rows: int) -> bool:
        """Batches only: for one row edgemoe's kernels are as fast or faster (see the figures above)."""
        return rows >= self.min_batch

    def ffn(self, key: tuple[int, int], get_codes, x: np.ndarray) -> np.ndarray | None:
        """y for rows x of expert `key` (at full width) on onnxruntime, or None: not (yet) worth
        a session (get_codes() gives the expert's full-width codes, or None)."""
        if not self.wants(x.shape[0]):
            return None
        with self.lock:
            if key in self.sessions:
                sess = self.sessions[key]
                self.sessions.move_to_end(key)
                if sess is None:  # another thread is creating it
                    return None
            else:
                sess = None
                n = self.rows.get(key, 0) + x.shape[0]
                self.rows[key] = n
        if sess is None:
            if n < self.min_rows:
                return None
            codes = get_codes()
            if codes is None:
                return None
            t0 = time.perf_counter()
            model = expert_model(self.scheme, codes, self.shapes, f"blk.{key[0]}.exp.{key[1]}")
            cost = self.session_bytes(model)
            with self.lock:  # room in the pool first: drop least recently used sessions
                if key in self.sessions:  # another thread made it (or is making it) meanwhile
                    sess = self.sessions[key]
                    if sess is None:
                        return None
                else:
                    while self.sessions and (
                        len(self.sessions) >= self.max_sessions
                        or (self.pool_bytes is not None and self.held_bytes + cost > self.pool_bytes)
                    ):
                        self._drop_lru()
                    if self.pool_bytes is not None and self.held_bytes + cost > self.pool_bytes:
                        self.refused += 1
                        return None
                    self.held_bytes += cost  # reserved before the session allocates
                    self.charged[key] = cost
                    self.sessions[key] = None
            if sess is None:
                try:
                    sess = self._session(model)
                except BaseException:
                    with self.lock:
                        self.sessions.pop(key, None)
                        self.held_bytes -= self.charged.pop(key, 0)
                    raise
                with self.lock:
                    self.create_s += time.perf_counter() - t0
                    self.created += 1
                    if key in self.sessions:
                        self.sessions[key] = sess
        return sess.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_store(store_path: str | Path, layers: list[int] | None = None) -> list[Path]:
    """Write every expert of a 4/8-bit matquant store as STORE/onnx/blk.L.exp.E.onnx (derived from
    the planes, read and checksummed through the store reader)."""
    import onnx

    from .reader import StoreReader

    r = StoreReader(store_path)
    try:
        sch = next(x for x in r.schemes if x is not None)
        if not supported(sch):
            raise EdgeMoEError(f"{store_path}: ONNX expert shards need a matquant store with top width 4 or 8 bits")
        shapes = expert_shapes(r.n_embd, r.n_ff_exp)
        out = Path(store_path) / "onnx"
        out.mkdir(exist_ok=True)
        paths = []
        for i, layer in enumerate(r.locations):
            if layers is not None and i not in layers:
                continue
            for e in range(len(layer)):
                bufs = [np.empty(n, np.uint8) for n in r.plane_sizes(i)]
                r.read_planes(i, e, 0, bufs)
                codes = {m: full_codes(sch, per, *shapes[m]) for m, per in r.matrix_planes(bufs, i).items()}
                path = out / f"blk.{i}.exp.{e}.onnx"
                onnx.save(expert_model(sch, codes, shapes, path.stem), str(path))
                paths.append(path)
        return paths
    finally:
        r.close()


def measure(
    scheme: nested.Scheme,
    n_embd: int,
    n_ff: int,
    rows=(1, 16, 64),
    reps: int = 20,
    threads: int = 1,
    seed: int = 0,
    accuracy_level: int = 0,
) -> dict:
    """Time one expert of this shape: session creation, and per call on onnxruntime and on
    edgemoe's kernels for each batch of rows. Returns the figures and the break-even rows."""
    rng = np.random.default_rng(seed)
    shapes = expert_shapes(n_embd, n_ff)
    per = {m: scheme.encode(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1])) for m, s in shapes.items()}
    be = OnnxExperts(scheme, shapes, min_rows=0, threads=threads)
    t0 = time.perf_counter()
    model = expert_model(
        scheme, {m: full_codes(scheme, per[m], *shapes[m]) for m in MATRICES}, shapes, accuracy_level=accuracy_level
    )
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    sess = be._session(model)
    t_session = time.perf_counter() - t0
    res = dict(
        shape=[n_embd, n_ff],
        bits=scheme.widths[-1],
        group=scheme.group,
        build_s=t_build,
        session_s=t_session,
        per_rows={},
    )
    for T in rows:
        x = rng.standard_normal((T, n_embd)).astype(np.float32)
        sess.run(None, {"x": x})

        def own(x=x):
            g = scheme.matmul(per["gate"], *shapes["gate"], x)
            u = scheme.matmul(per["up"], *shapes["up"], x)
            h = np.ascontiguousarray(g / (1 + np.exp(-g)) * u, dtype=np.float32)
            return scheme.matmul(per["down"], *shapes["down"], h)

        y_own = own()
        y_ort = sess.run(None, {"x": x})[0]
        t_ort = t_own = float("inf")  # best of reps: the machine may be shared
        for _ in range(reps):
            t0 = time.perf_counter()
            y_ort = sess.run(None, {"x": x})[0]
            t_ort = min(t_ort, time.perf_counter() - t0)
            t0 = time.perf_counter()
            own()
            t_own = min(t_own, time.perf_counter() - t0)
        err = float(np.abs(y_ort - y_own).max() / (np.abs(y_own).max() + 1e-12))
        res["per_rows"][T] = dict(ort_s=t_ort, edgemoe_s=t_own, rel_err=err)
    saved = [(v["edgemoe_s"] - v["ort_s"]) / T for T, v in res["per_rows"].items()]
    best = max(saved)
    res["break_even_rows"] = (t_build + t_session) / best if best > 0 else float("inf")
    return res
