"""Loader: deterministic, rank-disjoint, resumable batches over a prepared split."""

import hashlib
import json

import numpy as np
import pytest
import torch

from lmscale.data import Loader, Manifest, Shard, Split, TokenDataset
from lmscale.errors import LmscaleError

N_TOKENS = 5000


def _write_prepared(directory, n_tokens=N_TOKENS, shard_tokens=2000):
    """A prepared folder whose token at position i is i: a window's first token is its start."""
    tokens = np.arange(n_tokens, dtype=np.uint16)
    shards = []
    for i, start in enumerate(range(0, n_tokens, shard_tokens)):
        data = tokens[start : start + shard_tokens].tobytes()
        (directory / f"train_{i:03d}.bin").write_bytes(data)
        shards.append(Shard(f"train_{i:03d}.bin", len(data) // 2, hashlib.sha256(data).hexdigest()))
    splits = {"train": Split(["synthetic"], n_tokens, shards)}
    Manifest("synthetic", "tokenizer.json", 65535, "uint16", 1, splits).save(directory)
    return directory


@pytest.fixture
def dataset(tmp_path):
    return TokenDataset(_write_prepared(tmp_path), "train")


def _batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return all(
        torch.equal(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True)
    )


def test_dataset(dataset, tmp_path):
    assert len(dataset) == N_TOKENS
    assert np.array_equal(dataset.tokens, np.arange(N_TOKENS))
    assert dataset.tokenizer_path == tmp_path / "tokenizer.json"
    with pytest.raises(LmscaleError, match="unknown split 'test'"):
        TokenDataset(tmp_path, "test")


def test_batch_shapes_and_shift(dataset):
    inputs, targets = Loader(dataset, batch_size=4, context=16).next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets, inputs + 1)  # token i is i here


def test_same_seed_same_batches(dataset):
    a = _batches(Loader(dataset, 4, 16, seed=3), 10)
    b = _batches(Loader(dataset, 4, 16, seed=3), 10)
    c = _batches(Loader(dataset, 4, 16, seed=4), 10)
    assert _same(a, b)
    assert not _same(a, c)


def test_ranks_are_disjoint_and_cover_the_global_batch(dataset):
    single = Loader(dataset, batch_size=8, context=16, seed=1)
    ranks = [Loader(dataset, 2, 16, seed=1, rank=r, world_size=4) for r in range(4)]
    for _ in range(20):
        whole, _ = single.next_batch()
        parts = [loader.next_batch()[0] for loader in ranks]
        starts = [set(part[:, 0].tolist()) for part in parts]
        assert sum(len(s) for s in starts) == 8
        assert len(set().union(*starts)) == 8  # disjoint
        assert torch.equal(torch.cat(parts), whole)


def test_resume_continues_exactly(dataset):
    uninterrupted = Loader(dataset, 4, 16, seed=7)
    _batches(uninterrupted, 5)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # must survive JSON
    expected = _batches(uninterrupted, 100)  # runs through an epoch boundary too
    resumed = Loader(dataset, 4, 16, seed=7)
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, 100), expected)


def test_resume_rejects_other_settings(dataset):
    state = Loader(dataset, 4, 16, seed=7).state_dict()
    with pytest.raises(LmscaleError, match="seed"):
        Loader(dataset, 4, 16, seed=8).load_state_dict(state)
    with pytest.raises(LmscaleError, match="context"):
        Loader(dataset, 4, 8, seed=7).load_state_dict(state)
    served = Loader(dataset, 4, 16, seed=7)
    _batches(served, 5)  # 20 windows: not whole batches of 3
    with pytest.raises(LmscaleError, match="global batches of 3"):
        Loader(dataset, 3, 16, seed=7).load_state_dict(served.state_dict())


def test_resume_at_another_world_size_serves_the_same_windows(dataset):
    """Saved by one rank with batch 4, resumed by 2 ranks with batch 2 (or 4 ranks with batch 1)."""
    single = Loader(dataset, 4, 16, seed=7)
    _batches(single, 3)
    state = single.state_dict()
    expected = [inputs for inputs, _ in _batches(single, 6)]
    for world in (2, 4):
        ranks = [
            Loader(dataset, 4 // world, 16, seed=7, rank=r, world_size=world) for r in range(world)
        ]
        for loader in ranks:
            loader.load_state_dict(state)
        for want in expected:
            got = torch.cat([loader.next_batch()[0] for loader in ranks])
            assert torch.equal(got, want)


def test_epoch_rollover(dataset):
    loader = Loader(dataset, batch_size=8, context=99, seed=0)
    steps = len(loader.epoch_starts(0)) // 8  # 5000 tokens / 100 per window ~ 49 windows: 6 steps
    seen = [set(loader.next_batch()[0][:, 0].tolist()) for _ in range(steps)]
    assert loader.epoch == 0
    assert len(set().union(*seen)) == steps * 8  # no window twice within an epoch
    loader.next_batch()
    assert (loader.epoch, loader.position) == (1, 1)
    offsets = {int(loader.epoch_starts(e).min() % 100) for e in range(10)}
    assert len(offsets) > 1  # offsets vary by epoch


def test_windows_stay_in_bounds(dataset):
    loader = Loader(dataset, batch_size=5, context=63)
    for _ in range(200):
        inputs, targets = loader.next_batch()
        assert int(targets.max()) < N_TOKENS


def test_too_little_data(tmp_path):
    dataset = TokenDataset(_write_prepared(tmp_path, n_tokens=100), "train")
    with pytest.raises(LmscaleError, match="too little data"):
        Loader(dataset, batch_size=4, context=32)
    with pytest.raises(LmscaleError, match="too little data"):
        Loader(dataset, batch_size=1, context=1, world_size=60)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"context": -1}, "context"),
        ({"world_size": 0}, "world_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options(dataset, kwargs, option):
    with pytest.raises(LmscaleError, match=option):
        Loader(dataset, **{"batch_size": 2, "context": 8, **kwargs})
