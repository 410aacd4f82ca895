"""A graph dynamo compiled, called without dynamo: same results, and None where it does not fit."""

import pytest
import torch
from torch import nn

from lmscale.engine.direct_graph import CapturingInductor, DirectGraph


@pytest.fixture(autouse=True, scope="module")
def compile_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


class Step(nn.Module):
    """A cache written in place at a position, read back up to `keys` (a dynamic size)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, position, keys, pools):
        y = self.proj(x)
        pools[0][position] = y[None]  # position: (1,)
        return pools[0][: keys.shape[0]].sum(0) + pools[1][0]


def compiled_step():
    torch.manual_seed(0)
    step = Step().eval()
    backend = CapturingInductor()
    graph = torch.compile(step.forward, backend=backend, fullgraph=True, dynamic=False)
    return step, backend, graph


def arguments(step, n_keys, dtype=torch.float32, position=2):
    pools = [torch.zeros(16, 8, dtype=dtype), torch.ones(16, 8, dtype=dtype)]
    return {"self": step, "x": torch.randn(8, dtype=dtype), "position": torch.tensor([position]),
            "keys": torch.arange(n_keys), "pools": pools}  # fmt: skip


def call(fn, args):
    return fn(args["x"], args["position"], args["keys"], args["pools"])


def compiled_and_bound():
    """The step, its backend and a `DirectGraph` of the graph compiled for a dynamic `keys`."""
    step, backend, graph = compiled_step()
    first = arguments(step, 5)
    torch._dynamo.maybe_mark_dynamic(first["keys"], 0)
    call(graph, first)
    return step, backend, DirectGraph(backend.graphs[0], {"self": step})


@torch.inference_mode()
def test_a_direct_call_equals_the_function_and_writes_its_inputs_in_place():
    step, backend, direct = compiled_and_bound()
    for n_keys, position in ((3, 1), (9, 7), (16, 0)):
        args = arguments(step, n_keys, position=position)
        want_pools = [p.clone() for p in args["pools"]]
        eager = call(step, {**args, "pools": want_pools})
        (got,) = direct(args)
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(args["pools"][0], want_pools[0])  # the write happened
    assert len(backend.graphs) == 1  # no call went through dynamo


@torch.inference_mode()
def test_inputs_the_graph_was_not_compiled_for_are_refused():
    step, _, direct = compiled_and_bound()
    assert direct(arguments(step, 5, dtype=torch.bfloat16)) is None  # another dtype
    wider = arguments(step, 5)
    wider["pools"][0] = torch.zeros(16, 9)  # a static size differs
    assert direct(wider) is None
    strided = arguments(step, 5)
    strided["x"] = torch.randn(16)[::2]  # the same size, another stride
    assert direct(strided) is None
    assert direct(arguments(step, 5)) is not None


def test_an_input_outside_the_bound_arguments_is_a_clear_error():
    step, backend, graph = compiled_step()
    with torch.inference_mode():
        call(graph, arguments(step, 5))
    with pytest.raises(ValueError, match="cannot evaluate"):
        DirectGraph(backend.graphs[0], {})  # the model's weights are under L['self']
