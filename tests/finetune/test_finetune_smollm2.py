"""One smoke test on the real SmolLM2-135M-Instruct: a LoRA step on real chat data."""

import torch

from lmscale.finetune.lora import LoRAConfig, apply_lora_, disable_adapters
from lmscale.finetune.sft_data import RowLoader, build_rows
from lmscale.finetune.shakespeare_chat import speaker_conversations
from lmscale.train.loss import count_targets, lm_loss_sum


def test_a_lora_step_on_smollm2_trains_only_the_adapter(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        before = model(ids)
    names = apply_lora_(model, LoRAConfig(rank=4, targets=("q", "v")))
    try:
        assert len(names) == 2 * model.config.n_layers
        rows = build_rows(tokenizer, speaker_conversations(limit=1), max_length=64)
        inputs, targets = RowLoader(rows, batch_size=1).next_batch()
        with torch.no_grad():
            assert torch.equal(model(ids), before)  # B = 0: exactly the base model
        loss = lm_loss_sum(model, inputs, targets) / count_targets(targets)
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 2 * len(names) and all(".lora_" in n for n in grads)
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
        with torch.no_grad():
            assert (model(ids) - before).abs().max() > 1e-3
            with disable_adapters(model):
                assert torch.equal(model(ids), before)
    finally:
        from lmscale.finetune.lora import merge_and_unload, set_adapter

        set_adapter(model, None)
        merge_and_unload(model)  # hand the shared fixture back as it was
