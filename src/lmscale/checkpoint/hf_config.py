"""Hugging Face `config.json` <-> `ModelConfig`, for the architectures lmscale can run exactly.

    model_type   architecture              lmscale
    llama        LlamaForCausalLM          family llama
    mistral      MistralForCausalLM        family llama (no sliding window)
    qwen2        Qwen2ForCausalLM          family llama, qkv_bias (no sliding window)
    gpt2         GPT2LMHeadModel           family gpt2

Anything that would change the maths (RoPE scaling, another activation, a sliding window) is
refused with the field's name rather than loaded into a model that computes something else.
"""

from __future__ import annotations

from typing import Any

from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_SILU = ("silu", "swish")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def hf_config_to_model_config(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face causal-LM config.

    Args:
        cfg: the parsed `config.json`.
        source: what to call it in error messages.

    Returns:
        The equivalent config; LmscaleError names the first field lmscale cannot honour.
    """
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LmscaleError(
            f"{source}: model_type '{model_type}' is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    for arch in cfg.get("architectures") or []:
        if arch != ARCHITECTURES[model_type] and not arch.endswith("Model"):
            raise LmscaleError(f"{source}: architecture '{arch}' is not supported")
    if model_type == "gpt2":
        return _from_gpt2(cfg, source)
    return _from_llama(cfg, model_type, source)


def _from_llama(cfg: dict, model_type: str, source: str) -> ModelConfig:
    _check(cfg.get("hidden_act", "silu") in _SILU, source, "hidden_act", cfg.get("hidden_act"))
    _check_rope(cfg, source)
    if model_type == "mistral":
        _check(cfg.get("sliding_window") is None, source, "sliding_window", cfg["sliding_window"])
    if model_type == "qwen2":
        use_window = cfg.get("use_sliding_window", False)
        _check(not use_window, source, "use_sliding_window", use_window)
    attention_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    # lmscale's `bias` covers every linear layer: only "all" or "none" fit (Qwen2 has qkv only).
    _check(attention_bias == mlp_bias, source, "attention_bias", (attention_bias, mlp_bias))
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // n_heads
    # NOTE: lmscale's own head-pruned models export with n_heads * head_dim < dim; importing
    # such a folder back is not supported yet.
    _check(head_dim * n_heads == dim, source, "head_dim", head_dim)
    return _model_config(
        source,
        family="llama",
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        hidden_dim=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(_rope_theta(cfg)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        bias=bool(attention_bias),
        qkv_bias=model_type == "qwen2",
        init_std=cfg.get("initializer_range", 0.02),
    )


def _from_gpt2(cfg: dict, source: str) -> ModelConfig:
    act = cfg.get("activation_function", "gelu_new")
    _check(act in _GELU_TANH, source, "activation_function", act)
    _check(cfg.get("scale_attn_weights", True), source, "scale_attn_weights", False)
    inverse = cfg.get("scale_attn_by_inverse_layer_idx", False)
    _check(not inverse, source, "scale_attn_by_inverse_layer_idx", inverse)
    _check(not cfg.get("add_cross_attention"), source, "add_cross_attention", True)
    dim = cfg["n_embd"]
    return _model_config(
        source,
        family="gpt2",
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["n_layer"],
        n_heads=cfg["n_head"],
        hidden_dim=cfg.get("n_inner") or 4 * dim,
        max_seq_len=cfg.get("n_positions", 1024),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True,  # GPT2LMHeadModel always ties lm_head to wte
        bias=True,
        init_std=cfg.get("initializer_range", 0.02),
    )


def _model_config(source: str, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except LmscaleError as err:
        raise LmscaleError(f"{source}: {err}") from None


def _rope_theta(cfg: dict) -> float:
    # transformers 5 nests it in rope_parameters; older configs keep it at the top level.
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta", cfg.get("rope_theta", 10000.0))


def _check_rope(cfg: dict, source: str) -> None:
    _check(cfg.get("rope_scaling") is None, source, "rope_scaling", cfg.get("rope_scaling"))
    rope_type = (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    _check(rope_type == "default", source, "rope_parameters.rope_type", rope_type)


def _check(ok: bool, source: str, field: str, value: Any) -> None:
    if not ok:
        raise LmscaleError(f"{source}: {field}={value!r} is not supported")


def model_config_to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers writes for the same model.

    Args:
        cfg: the lmscale config.

    Returns:
        A GPT2LMHeadModel config for the gpt2 family; LlamaForCausalLM for llama (Qwen2ForCausalLM
        when only q/k/v carry biases, as Llama cannot express that).
    """
    if cfg.family == "gpt2":
        return _to_gpt2(cfg)
    return _to_llama(cfg)


def _to_llama(cfg: ModelConfig) -> dict[str, Any]:
    model_type = "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_dropout": 0.0,
        "dtype": "float32",
    }
    if model_type == "llama":
        out |= {"attention_bias": bool(cfg.bias), "mlp_bias": bool(cfg.bias), "pretraining_tp": 1}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}
    return out


def _to_gpt2(cfg: ModelConfig) -> dict[str, Any]:
    if (
        not cfg.bias or not cfg.tie_embeddings or cfg.n_kv_heads != cfg.n_heads or cfg.qkv_bias
        or cfg.q_dim != cfg.dim
    ):  # fmt: skip
        raise LmscaleError(
            "only GPT-2 shaped models export as GPT2LMHeadModel: bias=True, tie_embeddings=True, "
            "n_kv_heads=n_heads, qkv_bias=False, n_heads * head_dim = dim"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.hidden_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
