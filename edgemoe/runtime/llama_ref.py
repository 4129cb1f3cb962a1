"""llama.cpp (llama-cpp-python) as the reference and the baseline: the one way edgemoe builds a
`llama_cpp.Llama`.

llama.cpp puts some weights into "extra" buffer types at load: CPU_REPACK (Q4_0/Q4_K rows
interleaved for its faster gemv/gemm) and, on CPUs with AMX, AMX (the dense matrices). Two
reasons to turn them off (`use_extra_bufts = False`: the weights stay memory-mapped as written):
- under a memory cap their copies of the weights are OOM-killed (`edgemoe bench`'s runs);
- ggml's AMX matmul in llama-cpp-python 0.3.36 crashes (SIGSEGV in ggml_backend_amx_mul_mat) on
  any batch of two or more tokens on this project's AMX machine (Intel Xeon, VM; seen 2026-12-07),
  so wherever the build reports AMX_INT8 the extra buffer types are off (ggml offers no switch for
  AMX alone, and an override of the dense weights to the CPU buffer type still picks AMX).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any


@functools.cache
def amx_build() -> bool:
    """Whether this llama.cpp build uses AMX on this CPU (then its extra buffer types are off)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def _model_params(extra_bufts: bool) -> Iterator[None]:
    import llama_cpp.llama_cpp as low  # Llama() takes its model parameters from here

    if extra_bufts:
        yield
        return
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def llama(path: Any, *, repack: bool = True, **kw: Any):
    """llama_cpp.Llama(model_path=path, verbose=False, **kw). repack: keep llama.cpp's extra
    weight buffer types (its default; off under a memory cap), always off on an AMX build."""
    import llama_cpp

    kw.setdefault("verbose", False)
    with _model_params(repack and not amx_build()):
        return llama_cpp.Llama(model_path=str(path), **kw)
