"""The decoder-only Transformer: `ModelConfig`, presets by name, and the KV cache.

Pure model code: no torch.distributed, no files, no command line.
"""

from lmscale.model.config import PRESETS, ModelConfig, preset
from lmscale.model.kv_cache import KVCache
from lmscale.model.layout import decode_layout_
from lmscale.model.transformer import Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "decode_layout_", "preset"]
