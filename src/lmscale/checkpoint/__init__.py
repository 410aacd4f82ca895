"""Checkpoint formats. The native one: a directory per step holding safetensors weights, a JSON
config, the tokenizer's JSON and the train state, written atomically. Hugging Face folders in and
out (`hf.py`). No pickle anywhere.
"""

from lmscale.checkpoint.hf import export_hf, is_hf_dir, load_hf, load_hf_model
from lmscale.checkpoint.hf_config import hf_config_to_model_config, model_config_to_hf_config
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
    "export_hf",
    "flatten_state",
    "hf_config_to_model_config",
    "is_hf_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_hf",
    "load_hf_model",
    "load_model",
    "load_pretrained",
    "model_config_to_hf_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "unflatten_state",
]
