"""LoRA layers on a tiny model: what trains, what is exact, what switches."""

import copy

import pytest
import torch

from lmscale.compress import QuantConfig, quantize_
from lmscale.errors import LmscaleError
from lmscale.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_names,
    apply_lora_,
    disable_adapters,
    lora_layers,
    merge_and_unload,
    merge_lora_,
    resolve_targets,
    set_adapter,
    unmerge_lora_,
)
from lmscale.model.quantized import QuantizedLinear
from lmscale.train.loss import lm_loss_sum

TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def randomize_b_(model, name="default", seed=1):
    """Give every B a non-zero value, as training would (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                weight = layer.lora_B[name].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)


def test_short_names_and_patterns_resolve_to_the_model_layers(tiny_model):
    assert resolve_targets(tiny_model, ["q", "down"]) == [
        "layers.0.attention.wq", "layers.0.feed_forward.w2",
        "layers.1.attention.wq", "layers.1.feed_forward.w2",
    ]  # fmt: skip
    assert resolve_targets(tiny_model, ["layers.1.attention.w[kv]"]) == [
        "layers.1.attention.wk", "layers.1.attention.wv",
    ]  # fmt: skip
    assert len(resolve_targets(tiny_model, ["all-linear"])) == 2 * 7  # not the output head
    with pytest.raises(LmscaleError, match="matches no linear layer"):
        resolve_targets(tiny_model, ["qq"])


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
def test_only_adapter_parameters_receive_gradients(tiny_model, quantized):
    if quantized:
        quantize_(tiny_model, QuantConfig("int4", 32))
    apply_lora_(tiny_model, LoRAConfig(rank=4, targets=("q", "v", "up")))
    randomize_b_(tiny_model)
    tiny_model.train()
    lm_loss_sum(tiny_model, TOKENS[:, :-1], TOKENS[:, 1:]).backward()
    with_grad = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert len(with_grad) == 2 * 3 * 2  # A and B of 3 layers in 2 blocks
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == with_grad
    if quantized:
        base = tiny_model.layers[0].attention.wq.base
        assert isinstance(base, QuantizedLinear)
        assert all(not b.requires_grad for b in base.buffers())


def test_fresh_adapter_leaves_outputs_exactly_unchanged(tiny_model):
    with torch.no_grad():
        before = tiny_model(TOKENS)
        apply_lora_(tiny_model, LoRAConfig(rank=8, targets=("all-linear",)))
        assert torch.equal(tiny_model(TOKENS), before)


def test_merge_and_unmerge_match_the_unmerged_adapter(tiny_model):
    base_weight = tiny_model.layers[0].attention.wq.weight.detach().clone()
    apply_lora_(tiny_model, LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "down")))
    randomize_b_(tiny_model)
    with torch.no_grad():
        unmerged = tiny_model(TOKENS)
        with disable_adapters(tiny_model):
            plain = tiny_model(TOKENS)
        assert (unmerged - plain).abs().max() > 1e-2  # the adapter does change the output
        merge_lora_(tiny_model)
        assert (tiny_model(TOKENS) - unmerged).abs().max() <= 1e-5
        unmerge_lora_(tiny_model)
        assert (tiny_model(TOKENS) - unmerged).abs().max() <= 1e-5
        assert (tiny_model.layers[0].attention.wq.base.weight - base_weight).abs().max() <= 1e-6
        merge_and_unload(tiny_model)
        assert not lora_layers(tiny_model)
        assert (tiny_model(TOKENS) - unmerged).abs().max() <= 1e-5


def test_quantized_base_merges_only_by_dequantizing(tiny_model):
    quantize_(tiny_model, QuantConfig("int8"))
    apply_lora_(tiny_model, LoRAConfig(rank=4, targets=("q", "o")))
    randomize_b_(tiny_model)
    with torch.no_grad():
        adapted = tiny_model(TOKENS)
        with pytest.raises(LmscaleError, match="quantized base"):
            merge_lora_(tiny_model)
        merge_and_unload(tiny_model, dequantize=True)
        assert type(tiny_model.layers[0].attention.wq) is torch.nn.Linear
        assert isinstance(tiny_model.layers[0].attention.wk, QuantizedLinear)  # not adapted
        # NOTE: the int8 CPU kernel runs its activations in bfloat16, the merged float layers in
        # float32, so they agree to bf16 rounding (float bases merge to 1e-5: tests above).
        assert (tiny_model(TOKENS) - adapted).abs().max() <= 5e-3


def test_two_adapters_switch_and_switching_back_reproduces(tiny_model):
    apply_lora_(tiny_model, LoRAConfig(rank=4, targets=("q", "v")), name="first")
    randomize_b_(tiny_model, "first", seed=1)
    apply_lora_(tiny_model, LoRAConfig(rank=2, targets=("o",)), name="second")
    randomize_b_(tiny_model, "second", seed=2)
    assert adapter_names(tiny_model) == ["first", "second"]
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".second." in n for n in trainable)  # the newest one trains
    with torch.no_grad():
        second = tiny_model(TOKENS)
        set_adapter(tiny_model, "first")
        first = tiny_model(TOKENS)
        set_adapter(tiny_model, None)
        plain = tiny_model(TOKENS)
        set_adapter(tiny_model, "second")
        assert torch.equal(tiny_model(TOKENS), second)
    assert (first - second).abs().max() > 1e-2 and (first - plain).abs().max() > 1e-2
    assert isinstance(tiny_model.layers[0].attention.wo, LoRALinear)
    with pytest.raises(LmscaleError, match="no adapter named 'third'"):
        set_adapter(tiny_model, "third")
    merge_lora_(tiny_model)
    with pytest.raises(LmscaleError, match="unmerge"):
        set_adapter(tiny_model, "first")


def test_bad_lora_settings_are_refused():
    with pytest.raises(LmscaleError, match="--rank"):
        LoRAConfig(rank=0)
    with pytest.raises(LmscaleError, match="--dropout"):
        LoRAConfig(dropout=1.0)
    assert LoRAConfig(targets="q, v").targets == ("q", "v")


def test_dropout_acts_on_the_adapter_path_only_in_training(tiny_model):
    apply_lora_(tiny_model, LoRAConfig(rank=4, dropout=0.5, targets=("q",)))
    randomize_b_(tiny_model)
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        assert torch.equal(tiny_model(TOKENS), reference(TOKENS))  # eval: no dropout
        tiny_model.train()
        assert not torch.equal(tiny_model(TOKENS), reference(TOKENS))
