"""Compression: make a model smaller and faster, and measure the price in quality.

- quantization (`quantize_`: int8 per channel, int8 with dynamic activations, int4 group-wise
  with an integer or float zero point, optionally the embedding table) and GPTQ calibration
  (`gptq`), saved as a native model folder that every verb loads (`quantize_model`);
- pruning (`prune_`: magnitude, 2:4, or structured into a smaller dense model), saved as a
  float folder (`prune_model`), with an optional recovery fine-tune (`distill`);
- distillation from a teacher (`distill`, on the training loop's distillation loss);
- `compress_report`, which builds variants, scores them against the original and measures each
  saved variant's RAM and speed in a fresh process (`measure`).
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
