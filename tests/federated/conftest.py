"""A tiny model and per-client text folders for the federated tests."""

import pytest
import torch

from lmscale.checkpoint import save_model_dir
from lmscale.config import to_dict
from lmscale.data.corpus import iter_documents, shakespeare_dir
from lmscale.model import Transformer, preset
from lmscale.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fed_model_dir(tmp_path_factory):
    """A tiny Llama-shaped model with a 512-token BPE vocabulary trained on the plays."""
    texts = [doc.text[:20_000] for doc in iter_documents("shakespeare")]
    tokenizer = Tokenizer.train(texts, 512)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_seq_len=128))
    out = tmp_path_factory.mktemp("models") / "tiny"
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


@pytest.fixture(scope="session")
def client_folder(tmp_path_factory):
    """Three clients, one genre each, a slice of two plays per client (small and non-IID)."""
    root = tmp_path_factory.mktemp("clients")
    for genre in ("comedies", "histories", "tragedies"):
        plays = sorted((shakespeare_dir() / genre).glob("*.md"))[:2]
        client = root / genre
        client.mkdir()
        for play in plays:
            (client / f"{play.stem}.txt").write_text(play.read_text()[:12_000])
    return root
