"""What a `--model` argument may name, and loading it with its tokenizer.

source                                   loaded by
a registered name (bundled models)       `registry.resolve_bundled`, then as its file
a .gguf file                             `gguf.load_gguf` (tokenizer and template from metadata;
                                         its 4-bit linears as int4 with `keep_quantized`)
a Hugging Face model folder              `hf.load_hf` (config.json with a model_type)
a run or checkpoint directory (native)   `load.load_model`
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmscale.checkpoint.gguf import load_gguf
from lmscale.checkpoint.hf import is_hf_dir, load_hf
from lmscale.checkpoint.load import load_model
from lmscale.checkpoint.registry import BUNDLED_MODELS, resolve_bundled
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer


def load_pretrained(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    keep_quantized: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """A model and its tokenizer from any source a `--model` argument may name.

    Args:
        source: a bundled model's name, a .gguf file, a Hugging Face model folder, a run
            directory (its latest checkpoint is used) or a checkpoint directory.
        device: where to put the weights.
        dtype: a floating dtype (or its name) to cast to; None keeps the saved one.
        keep_quantized: a .gguf's Q4_0, Q4_1 and Q4_K linear layers stay int4 (see
            `load_gguf`). Other sources ignore it: a quantized native folder always loads its
            integers, and Hugging Face folders hold floats.

    Returns:
        The model in eval mode, and the tokenizer saved with it.
    """
    path = Path(source)
    if not path.exists():
        path = resolve_bundled(str(source)) or path
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, device, dtype, keep_quantized)
    if is_hf_dir(path):
        return load_hf(path, device=device, dtype=dtype)
    if not path.exists():
        known = ", ".join(BUNDLED_MODELS)
        raise LmscaleError(
            f"model not found: '{source}' is neither a path nor a known model ({known})"
        )
    model, checkpoint = load_model(path, device=device, dtype=dtype)
    if checkpoint.tokenizer_json is None:
        raise LmscaleError(f"{checkpoint.path} holds no tokenizer.json")
    settings = checkpoint.config.get("tokenizer", {})  # absent in checkpoints of older runs
    return model, Tokenizer.from_json(checkpoint.tokenizer_json, **settings)


def _load_gguf(path: Path, device, dtype, keep_quantized) -> tuple[Transformer, Tokenizer]:
    model, gguf = load_gguf(path, device=device, dtype=dtype, keep_quantized=keep_quantized)
    tokenizer = Tokenizer(
        gguf.tokenizer, bos_token=gguf.bos_token, eos_token=gguf.eos_token,
        pad_token=gguf.pad_token, chat_template=gguf.chat_template, add_bos=gguf.add_bos,
    )  # fmt: skip
    return model, tokenizer
