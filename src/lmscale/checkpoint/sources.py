"""What a `--model` argument may name, and loading it with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from lmscale.checkpoint.load import load_model
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer


def load_pretrained(
    source: str, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer]:
    """A model and its tokenizer from a run directory or a checkpoint directory.

    Args:
        source: a run directory (its latest checkpoint is used) or a checkpoint directory.
        device: where to put the weights.

    Returns:
        The model in eval mode, and the tokenizer saved with it.
    """
    if not Path(source).exists():
        raise LmscaleError(f"model not found: '{source}' is neither a path nor a known model name")
    model, checkpoint = load_model(source, device=device)
    if checkpoint.tokenizer_json is None:
        raise LmscaleError(f"{checkpoint.path} holds no tokenizer.json")
    return model, Tokenizer.from_json(checkpoint.tokenizer_json)
