"""flatten_state / unflatten_state: optimizer and RNG states survive a JSON + safetensors trip."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from lmscale.checkpoint import flatten_state, unflatten_state
from lmscale.model import Transformer, preset


def round_trip(obj):
    """Flatten, push through real JSON text and safetensors bytes, unflatten."""
    skeleton, tensors = flatten_state(obj)
    return unflatten_state(json.loads(json.dumps(skeleton)), load(save(tensors)))


def assert_same(a, b):
    """Deep equality that also checks container types, key types and tensor dtypes."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN equals NaN here


def trained_adamw():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    tokens = torch.randint(0, 512, (2, 16))
    for _ in range(2):
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_adamw_state_dict_round_trips():
    model, optimizer = trained_adamw()
    state = optimizer.state_dict()
    assert isinstance(next(iter(state["state"])), int)
    restored = round_trip(state)
    assert_same(state, restored)
    assert restored["param_groups"][0]["betas"] == (0.9, 0.95)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored)
    assert_same(fresh.state_dict(), state)


def test_rng_states_round_trip_and_replay():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "numpy_generator": np.random.default_rng(4).bit_generator.state,
        "torch": torch.get_rng_state(),
    }
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    restored = round_trip(states)
    assert_same(states, restored)
    random.setstate(restored["python"])
    np.random.set_state(restored["numpy"])
    torch.set_rng_state(restored["torch"])
    assert random.random() == expected[0]
    assert np.array_equal(np.random.rand(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_odd_keys_scalars_and_views():
    base = torch.arange(12.0).view(3, 4)
    obj = {
        1: "int key",
        "__tuple__": "a tag used as a key",
        None: [True, -0.0, float("inf"), float("nan"), 2**70],
        "nested": ((), [], {}, {"x": (base.t(), base[1])}),
        "f16": torch.ones(2, dtype=torch.float16),
    }
    restored = round_trip(obj)
    assert_same(obj, restored)
    assert restored["nested"][3]["x"][0].is_contiguous()


def test_unsupported_leaf_is_rejected():
    with pytest.raises(TypeError, match="'a.0'"):
        flatten_state({"a": [object()]})
