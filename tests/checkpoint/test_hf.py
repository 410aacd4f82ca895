"""Hugging Face folders in and out, checked against transformers itself."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from lmscale.checkpoint import (
    export_hf,
    hf_config_to_model_config,
    is_hf_dir,
    load_hf,
    load_hf_model,
    load_pretrained,
)
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer
from lmscale.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip


def reference(kind: str):
    """A tiny random transformers model of `kind`, in eval mode."""
    torch.manual_seed(0)
    config = {
        "llama": lambda: transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False),
        "llama-tied": lambda: transformers.LlamaConfig(**SHAPE, tie_word_embeddings=True),
        "qwen2": lambda: transformers.Qwen2Config(**SHAPE, tie_word_embeddings=False),
        "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=None),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
        ),  # fmt: skip
    }[kind]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is near-zero; widen it so differences would show
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def max_logit_diff(hf_model, model: Transformer) -> float:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf_model(tokens).logits - model(tokens)).abs().max().item()


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "mistral", "gpt2"])
def test_load_matches_transformers(tmp_path, kind):
    hf_model = reference(kind)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = load_hf_model(tmp_path)
    assert model.config.tie_embeddings == hf_model.config.tie_word_embeddings
    assert max_logit_diff(hf_model, model) <= 1e-4


def test_sharded_and_dtype(tmp_path):
    hf_model = reference("llama")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert max_logit_diff(hf_model, load_hf_model(tmp_path)) <= 1e-4
    assert load_hf_model(tmp_path, dtype="bfloat16").output.weight.dtype == torch.bfloat16


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    reference("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_hf_model(tmp_path).tok_embeddings.weight.dtype == torch.bfloat16
    assert load_hf_model(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32


def tiny_tokenizer() -> Tokenizer:
    base = Tokenizer.train(["To be, or not to be, that is the question."] * 20, vocab_size=VOCAB)
    hf = HFTokenizer.from_str(base.to_json())
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    return Tokenizer(hf, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>",
                     chat_template=template)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_loads_in_transformers(tmp_path, family):
    torch.manual_seed(0)
    config = ModelConfig(family=family, vocab_size=VOCAB + 2, dim=64, n_layers=2, n_heads=4,
                         n_kv_heads=2 if family == "llama" else None, max_seq_len=64,
                         tie_embeddings=family == "gpt2", init_std=0.2)  # fmt: skip
    model = Transformer(config).eval()
    tokenizer = tiny_tokenizer()
    export_hf(model, tokenizer, tmp_path)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert max_logit_diff(hf_model.eval(), model) <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "To be, or not<|im_end|> to be"
    assert hf_tokenizer.encode(text) == tokenizer.encode(text)
    assert hf_tokenizer.eos_token == "<|im_end|>"
    # and back again, through the generic entry point
    again, again_tokenizer = load_pretrained(str(tmp_path))
    assert again_tokenizer.settings == tokenizer.settings
    assert torch.equal(again(torch.tensor([[3, 4, 5]])), model(torch.tensor([[3, 4, 5]])))


def test_export_qkv_bias_as_qwen2(tmp_path):
    config = ModelConfig(family="llama", vocab_size=VOCAB, dim=64, n_layers=1, n_heads=4,
                         qkv_bias=True, init_std=0.2, max_seq_len=64)  # fmt: skip
    model = Transformer(config).eval()
    torch.nn.init.normal_(model.layers[0].attention.wk.bias)
    export_hf(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_logit_diff(hf_model, model) <= 1e-4


@pytest.fixture
def llama_dir(tmp_path):
    reference("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"model_type": "falcon"}, "falcon"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ],
)
def test_bad_config(llama_dir, changes, name):
    edit_config(llama_dir, **changes)
    with pytest.raises(LmscaleError, match=name):
        load_hf_model(llama_dir)


def test_truncated_safetensors(llama_dir):
    path = llama_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LmscaleError, match="model.safetensors"):
        load_hf_model(llama_dir)


def test_missing_tensor(llama_dir):
    from safetensors.torch import load_file, save_file

    path = llama_dir / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path)
    with pytest.raises(LmscaleError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_model(llama_dir)


def test_shape_mismatch(llama_dir):
    edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(LmscaleError, match="shape"):
        load_hf_model(llama_dir)


def test_bin_only_dir(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(LmscaleError, match="only safetensors"):
        load_hf_model(llama_dir)


def test_is_hf_dir_and_missing_tokenizer(llama_dir, tmp_path):
    assert is_hf_dir(llama_dir) and not is_hf_dir(tmp_path)
    with pytest.raises(LmscaleError, match="tokenizer.json"):
        load_hf(llama_dir)


def test_config_mapping():
    gpt2 = hf_config_to_model_config({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768,
                                      "n_layer": 12, "n_head": 12, "n_inner": None})  # fmt: skip
    assert (gpt2.hidden_dim, gpt2.tie_embeddings, gpt2.max_seq_len) == (3072, True, 1024)
    with pytest.raises(LmscaleError, match="sliding_window"):
        hf_config_to_model_config(transformers.MistralConfig(sliding_window=4096).to_dict())
