"""Compression: make a model smaller and faster, and measure the price in quality.

So far: weight-only quantization (`quantize_`, int8 per channel and int4 group-wise), saved as
a native model folder that every verb loads (`quantize_model`).
"""

from lmscale.compress.quantize import QuantConfig, quantization_of, quantize_
from lmscale.compress.save import QuantizeResult, quantize_model, save_quantized

__all__ = [
    "QuantConfig",
    "QuantizeResult",
    "quantization_of",
    "quantize_",
    "quantize_model",
    "save_quantized",
]
