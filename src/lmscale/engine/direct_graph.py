"""Calling a graph dynamo compiled without dynamo's per-call prologue.

A compiled decode step of SmolLM2 takes 850 graph inputs: 125 change per call (tokens,
positions, block tables, the 60 KV pools and their sizes), the rest are the model's weights and
packed kernel forms. Through `torch.compile`, every call gathers all of them attribute by attribute and checks
them against the guards: ~2 ms of a ~12 ms int4 step on one core, time in which no kernel runs.

`CapturingInductor` is a dynamo backend that compiles with inductor, as `torch.compile` does,
and keeps each graph with the sources (the Python expressions dynamo names its inputs by, such
as `L['self'].model._modules['norm']._parameters['weight']`) of its inputs. A `DirectGraph`
binds the model's inputs once and, per call, reads only the inputs that come from the call's
arguments and checks only what could differ: their dtypes and devices, and the shape guards of
the graph (static sizes included). A call that fails the check returns None: the caller goes
through dynamo, which recompiles if it must.

NOTE: the model's tensors are bound when the `DirectGraph` is made. A model whose parameters or
buffers are replaced by other tensors afterwards needs a new one (copying into them in place is
fine); lmscale's reload builds a new engine, and so a new decode step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

MODEL_ROOT = "L['self']"
"""The source prefix of the inputs that belong to the model (bound once)."""


@dataclass
class CapturedGraph:
    sources: list[str]
    """The source of each graph input, in order."""
    examples: list
    """The fake tensors and symbolic ints dynamo traced each input as."""
    compiled: Callable
    """Inductor's callable: takes the inputs positionally, returns the graph's outputs."""


@dataclass
class CapturingInductor:
    """A dynamo backend: inductor with `options`, keeping every graph it compiles."""

    options: dict = field(default_factory=dict)
    graphs: list[CapturedGraph] = field(default_factory=list)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        from torch._inductor.compile_fx import compile_fx  # NOTE: imports inductor (seconds)

        placeholders = gm.graph.find_nodes(op="placeholder")
        sources = [node.meta["grapharg"].source.name for node in placeholders]
        examples = [node.meta["example_value"] for node in placeholders]
        compiled = compile_fx(gm, example_inputs, config_patches=self.options)
        self.graphs.append(CapturedGraph(sources, examples, compiled))
        return compiled


class DirectGraph:
    """One captured graph, called with the arguments of the function dynamo compiled.

    Args:
        graph: the captured graph.
        bound: the function's `self` argument, as {"self": ...}: every input read from it
            (the model's tensors) is bound now; the others are read from each call's arguments.

    Raises:
        ValueError: an input under `self` cannot be read from `bound`.
    """

    def __init__(self, graph: CapturedGraph, bound: dict):
        self.compiled = graph.compiled
        self.template: list = []
        per_call, self.slots, examples = [], [], []
        for i, (source, example) in enumerate(zip(graph.sources, graph.examples, strict=True)):
            if source.startswith(MODEL_ROOT):
                self.template.append(_evaluate(source, bound))
            else:
                self.template.append(None)
                per_call.append(source)
                self.slots.append(i)
                examples.append(example)
        # NOTE: the sources are dynamo's own names for its inputs, Python expressions over the
        # frame's locals `L` (its guards are generated from them the same way).
        self.read: Callable[[dict], tuple] = _evaluate(f"lambda L: ({', '.join(per_call)},)", {})
        self.tensor_checks = [
            (k, e.dtype, e.device) for k, e in enumerate(examples) if isinstance(e, Tensor)
        ]
        self.fits = _shape_guards(examples)

    def __call__(self, arguments: dict) -> list | None:
        """The graph's outputs for these arguments; None when the graph does not fit them."""
        values = self.read(arguments)
        for k, dtype, device in self.tensor_checks:
            if values[k].dtype != dtype or values[k].device != device:
                return None
        if not self.fits(values):
            return None
        args = self.template.copy()
        for slot, value in zip(self.slots, values, strict=True):
            args[slot] = value
        return self.compiled(*args)


def _evaluate(source: str, bound: dict, names: dict | None = None):
    """`source` evaluated with the frame's locals `L` = `bound` (and other `names`)."""
    try:
        return eval(source, {**(names or {}), "L": bound})
    except Exception as error:
        raise ValueError(f"cannot evaluate {source[:80]!r}: {error}") from error


def _shape_guards(examples: Sequence) -> Callable[[dict], bool]:
    """A check of the graph's shape guards (static sizes and strides too) over these inputs.

    It takes the inputs' values in the order of `examples`.
    """
    fake_mode = torch._guards.detect_fake_mode(examples)
    if fake_mode is None or fake_mode.shape_env is None:
        return lambda L: False  # nothing to check against: always through dynamo
    guards = fake_mode.shape_env.produce_guards_expression(list(examples), ignore_static=False)
    # NOTE: compiled once (the shape environment's own evaluation parses the text every call),
    # over the values by position: it names them L['t0'], L['t1'], ... (a dict per call).
    guards = re.sub(r"L\['t(\d+)'\]", r"L[\1]", guards or "True")
    return _evaluate(f"lambda L: {guards}", {}, dict(SYMPY_INTERP))
