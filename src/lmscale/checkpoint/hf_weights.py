"""Weight names and layouts: lmscale's state dict <-> a Hugging Face checkpoint's.

Llama, Mistral and Qwen2 rename one-to-one:

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention.wq / wk / wv / wo   model.layers.N.self_attn.q_proj / k_proj / v_proj / o_proj
    layers.N.feed_forward.w1 / w3 / w2     model.layers.N.mlp.gate_proj / up_proj / down_proj
    layers.N.attention_norm / ffn_norm     model.layers.N.input_layernorm / post_attention_layernorm
    norm.weight / output.weight            model.norm.weight / lm_head.weight (absent when tied)

GPT-2 stores its linear layers as `Conv1D`, whose weight is (in, out), the transpose of
`nn.Linear`'s; and one `c_attn` holds q|k|v side by side:

    transformer.h.N.attn.c_attn.weight (dim, 3*dim) --t--> (3*dim, dim) --split--> wq | wk | wv
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmscale.model import ModelConfig, Transformer

_LLAMA_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_GPT2_TOP = {
    "tok_embeddings": "transformer.wte",
    "pos_embeddings": "transformer.wpe",
    "norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_PLAIN = {"attention_norm": "ln_1", "ffn_norm": "ln_2"}
_GPT2_CONV1D = {"attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc", "feed_forward.w2": "mlp.c_proj"}  # fmt: skip
# Buffers some checkpoints carry that hold no learned weights (causal masks, RoPE frequencies).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def to_hf_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """lmscale's `state_dict()` in Hugging Face names and layouts (tied output left out).

    Args:
        state: the model's state dict (meta tensors work: only shapes are then computed).
        cfg: the model's config.

    Returns:
        The checkpoint tensors transformers expects, each contiguous and owning its memory.
    """
    state = {k: v for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight")}
    if cfg.family == "gpt2":
        out = _gpt2_to_hf(state, cfg)
    else:
        out = {_llama_name(name): tensor for name, tensor in state.items()}
    # NOTE: safetensors refuses tensors that share memory; clone so each is stored once, alone.
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def from_hf_state(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A checkpoint's tensors (names already checked) as lmscale's state dict.

    Args:
        hf_state: Hugging Face names (with their `model.` / `transformer.` prefix) to tensors.
        cfg: the model's config.

    Returns:
        The state dict for `Transformer(cfg).load_state_dict`.
    """
    if cfg.family == "gpt2":
        state = _gpt2_from_hf(hf_state, cfg)
    else:
        names = {_llama_name(name): name for name in _our_names(cfg)}
        state = {names[hf]: tensor for hf, tensor in hf_state.items()}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def normalize_name(name: str, cfg: ModelConfig) -> str:
    """Add the `model.` / `transformer.` prefix a base-model checkpoint leaves out."""
    prefix = "transformer." if cfg.family == "gpt2" else "model."
    if name.startswith(prefix) or name.startswith("lm_head."):
        return name
    return prefix + name


def _our_names(cfg: ModelConfig) -> list[str]:
    with torch.device("meta"):  # names only: no memory, no initialisation cost
        return list(Transformer(cfg).state_dict())


def _llama_name(name: str) -> str:
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return f"model.layers.{index}.{_LLAMA_LAYER[rest]}.{param}"
    return f"{_LLAMA_TOP[module]}.{param}"


def _gpt2_to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = {}
    for name, tensor in state.items():
        module, param = name.rsplit(".", 1)
        if not module.startswith("layers."):
            out[f"{_GPT2_TOP[module]}.{param}"] = tensor
            continue
        _, index, rest = module.split(".", 2)
        prefix = f"transformer.h.{index}"
        if rest in _GPT2_PLAIN:
            out[f"{prefix}.{_GPT2_PLAIN[rest]}.{param}"] = tensor
        elif rest in _GPT2_CONV1D:
            out[f"{prefix}.{_GPT2_CONV1D[rest]}.{param}"] = (
                tensor.t() if param == "weight" else tensor
            )
    for i in range(cfg.n_layers):
        q, k, v = (f"layers.{i}.attention.{w}" for w in ("wq", "wk", "wv"))
        for param in ("weight", "bias"):
            fused = torch.cat([state[f"{q}.{param}"], state[f"{k}.{param}"], state[f"{v}.{param}"]])
            out[f"transformer.h.{i}.attn.c_attn.{param}"] = (
                fused.t() if param == "weight" else fused
            )
    return out


def _gpt2_from_hf(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    state = {}
    for module, hf_module in _GPT2_TOP.items():
        for param in ("weight", "bias"):
            if f"{hf_module}.{param}" in hf_state:
                state[f"{module}.{param}"] = hf_state[f"{hf_module}.{param}"]
    for i in range(cfg.n_layers):
        prefix = f"transformer.h.{i}"
        for param in ("weight", "bias"):
            for ours, hf in _GPT2_PLAIN.items():
                state[f"layers.{i}.{ours}.{param}"] = hf_state[f"{prefix}.{hf}.{param}"]
            for ours, hf in _GPT2_CONV1D.items():
                tensor = hf_state[f"{prefix}.{hf}.{param}"]
                state[f"layers.{i}.{ours}.{param}"] = tensor.t() if param == "weight" else tensor
            fused = hf_state[f"{prefix}.attn.c_attn.{param}"]
            fused = fused.t() if param == "weight" else fused  # (3*dim, dim) or (3*dim,)
            for w, part in zip(("wq", "wk", "wv"), fused.chunk(3), strict=True):
                state[f"layers.{i}.attention.{w}.{param}"] = part
    return state
