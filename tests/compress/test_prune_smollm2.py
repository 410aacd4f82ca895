"""Pruning the bundled SmolLM2-135M: perplexity after 2:4 and structured pruning, and shapes.

The perplexities in the README's "Compression" section come from this test (run it with `-s`);
the speed of the pruned models from `bench/prune_speed.py`.
Perplexity is on the first 2,040 scored tokens of *Hamlet* (windows of 256), as in
test_smollm2.py; structured pruning calibrates on 2,048 tokens of *Macbeth*, so as not to score
the text it was calibrated on. No recovery fine-tune: these are one-shot numbers.
"""

import copy

import numpy as np
import pytest
import torch

from lmscale.compress import PruneConfig, prune_
from lmscale.data.corpus import iter_documents
from lmscale.train.evaluate import evaluate

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
N_TOKENS, CONTEXT = 2048, 256


@pytest.fixture(scope="module")
def plays(smollm2):
    _, tokenizer = smollm2
    texts = {
        doc.name: doc.text
        for doc in iter_documents("shakespeare")
        if doc.name in ("tragedies/hamlet", "tragedies/macbeth")
    }
    hamlet = np.asarray(tokenizer.encode(texts["tragedies/hamlet"][:40_000])[: N_TOKENS + 1])
    macbeth = tokenizer.encode(texts["tragedies/macbeth"][:40_000])[:N_TOKENS]
    return hamlet, torch.tensor(macbeth).view(-1, CONTEXT)


@pytest.fixture(scope="module")
def float_perplexity(smollm2, plays):
    result = evaluate(smollm2[0], plays[0], CONTEXT)
    print(f"\nSmolLM2 float32: perplexity {result.perplexity:.2f}")
    return result.perplexity


def pruned(smollm2, plays, config):
    model = copy.deepcopy(smollm2[0])
    record = prune_(model, config, calibration=plays[1])
    return model, record


@pytest.fixture(scope="module")
def structured(smollm2, plays):
    """Structured pruning at 25% and 50% (activation importance), built once for both tests."""
    return {sparsity: pruned(smollm2, plays, PruneConfig("structured", sparsity))
            for sparsity in (0.25, 0.5)}  # fmt: skip


def test_two_four_and_structured_perplexity(smollm2, plays, float_perplexity, structured):
    results = {}
    for name, config in {
        "2:4": PruneConfig("2:4", 0.5),
        "structured 25%, activation": 0.25,
        "structured 25%, weight norms": PruneConfig("structured", 0.25, importance="weight"),
        "structured 50%, activation": 0.5,
    }.items():
        is_shared = isinstance(config, float)
        model, record = structured[config] if is_shared else pruned(smollm2, plays, config)
        perplexity = evaluate(model, plays[0], CONTEXT).perplexity
        results[name] = perplexity
        shape = f", {record['after']}" if "after" in record else ""
        print(
            f"SmolLM2 {name}: perplexity {perplexity:.2f} ({perplexity / float_perplexity:.2f}x)"
            f", {record['achieved']:.1%} of block weights removed{shape}"
        )
    # Loose bounds, well above what was measured (one-shot, no recovery fine-tune).
    assert float_perplexity < results["structured 25%, activation"] < 3 * float_perplexity
    assert float_perplexity < results["2:4"] < 100 * float_perplexity
    assert results["structured 25%, activation"] < results["structured 25%, weight norms"]


def test_structured_pruning_shrinks_every_block(smollm2, structured):
    """The smaller dense model is really smaller (its speed is measured by bench/prune_speed.py)."""
    config = smollm2[0].config
    total = sum(p.numel() for p in smollm2[0].parameters())
    for sparsity, heads, hidden in ((0.25, 6, 1152), (0.5, 3, 768)):
        model, _ = structured[sparsity]
        assert (model.config.n_heads, model.config.hidden_dim) == (heads, hidden)
        assert model.config.head_dim == config.dim // config.n_heads  # heads keep their width
        assert all(b.feed_forward.w1.weight.shape == (hidden, config.dim) for b in model.layers)
        assert sum(p.numel() for p in model.parameters()) < total
