"""What a `--model` argument may name, and loading it with its tokenizer.

source                                   loaded by
a Hugging Face model folder              `hf.load_hf` (config.json with a model_type)
a run or checkpoint directory (native)   `load.load_model`
(next: a .gguf file, a registered name)  add a branch to `load_pretrained` before the error
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmscale.checkpoint.hf import is_hf_dir, load_hf
from lmscale.checkpoint.load import load_model
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer


def load_pretrained(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[Transformer, Tokenizer]:
    """A model and its tokenizer from a Hugging Face folder, run directory or checkpoint directory.

    Args:
        source: a Hugging Face model folder, a run directory (its latest checkpoint is used) or a
            checkpoint directory.
        device: where to put the weights.
        dtype: a floating dtype (or its name) to cast to; None keeps the saved one.

    Returns:
        The model in eval mode, and the tokenizer saved with it.
    """
    path = Path(source)
    if is_hf_dir(path):
        return load_hf(path, device=device, dtype=dtype)
    # NOTE: GGUF files and registered model names go here, before the "not found" error.
    if not path.exists():
        raise LmscaleError(f"model not found: '{source}' is neither a path nor a known model name")
    model, checkpoint = load_model(path, device=device, dtype=dtype)
    if checkpoint.tokenizer_json is None:
        raise LmscaleError(f"{checkpoint.path} holds no tokenizer.json")
    return model, Tokenizer.from_json(checkpoint.tokenizer_json)
