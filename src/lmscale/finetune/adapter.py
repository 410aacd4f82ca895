"""Adapter folders: the trained A and B matrices and what they were trained on, nothing more.

    OUT/
        adapter_model.safetensors   `<layer>.lora_A.weight` (r, in), `<layer>.lora_B.weight` (out, r)
        adapter_config.json         {"format", "rank", "alpha", "dropout", "targets", "modules",
                                     "base": {fingerprint}, "base_quantization": {...} or null}

The fingerprint of the base is its model config, the shape of every adapted layer and a
SHA-256 of the first and last adapted layers' weights (rounded to bfloat16, so a float32 and a
bfloat16 load of the same weights agree). An adapter loaded onto another model is refused
with one line saying what differs; a model that already has the adapter merged in differs in
exactly those weights, so a second application is refused too.

A QLoRA adapter records the base's quantization; loading it onto the float model it came from
quantizes that model the same way first (round-to-nearest is deterministic), so the adapter
runs on exactly the weights it was trained against.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmscale.compress.quantize import QuantConfig, quantization_of, quantize_
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.finetune.lora import (
    DEFAULT_ADAPTER,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora_,
    lora_layers,
)
from lmscale.model.quantized import QuantizedLinear

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "lmscale-lora-1"


def save_adapter(
    model: nn.Module, out: str | Path, config: LoRAConfig, name: str = DEFAULT_ADAPTER,
    extra: dict | None = None,
) -> Path:  # fmt: skip
    """Write adapter `name` of `model` to the folder `out` (created; files replaced atomically).

    Args:
        model: a model holding the adapter (merged or not).
        out: the adapter folder.
        config: the adapter's `LoRAConfig` (rank, alpha, dropout, targets as the user gave them).
        name: which adapter.
        extra: more JSON-able fields for adapter_config.json (e.g. the base model's name and
            the training settings).

    Returns:
        The folder.
    """
    state = adapter_state_dict(model, name)
    if not state:
        raise LmscaleError(f"the model holds no adapter named '{name}'")
    return write_adapter(out, state, adapter_record(model, config, name, extra))


def adapter_record(
    model: nn.Module, config: LoRAConfig, name: str = DEFAULT_ADAPTER, extra: dict | None = None
) -> dict:
    """adapter_config.json's contents for adapter `name` of `model` (see `save_adapter`).

    A sharded run computes this before sharding, while the base weights it hashes are whole.
    """
    modules = [n for n, layer in lora_layers(model).items() if name in layer.lora_A]
    return {
        "format": FORMAT, "rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
        "targets": list(config.targets), "modules": modules,
        "base": fingerprint(model, modules),
        "base_quantization": base_quantization(model),
    } | (extra or {})  # fmt: skip


def write_adapter(out: str | Path, state: dict[str, Tensor], record: dict) -> Path:
    """Write an adapter's full tensors and its `adapter_record` to the folder `out`."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    _write_atomic(out / CONFIG, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of an adapter folder, checked for the fields loading needs."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise LmscaleError(f"{directory} is not an adapter folder: {CONFIG} not found")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LmscaleError(f"{path} is not valid JSON: {error}") from None
    needed = ("format", "rank", "alpha", "dropout", "modules", "base")
    missing = [key for key in needed if key not in record]
    if missing or record["format"] != FORMAT:
        raise LmscaleError(f"{path} is not an lmscale LoRA adapter config (missing {missing})")
    return record


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Put the adapter saved in `directory` on `model` as adapter `name`, and activate it.

    Args:
        model: the base model the adapter was trained on (float; a QLoRA adapter's base is
            quantized here as it was in training).
        directory: a folder written by `save_adapter`.
        name: the adapter's name on this model (several may coexist: see `set_adapter`).

    Returns:
        The same model. The adapter's parameters are frozen (this is for inference; call
        `lora.mark_trainable_` to train on).

    Raises:
        LmscaleError: the folder is not an adapter, or it was trained on another base model.
    """
    record = read_adapter_config(directory)
    _quantize_like(model, record.get("base_quantization"), directory)
    check_base(model, record, directory)
    config = LoRAConfig(
        record["rank"], record["alpha"], record["dropout"], tuple(record["modules"])
    )
    apply_lora_(model, config, name)
    state = load_file(str(Path(directory) / WEIGHTS))
    expected = adapter_state_dict(model, name)
    if state.keys() != expected.keys():
        raise LmscaleError(f"{Path(directory) / WEIGHTS} does not hold the layers its config names")
    with torch.no_grad():
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                raise LmscaleError(f"{key} in {directory} has shape {tuple(state[key].shape)}")
            tensor.copy_(state[key])
    model.requires_grad_(False)
    return model


def base_quantization(model: nn.Module) -> dict | None:
    """`quantization_of(model)` under the base model's layer names (no `.base` of a wrapper)."""
    record = quantization_of(model)
    if record is None:
        return None
    wrapped = {
        f"{name}.base": name for name, m in model.named_modules() if isinstance(m, LoRALinear)
    }
    return record | {"modules": [wrapped.get(name, name) for name in record["modules"]]}


def _quantize_like(model: nn.Module, quantization: dict | None, directory) -> None:
    """Quantize a float base the way the adapter's base was (QLoRA); a match is left alone."""
    if quantization is None or quantization_of(model) is not None:
        return  # a differently quantized base fails the fingerprint check next
    modules = set(quantization["modules"])
    try:
        quantize_(
            model,
            QuantConfig(
                quantization["method"], quantization["group_size"],
                zero_point=quantization.get("zero_point", "int"),
            ),
            filter_fn=lambda _, fqn: fqn in modules,
        )  # fmt: skip
    except LmscaleError as error:
        raise LmscaleError(
            f"cannot quantize the base as adapter {directory} needs: {error}"
        ) from None


def fingerprint(model: nn.Module, modules: list[str]) -> dict:
    """What identifies the base an adapter fits: config, adapted shapes, a hash of two weights."""
    config = getattr(model, "config", None)
    shapes = {name: list(_base_weight(model, name).shape) for name in modules}
    ends = sorted({modules[0], modules[-1]}, key=modules.index)
    digest = hashlib.sha256()
    for name in ends:
        digest.update(_weight_bytes(_base_weight(model, name)))
    return {
        "model": to_dict(config) if config is not None else None,
        "shapes": shapes,
        "hashed": ends,
        "sha256": digest.hexdigest(),
    }


def check_base(model: nn.Module, record: dict, directory: str | Path) -> None:
    """Raise a one-line LmscaleError unless `model` is the base the adapter was trained on."""
    saved = record["base"]
    what = f"adapter {directory} was trained on another base model"
    current_config = to_dict(model.config) if hasattr(model, "config") else None
    if saved["model"] and current_config:
        diff = [k for k in saved["model"] if saved["model"][k] != current_config.get(k)]
        if diff:
            key = diff[0]
            raise LmscaleError(
                f"{what}: its {key} is {saved['model'][key]}, this model's is "
                f"{current_config.get(key)}"
            )
    for module, shape in saved["shapes"].items():
        try:
            current = list(_base_weight(model, module).shape)
        except (AttributeError, LmscaleError):
            raise LmscaleError(f"{what}: this model has no linear layer '{module}'") from None
        if current != shape:
            raise LmscaleError(f"{what}: '{module}' is {shape} there, {current} here")
    if fingerprint(model, saved["hashed"])["sha256"] != saved["sha256"]:
        raise LmscaleError(
            f"{what}: the weights of {' and '.join(saved['hashed'])} differ "
            "(another checkpoint, another quantization, or the adapter is already merged in)"
        )


def _base_weight(model: nn.Module, name: str) -> Tensor:
    """The frozen weight (out, in) under layer `name`, without any merged adapter update."""
    module = model.get_submodule(name)
    base = module.base if isinstance(module, LoRALinear) else module
    if isinstance(base, QuantizedLinear):
        return base.dequantize(torch.float32)
    if not isinstance(base, nn.Linear):
        raise LmscaleError(f"'{name}' is not a linear layer")
    weight = base.weight.detach()
    if isinstance(module, LoRALinear) and module.merged is not None:
        weight = weight - module.delta_weight(module.merged).detach().to(weight.dtype)
    return weight


def _weight_bytes(weight: Tensor) -> bytes:
    return (
        weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    )
