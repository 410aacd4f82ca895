"""`train.float8`: which linears convert, and the one-line errors where float8 cannot run."""

import pytest
import torch
from torch import nn

from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.train.float8 import apply_float8_training, float8_eligible


def test_only_block_linears_with_dims_of_multiples_of_16_are_eligible():
    model = Transformer(preset("tiny"))
    chosen = {fqn for fqn, m in model.named_modules() if float8_eligible(m, fqn)}
    linears = {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert chosen == linears - {"output"}
    assert not float8_eligible(nn.Linear(64, 50257), "layers.0.feed_forward.w2")
    assert not float8_eligible(nn.Linear(24, 64), "layers.0.attention.wq")


def test_disabled_leaves_the_model_alone():
    model = Transformer(preset("tiny"))
    apply_float8_training(model, torch.device("cpu"), enabled=False)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_the_cpu_is_refused_in_one_line():
    with pytest.raises(LmscaleError, match=r"^train.float8 needs a CUDA GPU[^\n]*cpu$"):
        apply_float8_training(Transformer(preset("tiny")), torch.device("cpu"), enabled=True)


def test_conversion_swaps_the_eligible_linears(monkeypatch):
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from lmscale.train import float8

    # The device check is the GPU's side; the module swap itself runs anywhere.
    monkeypatch.setattr(float8, "_check_device", lambda device: None)
    model = Transformer(preset("tiny"))
    apply_float8_training(model, torch.device("cpu"), enabled=True)
    swapped = {fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(swapped) == 2 * 7 and "output" not in swapped  # 2 blocks: q k v o, w1 w2 w3
    assert set(model.state_dict()) == set(Transformer(preset("tiny")).state_dict())
