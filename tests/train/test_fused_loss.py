import torch
import torch.nn.functional as F

from lmscale.model import Transformer, preset
from lmscale.train.fused_loss import CHUNK_ELEMENTS, IGNORE_INDEX, linear_cross_entropy
from lmscale.train.loss import lm_loss_sum


def reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def grads(fn, hidden, weight, targets):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def test_matches_plain_cross_entropy_across_chunks_and_ignored_targets():
    gen = torch.Generator().manual_seed(0)
    vocab = 1000
    rows = 3 * max(64, CHUNK_ELEMENTS // vocab) + 17  # several chunks and a ragged last one
    hidden, weight = torch.randn(rows, 32, generator=gen), torch.randn(vocab, 32, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::5] = IGNORE_INDEX
    ours, expected = (
        grads(linear_cross_entropy, hidden, weight, targets),
        grads(reference, hidden, weight, targets),
    )
    assert torch.allclose(ours[0], expected[0], rtol=1e-6)
    for got, want in zip(ours[1:], expected[1:], strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_bf16_autocast_errs_no_more_than_the_plain_autocast_path():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(300, 64, generator=gen), torch.randn(500, 64, generator=gen) * 0.1
    targets = torch.randint(0, 500, (300,), generator=gen)
    exact = grads(reference, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(linear_cross_entropy, hidden, weight, targets)
        plain = grads(reference, hidden, weight, targets)
    assert ours[1].dtype == ours[2].dtype == torch.float32
    for i in range(3):
        our_error = (ours[i] - exact[i]).abs().max()
        assert our_error <= 1.1 * (plain[i] - exact[i]).abs().max() + 1e-6, i


def test_lm_loss_sum_of_the_model_equals_the_logits_path():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    inputs, targets = torch.randint(0, 512, (2, 2, 32)).unbind(0)
    fused = lm_loss_sum(model, inputs, targets)
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    plain.backward()
    assert torch.allclose(fused, plain, rtol=1e-6)
    for got, param in zip(fused_grads, model.parameters(), strict=True):
        assert torch.allclose(got, param.grad, atol=1e-6)


def test_no_gradients_are_computed_without_autograd():
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 20, (10,)))
    assert not loss.requires_grad
