import math

import numpy as np
import torch
import torch.nn.functional as F

from lmscale.model import Transformer, preset
from lmscale.train.evaluate import evaluate, unigram_loss, windows


def test_windows_are_non_overlapping_and_keep_a_scorable_tail():
    tokens = np.arange(10)
    assert [w.tolist() for w in windows(tokens, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in windows(np.arange(9), 4)][-1] == [
        4,
        5,
        6,
        7,
    ]  # a 1-token tail scores nothing


def test_evaluate_matches_the_definition():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    tokens = np.random.default_rng(0).integers(0, 512, 70)
    result = evaluate(model, tokens, context=16, batch_size=3)
    nll, count = 0.0, 0
    for w in windows(tokens, 16):
        x = torch.tensor(w[None].astype(np.int64))
        nll += F.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="sum").item()
        count += len(w) - 1
    assert result.tokens == count == 4 * 15 + 5
    assert math.isclose(result.loss, nll / count, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(nll / count), rel_tol=1e-5)


def test_unigram_loss_is_the_cross_entropy_of_smoothed_frequencies():
    train = np.array([0, 0, 0, 1])
    result = unigram_loss(train, np.array([0, 1, 0]), vocab_size=3, context=3)
    probs = np.array([4, 2, 1]) / 7  # counts + 1
    assert math.isclose(result.loss, -(np.log(probs[1]) + np.log(probs[0])) / 2)
