"""A frozen quantized layer passes gradients to its input (QLoRA) without keeping a float weight."""

import torch

from lmscale.compress.quantize import QuantConfig, quantize_


def test_input_gradient_equals_the_dequantized_float_layer_s():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False))
    quantize_(model, QuantConfig("int4", 32), filter_fn=lambda m, n: True)
    layer = model[0]
    x = torch.randn(3, 5, 64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    expected_x = x.detach().clone().requires_grad_(True)
    weight = layer.dequantize(torch.float32)
    (torch.nn.functional.linear(expected_x, weight) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)


def test_no_float_weight_is_saved_for_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False))
    quantize_(model, QuantConfig("int8"), filter_fn=lambda m, n: True)
    saved = []
    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model[0](x)
    assert y.requires_grad and not any(t.shape == (512, 256) for t in saved)
