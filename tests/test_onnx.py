"""ONNX MoE models: import into the expert store (MatMul / MatMulNBits experts, com.microsoft MoE),
the `tokenizers` tokenizer, and agreement with the GGUF path and with onnxruntime itself.

The ONNX models are written here with onnx.helper from the same seeded weights as a tiny GGUF
(edgemoe.testing.synth): a full decoder (embedding, RMS norms, GQA attention with neox rope, qk-norm, the
MoE FFN, the output layer) that onnxruntime runs for a fixed sequence length.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as onh  # noqa: E402

import edgemoe  # noqa: E402
from edgemoe.errors import EdgeMoEError  # noqa: E402
from edgemoe.store.convert import convert  # noqa: E402
from edgemoe.testing import synth  # noqa: E402

SPEC = dict(n_embd=64, n_ff_exp=64, n_expert=8, n_layer=2)
IDS = [5, 17, 99, 250, 3, 42, 77, 8]


def nbits_codes(w: np.ndarray, bits: int = 4, block: int = 32):
    """[N, K] float -> asymmetric block codes q [N, K/block, block], scales [N, K/block] float32 and
    zero points [N, K/block] (uint8), before any packing."""
    n, k = w.shape
    nb = k // block
    x = w.reshape(n, nb, block)
    lo, hi = x.min(-1), x.max(-1)
    qmax = (1 << bits) - 1
    s = (np.maximum(hi - lo, 1e-8) / qmax).astype(np.float32)
    zp = np.clip(np.round(-lo / s), 0, qmax).astype(np.uint8)
    q = np.clip(np.round(x / s[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return q, s, zp


def nbits_reference(w: np.ndarray, bits: int = 4, block: int = 32) -> np.ndarray:
    """What MatMulNBits means by quant_nbits(w): (q - zp) * scale, float32, from the unpacked codes."""
    q, s, zp = nbits_codes(w, bits, block)
    return ((q.astype(np.float32) - zp.astype(np.float32)[..., None]) * s[..., None]).reshape(w.shape)


def quant_nbits(w: np.ndarray, bits: int = 4, block: int = 32):
    """[N, K] float -> MatMulNBits B [N, K/block, block*bits/8], scales [N*K/block], packed zp."""
    n, k = w.shape
    nb = k // block
    q, s, zp = nbits_codes(w, bits, block)
    per = 8 // bits
    q = q.reshape(n, nb, block // per, per)
    packed = np.zeros(q.shape[:-1], np.uint8)
    for j in range(per):
        packed |= q[..., j] << (bits * j)
    zq = zp.reshape(n, -1)
    if zq.shape[1] % per:
        zq = np.pad(zq, ((0, 0), (0, per - zq.shape[1] % per)))
    zq = zq.reshape(n, -1, per)
    zpk = np.zeros(zq.shape[:-1], np.uint8)
    for j in range(per):
        zpk |= zq[..., j] << (bits * j)
    return packed, s.astype(np.float32).reshape(-1), zpk


def build_onnx(spec: synth.SynthSpec, out: Path, experts: str = "matmul", seq: int = len(IDS)) -> Path:
    """Write spec's weights as an ONNX decoder (HF / onnxruntime-genai builder names) with
    config.json, tokenizer.json and tokenizer_config.json beside it. experts: "matmul" (one MatMul
    per expert projection), "nbits" (MatMulNBits, 4-bit), "moe" (one com.microsoft MoE node per
    layer, fused interleaved SwiGLU)."""
    t = synth._tensors(spec)
    D, H, KV, hd = spec.n_embd, spec.n_head, spec.n_head_kv, spec.n_head_dim
    E, K = spec.n_expert, spec.n_expert_used
    eps = synth._RMS_EPS[spec.arch]
    llama = spec.arch == "llama"
    qwen2 = spec.arch == "qwen2moe"  # q/k/v biases, no qk-norm, a gated shared expert, no renormalisation
    olmoe = spec.arch == "olmoe"  # qk-norm over the whole projection, no renormalisation
    nodes, inits = [], []
    cnt = [0]

    def init(name, arr):
        inits.append(onh.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, name, n_out=1, domain="", **attrs):
        outs = [f"{name}/output_{j}" for j in range(n_out)]
        nodes.append(oh.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(arr):
        cnt[0] += 1
        return init(f"const_{cnt[0]}", np.asarray(arr))

    def matmul(x, w_numpy_out_in, pfx):  # weight given as [out, in]; MatMul wants [in, out]
        if experts == "nbits" and "/experts." in pfx:
            b, s, z = quant_nbits(w_numpy_out_in)
            n, k = w_numpy_out_in.shape
            ins = [
                x,
                init(pfx[1:].replace("/", ".") + "NBits.weight_Q4", b.reshape(n, k // 32, 16)),
                init(pfx[1:].replace("/", ".") + "NBits.weight_scales", s),
                init(pfx[1:].replace("/", ".") + "NBits.weight_zp", z),
            ]
            return node("MatMulNBits", ins, pfx + "NBits", domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
        w = init(pfx[1:].replace("/", ".") + ".weight", np.ascontiguousarray(w_numpy_out_in.T))
        return node("MatMul", [x, w], pfx)

    def rms(x, w, pfx, axis=-1):
        sq = node("Mul", [x, x], pfx + "/sq")
        m = node("ReduceMean", [sq], pfx + "/mean", axes=[axis], keepdims=1)
        r = node("Sqrt", [node("Add", [m, const(np.float32(eps))], pfx + "/add")], pfx + "/sqrt")
        n = node("Div", [x, r], pfx + "/div")
        return node("Mul", [n, init(pfx[1:].replace("/", ".") + ".weight", w)], pfx + "/scale")

    pos = np.arange(seq, dtype=np.float64)
    inv = spec.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None] * inv[None]
    cos = init("cos_cache", np.concatenate([np.cos(ang)] * 2, 1)[:, None, :].astype(np.float32))
    sin = init("sin_cache", np.concatenate([np.sin(ang)] * 2, 1)[:, None, :].astype(np.float32))
    mask = const(np.triu(np.full((seq, seq), -1e9, np.float32), 1))

    def rope(x, pfx):
        x1 = node("Slice", [x, const(np.array([0])), const(np.array([hd // 2])), const(np.array([-1]))], pfx + "/x1")
        x2 = node("Slice", [x, const(np.array([hd // 2])), const(np.array([hd])), const(np.array([-1]))], pfx + "/x2")
        rot = node("Concat", [node("Neg", [x2], pfx + "/neg"), x1], pfx + "/rot", axis=-1)
        return node("Add", [node("Mul", [x, cos], pfx + "/c"), node("Mul", [rot, sin], pfx + "/s")], pfx + "/rope")

    x = node(
        "Gather", [init("model.embed_tokens.weight", t["token_embd.weight"]), "input_ids"], "/model/embed_tokens/Gather"
    )
    for i in range(spec.n_layer):
        p, L = f"blk.{i}.", f"/model/layers.{i}"
        h = rms(x, t[p + "attn_norm.weight"], f"{L}/input_layernorm")
        wq, wk, wv = t[p + "attn_q.weight"], t[p + "attn_k.weight"], t[p + "attn_v.weight"]
        if llama:  # llama.cpp's interleaved rope rows back to HF's rotate_half order
            wq, wk = unpermute(wq, H), unpermute(wk, KV)
        if experts == "moe":  # the model builder's packed Q|K|V MatMul
            qkv = matmul(h, np.concatenate([wq, wk, wv]), f"{L}/attn/qkv_proj/MatMul")
            q, k, v = node(
                "Split", [qkv, const(np.array([H * hd, KV * hd, KV * hd]))], f"{L}/attn/split", n_out=3, axis=-1
            )
        else:
            q = matmul(h, wq, f"{L}/attn/q_proj/MatMul")
            k = matmul(h, wk, f"{L}/attn/k_proj/MatMul")
            v = matmul(h, wv, f"{L}/attn/v_proj/MatMul")
            if qwen2:
                q, k, v = (
                    node(
                        "Add",
                        [z, init(f"model.layers.{i}.attn.{w}_proj.bias", t[p + f"attn_{w}.bias"])],
                        f"{L}/attn/{w}_proj/Add",
                    )
                    for z, w in ((q, "q"), (k, "k"), (v, "v"))
                )
        if olmoe:
            q = rms(q, t[p + "attn_q_norm.weight"], f"{L}/attn/q_norm")
            k = rms(k, t[p + "attn_k_norm.weight"], f"{L}/attn/k_norm")
        q = node("Reshape", [q, const(np.array([seq, H, hd]))], f"{L}/attn/q_rs")
        k = node("Reshape", [k, const(np.array([seq, KV, hd]))], f"{L}/attn/k_rs")
        v = node("Reshape", [v, const(np.array([seq, KV, hd]))], f"{L}/attn/v_rs")
        if spec.arch == "qwen3moe":  # per head
            q = rms(q, t[p + "attn_q_norm.weight"], f"{L}/attn/q_norm")
            k = rms(k, t[p + "attn_k_norm.weight"], f"{L}/attn/k_norm")
        q, k = rope(q, f"{L}/attn/q_rot"), rope(k, f"{L}/attn/k_rot")

        def heads(z, name):  # [T, KV, hd] -> [H, T, hd], kv head h // (H/KV)
            z = node("Transpose", [z], name + "/tr", perm=[1, 0, 2])
            z = node("Unsqueeze", [z, const(np.array([1]))], name + "/us")
            z = node("Expand", [z, const(np.array([KV, H // KV, seq, hd]))], name + "/ex")
            return node("Reshape", [z, const(np.array([H, seq, hd]))], name + "/rs")

        qh = node("Transpose", [q], f"{L}/attn/q_tr", perm=[1, 0, 2])
        kh, vh = heads(k, f"{L}/attn/k_heads"), heads(v, f"{L}/attn/v_heads")
        s = node("MatMul", [qh, node("Transpose", [kh], f"{L}/attn/kT", perm=[0, 2, 1])], f"{L}/attn/qk")
        s = node(
            "Add", [node("Mul", [s, const(np.float32(1 / np.sqrt(hd)))], f"{L}/attn/scale"), mask], f"{L}/attn/mask"
        )
        a = node("MatMul", [node("Softmax", [s], f"{L}/attn/softmax", axis=-1), vh], f"{L}/attn/av")
        a = node(
            "Reshape",
            [node("Transpose", [a], f"{L}/attn/a_tr", perm=[1, 0, 2]), const(np.array([seq, H * hd]))],
            f"{L}/attn/a_rs",
        )
        x = node("Add", [x, matmul(a, t[p + "attn_output.weight"], f"{L}/attn/o_proj/MatMul")], f"{L}/attn_residual")
        h = rms(x, t[p + "ffn_norm.weight"], f"{L}/post_attention_layernorm")
        logits = matmul(h, t[p + "ffn_gate_inp.weight"], f"{L}/moe/gate/MatMul")
        G, U, Dn = t[p + "ffn_gate_exps.weight"], t[p + "ffn_up_exps.weight"], t[p + "ffn_down_exps.weight"]
        if experts == "moe":
            fc1 = np.stack([G, U], 2).reshape(E, 2 * G.shape[1], D)  # interleaved gate, up rows
            y = node(
                "MoE",
                [
                    h,
                    logits,
                    init(f"model.layers.{i}.moe.fc1_experts_weights", fc1),
                    "",
                    init(f"model.layers.{i}.moe.fc2_experts_weights", Dn),
                ],
                f"{L}/moe/MoE",
                domain="com.microsoft",
                k=K,
                activation_type="swiglu",
                swiglu_fusion=1,
                activation_alpha=1.0,
                activation_beta=0.0,
                normalize_routing_weights=1,
            )
        else:
            probs = node("Softmax", [logits], f"{L}/moe/probs", axis=-1)
            tv, ti = node("TopK", [probs, const(np.array([K]))], f"{L}/moe/topk", n_out=2, axis=-1)
            if not (qwen2 or olmoe):
                tv = node(
                    "Div",
                    [tv, node("ReduceSum", [tv, const(np.array([-1]))], f"{L}/moe/sum", keepdims=1)],
                    f"{L}/moe/norm",
                )
            wts = node("ScatterElements", [const(np.zeros((seq, E), np.float32)), ti, tv], f"{L}/moe/scatter", axis=1)
            y = None
            for e in range(E):
                pe = f"{L}/moe/experts.{e}"
                g = matmul(h, G[e], f"{pe}/gate_proj/MatMul")
                u = matmul(h, U[e], f"{pe}/up_proj/MatMul")
                act = node("Mul", [node("Mul", [g, node("Sigmoid", [g], pe + "/sig")], pe + "/silu"), u], pe + "/act")
                o = matmul(act, Dn[e], f"{pe}/down_proj/MatMul")
                we = node(
                    "Slice", [wts, const(np.array([e])), const(np.array([e + 1])), const(np.array([1]))], pe + "/w"
                )
                o = node("Mul", [o, we], pe + "/weighted")
                y = o if y is None else node("Add", [y, o], pe + "/sum")
        if qwen2:
            ps = f"{L}/mlp/shared_expert"
            g = matmul(h, t[p + "ffn_gate_shexp.weight"], f"{ps}/gate_proj/MatMul")
            u = matmul(h, t[p + "ffn_up_shexp.weight"], f"{ps}/up_proj/MatMul")
            act = node("Mul", [node("Mul", [g, node("Sigmoid", [g], ps + "/sig")], ps + "/silu"), u], ps + "/act")
            o = matmul(act, t[p + "ffn_down_shexp.weight"], f"{ps}/down_proj/MatMul")
            gate = node(
                "Sigmoid",
                [matmul(h, t[p + "ffn_gate_inp_shexp.weight"], f"{L}/mlp/shared_expert_gate/MatMul")],
                f"{L}/mlp/shared_expert_gate/Sigmoid",
            )
            y = node("Add", [y, node("Mul", [o, gate], ps + "/gated")], ps + "/sum")
        x = node("Add", [x, y], f"{L}/moe_residual")
    x = rms(x, t["output_norm.weight"], f"/model/layers.{spec.n_layer}/final_norm_layernorm")
    out_w = t.get("output.weight", t["token_embd.weight"])
    lg = matmul(x, out_w, "/lm_head/MatMul")
    nodes.append(oh.make_node("Identity", [lg], ["logits"], name="/logits"))
    g = oh.make_graph(
        nodes,
        "edgemoe-test",
        [oh.make_tensor_value_info("input_ids", TP.INT64, [seq])],
        [oh.make_tensor_value_info("logits", TP.FLOAT, [seq, spec.n_vocab])],
        inits,
    )
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    onnx.save(model, str(path))
    (out / "config.json").write_text(
        json.dumps(
            dict(
                model_type="mixtral" if llama else "qwen2_moe" if qwen2 else "olmoe" if olmoe else "qwen3_moe",
                num_local_experts=E,
                hidden_size=D,
                num_attention_heads=H,
                num_key_value_heads=KV,
                head_dim=hd,
                num_hidden_layers=spec.n_layer,
                vocab_size=spec.n_vocab,
                max_position_embeddings=spec.n_ctx_train,
                num_experts=E,
                num_experts_per_tok=K,
                moe_intermediate_size=spec.n_ff_exp,
                rms_norm_eps=eps,
                rope_theta=spec.rope_theta,
                norm_topk_prob=not (qwen2 or olmoe),
                tie_word_embeddings="output.weight" not in t,
                shared_expert_intermediate_size=spec.n_ff_shexp,
                bos_token_id=spec.bos_id,
                eos_token_id=spec.eos_id,
            )
        )
    )
    write_tokenizer(spec, out)
    return path


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tokenizer(spec: synth.SynthSpec, out: Path) -> None:
    """synth's byte-level BPE vocabulary as a Hugging Face tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, _ = synth.build_vocab(spec.vocab)
    vocab = {tok: i for i, tok in enumerate(tokens[: spec.vocab])}
    tk = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in tokens[spec.vocab :]])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(dict(add_bos_token=True, bos_token="<|bos|>", eos_token="<|endoftext|>"))
    )


@pytest.fixture(scope="module")
def spec():
    return synth.SynthSpec.tiny("qwen3moe", **SPEC)


def _gguf_store(spec, d):
    src = synth.write_model(spec, d / "model.gguf")
    return src, convert(src, d / "store", progress=False)


@pytest.fixture(scope="module")
def gguf_store(spec, tmp_path_factory):
    return _gguf_store(spec, tmp_path_factory.mktemp("onnx-gguf"))


def _logits(path, ids=IDS, **kw):
    with edgemoe.load(path, kv_type="f32", quality="max", progress=False, **kw) as m:
        return m.logits(ids)


def _ort_logits(path: Path, ids=IDS) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": np.array(ids, np.int64)})[0]


# onnxruntime and edgemoe on the same float32 weights differ only by float32 rounding in another
# summation order: measured at most 6e-6 on logits of magnitude ~12 (every family below); 1e-4
# (1e-5 of the logits' scale) leaves room for other CPUs' kernels, and any wrong weight, rope or
# norm is orders of magnitude past it
FLOAT32_ATOL = 1e-4


@pytest.mark.parametrize("experts", ["matmul", "moe"])
def test_onnx_store_equals_gguf_store_and_is_lossy_only_by_8_bits(spec, gguf_store, tmp_path, experts):
    """The ONNX model converts into the same store as the GGUF (same planes, same dense tensors),
    so the logits are identical; onnxruntime running the whole ONNX model agrees with the GGUF in
    place to float32 rounding (the graph is the model), and with the store only within what its
    nested 8-bit top width loses (a KL bound: lossy)."""
    from conftest import kl_per_position

    src, gstore = gguf_store
    path = build_onnx(spec, tmp_path / experts, experts)
    ostore = convert(path, tmp_path / f"{experts}.edgemoe", progress=False)
    gm = json.loads((gstore / "manifest.json").read_text())
    om = json.loads((ostore / "manifest.json").read_text())
    assert om["experts"] == gm["experts"] and om["scheme"] == gm["scheme"]  # checksums of every plane
    assert (ostore / "tokenizer.json").is_file()
    ours = _logits(ostore)
    np.testing.assert_array_equal(ours, _logits(gstore))
    ref = _ort_logits(path)
    in_place = _logits(src)
    np.testing.assert_allclose(in_place, ref, atol=FLOAT32_ATOL, rtol=0)
    # lossy, the 8-bit re-quantization of the experts: measured median KL 8e-5 and worst 3.5e-4
    # nats, same argmax at every position; the bounds leave ~6x room, a wrong expert or a plane
    # dropped (read at 4 bits: median KL 2e-2) breaks them
    kl = kl_per_position(ours, ref)
    assert np.median(kl) <= 5e-4 and kl.max() <= 2e-3, kl
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 7 / 8


@pytest.mark.parametrize(
    "arch,experts,tensors",
    [
        # Mixtral (HF rotate_half q/k rows) -> llama.cpp's `llama` with the converter's q/k permutation
        ("llama", "matmul", ()),
        ("llama", "moe", ()),
        # Qwen2-MoE: q/k/v biases, a sigmoid-gated shared expert, top-k weights not renormalised
        ("qwen2moe", "matmul", ("blk.0.attn_q.bias", "blk.0.ffn_gate_inp_shexp.weight", "blk.1.ffn_down_shexp.weight")),
        # OLMoE: q/k RMS-normed over the whole projection, top-k weights not renormalised
        ("olmoe", "matmul", ()),
    ],
)
def test_onnx_families(tmp_path, arch, experts, tensors):
    """Each family imports into the same store as its GGUF (same planes, same logits), and
    onnxruntime on the graph agrees with the GGUF run in place."""
    spec = synth.SynthSpec.tiny(arch, **SPEC)
    src, gstore = _gguf_store(spec, tmp_path)
    path = build_onnx(spec, tmp_path / experts, experts)
    ostore = convert(path, tmp_path / "o.edgemoe", progress=False)
    om, gm = (json.loads((s / "manifest.json").read_text()) for s in (ostore, gstore))
    assert om["experts"] == gm["experts"]
    assert set(tensors) <= {t.name for t in gguf.GGUFReader(ostore / "dense.gguf").tensors}
    np.testing.assert_array_equal(_logits(ostore), _logits(gstore))
    np.testing.assert_allclose(_logits(src), _ort_logits(path), atol=FLOAT32_ATOL, rtol=0)


def test_onnx_matmulnbits_experts_dequantized_exactly_then_stored_lossily(spec, tmp_path):
    """4-bit MatMulNBits experts (block 32, zero points) are dequantized exactly: the import gives
    every expert weight bit for bit as (q - zp) * scale of the codes written. The store then re-fits
    them at the source's width (nested 2,3,4, groups of 64 over the source's blocks of 32): lossy,
    so the store's logits agree with onnxruntime's only within a KL bound."""
    from conftest import kl_per_position

    from edgemoe.store.onnx_import import OnnxSource

    path = build_onnx(spec, tmp_path / "nbits", "nbits")
    t = synth._tensors(spec)
    src = OnnxSource(path)
    try:
        for i in range(spec.n_layer):
            for m in ("gate", "up", "down"):
                got = src.tensor(f"blk.{i}.ffn_{m}_exps.weight").data
                for e in range(spec.n_expert):
                    # exact: codes and zero points are small integers (exact in float32), their
                    # difference is exact, and one float32 product rounds the same everywhere
                    np.testing.assert_array_equal(
                        np.asarray(got[e]),
                        nbits_reference(t[f"blk.{i}.ffn_{m}_exps.weight"][e]),
                        err_msg=f"blk.{i}.ffn_{m}_exps expert {e}",
                    )
    finally:
        src.close()
    st = convert(path, tmp_path / "nbits.edgemoe", progress=False)
    man = json.loads((st / "manifest.json").read_text())
    assert man["source"]["expert_bits_per_weight"] == 4 and man["scheme"]["bits"] == [2, 3, 4]
    ours, ref = _logits(st), _ort_logits(path)
    # lossy (the 4-bit re-fit): measured median KL 0.0097 and worst 0.041 nats over the 8 positions,
    # same argmax everywhere; the bounds leave 3x room. A zero point off by one, or any expert's
    # weights mixed up, goes far past them.
    kl = kl_per_position(ours, ref)
    assert np.median(kl) <= 0.03 and kl.max() <= 0.12, kl
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 7 / 8


def test_load_onnx_path_and_tokenizer(spec, tmp_path, monkeypatch):
    """edgemoe.load(MODEL.onnx) converts into the cache dir once and reads tokenizer.json beside
    it with `tokenizers`: the same ids and text as llama.cpp's tokenizer of the GGUF."""
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))
    path = build_onnx(spec, tmp_path / "m", "moe")
    src = synth.write_model(spec, tmp_path / "m.gguf")
    text = "ROMEO. What light through yonder window breaks? 123 éà"
    with edgemoe.load(path, progress=False) as m, edgemoe.load(src, progress=False) as g:
        assert m.store_path is not None and str(m.store_path).startswith(str(tmp_path / "cache"))
        ids = m.tokenize(text)
        assert ids == g.tokenize(text)
        assert m.detokenize(ids[1:]) == g.detokenize(ids[1:]) == text
        assert m._tok.is_eog(spec.eos_id) and not m._tok.is_eog(ids[2])
        out = m.generate("ROMEO.", max_tokens=5, temperature=0)
        assert isinstance(out, str)
    with edgemoe.load(path, progress=False) as m2:  # converted once
        assert m2.store_path == m.store_path


def test_cli_convert_and_run_onnx(spec, tmp_path, monkeypatch, capsys):
    from edgemoe import cli

    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))
    path = build_onnx(spec, tmp_path / "c", "matmul")
    assert cli.main(["convert", str(path), "-o", str(tmp_path / "c.edgemoe")]) in (0, None)
    assert (tmp_path / "c.edgemoe" / "manifest.json").is_file()
    capsys.readouterr()
    assert cli.main(["run", "-m", str(path), "--max-tokens", "4", "--temperature", "0", "ROMEO."]) in (0, None)
    out = capsys.readouterr().out
    assert out.strip() and "error" not in out


def test_unknown_onnx_layout_is_one_clear_error(spec, tmp_path):
    path = build_onnx(spec, tmp_path / "bad", "matmul")
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name == "model.layers.0.attn.q_proj.MatMul.weight":
            t.name = "model.layers.0.attn.mystery.MatMul.weight"
    for n in m.graph.node:
        n.input[:] = [
            "model.layers.0.attn.mystery.MatMul.weight" if x == "model.layers.0.attn.q_proj.MatMul.weight" else x
            for x in n.input
        ]
        if n.name == "/model/layers.0/attn/q_proj/MatMul":
            n.name = "/model/layers.0/attn/mystery/MatMul"
    onnx.save(m, str(path))
    with pytest.raises(EdgeMoEError, match=r"model\.onnx: weights of unknown role.*mystery"):
        convert(path, tmp_path / "bad.edgemoe", progress=False)
    (tmp_path / "bad" / "config.json").write_text(json.dumps(dict(model_type="gpt_neox")))
    with pytest.raises(EdgeMoEError, match=r"model\.onnx: model_type 'gpt_neox' is not supported"):
        convert(path, tmp_path / "bad2.edgemoe", progress=False)


def test_onnx_expert_backend_counts_rows_and_matches_up_to_activation_rounding(spec, tmp_path):
    """Experts of a 4-bit store run on onnxruntime (MatMulNBits sessions derived from the planes,
    or from the Q4_1 form the ggml path transcoded them to) for batches, once routed min_rows
    rows; the logits match edgemoe's own kernels (float32 planes: to float32 rounding; against
    ggml, which rounds activations to 8 bits: within a KL bound) and the stats count each
    backend's rows. Experts in ggml's repacked Q4_0 form (a Q4_0 source) never go to onnxruntime:
    ggml is faster."""
    from conftest import kl_per_position

    from edgemoe.quant import kernels, nested
    from edgemoe.store.onnx_experts import expert_model, full_codes

    QT = gguf.GGMLQuantizationType
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 288, 40)]
    small = dict(n_embd=96, n_ff_exp=96, n_expert=8, n_layer=2)
    for name, sp in (
        ("f32", spec),
        ("q4_1", synth.SynthSpec.tiny("qwen3moe", dtype="Q4_1", **small)),
        ("q4_0", synth.SynthSpec.tiny("qwen3moe", dtype="Q4_0", **small)),
    ):
        src = synth.write_model(sp, tmp_path / f"{name}.gguf")
        st = convert(src, tmp_path / f"{name}.edgemoe", bits=(2, 3, 4), progress=False)
        ref = _logits(st, ids)
        with edgemoe.load(
            st, kv_type="f32", quality="max", progress=False, onnx_experts=dict(min_rows=6, min_batch=1, pool="8MB")
        ) as m:
            first = m.logits(ids)
            again = m.logits(ids)
            c = m.stats().cache
            cache = m._experts.cache
            forms = {cache.fast(*k)["gate"].qtype for k, h in cache.state().held.items() if h.fast}
        if name == "f32":  # group 64 (96 is not a multiple of 32 x 3): numba planes, float32 like onnxruntime
            assert c.backend_rows["onnxruntime"] > 0 and c.backend_rows["edgemoe"] > 0 and c.onnx_sessions > 0
            np.testing.assert_allclose(first, ref, atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(again, ref, atol=2e-4, rtol=1e-4)
        elif name == "q4_1":  # ggml Q4_1 for what onnxruntime does not take; its codes feed the sessions
            assert forms == {QT.Q4_1}
            assert c.backend_rows["onnxruntime"] > 0 and c.backend_rows["ggml"] > 0 and c.onnx_sessions > 0
            # lossy: ggml quantizes the activations to 8 bits (Q8_1), onnxruntime does not, so
            # the two backends differ by that rounding, and where a router is near a tie a token
            # may pick another expert (one position of the 40 here: KL 0.44). Measured median KL
            # 5.7e-4, 39 of 40 positions under 4e-3, argmax 0.95. The bounds catch what the old
            # ones (mean |diff| < 1% of max, argmax > 0.9) let through: the sessions' group
            # offsets 2% off give median KL 3.9e-3 (mean |diff| 0.9% of max, argmax 0.95).
            kl = kl_per_position(again, ref)
            assert np.median(kl) <= 2e-3, kl
            assert (kl > 1e-2).mean() <= 0.1, kl  # routing flips only
            assert (again.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        elif kernels.can_pack_shape(QT.Q4_0, 96):
            assert forms == {QT.Q4_0}
            assert c.backend_rows["onnxruntime"] == 0 and c.backend_rows["ggml"] > 0 and c.onnx_sessions == 0
    # an 8-bit expert graph computes what the nested planes hold
    sch = nested.SCHEMES["matquant"]((2, 4, 8), 32)
    rng = np.random.default_rng(0)
    shapes = {"gate": (32, 64), "up": (32, 64), "down": (64, 32)}
    planes = {k: sch.encode(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}
    model = expert_model(sch, {k: full_codes(sch, planes[k], *shapes[k]) for k in shapes}, shapes)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g, u = (sch.matmul(planes[k], *shapes[k], x) for k in ("gate", "up"))
    want = sch.matmul(planes["down"], *shapes["down"], np.ascontiguousarray(g / (1 + np.exp(-g)) * u, np.float32))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_store_expert_shards(spec, tmp_path):
    """STORE/onnx/blk.L.exp.E.onnx files, derived from the planes, compute the expert's FFN."""
    from edgemoe.store.onnx_experts import export_store
    from edgemoe.store.reader import StoreReader

    src = synth.write_model(spec, tmp_path / "m.gguf")
    st = convert(src, tmp_path / "m.edgemoe", progress=False)  # F32 source: widths 2,4,8
    paths = export_store(st, layers=[1])
    assert len(paths) == spec.n_expert and paths[3].name == "blk.1.exp.3.onnx"
    r = StoreReader(st)
    sch = r.schemes[1]
    bufs = [np.empty(n, np.uint8) for n in r.plane_sizes(1)]
    r.read_planes(1, 3, 0, bufs)
    per = r.matrix_planes(bufs, 1)
    F, D = r.n_ff_exp, r.n_embd
    r.close()
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    g, u = sch.matmul(per["gate"], F, D, x), sch.matmul(per["up"], F, D, x)
    want = sch.matmul(per["down"], D, F, np.ascontiguousarray(g / (1 + np.exp(-g)) * u, np.float32))
    y = ort.InferenceSession(str(paths[3]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_external_data_and_qmoe(spec, gguf_store, tmp_path):
    """Weights in an external data file convert to the same store; a QMoE node (4-bit, block 32,
    per-expert packed codes and scales) converts like MatMulNBits experts of the same codes."""
    _, gstore = gguf_store
    path = build_onnx(spec, tmp_path / "ext", "moe")
    m = onnx.load(str(path))
    onnx.save(
        m,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext" / "model.onnx.data").stat().st_size > path.stat().st_size
    st = convert(path, tmp_path / "ext.edgemoe", progress=False)
    assert (
        json.loads((st / "manifest.json").read_text())["experts"]
        == json.loads((gstore / "manifest.json").read_text())["experts"]
    )
    # QMoE: replace each MoE node by QMoE with the same weights quantized to 4 bits
    nb = build_onnx(spec, tmp_path / "nb", "nbits")
    q = build_onnx(spec, tmp_path / "q", "moe")
    m = onnx.load(str(q))
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type != "MoE":
            continue
        fc1 = onh.to_array(inits[n.input[2]])
        fc2 = onh.to_array(inits[n.input[4]])
        new = []
        for name, w in (("fc1", fc1), ("fc2", fc2)):
            parts = [quant_nbits(w[e]) for e in range(w.shape[0])]
            E, N = w.shape[:2]
            new += [
                onh.from_array(np.stack([p[0] for p in parts]).reshape(E, N, -1), f"{n.name}.{name}.w"),
                onh.from_array(np.stack([p[1] for p in parts]).reshape(E, N, -1), f"{n.name}.{name}.s"),
                onh.from_array(np.stack([p[2] for p in parts]).reshape(E, N, -1), f"{n.name}.{name}.z"),
            ]
        m.graph.initializer.extend(new)
        ins = [
            n.input[0],
            n.input[1],
            f"{n.name}.fc1.w",
            f"{n.name}.fc1.s",
            "",
            f"{n.name}.fc2.w",
            f"{n.name}.fc2.s",
            "",
            "",
            "",
            "",
            f"{n.name}.fc1.z",
            f"{n.name}.fc2.z",
        ]
        attrs = {a.name: oh.get_attribute_value(a) for a in n.attribute}
        n.CopyFrom(
            oh.make_node(
                "QMoE",
                ins,
                list(n.output),
                name=n.name,
                domain="com.microsoft",
                expert_weight_bits=4,
                block_size=32,
                **attrs,
            )
        )
    onnx.save(m, str(q))
    sq = convert(q, tmp_path / "q.edgemoe", progress=False)
    snb = convert(nb, tmp_path / "nb.edgemoe", progress=False)
    mq = json.loads((sq / "manifest.json").read_text())
    assert mq["source"]["expert_bits_per_weight"] == 4
    # same codes: fc1 rows interleave gate and up, quantized per row, so the dequantized experts
    # equal the MatMulNBits model's
    assert mq["experts"] == json.loads((snb / "manifest.json").read_text())["experts"]


def test_float16_weights_stay_f16(tmp_path):
    """float16 ONNX weights give the store of the F16 GGUF (F16 dense tensors, same planes; the
    routers stay float32, as in synth's F16 GGUF)."""
    spec = synth.SynthSpec.tiny("qwen3moe", dtype="F16", **SPEC)
    src, gstore = _gguf_store(spec, tmp_path)
    path = build_onnx(spec, tmp_path / "h", "matmul")
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        a = onh.to_array(t)
        if a.dtype == np.float32 and a.ndim == 2 and ".moe.gate." not in t.name and a.min() > -1e4:  # routers: F32
            t.CopyFrom(onh.from_array(a.astype(np.float16), t.name))
    onnx.save(m, str(path))
    ostore = convert(path, tmp_path / "h.edgemoe", progress=False)
    assert (
        json.loads((ostore / "manifest.json").read_text())["experts"]
        == json.loads((gstore / "manifest.json").read_text())["experts"]
    )
    from edgemoe.models.gguf_file import GGUFFile

    f = GGUFFile(ostore / "dense.gguf")
    assert f.tensor("token_embd.weight").qtype.name == "F16" and f.tensor("blk.0.attn_norm.weight").qtype.name == "F32"
    f.close()
    np.testing.assert_array_equal(_logits(ostore), _logits(gstore))


def test_missing_tokenizer_is_one_clear_error(spec, tmp_path):
    path = build_onnx(spec, tmp_path / "nt", "matmul")
    (tmp_path / "nt" / "tokenizer.json").unlink()
    st = convert(path, tmp_path / "nt.edgemoe", progress=False)
    with pytest.raises(EdgeMoEError, match="without a tokenizer.json"):
        edgemoe.load(st, progress=False)
