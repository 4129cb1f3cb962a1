"""edgemoe: run Mixture-of-Experts GGUF models on devices whose memory is smaller than the model."""

from .errors import EdgeMoEError
from .api import Model, Response, Stats, load

__all__ = ["EdgeMoEError", "Model", "Response", "Stats", "load"]
__version__ = "0.1.0"
