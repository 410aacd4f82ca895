"""A tiny Llama-shaped chat model saved as a native folder, shared by the fine-tuning tests."""

import pytest
import torch

from lmscale.checkpoint import save_model_dir
from lmscale.config import to_dict
from lmscale.finetune.shakespeare_chat import speaker_conversations, speeches, write_jsonl
from lmscale.model import Transformer, preset
from lmscale.tokenizer import BOS, EOS, Tokenizer

# ChatML with the tiny tokenizer's own special tokens: <|bos|>role\ncontent<|eos|>\n
CHAT_TEMPLATE = (
    "{% for m in messages %}" + BOS + "{{ m['role'] }}\n{{ m['content'] }}" + EOS + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + BOS + "assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: the machine is shared, and a busy second core slows every op down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    _, pairs = speeches()
    hf = Tokenizer.train([line for _, line in pairs] + [who for who, _ in pairs], 512)._hf
    return Tokenizer(hf, chat_template=CHAT_TEMPLATE)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", max_seq_len=256)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A native model folder: what `--model` names in the CLI tests."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_seq_len=256))
    out = tmp_path_factory.mktemp("models") / "tiny"
    config = {"model": to_dict(model.config), "tokenizer": tiny_tokenizer.settings}
    return save_model_dir(out, model.state_dict(), config, tiny_tokenizer.to_json())


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Real chat data from the bundled Hamlet: who speaks a line -> the speaker."""
    path = tmp_path_factory.mktemp("data") / "speakers.jsonl"
    return write_jsonl(speaker_conversations(limit=64, seed=0), path)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct and its tokenizer, loaded once."""
    from lmscale.checkpoint import load_pretrained

    return load_pretrained("smollm2-135m-instruct")
