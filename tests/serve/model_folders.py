"""Model and adapter folders for the reload and Prometheus tests: a small random Llama saved as
a native folder, and LoRA adapters of it with random weights (so each changes the greedy output),
saved as `lmscale finetune` saves them."""

import torch

from lmscale.checkpoint import load_pretrained
from lmscale.checkpoint.native import save_model_dir
from lmscale.config import to_dict
from lmscale.finetune.adapter import save_adapter
from lmscale.finetune.lora import LoRAConfig, adapter_state_dict, apply_lora_
from lmscale.model import ModelConfig, Transformer

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"
SHAPE = dict(family="llama", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=256,
             max_seq_len=512)  # fmt: skip


def save_model(out, tokenizer, seed, **shape):
    torch.manual_seed(seed)
    shape = SHAPE | shape | {"vocab_size": tokenizer.vocab_size}
    model = Transformer(ModelConfig(**shape)).eval()
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


def save_random_adapter(base, out, seed):
    model, _ = load_pretrained(base)
    config = LoRAConfig(rank=4, alpha=8.0)
    apply_lora_(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return save_adapter(model, out, config)
