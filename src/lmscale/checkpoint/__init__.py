"""Checkpoint formats. The native one: a directory per step holding safetensors weights, a JSON
config, the tokenizer's JSON and the train state, written atomically. No pickle anywhere.
"""

from lmscale.checkpoint.load import load_model
from lmscale.checkpoint.native import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from lmscale.checkpoint.sources import load_pretrained
from lmscale.checkpoint.state import flatten_state, unflatten_state

__all__ = [
    "Checkpoint",
    "flatten_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "resolve_checkpoint",
    "save_checkpoint",
    "unflatten_state",
]
