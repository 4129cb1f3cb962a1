"""Bad input: one clear error naming the file or value; the CLI exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

import edgemoe


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgemoe: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am not a model")
    with pytest.raises(edgemoe.EdgeMoEError, match="not a GGUF file") as exc:
        edgemoe.load(bad)
    assert str(bad) in str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert_one_line_error(cli("run", "-m", str(bad), "hi"), str(bad), "not a GGUF file")
    assert_one_line_error(cli("info", str(bad)), "not a GGUF file")


def test_missing_file(tmp_path):
    assert_one_line_error(cli("run", "-m", str(tmp_path / "nope.gguf"), "hi"), "nope.gguf", "no such file")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_gguf(build_model, tmp_path, keep):
    src = build_model("qwen3moe").read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(src[: int(len(src) * keep)])
    with pytest.raises(edgemoe.EdgeMoEError, match="truncated"):
        edgemoe.load(bad)
    assert_one_line_error(cli("info", str(bad)), str(bad), "truncated")


def _rewrite(src, dst, *, arch=None, drop=None, tensor_fn=None):
    """Copy a GGUF, changing the architecture, dropping a tensor, or replacing tensors:
    tensor_fn(name, data) -> (data, raw_dtype) or None to keep the tensor as it is."""
    r = gguf.GGUFReader(src)
    old_arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch or old_arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = name.replace(f"{old_arch}.", f"{arch}.", 1) if arch else name
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(key, f.contents())
        elif vt == gguf.GGUFValueType.STRING:
            w.add_string(key, f.contents())
        else:
            w.add_key_value(key, f.contents(), vt)
    for t in r.tensors:
        if t.name == drop:
            continue
        data = np.array(t.data)
        new = tensor_fn(t.name, data) if tensor_fn else None
        if new is not None:
            w.add_tensor(t.name, new[0], raw_dtype=new[1])
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(build_model, tmp_path):
    bad = tmp_path / "falcon.gguf"
    _rewrite(build_model("qwen3moe"), bad, arch="falcon")
    with pytest.raises(edgemoe.EdgeMoEError) as exc:
        edgemoe.load(bad)
    msg = str(exc.value)
    assert "falcon" in msg and "qwen3moe" in msg and "olmoe" in msg  # lists the supported ones
    assert_one_line_error(cli("info", str(bad)), "falcon", "not supported")


def test_missing_tensor(build_model, tmp_path):
    bad = tmp_path / "missing.gguf"
    _rewrite(build_model("qwen3moe"), bad, drop="blk.1.ffn_down_exps.weight")
    with pytest.raises(edgemoe.EdgeMoEError, match=r"tensor blk\.1\.ffn_down_exps\.weight is missing"):
        edgemoe.load(bad)
    assert_one_line_error(cli("run", "-m", str(bad), "hi"), "blk.1.ffn_down_exps.weight", "missing")


def test_unsupported_weight_type(build_model, tmp_path):
    """A tensor whose type edgemoe has no kernel for: the error names tensor and type."""
    from edgemoe.quant import kernels

    unsupported = [
        t
        for t in gguf.GGMLQuantizationType
        if not kernels.supported(t) and t in gguf.GGML_QUANT_SIZES and t.name not in ("I8", "I16", "I32", "I64", "F64")
    ]
    if not unsupported:
        pytest.skip("every GGML type is supported")
    qt = unsupported[0]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    target = "blk.0.attn_q.weight"

    def retype(name, data):
        if name != target:
            return None
        n_out, n_in = data.shape
        return np.zeros((n_out, max(n_in // block, 1) * size), dtype=np.uint8), qt

    bad = tmp_path / "oddtype.gguf"
    _rewrite(build_model("qwen3moe"), bad, tensor_fn=retype)
    with pytest.raises(edgemoe.EdgeMoEError) as exc:
        edgemoe.load(bad)
    assert target in str(exc.value) and qt.name in str(exc.value)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(memory_budget="lots"), "lots"),
        (dict(memory_budget=-5), "positive"),
        (dict(n_ctx=0), "n_ctx"),
        (dict(quality="ultra"), "ultra"),
        (dict(memory_budget="1KB"), "budget"),
    ],
)
def test_bad_load_options(build_model, kwargs, needle):
    with pytest.raises(edgemoe.EdgeMoEError, match=needle):
        edgemoe.load(build_model("qwen3moe"), **kwargs)


def test_bad_generation_options(build_model):
    with edgemoe.load(build_model("qwen3moe")) as m:
        for kw, needle in [
            (dict(temperature=-1), "temperature"),
            (dict(top_p=0), "top_p"),
            (dict(max_tokens=0), "max_tokens"),
            (dict(stop=[""]), "stop"),
        ]:
            with pytest.raises(edgemoe.EdgeMoEError, match=needle):
                m.generate("hi", **kw)
        with pytest.raises(edgemoe.EdgeMoEError, match="out of range"):
            m.logits([0, 10**6])
        with pytest.raises(edgemoe.EdgeMoEError, match="messages"):
            m.chat([{"role": "wizard", "content": "hi"}])


def test_a_norm_present_for_q_but_not_for_k(build_model, tmp_path):
    """qwen3moe with attn_q_norm but without attn_k_norm (a fuzzer's renamed tensor, found in CI): one
    clear error at load, not an AttributeError from inside the RMS norm."""
    bad = tmp_path / "no-k-norm.gguf"
    _rewrite(build_model("qwen3moe"), bad, drop="blk.0.attn_k_norm.weight")
    with pytest.raises(edgemoe.EdgeMoEError, match="do not fit the model's configuration.*norm"):
        edgemoe.load(bad)
    assert_one_line_error(cli("run", "-m", str(bad), "hi"), "no-k-norm.gguf", "norm")


def test_tensor_shape_contradicting_the_config(build_model, tmp_path):
    """A tensor whose shape does not fit the metadata is an error at load, not a crash mid-generation."""
    bad = tmp_path / "shrunk.gguf"
    _rewrite(
        build_model("qwen3moe"),
        bad,
        tensor_fn=lambda name, data: (data[:-16], None) if name == "blk.1.attn_k.weight" else None,
    )
    with pytest.raises(edgemoe.EdgeMoEError, match="do not fit the model's configuration"):
        edgemoe.load(bad)
    assert_one_line_error(cli("run", "-m", str(bad), "hi"), "shrunk.gguf", "configuration")
