import pytest
import torch

from lmscale.checkpoint import load_pretrained


@pytest.fixture(scope="module")
def smollm2():
    """The bundled SmolLM2-135M-Instruct in float32, run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: a busy second core slows every op down
    try:
        yield load_pretrained("smollm2-135m-instruct")
    finally:
        torch.set_num_threads(threads)
