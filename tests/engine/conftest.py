import pytest
import torch

from lmscale.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE, the size of the tiny presets' vocabulary."""
    texts = [
        f"the quick brown fox {i} jumps over the lazy dog; hello world " * 3 for i in range(300)
    ]
    return Tokenizer.train(texts, 512)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run faster on one thread, and far steadier on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
