"""Exporting a model to runtimes outside PyTorch: ONNX with a KV cache, run by onnxruntime.

The model code knows nothing of this: `decoder.py` wraps a `Transformer` in a module whose
cache is passed in and returned (past in, present out), which is what an exported graph needs.
onnx, onnxruntime and onnxscript are an optional extra (`pip install 'lmscale[onnx]'`).
"""

from lmscale.export.onnx import export_onnx, verify_onnx

__all__ = ["export_onnx", "verify_onnx"]
