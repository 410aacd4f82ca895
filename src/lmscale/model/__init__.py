"""The decoder-only Transformer: `ModelConfig`, presets by name, and the KV cache.

Pure model code: no torch.distributed, no files, no command line. The config and the presets
import no torch (`lmscale.plan` reads them on machines without it); the modules holding tensors
load on first use.
"""

from importlib import import_module

from lmscale.model.config import PRESETS, ModelConfig, preset

_LAZY = {
    "KVCache": "lmscale.model.kv_cache",
    "Transformer": "lmscale.model.transformer",
    "decode_layout_": "lmscale.model.layout",
}

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "decode_layout_", "preset"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmscale.model' has no attribute {name!r}")
