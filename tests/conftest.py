import pytest


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """The bundled plays, prepared once per test session with a small vocabulary."""
    from lmscale.data import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare("shakespeare", out, vocab_size=512)
    return out
