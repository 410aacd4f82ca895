"""`lmscale merge`: fold an adapter into its base and save an ordinary model folder."""

from __future__ import annotations

from pathlib import Path

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.compress.quantize import quantization_of
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.finetune.adapter import load_adapter
from lmscale.finetune.lora import merge_and_unload


def merge_adapter(source: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Load `source`, apply the adapter in `adapter`, merge it, write a native folder at `out`.

    A QLoRA adapter merges into the dequantized weights it was trained against: each adapted
    layer becomes float32 (dequantized W + update), the base's other quantized layers keep
    their integers, and the folder's config records them as any quantized model's does. The
    result computes what the base with the adapter computed, up to float rounding.

    Args:
        source: the base model (anything `load_pretrained` accepts).
        adapter: a folder written by `save_adapter` (e.g. by `lmscale finetune lora`).
        out: the folder to create; an existing one is refused before any work.

    Returns:
        The folder, loadable wherever a model is (`--model OUT`).
    """
    if Path(out).exists():
        raise LmscaleError(f"{out} already exists: choose a new --out")
    model, tokenizer = load_pretrained(source)
    load_adapter(model, adapter)
    merge_and_unload(model, dequantize=True)
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    quantization = quantization_of(model)
    if quantization is not None:
        config["quantization"] = quantization
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())
