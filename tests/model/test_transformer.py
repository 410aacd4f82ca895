"""The Transformer: causality, KV-cache equivalence, shapes, config errors, parity with transformers."""

from __future__ import annotations

import pytest
import torch

from lmscale.errors import LmscaleError
from lmscale.model import PRESETS, ModelConfig, Transformer, preset

FAMILIES = ["tiny", "tiny-gpt2"]


def build(name: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset(name, **overrides)).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_changing_a_token_never_changes_earlier_logits(name):
    model = build(name)
    tokens = torch.randint(model.config.vocab_size, (2, 24))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 7, 23):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % model.config.vocab_size
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_decoding_equals_the_full_pass(name):
    model = build(name)
    tokens = torch.randint(model.config.vocab_size, (3, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=3)
        pieces, pos = [], 0
        for size in (16, 5, 1, 1, 9, 1, 7):  # prefill, then chunks and single tokens
            pieces.append(model(tokens[:, pos : pos + size], cache=cache))
            pos += size
    assert pos == 40 and cache.length == 40
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "llama-135m"])
def test_num_params_matches_the_module(name):
    config = preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert config.num_params() == counted


@pytest.mark.parametrize(
    "fields, message",
    [(dict(dim=100, n_heads=6), "divisible by model.n_heads"),
     (dict(dim=384, n_heads=6, n_kv_heads=4), "divisible by model.n_kv_heads")],
)  # fmt: skip
def test_bad_shapes_are_rejected(fields, message):
    with pytest.raises(LmscaleError, match=message):
        ModelConfig(**fields)


@pytest.mark.parametrize("name", FAMILIES)
def test_tied_embeddings_share_storage(name):
    model = build(name)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    untied = build(name, tie_embeddings=False)
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


def _llama_twin(config: ModelConfig, model: Transformer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
            rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, tie_word_embeddings=True,
            attn_implementation="eager",
        )
    )  # fmt: skip
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}  # fmt: skip
    sd = model.state_dict()
    new = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}  # fmt: skip
    for i in range(config.n_layers):
        for ours, theirs in names.items():
            new[f"model.layers.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
    hf.load_state_dict({k: v.clone() for k, v in new.items()})
    return hf


def _gpt2_twin(config: ModelConfig, model: Transformer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.dim,
            n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.hidden_dim,
            activation_function="gelu_new", layer_norm_epsilon=config.norm_eps, bos_token_id=None,
            eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
        )
    )  # fmt: skip
    sd = model.state_dict()
    new = {"transformer.wte.weight": sd["tok_embeddings.weight"], "transformer.wpe.weight": sd["pos_embeddings.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"],
           "lm_head.weight": sd["output.weight"]}  # fmt: skip
    for i in range(config.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [sd[f"{p}attention.w{x}.weight"] for x in "qkv"]
        new[f"{h}attn.c_attn.weight"] = torch.cat(qkv).T  # Conv1D stores (in, out)
        new[f"{h}attn.c_attn.bias"] = torch.cat([sd[f"{p}attention.w{x}.bias"] for x in "qkv"])
        for ours, theirs in (("attention.wo", "attn.c_proj"), ("feed_forward.w1", "mlp.c_fc"),
                             ("feed_forward.w2", "mlp.c_proj")):  # fmt: skip
            new[f"{h}{theirs}.weight"] = sd[f"{p}{ours}.weight"].T
            new[f"{h}{theirs}.bias"] = sd[f"{p}{ours}.bias"]
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            new[f"{h}{theirs}.weight"], new[f"{h}{theirs}.bias"] = (
                sd[f"{p}{ours}.weight"],
                sd[f"{p}{ours}.bias"],
            )
    hf.load_state_dict({k: v.clone() for k, v in new.items()})
    return hf


@pytest.mark.parametrize("name, twin", [("tiny", _llama_twin), ("tiny-gpt2", _gpt2_twin)])
def test_logits_match_transformers(name, twin):
    model = build(name)
    # Non-trivial norm gains and biases, so that a mis-mapped one would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf = twin(model.config, model).eval()
    tokens = torch.randint(model.config.vocab_size, (2, 33))
    with torch.no_grad():
        diff = (model(tokens) - hf(input_ids=tokens).logits).abs().max()
    assert diff <= 1e-4
