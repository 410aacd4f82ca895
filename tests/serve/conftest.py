import pytest
import torch
from serving import running

from lmscale.checkpoint import load_pretrained
from lmscale.engine.async_engine import AsyncEngine
from lmscale.engine.config import EngineConfig
from lmscale.model import PRESETS, ModelConfig, Transformer
from lmscale.serve.app import create_app
from lmscale.tokenizer import Tokenizer

MODEL = "smollm2-135m-instruct"
NAME = "tiny"


@pytest.fixture(scope="session")
def smollm2():
    return load_pretrained(MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    """The bundled model, fp32, served on a real socket."""
    model, tokenizer = smollm2
    engine = AsyncEngine(model, tokenizer, EngineConfig(max_num_seqs=32))
    with running(create_app(engine, MODEL)) as url:
        yield url
    engine.close()


@pytest.fixture(scope="module")
def tiny(shakespeare_dir):
    """A random tiny model (fast) with the prepared data's tokenizer."""
    tokenizer = Tokenizer.load(shakespeare_dir / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS["tiny"] | {"vocab_size": tokenizer.vocab_size})
    return Transformer(config).eval(), tokenizer


def serve(tiny, **options):
    """A server of the tiny model (a context manager yielding its URL) and its engine."""
    model, tokenizer = tiny
    engine_options = {
        k: options.pop(k) for k in list(options) if k in ("max_num_seqs", "max_waiting")
    }
    engine = AsyncEngine(model, tokenizer, EngineConfig(**engine_options))
    return running(create_app(engine, NAME, **options)), engine


@pytest.fixture(scope="module")
def tiny_server(tiny):
    """The tiny model served on a real socket with the default limits; yields its URL."""
    server, engine = serve(tiny)
    with server as base:
        yield base
    engine.close()
