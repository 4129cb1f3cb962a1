"""How close edgemoe's logits are to llama.cpp's, bit for bit, on tiny synthetic models.

    python3 tools/parity_bits.py [--arches qwen3moe,olmoe,gpt-oss,deepseek2] [--seqs 4]

For each architecture: a tiny model written by edgemoe.testing.synth at F32, and the same model quantized
to Q8_0 by llama.cpp's quantizer; each evaluated on random 40-token sequences (batched, logits at
every position) by edgemoe and by llama.cpp (llama-cpp-python, no flash attention, the same KV cache
type). Prints, per file and KV type, how many sequences are bit-identical and the largest
difference in units of the logits' standard deviation.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np

os.environ.setdefault("EDGEMOE_THREADS", "2")
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

import edgemoe  # noqa: E402 (after EDGEMOE_THREADS: the kernels read it at import)
from edgemoe.runtime import llama_ref  # noqa: E402
from edgemoe.testing import synth  # noqa: E402


def llama_cpp_logits(path: str, ids: list[int], kv: str) -> np.ndarray:
    import llama_cpp

    t = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv]
    llm = llama_ref.llama(
        path,
        n_ctx=256,
        n_batch=256,
        n_ubatch=256,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=t,
        type_v=t,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arches", default="qwen3moe,olmoe,gpt-oss,deepseek2")
    ap.add_argument("--seqs", type=int, default=4)
    args = ap.parse_args()
    print(f"{'arch':10s} {'file':5s} {'kv':4s} {'bit-identical':>14s} {'max |diff| / std':>17s}")
    with tempfile.TemporaryDirectory() as d:
        for arch in args.arches.split(","):
            for ftype in ("F32", "Q8_0"):
                if ftype == "F32":
                    path = str(synth.write_model(synth.SynthSpec.tiny(arch), f"{d}/{arch}-f32.gguf"))
                else:
                    src = synth.write_model(synth.SynthSpec.for_quant(arch), f"{d}/{arch}-src.gguf")
                    path = f"{d}/{arch}-q8_0.gguf"
                    synth.quantize_model(src, path, "Q8_0")
                for kv in ("f32", "f16"):
                    same, worst = 0, 0.0
                    with edgemoe.load(path, kv_type=kv, n_ctx=256) as m:
                        for s in range(args.seqs):
                            ids = np.random.default_rng(s).integers(0, m.config.n_vocab - 3, size=40).tolist()
                            ours, ref = m.logits(ids), llama_cpp_logits(path, ids, kv)
                            same += bool(np.array_equal(ours, ref))
                            worst = max(worst, float(np.abs(ours - ref).max() / ref.std()))
                    print(f"{arch:10s} {ftype:5s} {kv:4s} {f'{same} of {args.seqs}':>14s} {worst:17.1e}")


if __name__ == "__main__":
    main()
