#!/usr/bin/env python3
"""Write a large synthetic OLMoE-shaped GGUF for benchmarks (fast, memory-lean).

    python tools/make_bench_model.py --shape olmoe-1b-7b --type Q4_0 --out PATH   # ~4.0 GB
    python tools/make_bench_model.py --shape olmoe-small                          # ~1.2 GB
    python tools/make_bench_model.py --shape olmoe-small --check                  # + llama.cpp run

Quantized blocks are generated directly (random codes + fp16 scales), never as floats, and
tensors are written one at a time, so a 4 GB file needs ~100 MB of RAM and well under a minute
of CPU. Experts and attention use --type (Q4_0 or Q8_0), token_embd/output Q8_0, norms and
routers F32 (as llama.cpp keeps them).

Routing realism (a first, simple model; see make_router):
  --router-skew S  uneven expert popularity: every token's hidden state carries a shared
                   component (a common offset in all embeddings), and router rows get a
                   per-expert bias along it plus norms that grow with popularity.
  --locality L     token-to-token reuse: router rows are partly aligned with the range of the
                   attention output projection, whose output (a running mix over the context)
                   changes slowly from token to token; attn_output is scaled up so that part
                   of the residual stream is not negligible.
Both default to 0 (near-uniform routing, the DESIGN.md baseline).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import edgemoe.synth as synth
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import edgemoe.synth as synth

import gguf

Q = gguf.GGMLQuantizationType
EMBD_OFFSET = 0.5  # per-element size of the shared embedding offset used by --router-skew
DEFAULT_DIR = Path.home() / ".cache" / "edgemoe" / "bench-models"


@dataclass(frozen=True)
class BenchShape:
    n_layer: int
    n_embd: int = 2048
    n_head: int = 16
    n_expert: int = 64
    n_expert_used: int = 8
    n_ff_exp: int = 1024
    vocab: int = 50304
    n_ctx_train: int = 4096


SHAPES = {
    # OLMoE-1B-7B: 16 layers, hidden 2048, 16 heads (no GQA), 64 experts x 1024, top-8
    "olmoe-1b-7b": BenchShape(n_layer=16),
    # same per-layer geometry (1.2 MB Q4_0 expert slices), 4 layers: ~1.2 GB
    "olmoe-small": BenchShape(n_layer=4),
}

# ---- direct block generation -------------------------------------------------------------------

# Q4_0 stores x = (q - 8) * d. Random nibbles would give mean -0.5*d; map code 0 (-8) to 8 (0)
# so values are -7..7 with zero mean (std 4.18 units of d).
_LUT4 = np.arange(256, dtype=np.uint8)
_lo, _hi = _LUT4 & 0xF, _LUT4 >> 4
_LUT4 = (np.where(_lo == 0, 8, _lo) | (np.where(_hi == 0, 8, _hi) << 4)).astype(np.uint8)
_Q4_STD = float(np.sqrt(2 * sum(k * k for k in range(1, 8)) / 16))
_Q8_STD = float(np.sqrt(((np.arange(-128, 128) + 0.5) ** 2).mean()))


def quant_blocks(rng: np.random.Generator, shape: tuple[int, ...], std: float, qtype: Q,
                 jitter: float = 0.1) -> np.ndarray:
    """Random Q4_0/Q8_0 data for a float tensor of numpy `shape`, element std ~`std`.
    Returns uint8 of shape (*shape[:-1], row_bytes)."""
    blk, bsize = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    nb = n // blk
    out = np.empty((nb, bsize), np.uint8)
    unit = _Q4_STD if qtype == Q.Q4_0 else _Q8_STD
    d = (std / unit) * (1.0 + jitter * rng.standard_normal(nb, dtype=np.float32))
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    raw = np.frombuffer(rng.bytes(nb * (bsize - 2)), np.uint8)
    if qtype == Q.Q4_0:
        raw = _LUT4[raw]
    out[:, 2:] = raw.reshape(nb, bsize - 2)
    return out.reshape(*shape[:-1], shape[-1] // blk * bsize)


def dequant(x: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(x, qtype)


# ---- the model ---------------------------------------------------------------------------------


def make_router(rng: np.random.Generator, D: int, E: int, w_o: np.ndarray | None,
                shared_dir: np.ndarray, skew: float, locality: float,
                scale: float = 2.0) -> np.ndarray:
    """Router rows (E, D); logits std ~`scale` on a unit-RMS hidden state.

    locality mixes random rows with rows in the range of attn_output (W_o @ c_e); skew adds a
    per-expert popularity bias along the direction every hidden state shares.
    """
    g = rng.standard_normal((E, D))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    if w_o is not None and locality > 0:
        c = rng.standard_normal((w_o.shape[1], E))
        a = (w_o @ c).T
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        g = np.sqrt(max(0.0, 1 - locality**2)) * g + locality * a
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    if skew > 0:  # no accidental per-expert bias from the shared component: only the explicit one
        g -= (g @ shared_dir)[:, None] * shared_dir[None, :]
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    r = g * scale  # |r| = scale: r . x has std ~ scale for x with unit RMS and random direction
    if skew > 0:
        # pop_e ~ N(0,1): expert e's logit gets a bias of skew * pop_e logit-stds. The hidden
        # state's projection on shared_dir is ~ proj (EMBD_OFFSET per element, after the norm).
        proj = EMBD_OFFSET * np.sqrt(D) / np.sqrt(1 + EMBD_OFFSET**2)
        pop = np.sort(rng.standard_normal(E))[::-1]
        r *= np.exp(0.2 * skew * pop)[:, None]
        r += (skew * scale / proj) * pop[:, None] * shared_dir[None, :]
    return r.astype(np.float32)


def tensor_plan(shape: BenchShape, wtype: Q):
    """[(name, numpy shape, type)] in file order."""
    D, E, F, V = shape.n_embd, shape.n_expert, shape.n_ff_exp, shape.vocab + synth.N_SPECIAL
    plan = [("token_embd.weight", (V, D), Q.Q8_0)]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (D,), Q.F32),
            (p + "attn_q.weight", (D, D), wtype),
            (p + "attn_k.weight", (D, D), wtype),
            (p + "attn_v.weight", (D, D), wtype),
            (p + "attn_output.weight", (D, D), wtype),
            (p + "attn_q_norm.weight", (D,), Q.F32),
            (p + "attn_k_norm.weight", (D,), Q.F32),
            (p + "ffn_norm.weight", (D,), Q.F32),
            (p + "ffn_gate_inp.weight", (E, D), Q.F32),
            (p + "ffn_gate_exps.weight", (E, F, D), wtype),
            (p + "ffn_up_exps.weight", (E, F, D), wtype),
            (p + "ffn_down_exps.weight", (E, D, F), wtype),
        ]
    plan += [("output_norm.weight", (D,), Q.F32), ("output.weight", (V, D), Q.Q8_0)]
    return plan


def _nbytes(shp, qt: Q) -> int:
    blk, bsize = gguf.GGML_QUANT_SIZES[qt]
    return int(np.prod(shp)) // blk * bsize


def write_bench_model(shape: BenchShape, out: Path, wtype: Q = Q.Q4_0, seed: int = 0,
                      router_skew: float = 0.0, locality: float = 0.0,
                      log=print) -> Path:
    rng = np.random.default_rng(seed)
    D, H = shape.n_embd, shape.n_head
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    # a direction every hidden state shares (only used with router_skew)
    shared = rng.standard_normal(D)
    shared /= np.linalg.norm(shared)
    attn_gain = 1.0 + 2.0 * locality
    try:
        w = gguf.GGUFWriter(tmp, "olmoe")
        w.add_name(f"edgemoe-bench-olmoe-{shape.n_layer}L")
        w.add_file_type(2 if wtype == Q.Q4_0 else 7)
        w.add_context_length(shape.n_ctx_train)
        w.add_embedding_length(D)
        w.add_block_count(shape.n_layer)
        w.add_feed_forward_length(shape.n_ff_exp)
        w.add_head_count(H)
        w.add_head_count_kv(H)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(D // H)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
        w.add_float32("edgemoe.bench.router_skew", router_skew)
        w.add_float32("edgemoe.bench.locality", locality)
        synth.add_tokenizer(w, shape.vocab)
        plan = tensor_plan(shape, wtype)
        for name, shp, qt in plan:
            if qt == Q.F32:
                w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
            else:
                byte_shape = (*shp[:-1], _nbytes((shp[-1],), qt))
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _nbytes(shp, qt),
                                  raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        t0, done, total = time.time(), 0, sum(_nbytes(s, q) if q != Q.F32 else 4 * int(np.prod(s))
                                               for _, s, q in plan)
        w_o = None
        for name, shp, qt in plan:
            if qt == Q.F32:
                if name.endswith("ffn_gate_inp.weight"):
                    data = make_router(rng, D, shape.n_expert, w_o, shared, router_skew, locality)
                else:
                    data = (1.0 + 0.2 * rng.standard_normal(shp)).astype(np.float32)
            else:
                fan_in = shp[-1]
                std = 1.0 / np.sqrt(fan_in)
                if name == "token_embd.weight":
                    std = 1.0
                elif name == "output.weight":
                    std = 3.0 / np.sqrt(D)
                elif name.endswith("attn_output.weight"):
                    std *= attn_gain
                data = quant_blocks(rng, shp, std, qt)
                if name == "token_embd.weight" and router_skew > 0:
                    # shared offset in every embedding row -> a direction all hidden states carry
                    off = (EMBD_OFFSET * np.sqrt(D) * shared).astype(np.float32)
                    emb = dequant(data, qt) + off[None, :]
                    data = gguf.quants.quantize(emb.astype(np.float32), qt)
                if name.endswith("attn_output.weight"):
                    w_o = dequant(data, qt) if locality > 0 else None
            w.write_tensor_data(data)
            done += data.nbytes
            if name.endswith("ffn_down_exps.weight"):
                el = time.time() - t0
                log(f"  {name}: {done / 1e9:.2f}/{total / 1e9:.2f} GB, {el:.1f} s")
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_llama_cpp(path: Path, n_threads: int = 2, n_gen: int = 16) -> dict:
    """Load with llama.cpp, prompt 32 tokens, greedy-decode n_gen; load time and tok/s."""
    import llama_cpp

    t0 = time.time()
    # logits_all: llama-cpp-python 0.3.36 leaves llm.scores empty for the last token otherwise
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=n_threads, n_threads_batch=n_threads,
                          logits_all=True, verbose=False)
    load_s = time.time() - t0
    prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 4)[:32]
    t1 = time.time()
    llm.eval(prompt)
    prompt_s = time.time() - t1
    toks, t2 = [], time.time()
    for _ in range(n_gen):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        toks.append(tok)
        llm.eval([tok])
    gen_s = time.time() - t2
    logits = np.asarray(llm.scores[llm.n_tokens - 1])
    return dict(load_s=round(load_s, 2), prompt_tok_s=round(len(prompt) / prompt_s, 2),
                decode_tok_s=round(n_gen / gen_s, 2), n_prompt=len(prompt), n_gen=n_gen,
                distinct_generated=len(set(toks)), logit_std=round(float(logits.std()), 2),
                finite=bool(np.isfinite(logits).all()))


def _rms(x: np.ndarray, w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _neox_rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0) -> np.ndarray:
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)                       # (hd/2,)
    ang = pos[:, None, None] * inv[None, None, :]                  # (T, 1, hd/2)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], -1)


def routing_stats(path: Path, n_tokens: int = 256, seed: int = 1) -> dict:
    """Layer-0 routing of a bench file on random tokens, by a float numpy forward pass (embedding,
    attention, router; as llama.cpp's olmoe graph computes it, up to quantization noise).

    top_share: fraction of all picks that go to the most popular 8 experts (uniform: 8/E);
    reuse: mean |topk(t) & topk(t-1)| / k (independent uniform picks: k/E)."""
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}

    def f(name):
        x = t[name]
        return dequant(np.asarray(x.data), x.tensor_type) if x.tensor_type != Q.F32 \
            else np.asarray(x.data, dtype=np.float32)

    E = int(r.fields["olmoe.expert_count"].parts[-1][0])
    k = int(r.fields["olmoe.expert_used_count"].parts[-1][0])
    H = int(r.fields["olmoe.attention.head_count"].parts[-1][0])
    emb_t = t["token_embd.weight"]
    V = int(emb_t.shape[1])
    tok = np.random.default_rng(seed).integers(0, min(V - synth.N_SPECIAL, 50000), n_tokens)
    x = dequant(np.asarray(emb_t.data)[tok], emb_t.tensor_type)     # (T, D)
    T, D = x.shape
    hd = D // H
    h = _rms(x, f("blk.0.attn_norm.weight"))
    q = _rms(h @ f("blk.0.attn_q.weight").T, f("blk.0.attn_q_norm.weight")).reshape(T, H, hd)
    kk = _rms(h @ f("blk.0.attn_k.weight").T, f("blk.0.attn_k_norm.weight")).reshape(T, H, hd)
    v = (h @ f("blk.0.attn_v.weight").T).reshape(T, H, hd)
    pos = np.arange(T, dtype=np.float64)
    q, kk = _neox_rope(q, pos), _neox_rope(kk, pos)
    sc = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
    sc = np.where(np.tril(np.ones((T, T), bool))[None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    att = np.einsum("hts,shd->thd", p, v).reshape(T, D) @ f("blk.0.attn_output.weight").T
    n = _rms(x + att, f("blk.0.ffn_norm.weight"))
    logits = n @ f("blk.0.ffn_gate_inp.weight").T                  # (T, E)
    top = np.argsort(-logits, axis=1)[:, :k]
    counts = np.bincount(top.ravel(), minlength=E)
    top_share = np.sort(counts)[::-1][:8].sum() / counts.sum()
    reuse = np.mean([len(set(top[i]) & set(top[i - 1])) / k for i in range(1, T)])
    return dict(layer=0, n_tokens=T, top8_share=round(float(top_share), 3),
                uniform_top8_share=round(8 / E, 3), reuse=round(float(reuse), 3),
                independent_reuse=round(k / E, 3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe-small")
    ap.add_argument("--type", choices=["Q4_0", "Q8_0"], default="Q4_0")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output file (default {DEFAULT_DIR}/<shape>-<type>.gguf)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocab size")
    ap.add_argument("--router-skew", type=float, default=0.0)
    ap.add_argument("--locality", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    ap.add_argument("--check", action="store_true", help="load in llama.cpp, time decode")
    ap.add_argument("--routing-stats", action="store_true",
                    help="print layer-0 expert popularity and token-to-token reuse (numpy)")
    ap.add_argument("--threads", type=int, default=2,
                    help="llama.cpp threads for --check (on a busy shared box, OpenMP spin "
                         "barriers "
                         "make 2 threads far slower than 1: compare both)")
    args = ap.parse_args(argv)

    shape = SHAPES[args.shape]
    kw = {}
    if args.layers:
        kw["n_layer"] = args.layers
    if args.vocab:
        kw["vocab"] = args.vocab
    if kw:
        shape = BenchShape(**{**shape.__dict__, **kw})
    out = args.out or DEFAULT_DIR / f"{args.shape}-{args.type}" \
        f"{'-skew' + str(args.router_skew) if args.router_skew else ''}" \
        f"{'-loc' + str(args.locality) if args.locality else ''}.gguf"
    if out.exists() and not args.force:
        print(f"{out} exists (use --force to rewrite)")
    else:
        t0 = time.time()
        write_bench_model(shape, out, Q[args.type], args.seed, args.router_skew, args.locality)
        print(f"wrote {out}: {out.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.1f} s")
    if args.routing_stats:
        print(routing_stats(out))
    if args.check:
        print(check_llama_cpp(out, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
