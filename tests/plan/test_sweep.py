"""The study's pure parts: shapes for target sizes, the step plan, the config's checks."""

import subprocess
import sys

import pytest

from lmscale.errors import LmscaleError
from lmscale.plan.sweep import ScalingConfig, kaplan_lr, plan_steps, planned_seconds, shape_for


@pytest.mark.parametrize("target", [2e4, 5e5, 1e6, 2e6, 4e6, 8e6, 3e7, 1e8])
def test_shapes_hit_their_non_embedding_target(target):
    model = shape_for(target, vocab_size=4096, context=128)
    tolerance = 0.12 if target >= 5e5 else 0.25  # a 32-wide model of one layer is coarse
    assert model.num_params(embeddings=False) == pytest.approx(target, rel=tolerance)
    assert model.family == "llama" and model.head_dim in (32, 64)
    assert 2 * model.dim <= model.hidden_dim <= 4 * model.dim
    assert model.num_params() > model.num_params(embeddings=False)  # the embedding, counted apart
    if target >= 5e5:
        assert 12 <= model.dim / model.n_layers <= 80  # a sensible aspect ratio


def test_shapes_grow_with_the_target():
    counts = [shape_for(n, 4096, 128).num_params(embeddings=False) for n in (5e5, 1e6, 2e6, 4e6)]
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_steps_are_proportional_to_size_and_fill_the_budget():
    params, step_s, overhead = [1e6, 2e6, 4e6], [0.1, 0.2, 0.4], [5.0, 5.0, 10.0]
    steps = plan_steps(params, step_s, overhead, seconds=600.0)
    assert steps[1] == pytest.approx(2 * steps[0], abs=1)
    assert steps[2] == pytest.approx(4 * steps[0], abs=1)
    assert planned_seconds(steps, step_s, overhead) == pytest.approx(600.0, rel=0.01)


def test_a_budget_too_short_keeps_the_proportions_at_the_minimum():
    steps = plan_steps([1e6, 2e6, 4e6], [0.1, 0.2, 0.4], [5.0, 5.0, 10.0], 1.0, min_steps=20)
    assert steps == [20, 40, 80]


def test_kaplans_learning_rate_falls_with_size():
    assert kaplan_lr(5e5) == pytest.approx(1.41e-3, rel=0.01)
    assert kaplan_lr(8e6) < kaplan_lr(5e5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sizes": [1e6, 2e6]}, "at least 3 different sizes"),
        ({"sizes": [1e6, 1e6, 2e6]}, "at least 3 different sizes"),
        ({"minutes": 0}, "--minutes must be positive"),
        ({"budget_flops": -1.0}, "--budget-flops must be positive"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"evals": 0}, "--evals"),
    ],
)
def test_bad_settings_name_their_option(changes, message):
    with pytest.raises(LmscaleError, match=message):
        ScalingConfig(**({"data": "d", "out": "o", "sizes": [1e6, 2e6, 4e6]} | changes))


def test_the_study_and_its_fits_import_no_torch():
    modules = "lmscale.plan, lmscale.plan.sweep, lmscale.plan.scaling_report, lmscale.cli.scaling"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
