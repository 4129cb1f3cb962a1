"""Benchmark nested (matryoshka) bit-plane quantization: accuracy per width and kernel speed.

Accuracy, per width of the (2,3,4) and (2,4,8) families:
  weight error  ||W - W^|| / ||W||          (pooled over the matrices of a set)
  output error  ||x W^T - x W^_hat^T|| / ||x W^T||   on held-out activations x
for d2moe, d2moe activation-aware (act_scale = mean |x| per column from calibration tokens),
matquant, matquant activation-aware, naive MSB slicing of an RTN INT8 (MatQuant's rounded slice
S(q,r) "naive-round", and top bits read at the bin centre "naive-trunc"), and independent RTN
asymmetric min-max per-group quantization at that width ("rtn", the reference).

Weight sets:
  model: the bundled model's experts (gate/up/down), activations = the real ffn_norm outputs
         (gate/up inputs) and SwiGLU outputs (down inputs) of the tokens routed to each expert,
         recorded by running edgemoe on validation text; first half calibrates, second half tests.
  synth: a Student-t (df 4) 1024x2048 matrix (OLMoE expert shape); activations x ~ N(0,1) * c_j
         with log-normal per-column magnitudes c_j (sigma 1) - synthetic, not real activations.
Kernel timings: nested matmul at each width (1024x2048 and 2048x1024, T=1 and T=8), median of
repeats, us and effective GB/s of plane bytes read, next to edgemoe.quant.kernels.matmul on Q4_0/Q8_0.

Native (source-exact) planes, per source type llama.cpp writes (blocks made by its quantizer,
ggml_quantize_chunk, from the synth matrix): output error of each width against the source matrix,
beside independent RTN at that width from the same source (group 32, min-max) and, for reference,
with a per-row least-squares rescale of the width (a per-width correction that would cost 2 bytes
per row; edgemoe does not store it: see the printed gains).

usage: python tools/bench_nested.py [--model PATH] [--json OUT] [--skip-model] [--skip-timing]
                                    [--skip-native]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgemoe.quant import nested, nested_fit, nested_kernels  # noqa: E402

FAMILIES = [(2, 3, 4), (2, 4, 8)]
METHODS = ["d2moe", "d2moe-aa", "matquant", "matquant-aa", "naive-round", "naive-trunc", "rtn"]


def _recons(w: np.ndarray, act: np.ndarray | None, bits) -> dict:
    """method -> {width: W^}"""
    out = {}
    for name in ("d2moe", "matquant"):
        sch = nested.SCHEMES[name](bits)
        for tag, a in ((name, None), (name + "-aa", act)):
            planes = sch.encode(w, act_scale=a)
            out[tag] = {b: sch.dequantize(planes[: sch.planes_for(b)], *w.shape) for b in bits}
    out["naive-round"] = nested_fit.naive_msb_slices(w, bits, mode="round")
    out["naive-trunc"] = nested_fit.naive_msb_slices(w, bits, mode="trunc")
    out["rtn"] = {b: nested_fit.rtn_quantize(w, b) for b in bits}
    return out


class _Acc:
    """Pooled squared errors over a set of matrices."""

    def __init__(self):
        self.num: dict = {}
        self.den: dict = {}

    def add(self, key, err2: float, ref2: float):
        self.num[key] = self.num.get(key, 0.0) + err2
        self.den[key] = self.den.get(key, 0.0) + ref2

    def rel(self, key) -> float:
        return float(np.sqrt(self.num[key] / self.den[key]))


def accuracy(mats: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """mats: (w [n_out, n_in], x_calib [Tc, n_in], x_eval [Te, n_in]) -> results dict."""
    res = {}
    for bits in FAMILIES:
        acc = _Acc()
        for w, xc, xe in mats:
            act = np.abs(xc).mean(0).astype(np.float32)
            y = xe @ w.T
            for method, rec in _recons(w, act, bits).items():
                for b, wh in rec.items():
                    acc.add((method, b, "w"), float(((w - wh) ** 2).sum()), float((w * w).sum()))
                    acc.add((method, b, "y"), float(((y - xe @ wh.T) ** 2).sum()), float((y * y).sum()))
        res[str(bits)] = {
            m: {str(b): {"weight": acc.rel((m, b, "w")), "output": acc.rel((m, b, "y"))} for b in bits} for m in METHODS
        }
    return res


def model_mats(path: Path, n_tokens: int, max_mats: int) -> tuple[list, str]:
    import gguf

    import edgemoe

    reader = gguf.GGUFReader(str(path))
    tens = {t.name: t for t in reader.tensors}
    m = edgemoe.load(str(path), kv_type="f32")
    eng = m._engine
    recorded: dict[int, list] = {}
    orig = eng.moe

    def hook(i, layer, h):
        recorded.setdefault(i, []).append(np.array(h))
        return orig(i, layer, h)

    eng.moe = hook
    text = (Path(__file__).resolve().parent.parent / "models/data/validation.txt").read_text()
    ids = m.tokenize(text[:20000])[:n_tokens]
    m.logits(ids)
    eng.moe = orig
    mats = []
    n_layers = len(recorded)
    names = []
    for i in range(n_layers):
        h = np.concatenate(recorded[i])  # [T, D]
        top, _ = eng.route(eng.layers[i], h)
        W = {
            k: gguf.quants.dequantize(
                tens[f"blk.{i}.ffn_{k}_exps.weight"].data, tens[f"blk.{i}.ffn_{k}_exps.weight"].tensor_type
            )
            for k in ("gate", "up", "down")
        }
        n_exp = W["gate"].shape[0]
        counts = [(int((top == e).sum()), e) for e in range(n_exp)]
        for _cnt, e in sorted(counts, reverse=True)[:2]:  # the two busiest experts per layer
            rows = np.nonzero((top == e).any(-1))[0]
            if rows.size < 16:
                continue
            x = h[rows].astype(np.float32)
            g, u = x @ W["gate"][e].T, x @ W["up"][e].T
            hid = (g / (1 + np.exp(-g)) * u).astype(np.float32)
            half = rows.size // 2
            for k, xin in (("gate", x), ("up", x), ("down", hid)):
                mats.append((W[k][e].astype(np.float32), xin[:half], xin[half:]))
                names.append(f"blk.{i}.{k}[{e}]")
    m.close()
    mats = mats[:max_mats]
    desc = (
        f"{path.name}: {len(mats)} expert matrices ({', '.join(sorted({str(w.shape) for w, _, _ in mats}))}),"
        f" {len(ids)} validation tokens, real activations (routed tokens; half calibrate, half test)"
    )
    return mats, desc


def synth_mats(seed: int = 0) -> tuple[list, str]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(1024, 2048)) * 0.02).astype(np.float32)
    c = np.exp(rng.normal(0, 1.0, 2048)).astype(np.float32)
    xc = (rng.standard_normal((256, 2048)) * c).astype(np.float32)
    xe = (rng.standard_normal((256, 2048)) * c).astype(np.float32)
    return [(w, xc, xe)], (
        "Student-t(df=4) 1024x2048; synthetic x ~ N(0,1)*c_j, c_j log-normal "
        "(sigma 1) per column, 256 calibration / 256 test rows"
    )


def native_accuracy(seed: int = 0) -> list[dict]:
    """Rows of the native table (module docstring)."""
    from edgemoe.quant import native
    from edgemoe.quant._ggml import GGMLLib

    lib = GGMLLib()
    [(w, _, xe)], _ = synth_mats(seed)
    rows = []
    for qtype, nt in native.TYPES.items():
        raw = lib.quantize(int(qtype), w)
        planes = native.split(qtype, raw, *w.shape)
        src = native.dequantize(qtype, planes, *w.shape)
        ref = xe @ src.T
        for k, b in enumerate(nt.widths[:-1], 1):
            wk = native.dequantize(qtype, planes[:k], *w.shape)
            alpha = (wk * src).sum(1, keepdims=True) / np.maximum((wk * wk).sum(1, keepdims=True), 1e-30)
            errs = {
                "native": wk,
                "native+row-rescale": alpha * wk,
                "rtn": nested_fit.rtn_quantize(src, b, 32),
            }
            row = {"type": qtype.name, "width": b}
            for name, m in errs.items():
                row[name] = float(np.linalg.norm(xe @ m.T - ref) / np.linalg.norm(ref))
            rows.append(row)
    return rows


def print_native(rows: list[dict]) -> None:
    print("\nnative planes: output error ||x W_r^T - x W^T|| / ||x W^T|| against the source matrix W")
    print(f"{'type':6} {'width':>5} {'native':>8} {'+rescale':>9} {'rtn g32':>8} {'native/rtn':>11}")
    for r in rows:
        print(
            f"{r['type']:6} {r['width']:5d} {r['native']:8.4f} {r['native+row-rescale']:9.4f} {r['rtn']:8.4f} "
            f"{r['native'] / r['rtn']:10.2f}x"
        )


def _median_us(f, repeats: int) -> tuple[float, float]:
    """(median, min) microseconds; the min is the robust figure on a shared, busy machine."""
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6), float(np.min(ts) * 1e6)


def timings(repeats: int) -> list[dict]:
    import gguf

    from edgemoe.quant import kernels

    QT = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    rows = []
    for shape in ((1024, 2048), (2048, 1024)):
        w = (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
        enc = {}
        for name in ("d2moe", "matquant"):
            for bits in FAMILIES:
                sch = nested.SCHEMES[name](bits)
                enc[name, bits] = (sch, sch.encode(w))
        for T in (1, 8):
            x = rng.standard_normal((T, shape[1])).astype(np.float32)
            for qt in ("Q4_0", "Q8_0"):
                qw = kernels.QWeight(gguf.quants.quantize(w, QT[qt]), QT[qt], shape[1])
                us, mn = _median_us(lambda qw=qw, x=x: kernels.matmul(qw, x), repeats)
                rows.append(
                    dict(
                        shape=list(shape),
                        T=T,
                        method=f"ggml {qt}",
                        bits=None,
                        us=us,
                        min_us=mn,
                        bytes=qw.nbytes,
                        gbps=qw.nbytes / us / 1e3,
                    )
                )
            for (name, bits), (sch, planes) in enc.items():
                for b in bits:
                    if bits == (2, 4, 8) and b in (2, 4) and name == "d2moe":
                        continue  # same planes as the (2,3,4) family
                    k = sch.planes_for(b)
                    nbytes = sum(p.nbytes for p in planes[:k])
                    us, mn = _median_us(
                        lambda sch=sch, p=planes[:k], shape=shape, x=x: sch.matmul(p, *shape, x), repeats
                    )
                    rows.append(
                        dict(
                            shape=list(shape),
                            T=T,
                            method=f"{name}{list(bits)}",
                            bits=b,
                            us=us,
                            min_us=mn,
                            bytes=nbytes,
                            gbps=nbytes / us / 1e3,
                        )
                    )
    return rows


def print_accuracy(title: str, res: dict) -> None:
    print(f"\n## {title}")
    for fam, per in res.items():
        widths = list(next(iter(per.values())).keys())
        print(f"\nfamily {fam}: relative error, weight / output")
        print("| method | " + " | ".join(f"{b}-bit W | {b}-bit out" for b in widths) + " |")
        print("|---|" + "---|---|" * len(widths))
        for m, d in per.items():
            cells = " | ".join(f"{d[b]['weight']:.4f} | {d[b]['output']:.4f}" for b in widths)
            print(f"| {m} | {cells} |")


def print_timings(rows: list[dict]) -> None:
    print("\n## kernel timings (median and min us; GB/s = plane bytes read / median time)")
    print("| shape | T | method | bits | median us | min us | MB | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['T']} | {r['method']} | "
            f"{r['bits'] if r['bits'] is not None else ''} | {r['us']:.0f} | {r['min_us']:.0f} | "
            f"{r['bytes'] / 1e6:.3f} | {r['gbps']:.2f} |"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="GGUF MoE model (default: models/shakespeare-moe.gguf or the bundled model)"
    )
    ap.add_argument("--tokens", type=int, default=512, help="validation tokens to run for activations")
    ap.add_argument("--max-mats", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--json", default=None, help="write all results as JSON here")
    args = ap.parse_args(argv)

    out: dict = {"numba": nested_kernels.HAVE_NUMBA, "threads": None}
    try:
        import numba

        out["threads"] = numba.get_num_threads()
    except ImportError:
        pass
    out["edgemoe_threads"] = os.environ.get("EDGEMOE_THREADS")

    if not args.skip_model:
        path = Path(args.model) if args.model else Path("models/shakespeare-moe.gguf")
        if not path.exists() and args.model is None:
            try:
                from edgemoe.api import bundled_model_path

                path = bundled_model_path()
            except Exception:  # noqa: BLE001
                path = None
        if path is None or not path.exists():
            print(f"(no model at {args.model or 'models/shakespeare-moe.gguf'}: skipping model experts)")
        else:
            mats, desc = model_mats(path, args.tokens, args.max_mats)
            res = accuracy(mats)
            out["model"] = {"desc": desc, "results": res}
            print_accuracy(f"model experts - {desc}", res)
    mats, desc = synth_mats()
    res = accuracy(mats)
    out["synth"] = {"desc": desc, "results": res}
    print_accuracy(f"synthetic - {desc}", res)
    if not args.skip_native:
        out["native"] = native_accuracy()
        print_native(out["native"])
    if not args.skip_timing:
        rows = timings(args.repeats)
        out["timings"] = rows
        print(f"\n(numba threads: {out['threads']}, EDGEMOE_THREADS={out['edgemoe_threads']})")
        print_timings(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
