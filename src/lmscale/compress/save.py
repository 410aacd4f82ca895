"""Quantize a model from any `--model` source and save it as a native model folder.

    OUT/
        model.safetensors   float tensors as before; each quantized layer as its integers
                            (`….qweight`), float16 `….scales` and, for int4, packed `….zeros`
                            (or, zero point "float", float16 `….mins`);
                            a quantized embedding as `tok_embeddings.table.*` (a tied head's
                            `output.*` names the same tensors, stored once)
        config.json         {"model": {...}, "tokenizer": {...},
                             "quantization": {"method", "group_size", "zero_point",
                                              "modules": [fqn, ...],
                                              "embeddings": null | {"method", "group_size",
                                                                    "tied", "zero_point"}}}
        tokenizer.json

`lmscale.checkpoint.load_pretrained(OUT)` reads "quantization" and rebuilds the
`QuantizedLinear` modules from the stored integers (see `lmscale.checkpoint.load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.compress.gptq import GptqConfig, calibrate_, check_calibrate
from lmscale.compress.quantize import (
    QuantConfig,
    quantization_of,
    quantize_,
    quantize_embeddings_,
)
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.model.quantized import QuantizedLinear
from lmscale.tokenizer import Tokenizer


@dataclass
class QuantizeResult:
    """What `quantize_model` wrote."""

    out: Path
    method: str
    group_size: int | None
    modules: int
    """Number of linear layers quantized (the embedding / head not counted)."""
    embeddings: str
    """float, int8 or int4: the token embedding (and output head)."""
    bytes: int
    """Size of the written model.safetensors."""
    float_bytes: int
    """Size of the same tensors in the source model's float dtype (before quantizing)."""
    calibration: dict | None = None
    """The calibrated method's record (see `GptqConfig.as_dict`), or None for RTN."""

    def as_dict(self) -> dict:
        return {
            "out": str(self.out), "method": self.method, "group_size": self.group_size,
            "modules": self.modules, "embeddings": self.embeddings, "bytes": self.bytes,
            "float_bytes": self.float_bytes, "calibration": self.calibration,
        }  # fmt: skip


def quantize_model(
    source: str | Path, config: QuantConfig, out: str | Path, gptq: GptqConfig | None = None
) -> QuantizeResult:
    """Load `source`, quantize it in place (`quantize_`), save it to the new folder `out`.

    Args:
        source: anything `load_pretrained` accepts (a bundled name, .gguf, HF folder, run dir).
        config: the method, group size and embeddings.
        out: the folder to create; an existing one is refused before any work.
        gptq: calibrate with GPTQ (int4) on these settings instead of rounding to nearest.

    Returns:
        The folder written and its sizes.
    """
    if Path(out).exists():
        raise LmscaleError(f"{out} already exists: choose a new --out")
    if gptq is not None:
        check_calibrate(config, "gptq")
    model, tokenizer = load_pretrained(source)
    float_bytes = state_bytes(model)
    if gptq is None:
        names = quantize_(model, config)
    else:
        names = calibrate_(model, tokenizer, config, gptq)
        quantize_embeddings_(model, config)
    if not names and config.embeddings == "float":
        raise LmscaleError(f"{source} has no linear layers to quantize")
    calibration = gptq.as_dict() if gptq is not None else None
    path = save_quantized(model, tokenizer, out, calibration)
    return QuantizeResult(
        path, config.method, config.group_size, len(names), config.embeddings,
        (path / "model.safetensors").stat().st_size, float_bytes, calibration,
    )  # fmt: skip


def save_quantized(
    model: Transformer, tokenizer: Tokenizer, out: str | Path, calibration: dict | None = None
) -> Path:
    """Write a quantized model (see `quantize_`) as a native folder that `load_pretrained` reads.

    Args:
        model: a `Transformer` holding `QuantizedLinear` modules.
        tokenizer: its tokenizer.
        out: the folder to create.
        calibration: how the integers were calibrated, kept as "quantization"."calibration".

    Returns:
        The folder.
    """
    quantization = quantization_of(model)
    if quantization is None:
        raise LmscaleError("the model holds no quantized layers; run quantize_ first")
    if calibration is not None:
        quantization["calibration"] = calibration
    config = {
        "model": to_dict(model.config), "tokenizer": tokenizer.settings,
        "quantization": quantization,
    }  # fmt: skip
    return save_model_dir(out, saved_state(model), config, tokenizer.to_json())


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict as written: every quantized layer's scales (and mins) in float16.

    `quantize_` rounds them to float16 already, so this loses nothing; a tied head's tensors
    stay one object (the file stores them once).
    """
    state = model.state_dict()
    halves: dict[int, Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLinear):
            for buffer in ("scales", "mins"):
                key = f"{name}.{buffer}" if name else buffer
                if key not in state:
                    continue
                tensor = state[key]
                if id(tensor) not in halves:
                    halves[id(tensor)] = tensor.to(torch.float16)
                state[key] = halves[id(tensor)]
    return state


def state_bytes(model: nn.Module) -> int:
    """Bytes of a model's state dict, tensors sharing storage (a tied head) counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.nbytes
    return total
