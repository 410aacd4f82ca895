"""`lmscale serve`: load a model, start the engine, run the app on uvicorn until SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets the requests in flight finish
for up to `drain_s` seconds; then the engine stops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmscale.engine.config import EngineConfig


@dataclass
class ServeOptions:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    served_name: str | None = None
    drain_s: float = 30.0
    keep_quantized: bool = False
    """A .gguf's Q4_0, Q4_1 and Q4_K linears stay int4 (see `lmscale.checkpoint.load_gguf`)."""
    engine: EngineConfig | None = None


def build_engine(options: ServeOptions):
    """The model loaded and its `AsyncEngine` started, and the name the API serves it under.

    The loading runs on a thread of its own that then exits (see `on_a_passing_thread`): the
    engine's step thread must be the only thread with a pool of OpenMP workers.
    """
    from lmscale.engine.async_engine import on_a_passing_thread

    return on_a_passing_thread(_build_engine, options)


def _build_engine(options: ServeOptions):
    from lmscale.checkpoint import load_pretrained
    from lmscale.engine.async_engine import AsyncEngine
    from lmscale.model import decode_layout_

    model, tokenizer = load_pretrained(
        options.model, device=options.device, dtype=options.dtype,
        keep_quantized=options.keep_quantized,
    )  # fmt: skip
    config = options.engine or EngineConfig()
    if not config.compiled_decode:
        decode_layout_(model)  # eager fp32 matrix-vector products run faster column-major
    engine = AsyncEngine(model, tokenizer, config)
    # NOTE: the server answers from its first second: decode steps run eagerly until the
    # compiled graphs are ready (compiled after the first request, in the background).
    engine.warm_up()
    return engine, served_name(options)


def served_name(options: ServeOptions) -> str:
    return options.served_name or os.path.basename(os.path.normpath(options.model))


def api_key(options: ServeOptions) -> str | None:
    return options.api_key or os.environ.get("LMSCALE_API_KEY") or None


def build_app(options: ServeOptions):
    """The app and its engine, ready for uvicorn."""
    from lmscale.serve.app import create_app

    engine, name = build_engine(options)
    app = create_app(engine, name, api_key=api_key(options))
    app.router.on_shutdown.append(engine.close)
    return app, name


def serve(options: ServeOptions) -> None:
    import uvicorn

    app, name = build_app(options)
    print(
        f"serving {name} on http://{options.host}:{options.port} (OpenAI API under /v1)", flush=True
    )
    uvicorn.run(
        app, host=options.host, port=options.port, log_level="warning",
        timeout_graceful_shutdown=options.drain_s,
    )  # fmt: skip
