"""gpt-oss: what its GGUF metadata means beyond the llama-like families: sliding-window attention
on a pattern of layers, with an optional rope base of their own. (Its attention scale 1/sqrt(n_rot)
is set in config.py; its attention sinks, expert biases and clamped SwiGLU are tensors and an
activation: runtime/.)"""

from __future__ import annotations


def fields(key, n_layer: int, extra: dict) -> None:
    """The sliding window, which layers use it, and their rope base into extra."""
    n_swa = int(key("attention.sliding_window", required=True))
    pattern = key("attention.sliding_window_pattern", 2)
    if isinstance(pattern, (list, tuple)) or getattr(pattern, "ndim", 0):
        swa = tuple(bool(v) for v in pattern)
    else:  # llama_hparams::set_swa_pattern(n, dense_first=false): il % n < n - 1
        n = int(pattern)
        swa = tuple(n == 0 or i % n < n - 1 for i in range(n_layer))
    extra.update(n_swa=n_swa, swa_layers=swa, rope_theta_swa=float(key("rope.freq_base_swa", 0.0) or 0.0))
