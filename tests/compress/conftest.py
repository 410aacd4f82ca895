import pytest
import torch

from lmscale.checkpoint import load_pretrained


@pytest.fixture(scope="session")
def smollm2_loaded():
    """The bundled SmolLM2-135M-Instruct in float32, loaded once for every compression module.

    NOTE: the tests compress copies (`copy.deepcopy`) and never change this model in place.
    """
    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded):
    """The shared SmolLM2-135M-Instruct, run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: a busy second core slows every op down
    try:
        yield smollm2_loaded
    finally:
        torch.set_num_threads(threads)
