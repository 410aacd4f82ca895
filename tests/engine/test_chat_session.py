"""ChatSession with the bundled SmolLM2: history, template rendering, stops, prefix reuse."""

import pytest
import torch

from lmscale.checkpoint import load_pretrained
from lmscale.engine import ChatSession, SamplingParams
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is steadier
    yield load_pretrained("smollm2-135m-instruct")
    torch.set_num_threads(threads)


def test_history_grows_and_prompt_is_the_rendered_template(smollm):
    model, tokenizer = smollm
    session = ChatSession(model, tokenizer, GREEDY, system=SYSTEM)
    first = "".join(session.reply("What is the capital of France?"))
    assert "Paris" in first and "<|im_end|>" not in first
    second = "".join(session.reply("And of Germany?"))
    assert "Berlin" in second
    assert [m["role"] for m in session.messages] == [
        "system", "user", "assistant", "user", "assistant"
    ]  # fmt: skip
    assert session.messages[2]["content"] == first
    expected = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        f"<|im_start|>assistant\n{first}<|im_end|>\n"
        "<|im_start|>user\nAnd of Germany?<|im_end|>\n"
        f"<|im_start|>assistant\n{second}<|im_end|>\n"
    )
    rendered = tokenizer.apply_chat_template(session.messages, add_generation_prompt=False)
    assert rendered == expected
    assert tokenizer.decode(session.prompt_ids()) == expected + "<|im_start|>assistant\n"


def test_rendering_matches_transformers(smollm, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, tokenizer = smollm
    tokenizer.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Tell me a joke."}]  # fmt: skip
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_greedy_reply_is_deterministic_and_prefix_reuse_changes_nothing(smollm):
    model, tokenizer = smollm
    session = ChatSession(model, tokenizer, GREEDY)
    "".join(session.reply("Name a primary colour."))
    reused = "".join(session.reply("Name another one."))
    assert session.cache.length == len(session.cached_ids) > 0
    fresh = ChatSession(model, tokenizer, GREEDY)  # same history, prefilled from scratch
    fresh.messages = session.messages[:2]
    assert "".join(fresh.reply("Name another one.")) == reused
    session.reset()
    assert session.messages == [] and session.cache.length == 0


def test_reply_stops_at_end_of_turn_before_the_token_budget(smollm):
    model, tokenizer = smollm
    session = ChatSession(model, tokenizer, SamplingParams(temperature=0, max_new_tokens=200))
    reply = "".join(session.reply("Say just the word yes."))
    assert len(tokenizer.encode(reply, add_bos=False)) < 200
    assert tokenizer.end_of_turn_ids == [tokenizer.token_to_id("<|im_end|>")]


def test_a_model_without_chat_template_is_refused():
    tokenizer = Tokenizer.train(["a b c d e f g"] * 10, vocab_size=300)
    with pytest.raises(LmscaleError, match="no chat template"):
        ChatSession(Transformer(preset("tiny")), tokenizer, GREEDY)
