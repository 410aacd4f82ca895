"""`export_onnx`: a model as an ONNX folder onnxruntime runs with a KV cache, and its check.

The folder, laid out as Hugging Face Optimum's ONNX decoders are:

    model.onnx              inputs input_ids, attention_mask, past_key_values.N.key/value;
                            outputs logits, present.N.key/value; batch, sequence and past axes
                            dynamic; one graph for prefill (past length 0) and decode
    model.onnx.data         the weights, beside the graph, when they pass protobuf's 2 GB
    config.json             Hugging Face's config of the architecture, plus an "onnx" record
    generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json

Quantized layers keep their integers: each becomes one MatMulNBits node (see `nbits.py`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmscale.checkpoint import model_config_to_hf_config
from lmscale.errors import LmscaleError
from lmscale.export.decoder import PastKeyValuesDecoder, input_names, output_names
from lmscale.export.nbits import matmul_nbits_onnx, matmul_nbits_op, swap_to_nbits_
from lmscale.model import Transformer, quantized
from lmscale.model.quantized import QuantizedLinear
from lmscale.tokenizer import Tokenizer

MODEL_FILE = "model.onnx"
TWO_GB = 2**31
DEFAULT_OPSET = 18


def require_onnx() -> None:
    """Raise a one-line LmscaleError unless onnx, onnxruntime and onnxscript import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise LmscaleError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({e.name} is missing): "
            "pip install 'lmscale[onnx]'"
        ) from None


def check_out_dir(out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Raise LmscaleError unless `out` can take an export (checked before loading a model)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmscaleError(f"{out} exists and is not an empty folder")
    if opset < 18:
        raise LmscaleError(f"--opset must be 18 or newer (the exporter's minimum), got {opset}")
    return out


def export_onnx(
    model: Transformer, tokenizer: Tokenizer | None, out: str | Path, opset: int = DEFAULT_OPSET
) -> Path:
    """Write `model` (float32, or quantized with integers kept) and `tokenizer` to folder `out`.

    Args:
        model: the model; it is not changed (a copy is exported).
        tokenizer: written beside the graph; None writes none.
        out: a folder that does not exist yet or is empty.
        opset: the ONNX opset of the default domain (18 or newer).

    Returns:
        The folder.
    """
    require_onnx()
    out = check_out_dir(out, opset)
    decoder = PastKeyValuesDecoder(_export_copy(model)).eval()
    program = _torch_export(decoder, opset)
    out.mkdir(parents=True, exist_ok=True)
    weights = sum(t.numel() * t.element_size() for t in decoder.state_dict().values())
    program.save(str(out / MODEL_FILE), external_data=weights >= TWO_GB - 2**26)
    _name_dynamic_axes(out / MODEL_FILE, model.config.n_layers)
    _write_config(out, model, tokenizer, opset)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _export_copy(model: Transformer) -> Transformer:
    """A float32 copy of `model` with its quantized layers in MatMulNBits' layout."""
    copied = copy.deepcopy(model).eval()
    quantized = {n: m for n, m in copied.named_modules() if isinstance(m, QuantizedLinear)}
    floats = [p for n, p in copied.named_parameters() if p.is_floating_point()]
    for p in floats:
        p.data = p.data.float()
    for layer in quantized.values():
        layer.scales = layer.scales.float()
    copied.init_rope()
    try:
        swap_to_nbits_(copied)
    except ValueError as e:
        raise LmscaleError(f"cannot export this quantized model to ONNX: {e}") from None
    return copied


def _torch_export(decoder: PastKeyValuesDecoder, opset: int):
    """torch.export (dynamo) then translation to ONNX, with dynamic batch, sequence and past.

    NOTE: the sample has batch 2, 3 new tokens after 2 past ones, and a distinct tensor per past
    input: export would merge identical tensors into one input and specialise sizes of 0 or 1.
    """
    from torch.export import Dim

    config = decoder.model.config
    B, T, P = 2, 3, 2
    kv = (B, config.n_kv_heads, P, config.head_dim)
    past = tuple(torch.randn(kv) for _ in range(2 * config.n_layers))
    ids = torch.randint(0, config.vocab_size, (B, T))
    mask = torch.ones(B, P + T, dtype=torch.int64)
    batch = Dim("batch_size", min=1, max=4096)
    seq = Dim("sequence_length", min=1, max=config.max_seq_len)
    past_len = Dim("past_sequence_length", min=0, max=config.max_seq_len - 1)
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "past": tuple({0: batch, 2: past_len} for _ in past),
    }
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping ..."
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                decoder, (ids, mask, *past), dynamo=True, opset_version=opset,
                input_names=input_names(config.n_layers),
                output_names=output_names(config.n_layers), dynamic_shapes=shapes,
                custom_translation_table={matmul_nbits_op(): matmul_nbits_onnx}, optimize=True,
                verbose=False,
            )  # fmt: skip
    finally:
        quiet.setLevel(level)


def _name_dynamic_axes(path: Path, n_layers: int) -> None:
    """Give the total length (past + new) Optimum's name; the exporter numbers it s0, s1, ..."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    total = "past_sequence_length + sequence_length"
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        axis = 1 if value.name == "attention_mask" else 2 if "." in value.name else None
        if value.name.startswith("present.") or value.name == "attention_mask":
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = total
    onnx.save(proto, str(path))


def _write_config(out: Path, model: Transformer, tokenizer: Tokenizer | None, opset: int) -> None:
    n = model.config.n_layers
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    record = {
        "opset": opset,
        "n_layers": n,
        "n_kv_heads": model.config.n_kv_heads,
        "head_dim": model.config.head_dim,
        "inputs": input_names(n),
        "outputs": output_names(n),
        "positions": "past_sequence_length + 0..sequence_length-1 for every row",
        "quantization": (
            {"method": quantized[0].method, "group_size": quantized[0].group_size, "op": "MatMulNBits"}
            if quantized else None
        ),
    }  # fmt: skip
    config = model_config_to_hf_config(model.config) | {"onnx": record, "use_cache": True}
    generation = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        config |= ids | {"pad_token_id": tokenizer.pad_id}
        generation = ids | {"pad_token_id": tokenizer.pad_id}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@contextlib.contextmanager
def exact_quantized_math() -> Iterator[None]:
    """Run quantized layers through their reference matmul (float activations) meanwhile.

    MatMulNBits computes with float activations; lmscale's CPU kernels round them to bfloat16
    (their fast path), which alone moves logits by ~1e-3. The export is checked against the
    exact math the ONNX graph encodes.
    """
    previous = quantized.use_kernels
    quantized.use_kernels = False
    try:
        yield
    finally:
        quantized.use_kernels = previous


def verify_onnx(model: Transformer, out: str | Path, prompt_len: int = 8, seed: int = 0) -> dict:
    """Run one prefill and one decode step in onnxruntime and in lmscale; compare the logits.

    Returns:
        {"prefill_max_abs_diff": float, "decode_max_abs_diff": float}.
    """
    from lmscale.export.onnx_runtime import OnnxModel

    onnx_model = OnnxModel(out)
    generator = torch.Generator().manual_seed(seed)
    prompt_len = min(prompt_len, model.config.max_seq_len - 1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator)
    cache = model.new_cache(1, prompt_len + 1)
    with torch.no_grad(), exact_quantized_math():
        ref_prefill = model(ids, cache).float()
        next_id = ref_prefill[:, -1:].argmax(-1)
        ref_decode = model(next_id, cache).float()
    logits, past = onnx_model.step(ids.numpy(), onnx_model.empty_past(1))
    prefill = float(np.abs(logits - ref_prefill.numpy()).max())
    logits, _ = onnx_model.step(next_id.numpy(), past)
    decode = float(np.abs(logits - ref_decode.numpy()).max())
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode}
