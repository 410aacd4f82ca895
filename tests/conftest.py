import pytest


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """The bundled plays, prepared once per test session with a small vocabulary."""
    from lmscale.data import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare("shakespeare", out, vocab_size=512)
    return out


@pytest.fixture
def float_activations():
    """lmscale's own CPU kernels on their float32 path (no rounding of the activations).

    NOTE: the VNNI path rounds activations to int8 per 32 columns, which turns last-bit
    differences (a compiled graph's fused RMSNorm against eager's) into steps of 1/127 of a
    block's largest value; tests of layouts and graphs that compare to float use this path.
    """
    from lmscale import kernels

    if kernels.load():
        kernels.use_isa("avx512")
    yield
    if kernels.load():
        kernels.use_isa("vnni")  # back to the best this CPU has
