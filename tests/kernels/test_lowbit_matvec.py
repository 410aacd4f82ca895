"""lmscale's own CPU matvec kernels (`lmscale.kernels`) against float64 references.

Every path this CPU has is run: the float ones must equal the dequantized matmul up to float32
summation; the VNNI one must equal an emulation of its own arithmetic (activations rounded to
int8 per 32 columns) just as closely, which checks the layouts exactly even though it rounds.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lmscale import kernels
from lmscale.kernels.fusion import FuseSharedInputMatvecs, fuse_shared_input_matvecs
from lmscale.model.quantized import unpack_int4

pytestmark = pytest.mark.skipif(not kernels.load(), reason=f"no native kernels: {kernels.reason()}")


def available_isas() -> list[str]:
    best = kernels.ISAS.index(kernels.use_isa("vnni"))
    return list(kernels.ISAS[best:])


@pytest.fixture(params=available_isas())
def isa(request):
    yield kernels.use_isa(request.param)
    kernels.use_isa("vnni")  # back to the best this CPU has


def int4_weight(n, k, group, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // group, generator=gen) + 0.1
    mins = torch.randn(n, k // group, generator=gen)
    dense = unpack_int4(qweight).double().view(n, k // group, group)
    weight = (dense * scales.double()[..., None] + mins.double()[..., None]).view(n, k)
    return (qweight, scales, mins), weight


def int8_weight(n, k, group, seed):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    qweight[0, :32] = -128  # the extreme code, which the unsigned offset must keep exact
    scales = torch.rand(n, k // group, generator=gen) + 0.1
    weight = (qweight.double().view(n, k // group, group) * scales.double()[..., None]).view(n, k)
    return (qweight, scales), weight


def vnni_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the VNNI path sees it: int8 per 32 columns, scale max|x| / 127, back to float."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv).clamp(-128, 127)  # float32 products, as the kernel's
    return (codes.double() * (amax.double() / 127)).view_as(x)


def check(y, x, weight, isa, offsets=None):
    """y against x @ weight^T in float64 (with the VNNI path's own rounding of x)."""
    seen = vnni_activations(x) if isa == "vnni" else x.double()
    expected = seen @ weight.T
    if isa == "vnni" and offsets is not None:
        # the float offsets (min * sum x) use the exact sums of x, not of its rounding
        mins, group = offsets
        sums = x.double().view(x.shape[0], -1, group).sum(-1) - seen.view(
            x.shape[0], -1, group
        ).sum(-1)
        expected = expected + sums @ mins.double().T
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, (isa, float(error))


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("n, k, group", [(40, 256, 32), (576, 576, 64), (33, 1536, 128)])
def test_int4_matvec_equals_the_dequantized_matmul(isa, rows, n, k, group):
    (qweight, scales, mins), weight = int4_weight(n, k, group, seed=rows)
    x = torch.randn(rows, k)
    y = torch.ops.lmscale.int4_matvec(x, qweight, scales, mins, group)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    check(y, x, weight, isa, offsets=(mins, group))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n, k, group", [(40, 256, 32), (100, 576, 576), (7, 1536, 128)])
def test_int8_matvec_equals_the_dequantized_matmul(isa, rows, n, k, group):
    (qweight, scales), weight = int8_weight(n, k, group, seed=rows)
    x = torch.randn(rows, k)
    check(torch.ops.lmscale.int8_matvec(x, qweight, scales, group), x, weight, isa)


@pytest.mark.parametrize("rows", [1, 5])
def test_cat_forms_equal_the_single_weight_calls_side_by_side(isa, rows):
    """q/k/v-like widths (one not a multiple of the threads' grain): the same bits as alone."""
    x = torch.randn(rows, 576)
    int4 = [int4_weight(n, 576, 32, seed=n)[0] for n in (576, 200, 7)]
    alone = [torch.ops.lmscale.int4_matvec(x, *weight, 32) for weight in int4]
    together = torch.ops.lmscale.int4_matvec_cat(x, *map(list, zip(*int4, strict=True)), 32)
    assert torch.equal(together, torch.cat(alone, dim=1))
    int8 = [int8_weight(n, 576, 32, seed=n)[0] for n in (1536, 33)]
    alone = [torch.ops.lmscale.int8_matvec(x, *weight, 32) for weight in int8]
    together = torch.ops.lmscale.int8_matvec_cat(x, *map(list, zip(*int8, strict=True)), 32)
    assert torch.equal(together, torch.cat(alone, dim=1))


def test_the_vnni_path_rounds_activations_only_a_little():
    if "vnni" not in available_isas():
        pytest.skip("this CPU has no AVX-512 VNNI")
    (qweight, scales, mins), weight = int4_weight(576, 576, 32, seed=0)
    x = torch.randn(1, 576)
    y = torch.ops.lmscale.int4_matvec(x, qweight, scales, mins, 32)
    exact = x.double() @ weight.T
    error = (y.double() - exact).norm() / exact.norm()
    assert 1e-5 < error < 0.03  # rounded (so the path ran), by a few per mille


def test_a_compiled_graph_calls_the_kernels():
    (qweight, scales, mins), _ = int4_weight(40, 256, 32, seed=0)
    (q8, s8), _ = int8_weight(48, 256, 32, seed=0)

    def layer(x):
        h = torch.ops.lmscale.int4_matvec(torch.relu(x), qweight, scales, mins, 32)
        return torch.ops.lmscale.int8_matvec(torch.cat([h] * 8, -1)[:, :256], q8, s8, 32)

    x = torch.randn(2, 256)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


def test_a_compiled_graph_fuses_the_calls_that_read_one_input():
    """As q/k/v read one normalised vector, each through its own reshape: one call for them."""
    weights = [int4_weight(n, 256, 32, seed=n)[0] for n in (64, 32, 32, 48)]

    def block(x):
        h = torch.rms_norm(x, (256,))
        q, k, v = (
            torch.ops.lmscale.int4_matvec(h.reshape(-1, 256), *w, 32) for w in weights[:3]
        )  # fmt: skip
        other = torch.ops.lmscale.int4_matvec(x.reshape(-1, 256), *weights[3], 32)  # not h
        return q.sum(-1) + k.sum(-1) * v.sum(-1), other

    traced = make_fx(block)(torch.randn(2, 256))
    assert fuse_shared_input_matvecs(traced.graph) == 2
    traced.recompile()
    calls = [str(node.target) for node in traced.graph.nodes if "matvec" in str(node.target)]
    assert calls == ["lmscale.int4_matvec_cat.default", "lmscale.int4_matvec.default"]
    x = torch.randn(2, 256)
    for got, want in zip(traced(x), block(x), strict=True):
        assert torch.equal(got, want)
    compiled = torch.compile(
        block, fullgraph=True, options={"post_grad_custom_post_pass": FuseSharedInputMatvecs()}
    )  # fmt: skip
    for got, want in zip(compiled(x), block(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # inductor's own RMSNorm


def test_bad_arguments_raise_a_clear_error():
    (qweight, scales, mins), _ = int4_weight(40, 256, 32, seed=0)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.lmscale.int4_matvec(torch.randn(9, 256), qweight, scales, mins, 32)
    with pytest.raises(RuntimeError, match="must be contiguous \\(N, K/2\\) uint8"):
        torch.ops.lmscale.int4_matvec(torch.randn(1, 128), qweight, scales, mins, 32)
    with pytest.raises(RuntimeError, match="mins must be \\(N, K/group\\) float32"):
        torch.ops.lmscale.int4_matvec(torch.randn(1, 256), qweight, scales, mins[:, :4], 32)
    with pytest.raises(RuntimeError, match="x must be \\(M, K\\) float32"):
        torch.ops.lmscale.int4_matvec(torch.randn(1, 256).double(), qweight, scales, mins, 32)
    with pytest.raises(RuntimeError, match="as many scales and mins as weights"):
        torch.ops.lmscale.int4_matvec_cat(torch.randn(1, 256), [qweight] * 2, [scales], [mins], 32)


def test_switched_off_by_the_environment_the_layers_keep_pytorchs_kernels():
    code = "from lmscale import kernels; print(kernels.load(), kernels.reason())"
    env = {**os.environ, "LMSCALE_NATIVE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["False", "LMSCALE_NATIVE_KERNELS=0"]
