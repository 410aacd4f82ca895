"""Serving plans: weights, KV cache, concurrency and the decode ceiling."""

import pytest

from lmscale.errors import LmscaleError
from lmscale.plan.hardware import accelerator
from lmscale.plan.inference import kv_bytes_per_token, serve_plan, weight_bytes
from lmscale.plan.models import named_model


def test_kv_cache_per_token_is_two_tensors_per_layer_of_the_kv_heads():
    # Llama 2 7B (MHA): 2 x 32 layers x 32 heads x 128 x 2 bytes = 512 KiB; 70B (GQA, 8 kv heads):
    # 2 x 80 x 8 x 128 x 2 = 320 KiB.
    assert kv_bytes_per_token(named_model("llama2-7b"), "bf16") == 512 * 1024
    assert kv_bytes_per_token(named_model("llama2-70b"), "bf16") == 320 * 1024
    assert kv_bytes_per_token(named_model("llama2-70b"), "fp8") == 160 * 1024


def test_weights_shrink_with_the_dtype_and_int4_carries_its_scales():
    model = named_model("llama2-7b")
    sizes = {d: weight_bytes(model, d) for d in ("fp32", "bf16", "int8", "int4")}
    assert sizes["fp32"] == 2 * sizes["bf16"] == pytest.approx(4 * model.num_params())
    assert sizes["bf16"] > sizes["int8"] > sizes["int4"]
    embeddings = 2 * 32000 * 4096 * 2  # embedding and output stay 16-bit
    matrices = model.num_params() - 2 * 32000 * 4096
    assert sizes["int4"] == pytest.approx(embeddings + matrices * (0.5 + 2 / 128), rel=1e-3)


def test_concurrency_is_the_memory_left_over_the_sequence_kv():
    plan = serve_plan(named_model("llama2-7b"), accelerator("l4"), 4096, "int4")
    assert plan.max_sequences == int(plan.kv_budget_bytes // plan.kv_bytes_per_sequence)
    assert plan.max_sequences >= 1
    longer = serve_plan(named_model("llama2-7b"), accelerator("l4"), 8192, "int4")
    assert longer.max_sequences == pytest.approx(plan.max_sequences / 2, abs=1)


def test_decode_ceiling_is_bandwidth_over_bytes_read_per_token():
    device = accelerator("h100-80gb")
    plan = serve_plan(named_model("llama2-7b"), device, 1024, "bf16")
    read = plan.weights + plan.kv_bytes_per_sequence
    assert plan.decode_tokens_per_s_single == pytest.approx(device.bandwidth_gbs * 1e9 / read)
    assert plan.decode_tokens_per_s_batch > 10 * plan.decode_tokens_per_s_single
    two = serve_plan(named_model("llama2-7b"), device, 1024, "bf16", devices=2)
    assert two.max_sequences > 2 * plan.max_sequences


def test_a_model_that_cannot_hold_one_sequence_says_what_to_change():
    with pytest.raises(LmscaleError, match="use a smaller --dtype, a shorter --context or more"):
        serve_plan(named_model("llama2-70b"), accelerator("l4"), 4096, "bf16")
    with pytest.raises(LmscaleError, match="--dtype must be one of"):
        serve_plan(named_model("gpt2"), accelerator("l4"), 1024, "int3")
    with pytest.raises(LmscaleError, match="divides the heads"):
        serve_plan(named_model("gpt2"), accelerator("l4"), 1024, "bf16", devices=5)
