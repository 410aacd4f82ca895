"""The distillation loss against hand-written maths, and in the training loop."""

import math

import pytest
import torch

from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer
from lmscale.train import load_run_config
from lmscale.train.distill_loss import DistillLoss, distill_loss_sum, linear_distill_loss
from lmscale.train.loop import setup, train_step
from lmscale.train.loss import IGNORE_INDEX


def test_loss_equals_the_formula_by_hand():
    """Per scored token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]])
    teacher = torch.tensor([[0.5, 1.5, 1.0], [1.0, 0.0, 2.0], [9.0, 0.0, 0.0]])
    targets = torch.tensor([1, 2, IGNORE_INDEX])  # the third row is not scored
    temp, alpha = 2.0, 0.3
    expected = 0.0
    for z, t, y in zip(
        student[:2].tolist(), teacher[:2].tolist(), targets[:2].tolist(), strict=True
    ):
        q = [math.exp(v / temp) for v in z]
        q = [v / sum(q) for v in q]
        p = [math.exp(v / temp) for v in t]
        p = [v / sum(p) for v in p]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        ce = -math.log(math.exp(z[y]) / sum(math.exp(v) for v in z))
        expected += alpha * temp**2 * kl + (1 - alpha) * ce
    got = distill_loss_sum(student, teacher, targets, temp, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha 0 is the cross-entropy alone; a teacher equal to the student leaves only it too.
    ce = torch.nn.functional.cross_entropy(student[:2], targets[:2], reduction="sum")
    assert distill_loss_sum(student, teacher, targets, temp, 0.0).item() == pytest.approx(ce.item())
    same = distill_loss_sum(student, student, targets, temp, alpha)
    assert same.item() == pytest.approx((1 - alpha) * ce.item(), rel=1e-6)


@pytest.mark.parametrize("temp, alpha", [(2.0, 0.5), (1.0, 1.0), (4.0, 0.1)])
def test_fused_loss_and_gradients_match_the_reference(temp, alpha, monkeypatch):
    import lmscale.train.distill_loss as module

    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 64 * 100)  # several chunks of rows
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, generator=gen, requires_grad=True)
    weight = torch.randn(100, 16, generator=gen, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(300, 24, generator=gen), torch.randn(100, 24)
    targets = torch.randint(0, 100, (300,), generator=gen)
    targets[::7] = IGNORE_INDEX
    fused = linear_distill_loss(
        hidden, weight, teacher_hidden, teacher_weight, targets, temp, alpha
    )
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    reference = distill_loss_sum(
        hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, temp, alpha
    )
    reference_grads = torch.autograd.grad(reference, (hidden, weight))
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert fused_grads[0][::7].abs().max() == 0  # ignored positions get no gradient


def tiny_config(data_dir, *overrides):
    args = ["--data.path", str(data_dir), "--train.log_interval", "1", *overrides]
    return load_run_config("configs/tiny.toml", args)


@pytest.fixture(scope="module")
def teacher_dir(shakespeare_dir, tmp_path_factory):
    """A small trained-from-scratch teacher (deeper than the student) on the test data."""
    from lmscale.train import train

    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config(shakespeare_dir, "--train.max_steps", "8", "--model.n_layers", "3")
    train(cfg, run, progress=False)
    return run


SGD = (
    "--train.optimizer", "sgd", "--train.grad_clip", "0", "--train.warmup_steps", "0",
    "--train.lr", "1", "--train.weight_decay", "0", "--train.max_steps", "2",
)  # fmt: skip


def one_step(data_dir, run_dir, inputs, targets, accum, *overrides):
    """Weight change of one SGD step at lr 1 (the gradient) over `accum` micro-batches."""

    class FixedBatches:
        def __init__(self):
            rows = len(inputs) // accum
            self.batches = list(zip(inputs.split(rows), targets.split(rows), strict=True))

        def next_batch(self):
            return self.batches.pop(0)

    cfg = tiny_config(
        data_dir, *SGD, "--train.batch_size", str(len(inputs) // accum),
        "--train.grad_accum_steps", str(accum), *overrides,
    )  # fmt: skip
    run = setup(cfg, run_dir, resume=False)
    run.loader = FixedBatches()
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    loss = train_step(run)
    return loss, {n: before[n] - p.detach() for n, p in run.model.named_parameters()}


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 512, (8, 16), generator=gen)
    targets = torch.randint(0, 512, (8, 16), generator=gen)
    targets[0, :12] = IGNORE_INDEX  # micro-batches with uneven target counts
    targets[5, 3:] = IGNORE_INDEX
    return inputs, targets


def test_gradient_accumulation_with_a_teacher_equals_one_big_batch(
    shakespeare_dir, teacher_dir, tmp_path
):
    inputs, targets = batch()
    teacher = ("--distill.teacher", str(teacher_dir), "--distill.alpha", "0.7")
    loss1, big = one_step(shakespeare_dir, tmp_path / "a1", inputs, targets, 1, *teacher)
    loss4, small = one_step(shakespeare_dir, tmp_path / "a4", inputs, targets, 4, *teacher)
    assert loss4 == pytest.approx(loss1, rel=1e-6)
    for name in big:
        assert torch.allclose(small[name], big[name], rtol=0, atol=1e-6), name
    # The teacher does change the step.
    _, plain = one_step(shakespeare_dir, tmp_path / "p", inputs, targets, 1)
    assert not torch.allclose(plain["norm.weight"], big["norm.weight"], atol=1e-4)


def test_alpha_zero_is_exactly_plain_training(shakespeare_dir, teacher_dir, tmp_path):
    inputs, targets = batch(1)
    plain_loss, plain = one_step(shakespeare_dir, tmp_path / "plain", inputs, targets, 2)
    teacher = ("--distill.teacher", str(teacher_dir), "--distill.alpha", "0")
    loss, distilled = one_step(shakespeare_dir, tmp_path / "d", inputs, targets, 2, *teacher)
    assert loss == plain_loss
    for name in plain:
        assert torch.equal(distilled[name], plain[name]), name


def test_the_loop_loss_through_a_wrapper_matches_the_full_logits(teacher_dir):
    from lmscale.checkpoint import load_pretrained

    teacher, _ = load_pretrained(teacher_dir)
    torch.manual_seed(0)
    student = Transformer(ModelConfig(**{**vars(teacher.config), "n_layers": 1}))
    inputs, targets = batch(2)
    # torch.compile's wrapper stands for DDP's: the loss must reach the model through forward.
    fused = DistillLoss(teacher, 3.0, 0.4)(torch.compile(student, backend="eager"), inputs, targets)
    with torch.no_grad():
        reference = distill_loss_sum(
            student(inputs).flatten(0, 1),
            teacher(inputs).flatten(0, 1),
            targets.flatten(),
            3.0,
            0.4,
        )
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(shakespeare_dir, tmp_path):
    from lmscale.data import prepare
    from lmscale.train import train

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    prepare(str(text), tmp_path / "other", vocab_size=300)
    run = tmp_path / "small_teacher"
    train(tiny_config(tmp_path / "other", "--train.max_steps", "1"), run, progress=False)
    with pytest.raises(LmscaleError, match=r"vocabulary of 2\d\d, the student 512"):
        setup(tiny_config(shakespeare_dir, "--distill.teacher", str(run)), tmp_path / "s", False)
