"""Build a ready-to-run `Transformer` from a native checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscale.checkpoint.native import Checkpoint, load_checkpoint
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer
from lmscale.model.quantized import swap_in_embedding_, swap_in_quantized_


def load_model(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[Transformer, Checkpoint]:
    """Load a checkpoint's model, weights checked strictly, in eval mode.

    Args:
        source: a checkpoint, run or checkpoints directory (see `resolve_checkpoint`).
        device: where the model goes.
        dtype: a floating dtype (or its name, e.g. "bfloat16") to cast to; None keeps the saved one.

    Returns:
        (model, checkpoint); the checkpoint is loaded without its train state.
    """
    checkpoint = load_checkpoint(source, with_train_state=False)
    config = _model_config(checkpoint)
    quantization = _quantization(checkpoint)
    expected = empty_model(config, quantization).state_dict()
    check_state(expected, checkpoint.model_state, str(checkpoint.path / "model.safetensors"))
    # NOTE: a native checkpoint loads as float32 unless asked otherwise, as it always has.
    dtype = as_dtype(dtype) or torch.float32
    model = build_model(config, checkpoint.model_state, device, dtype, quantization)
    return model, checkpoint


def build_model(
    config: ModelConfig,
    state: dict[str, Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantization: dict | None = None,
) -> Transformer:
    """A model holding `state` (checked strictly), in eval mode, without a random init first.

    The model is built on the meta device and takes the loaded tensors as its parameters
    (`assign=True`), which saves drawing ~all weights at random only to overwrite them.

    Args:
        config: the model's shape.
        state: every weight under lmscale's names (the tied `output.weight` included).
        device: where the model goes.
        dtype: a floating dtype (or its name) to cast to; None keeps the state's dtypes.
        quantization: config.json's "quantization" section, for a model saved by
            `lmscale.compress`: its layers take their stored integers as they are.

    Returns:
        The model.
    """
    return fill_model(empty_model(config, quantization), state, device, dtype)


def fill_model(
    model: Transformer,
    state: dict[str, Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """`model`, built empty on the meta device (`empty_model`), holding `state`, in eval mode.

    For a loader whose layers are not one `quantization` record (a GGUF mixing int4 layouts
    and float layers swaps its own `QuantizedLinear` modules in first).

    Args:
        model: a `Transformer` on the meta device; its modules decide the names and shapes.
        state: every tensor it holds, checked strictly (the tied `output.weight` included).
        device, dtype: as for `build_model`.

    Returns:
        The same model, on `device`.
    """
    config = model.config
    # NOTE: contiguous, as copying into fresh parameters would make them: a transposed view
    # (GPT-2's Conv1D weights) gives matmuls of other rounding.
    state = {name: _aligned(tensor.contiguous()) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings and isinstance(model.tok_embeddings, nn.Embedding):
        # assign replaced the shared parameter by two separate ones (a quantized table is one
        # module, the head itself, and needs nothing)
        model.output.weight = model.tok_embeddings.weight
    model.init_rope(device="cpu")
    return model.to(device=device, dtype=as_dtype(dtype)).eval()


def _aligned(tensor: Tensor) -> Tensor:
    """`tensor`, copied if its data is not 64-byte aligned (a tensor read out of a safetensors
    file often is not; the int8 CPU kernel crashes on such a weight, see `QuantizedLinear`)."""
    if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
        return tensor.clone()
    return tensor


def empty_model(config: ModelConfig, quantization: dict | None = None) -> Transformer:
    """A `Transformer` on the meta device, its quantized layers (if any) swapped in.

    NOTE: a quantized model is rebuilt from its integers, never dequantized as a whole: the
    `QuantizedLinear` layout lives in `lmscale.model.quantized` (pure model code), so loading
    needs nothing from `lmscale.compress`, which sits above this package.
    """
    with empty_init():
        model = Transformer(config)
        if quantization is not None:
            method, group_size = quantization["method"], quantization["group_size"]
            zero_point = quantization.get("zero_point") or "int"
            swap_in_quantized_(model, quantization["modules"], method, group_size, zero_point)
            embeddings = quantization.get("embeddings")
            if embeddings is not None:
                _swap_in_embedding(model, embeddings)
    return model


def _swap_in_embedding(model: Transformer, embeddings: dict) -> None:
    """The quantized token table (and head: the same module when tied, else its own layer)."""
    method, group_size = embeddings["method"], embeddings["group_size"]
    zero_point = embeddings.get("zero_point") or "int"  # absent: saved before float zero points
    tied = bool(embeddings["tied"])
    if tied != model.config.tie_embeddings:
        raise LmscaleError("the quantized embedding's 'tied' does not match the model config")
    swap_in_embedding_(model, method, group_size, tied, zero_point)
    if not tied:
        swap_in_quantized_(model, ["output"], method, group_size, zero_point)


@contextmanager
def empty_init() -> Iterator[None]:
    """Build modules on the meta device with `torch.nn.init`'s fills turned off.

    Meta tensors hold no values, yet filling one at random still runs a Python decomposition
    whose first call imports torch._dynamo (~1.5 s); a model about to receive loaded weights
    needs neither. (transformers' `no_init_weights` does the same.)
    """
    fills = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in fills}
    for name in fills:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def _model_config(checkpoint: Checkpoint) -> ModelConfig:
    """The `ModelConfig` saved under "model" in config.json."""
    fields = checkpoint.config.get("model")
    config_file = checkpoint.path / "config.json"
    if not isinstance(fields, dict):
        raise LmscaleError(f"{config_file} has no 'model' section")
    try:
        return ModelConfig(**fields)
    except TypeError as error:
        raise LmscaleError(f"bad 'model' section in {config_file}: {error}") from None


def _quantization(checkpoint: Checkpoint) -> dict | None:
    """config.json's "quantization" section ({"method", "group_size", "zero_point", "modules",
    "embeddings"}); a section without "zero_point" (saved before it existed) means "int"."""
    section = checkpoint.config.get("quantization")
    if section is None:
        return None
    names = section.get("modules") if isinstance(section, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise LmscaleError(
            f"bad 'quantization' section in {checkpoint.path / 'config.json'}: "
            "expected {'method', 'group_size', 'modules': [names]}"
        )
    embeddings = section.get("embeddings")
    if embeddings is not None and not (
        isinstance(embeddings, dict) and {"method", "group_size", "tied"} <= embeddings.keys()
    ):
        raise LmscaleError(
            f"bad 'quantization' section in {checkpoint.path / 'config.json'}: "
            "'embeddings' must be null or {'method', 'group_size', 'tied'}"
        )
    return {"method": section.get("method"), "group_size": section.get("group_size"),
            "zero_point": section.get("zero_point") or "int", "modules": names,
            "embeddings": embeddings}  # fmt: skip


def check_state(expected: dict[str, Tensor], state: dict[str, Tensor], source: str) -> None:
    """Raise LmscaleError unless `state` has exactly the names and shapes of `expected`.

    Args:
        expected: the tensors the model needs (values unused: meta tensors do).
        state: the tensors read from a file.
        source: what to name in the message (a file or folder).
    """
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise LmscaleError(
            f"weights in {source} do not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise LmscaleError(
                f"tensor '{name}' in {source} has shape {tuple(state[name].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
        if tensor.is_floating_point() and not state[name].is_floating_point():
            raise LmscaleError(f"tensor '{name}' in {source} is {state[name].dtype}, not a float")
        if not tensor.is_floating_point() and state[name].dtype != tensor.dtype:
            raise LmscaleError(
                f"tensor '{name}' in {source} is {state[name].dtype}, not {tensor.dtype}"
            )


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept a torch dtype or its name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise LmscaleError(f"unknown floating dtype '{dtype}'")
    return resolved
