"""`load_pretrained` on native checkpoints: the tokenizer comes back with its settings."""

import torch

from lmscale.checkpoint import load_pretrained, save_checkpoint
from lmscale.config import to_dict
from lmscale.model import Transformer, preset
from lmscale.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"


def test_native_checkpoint_keeps_special_tokens_and_chat_template(tmp_path):
    tokenizer = Tokenizer.train(["to be or not to be, that is the question"] * 20, 300)
    tokenizer = Tokenizer.from_json(
        tokenizer.to_json(), pad_token=None, chat_template=TEMPLATE, add_bos=True
    )
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size))
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    path = save_checkpoint(tmp_path, 1, model.state_dict(), config, tokenizer.to_json())
    loaded_model, loaded = load_pretrained(path)
    assert loaded.settings == tokenizer.settings
    assert loaded.encode("to be") == tokenizer.encode("to be")  # add_bos kept
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    tokens = torch.tensor([tokenizer.encode("to be or not")])
    assert torch.equal(loaded_model(tokens), model.eval()(tokens))
