"""Checkpoint formats. The native one: a directory per step holding safetensors weights, a JSON
config, the tokenizer's JSON and the train state, written atomically. No pickle anywhere.
GGUF (llama.cpp's format) comes in through `read_gguf` / `load_gguf`.
"""

from lmscale.checkpoint.gguf import GGUFModel, load_gguf, read_gguf
from lmscale.checkpoint.load import load_model
from lmscale.checkpoint.native import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from lmscale.checkpoint.registry import BUNDLED_MODELS, resolve_bundled, smollm2_path
from lmscale.checkpoint.sources import load_pretrained
from lmscale.checkpoint.state import flatten_state, unflatten_state

__all__ = [
    "BUNDLED_MODELS",
    "Checkpoint",
    "GGUFModel",
    "flatten_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_gguf",
    "load_model",
    "load_pretrained",
    "read_gguf",
    "resolve_bundled",
    "resolve_checkpoint",
    "save_checkpoint",
    "smollm2_path",
    "unflatten_state",
]
