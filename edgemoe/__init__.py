"""edgemoe: run Mixture-of-Experts GGUF models on devices whose memory is smaller than the model.

`import edgemoe` is light (the kernels, numba and llama.cpp load with the first model), so the RSS
right after it is the baseline every memory figure is counted from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EdgeMoEError
from .runtime.memory import BASELINE_RSS  # first: RSS right after `import edgemoe`

if TYPE_CHECKING:
    from .api import Model, Response, Stats, load

__all__ = ["EdgeMoEError", "Model", "Response", "Stats", "load", "BASELINE_RSS"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Model", "Response", "Stats", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgemoe' has no attribute {name!r}")
