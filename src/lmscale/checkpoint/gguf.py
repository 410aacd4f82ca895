"""GGUF in: a llama.cpp model file as a `Transformer`, its tokenizer and its chat template.

A GGUF holds metadata (shape, tokenizer, chat template) and tensors, many of them quantized in
blocks. We read it with the `gguf` package's `GGUFReader`, dequantize every tensor to float32,
rename it to lmscale's names and undo the row order llama.cpp gives the query and key weights.
With `keep_quantized`, the linear layers of the three 4-bit types that are lmscale int4 layouts
(Q4_0, Q4_1, Q4_K: see `gguf_int4`) and of Q8_0 (grouped int8), and a Q8_0 token table (with
the output head tied to it), load as `QuantizedLinear` / `QuantizedEmbedding` modules holding
the file's own codes instead; every other tensor is dequantized as before.
Everything is checked before anything is returned: a file either loads whole or raises
`LmscaleError` naming the file and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscale.checkpoint.gguf_int4 import (
    GROUP_SIZE,
    INT8_TYPES,
    ZERO_POINTS,
    int4_buffers,
    int8_buffers,
)  # fmt: skip
from lmscale.checkpoint.gguf_tokenizer import GGUFTokenizer, build_tokenizer
from lmscale.checkpoint.load import empty_init, fill_model
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer
from lmscale.model.quantized import swap_in_embedding_, swap_in_quantized_

# Tensor types we can turn into float32 (all through `gguf.quants.dequantize`): those of the
# common llama.cpp files (Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...); not the IQ* and TQ* types.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# llama.cpp's tensor names -> lmscale's; "{n}" is the layer index.
GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


@dataclass
class GGUFModel:
    """Everything a GGUF file holds, in lmscale's terms."""

    config: ModelConfig
    """The model's shape, from the `llama.*` metadata."""
    state_dict: dict[str, Tensor]
    """float32 weights under lmscale's names (`output.weight` is the embedding when tied),
    and the int4 layers' buffers (see `int4_layers`)."""
    tokenizer: Any
    """A Hugging Face `tokenizers.Tokenizer` built from the `tokenizer.ggml.*` metadata."""
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos: bool
    """Whether llama.cpp prepends the BOS token when it encodes a prompt."""
    chat_template: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    """The file's `general.*` strings (name, license, ...)."""
    int4_layers: dict[str, str] = field(default_factory=dict)
    """Linear layers kept as int4 (`keep_quantized`): module name -> zero point ("int" for
    Q4_0, "float" for Q4_1 and Q4_K); `state_dict` holds their `QuantizedLinear` buffers
    (`<name>.qweight`, `.scales`, `.mins` or `.zeros`) instead of `<name>.weight`."""
    int8_layers: list[str] = field(default_factory=list)
    """Modules kept as grouped int8 (Q8_0, group 32; `keep_quantized`): linear layers by name,
    and "tok_embeddings" for the token table (a `QuantizedEmbedding`, the tied head with it);
    `state_dict` holds their `.qweight` and `.scales` (the table's as `tok_embeddings.table.*`)."""


def read_gguf(path: str | Path, keep_quantized: bool = False) -> GGUFModel:
    """Read a GGUF file of the llama architecture with a byte-level BPE ("gpt2") tokenizer.

    Args:
        path: the .gguf file.
        keep_quantized: keep the Q4_0, Q4_1 and Q4_K linear weights as int4 codes and Q8_0
            linear weights and token table as int8 codes (group 32, exactly the file's values)
            rather than dequantizing them; see `GGUFModel.int4_layers` and `.int8_layers`.

    Returns:
        The config, state dict, tokenizer, special tokens, chat template and metadata.

    Raises:
        LmscaleError: the file is missing, truncated or corrupt, or holds something unsupported
            (another architecture, a sentencepiece tokenizer, a tensor type, RoPE scaling).
    """
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = _get(meta, "general.architecture", str, path)
    if arch != "llama":
        raise LmscaleError(f"{path}: architecture '{arch}' is not supported (only 'llama')")
    tokenizer = build_tokenizer(meta, path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, path, len(tokenizer.tokens), tied="output.weight" not in tensors)
    state, int4_layers, int8_layers = _state_dict(tensors, config, path, keep_quantized)
    return _assemble(config, state, int4_layers, int8_layers, tokenizer, meta)


def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    keep_quantized: bool = False,
) -> tuple[Transformer, GGUFModel]:
    """A ready-to-run model from a GGUF file (weights loaded strictly, eval mode).

    Args:
        path: the .gguf file.
        device: where the model goes.
        dtype: a floating dtype (or its name) to cast to; None keeps float32 (and the int4
            layers' float32 scales, which hold Q4_K's exactly).
        keep_quantized: make the Q4_0, Q4_1 and Q4_K linear layers int4 `QuantizedLinear`
            modules (group 32; Q4_0 with zero point 8, the others with a float minimum), and
            Q8_0 linear layers and token table grouped int8 ones, whose dequantized weights
            are exactly the float load's; every other type stays float.

    Returns:
        (model, everything else the file holds, see `read_gguf`).
    """
    gguf_model = read_gguf(path, keep_quantized)
    model = _empty_model(gguf_model.config, gguf_model.int4_layers, gguf_model.int8_layers)
    return fill_model(model, gguf_model.state_dict, device, dtype), gguf_model


def permute_rope(weight: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's reordering of q/k rows: each head's half-split rotary pairs -> interleaved.

    Hugging Face's RoPE rotates row i with row i + head_dim/2 of a head; llama.cpp's rotates rows
    2i and 2i+1, so its converter reorders rows. Kept here to test `unpermute_rope` against.

    Args:
        weight: (n_heads * head_dim, dim) query or key weight in Hugging Face order.
        n_heads: heads of this projection (n_kv_heads for the key).

    Returns:
        The same weight in llama.cpp's row order.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (nh, 2, hs/2, ...)
    return w.transpose(1, 2).reshape(weight.shape)


def unpermute_rope(weight: Tensor, n_heads: int) -> Tensor:
    """Inverse of `permute_rope`: llama.cpp's interleaved row order back to half-split.

    Args:
        weight: (n_heads * head_dim, dim) weight as stored in the GGUF.
        n_heads: heads of this projection (n_kv_heads for the key).

    Returns:
        The weight in the Hugging Face (and lmscale) row order.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (nh, hs/2, 2, ...)
    return w.transpose(1, 2).reshape(weight.shape)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...], label: str) -> Tensor:
    """One tensor's raw data as float32 in PyTorch order (out_features, in_features).

    Args:
        data: the reader's array (quantized blocks as uint8 rows, or plain floats).
        type_name: the GGML type's name, e.g. "Q4_1".
        shape: the expected PyTorch shape.
        label: what to call the tensor in an error ("model.gguf: tensor 'blk.0.attn_q.weight'").

    Returns:
        A float32 tensor of `shape`.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if type_name not in SUPPORTED_TYPES:
        raise LmscaleError(
            f"{label} has type {type_name}, which lmscale cannot read "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    try:
        values = gguf_dequantize(data, GGMLQuantizationType[type_name])
        # NOTE: GGUF lists dimensions innermost first; the reader already reverses them, so
        # rows are out_features as PyTorch wants.
        values = np.require(values, np.float32, ["C", "W"]).reshape(shape)  # own a copy
    except ValueError as error:
        raise LmscaleError(f"{label} does not hold {shape} {type_name} values: {error}") from None
    return torch.from_numpy(values)


def _open(path: Path):
    """The file's `GGUFReader`, or LmscaleError when it is not a readable GGUF."""
    if not path.is_file():
        raise LmscaleError(f"{path}: no such GGUF file")
    try:
        return _plain_array_reader()(path)
    except Exception as error:  # noqa: BLE001 - the parser fails on corrupt input in many ways
        kind = type(error).__name__
        raise LmscaleError(f"{path}: truncated or not a GGUF file ({kind}: {error})") from None


def _plain_array_reader() -> type:
    """`GGUFReader` over a plain ndarray view of its memory map (same bytes, no copy).

    The reader slices its array once per string of the tokenizer's vocabulary and merges (~250k
    slices for SmolLM2); on a `np.memmap` every slice runs memmap's Python `__array_finalize__`,
    which made opening the file take ~3x longer.
    """
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

    return PlainArrayReader


def _metadata(reader, path: Path) -> dict[str, Any]:
    """Every metadata field as a Python value (str, int, float, bool or list)."""
    meta = {}
    for name, reader_field in reader.fields.items():
        try:
            meta[name] = reader_field.contents()
        except Exception as error:  # noqa: BLE001 - a corrupt field decodes in many wrong ways
            raise LmscaleError(f"{path}: metadata '{name}' is corrupt ({error})") from None
    return meta


def _get(meta: dict, key: str, kind: type | tuple[type, ...], path: Path, default=...) -> Any:
    """`meta[key]`, checked to be of `kind`; LmscaleError when missing (with no default) or wrong."""
    if key not in meta:
        if default is ...:
            raise LmscaleError(f"{path}: metadata '{key}' is missing")
        return default
    value = meta[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LmscaleError(f"{path}: metadata '{key}' is {value!r}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _config(meta: dict, path: Path, vocab_size: int, tied: bool) -> ModelConfig:
    """The `ModelConfig` the `llama.*` metadata describes."""
    _check_rope(meta, path)
    n_heads = _get(meta, "llama.attention.head_count", int, path)
    fields = dict(
        family="llama",
        vocab_size=vocab_size,
        dim=_get(meta, "llama.embedding_length", int, path),
        n_layers=_get(meta, "llama.block_count", int, path),
        n_heads=n_heads,
        n_kv_heads=_get(meta, "llama.attention.head_count_kv", int, path, default=n_heads),
        hidden_dim=_get(meta, "llama.feed_forward_length", int, path),
        max_seq_len=_get(meta, "llama.context_length", int, path),
        rope_theta=float(_get(meta, "llama.rope.freq_base", (int, float), path, 10000.0)),
        norm_eps=float(_get(meta, "llama.attention.layer_norm_rms_epsilon", (int, float), path)),
        tie_embeddings=tied,
    )
    try:
        config = ModelConfig(**fields)
    except LmscaleError as error:
        raise LmscaleError(f"{path}: metadata describes an invalid model ({error})") from None
    rotary = _get(meta, "llama.rope.dimension_count", int, path, default=config.head_dim)
    if rotary != config.head_dim:
        raise LmscaleError(
            f"{path}: RoPE over {rotary} of {config.head_dim} head dimensions is not supported"
        )
    return config


def _check_rope(meta: dict, path: Path) -> None:
    """Refuse RoPE scaling: lmscale's RoPE has none, and ignoring it would change the outputs."""
    scaling = _get(meta, "llama.rope.scaling.type", str, path, default="none")
    if scaling != "none":
        raise LmscaleError(f"{path}: RoPE scaling '{scaling}' is not supported")


def _empty_model(
    config: ModelConfig, int4_layers: dict[str, str], int8_layers: list[str]
) -> Transformer:
    """A `Transformer` on the meta device with an empty int4 layer at each of `int4_layers`
    and an empty grouped int8 one (or token table) at each of `int8_layers`."""
    with empty_init():
        model = Transformer(config)
        for zero_point in ("int", "float"):
            names = [name for name, zero in int4_layers.items() if zero == zero_point]
            swap_in_quantized_(model, names, "int4", GROUP_SIZE, zero_point)
        if "tok_embeddings" in int8_layers:
            swap_in_embedding_(model, "int8", GROUP_SIZE, tied=config.tie_embeddings)
        linears = [name for name in int8_layers if name != "tok_embeddings"]
        swap_in_quantized_(model, linears, "int8", GROUP_SIZE)
    return model


def _state_dict(
    tensors: dict, config: ModelConfig, path: Path, keep_quantized: bool
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Every tensor renamed, checked against the model's shapes, dequantized (or kept as int4
    or int8 codes), q/k unpermuted; the int4 layers' zero points by module name; the int8
    modules' names."""
    with empty_init():  # shapes and names only, no memory
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    _check_rope_freqs(tensors, path)
    state, int4_layers, int8_layers, loaded = {}, {}, [], set()
    for gguf_name, tensor in tensors.items():
        if gguf_name == "rope_freqs.weight":
            continue
        name = _lmscale_name(gguf_name, config.n_layers)
        if name is None or name not in expected:
            raise LmscaleError(f"{path}: unexpected tensor '{gguf_name}'")
        label = f"{path}: tensor '{gguf_name}'"
        entries, layout = _load_tensor(tensor, name, expected[name], config, label,
                                       keep_quantized)  # fmt: skip
        state |= entries
        module = name.removesuffix(".weight")
        if layout == "int8":
            int8_layers.append(module)
        elif layout is not None:
            int4_layers[module] = layout
        loaded.add(name)
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
        loaded.add("output.weight")
    elif config.tie_embeddings and "tok_embeddings" in int8_layers:  # the head is the table
        state |= {f"output.{key}": state[f"tok_embeddings.table.{key}"] for key in _INT8_BUFFERS}
        loaded.add("output.weight")
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise LmscaleError(f"{path}: missing tensors for {', '.join(missing[:3])}")
    return state, int4_layers, int8_layers


_INT8_BUFFERS = ("qweight", "scales")


def _load_tensor(
    tensor, name: str, shape: tuple[int, ...], config: ModelConfig, label: str, keep_quantized: bool
) -> tuple[dict[str, Tensor], str | None]:
    """One tensor's state dict entries and layout: its float weight (and None), or, kept
    quantized, its module's buffers (and the int4 layer's zero point, or "int8")."""
    type_name = tensor.tensor_type.name
    table = name == "tok_embeddings.weight"
    linear = len(shape) == 2 and not table  # the other 2-D weights
    if keep_quantized and (linear or table) and type_name in INT8_TYPES:
        buffers, layout = int8_buffers(tensor.data, shape, label), "int8"
    elif keep_quantized and linear and type_name in ZERO_POINTS:
        buffers = int4_buffers(tensor.data, type_name, shape, label)
        layout = ZERO_POINTS[type_name]
    else:
        weight = dequantize(tensor.data, type_name, shape, label)
        return {name: _rope_rows(weight, name, config)}, None
    module = "tok_embeddings.table" if table else name.removesuffix(".weight")
    # NOTE: each buffer has one row per output feature, so q/k rows unpermute as the weight's
    entries = {f"{module}.{key}": _rope_rows(rows, name, config) for key, rows in buffers.items()}
    return entries, layout


def _rope_rows(rows: Tensor, name: str, config: ModelConfig) -> Tensor:
    """`rows` (a weight, or an int4 layer's buffer: one row per output) of tensor `name` in
    lmscale's row order: llama.cpp's query and key rows unpermuted, any other left as it is."""
    if name.endswith("wq.weight"):
        return unpermute_rope(rows, config.n_heads)
    if name.endswith("wk.weight"):
        return unpermute_rope(rows, config.n_kv_heads)
    return rows


def _lmscale_name(gguf_name: str, n_layers: int) -> str | None:
    """lmscale's name for a llama.cpp tensor name, or None when it has none."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    index, _, suffix = rest.partition(".")
    if prefix != "blk" or not index.isdigit() or int(index) >= n_layers:
        return None
    return f"layers.{int(index)}.{LAYER_NAMES[suffix]}" if suffix in LAYER_NAMES else None


def _check_rope_freqs(tensors: dict, path: Path) -> None:
    """Allow a `rope_freqs` tensor only when all its factors are 1 (no Llama-3 style scaling)."""
    if "rope_freqs.weight" not in tensors:
        return
    tensor = tensors["rope_freqs.weight"]
    label = f"{path}: tensor 'rope_freqs.weight'"
    factors = dequantize(tensor.data, tensor.tensor_type.name, (-1,), label)
    if not torch.all(factors == 1.0):
        raise LmscaleError(f"{path}: RoPE frequency scaling (rope_freqs) is not supported")


def _assemble(
    config, state, int4_layers, int8_layers, tokenizer: GGUFTokenizer, meta: dict
) -> GGUFModel:
    general = {k: v for k, v in meta.items() if k.startswith("general.") and isinstance(v, str)}
    return GGUFModel(
        config=config,
        state_dict=state,
        tokenizer=tokenizer.tokenizer,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        add_bos=tokenizer.add_bos,
        chat_template=tokenizer.chat_template,
        metadata=general,
        int4_layers=int4_layers,
        int8_layers=int8_layers,
    )
