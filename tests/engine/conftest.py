import pytest

from lmscale.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE, the size of the tiny presets' vocabulary."""
    texts = [
        f"the quick brown fox {i} jumps over the lazy dog; hello world " * 3 for i in range(300)
    ]
    return Tokenizer.train(texts, 512)
