"""Checkpoint formats. The native one: a directory per step holding safetensors weights, a JSON
config, the tokenizer's JSON and the train state, written atomically. Hugging Face folders in and
out (`hf.py`); GGUF (llama.cpp's format) in (`gguf.py`). No pickle anywhere.
"""

from lmscale.checkpoint.gguf import GGUFModel, load_gguf, read_gguf
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
    save_model_dir,
)
from lmscale.checkpoint.registry import BUNDLED_MODELS, resolve_bundled, smollm2_path
from lmscale.checkpoint.sources import load_pretrained
from lmscale.checkpoint.state import flatten_state, unflatten_state

__all__ = [
    "BUNDLED_MODELS",
    "Checkpoint",
    "GGUFModel",
    "export_hf",
    "flatten_state",
    "hf_config_to_model_config",
    "is_hf_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_gguf",
    "load_hf",
    "load_hf_model",
    "load_model",
    "load_pretrained",
    "model_config_to_hf_config",
    "read_gguf",
    "resolve_bundled",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_model_dir",
    "smollm2_path",
    "unflatten_state",
]
