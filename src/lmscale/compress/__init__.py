"""Compression: make a model smaller and faster, and measure the price in quality.

So far: weight-only quantization (`quantize_`, int8 per channel and int4 group-wise), saved as
a native model folder that every verb loads (`quantize_model`); pruning (`prune_`: magnitude,
2:4, or structured into a smaller dense model), saved as a float folder (`prune_model`); and
`compress_report`, which builds variants in memory and measures size, quality and speed.
"""

from lmscale.compress.prune import PruneConfig, PruneResult, prune_, prune_model
from lmscale.compress.quantize import QuantConfig, quantization_of, quantize_
from lmscale.compress.report import DEFAULT_VARIANTS, Row, Variant, compress_report
from lmscale.compress.save import QuantizeResult, quantize_model, save_quantized

__all__ = [
    "DEFAULT_VARIANTS",
    "PruneConfig",
    "PruneResult",
    "QuantConfig",
    "QuantizeResult",
    "Row",
    "Variant",
    "compress_report",
    "prune_",
    "prune_model",
    "quantization_of",
    "quantize_",
    "quantize_model",
    "save_quantized",
]
