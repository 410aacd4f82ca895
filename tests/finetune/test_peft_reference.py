"""LoRA numerics against the reference: Hugging Face PEFT on the same weights and adapter."""

import pytest
import torch

from lmscale.checkpoint import export_hf
from lmscale.finetune.lora import LoRAConfig, apply_lora_, lora_layers

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wv": "self_attn.v_proj",
            "feed_forward.w2": "mlp.down_proj"}  # fmt: skip


def test_adapted_logits_match_peft(tiny_model, tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    export_hf(tiny_model, tiny_tokenizer, tmp_path / "hf")
    apply_lora_(tiny_model, LoRAConfig(rank=4, alpha=12, targets=("q", "v", "down")))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(tiny_model).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
    reference = peft.get_peft_model(hf, config).eval()
    state = {}
    for name, layer in lora_layers(tiny_model).items():
        block, suffix = name.split(".", 2)[1], name.split(".", 2)[2]
        prefix = f"base_model.model.model.layers.{block}.{HF_NAMES[suffix]}"
        state[f"{prefix}.lora_A.default.weight"] = layer.lora_A["default"].weight
        state[f"{prefix}.lora_B.default.weight"] = layer.lora_B["default"].weight
    missing = set(state) - set(reference.state_dict())
    assert not missing, missing
    reference.load_state_dict(state, strict=False)

    tokens = torch.randint(0, 512, (2, 20), generator=generator)
    with torch.no_grad():
        assert (reference(tokens).logits - tiny_model(tokens)).abs().max() <= 1e-4
