"""A compiler pass: matrix-vector products that read the same activations become one call.

In a Transformer block q, k and v are computed from the same normalised vector, and so are the
MLP's gate and up projections. Called one by one, each product prepares its activations (for
int4, permuted; on VNNI, quantized to int8) and opens its own parallel region; at batch 1 on a
few cores that fixed cost is a good part of a small layer's time. This pass, run by inductor on
the graph it compiles (after autograd, `post_grad_custom_post_pass`), replaces every group of
`lmscale::int4_matvec` (or `int8_matvec`) calls on one input and group size by one
`int4_matvec_cat` call, whose output columns are the layers' outputs side by side; each old
result becomes a slice of it. The weights stay where the model holds them (no concatenated
copy, no change to modules or state dicts), and the eager path is untouched.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


def _ops() -> dict:
    """Each single-weight op and its side-by-side form (looked up once the kernels are loaded)."""
    lmscale = torch.ops.lmscale
    return {
        lmscale.int4_matvec.default: lmscale.int4_matvec_cat.default,
        lmscale.int8_matvec.default: lmscale.int8_matvec_cat.default,
    }


_RESHAPES = ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")


def _same_values(x: fx.Node) -> tuple:
    """A key equal for nodes holding the same values: reshapes of one tensor to one shape.

    NOTE: each layer reshapes its input itself, so the graph holds one `view` per layer of the
    same normalised vector; a reshape keeps the order of the elements, so two reshapes of one
    tensor to one shape are the same tensor.
    """
    shape = tuple(x.meta["val"].shape)
    while x.op == "call_function" and str(x.target) in _RESHAPES:
        x = x.args[0]
    return x, shape


def fuse_shared_input_matvecs(graph: fx.Graph) -> int:
    """Fuse, in place, the matvec calls of `graph` that share their input; returns how many
    calls were fused away."""
    ops = _ops()
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ops:
            key = (node.target, _same_values(node.args[0]), node.args[-1])
            groups.setdefault(key, []).append(node)
    removed = 0
    for (single, _, group), nodes in groups.items():
        weights = [arg for node in nodes[1:] for arg in node.args[1:-1]]
        if len(nodes) < 2 or any(w.op not in ("placeholder", "get_attr") for w in weights):
            continue  # NOTE: a weight computed in the graph might come after the first call
        for weight in weights:  # inputs or constants: defined before the first call
            if weight.op == "get_attr":
                nodes[0].prepend(weight)
        # args: (x, qweight, scales[, mins], group) -> (x, [qweights], [scales][, [mins]], group)
        x = nodes[0].args[0]  # the first call's reshape: defined before the fused call
        lists = [[node.args[i] for node in nodes] for i in range(1, len(nodes[0].args) - 1)]
        widths = [node.meta["val"].shape[1] for node in nodes]
        with graph.inserting_before(nodes[0]):
            fused = graph.call_function(ops[single], (x, *lists, group))
            fused.meta["val"] = x.meta["val"].new_empty(x.meta["val"].shape[0], sum(widths))
        start = 0
        for node, width in zip(nodes, widths, strict=True):
            with graph.inserting_before(node):
                part = graph.call_function(
                    torch.ops.aten.slice.Tensor, (fused, 1, start, start + width)
                )
                part.meta["val"] = fused.meta["val"][:, start : start + width]
            node.replace_all_uses_with(part)
            graph.erase_node(node)
            start += width
        removed += len(nodes) - 1
    return removed


class FuseSharedInputMatvecs(CustomGraphPass):
    """`fuse_shared_input_matvecs` as inductor's post-grad pass (its uuid keys the on-disk
    cache of compiled graphs: it changes when this file does)."""

    def __call__(self, graph: fx.Graph) -> None:
        if hasattr(torch.ops.lmscale, "int4_matvec_cat"):  # kernels loaded
            fuse_shared_input_matvecs(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
