"""`lmscale serve`: load a model, start the engine, run the app on uvicorn until SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets the requests in flight finish
for up to `drain_s` seconds; then the engine stops. On SIGHUP the model (and adapter) are read
again from disk and put into service without downtime (see `lmscale.serve.reload`), as
`POST /admin/reload` does.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from lmscale.engine.config import EngineConfig
from lmscale.errors import LmscaleError
from lmscale.serve.reload import EngineSwitch, ModelSource

CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question."
)
"""What a reload's check forward pass reads when there is no probe text."""


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
    adapter: str | None = None
    """A LoRA adapter folder applied to the model."""
    probe: str | None = None
    """A text file whose perplexity the server measures at start and every `probe_every_s`."""
    probe_every_s: float = 600.0
    score_prompts: bool = True
    """Score each prompt's loss under the model in idle moments (the traffic's fit gauge)."""
    admin_key: str | None = None
    """The key of `/admin/*` (else LMSCALE_ADMIN_KEY, else the API key; none: admin is off)."""


def build_engine(options: ServeOptions):
    """The model loaded and its `AsyncEngine` started, and the name the API serves it under.

    The loading runs on a thread of its own that then exits (see `on_a_passing_thread`): the
    engine's step thread must be the only thread with a pool of OpenMP workers.
    """
    from lmscale.engine.async_engine import on_a_passing_thread

    source = ModelSource(options.model, options.adapter)
    return on_a_passing_thread(load_engine, options, source), served_name(options)


def load_engine(options: ServeOptions, source: ModelSource, replacing=None):
    """An `AsyncEngine` serving `source`, started; checked against the engine it is `replacing`.

    Raises:
        LmscaleError: the adapter was trained on another base (its fingerprint differs), the
            model's shapes or tokenizer differ from the served one's, or its forward pass is
            not finite.
    """
    from lmscale.checkpoint import load_pretrained
    from lmscale.engine.async_engine import AsyncEngine
    from lmscale.engine.quality import QualityMonitor, check_forward
    from lmscale.finetune.adapter import load_adapter
    from lmscale.model import decode_layout_

    model, tokenizer = load_pretrained(
        source.model, device=options.device, dtype=options.dtype,
        keep_quantized=options.keep_quantized,
    )  # fmt: skip
    if source.adapter is not None:
        load_adapter(model, source.adapter)
    probe = read_probe(options.probe)
    if replacing is not None:
        _check_same_shape(model, tokenizer, replacing, probe or CHECK_TEXT)
    check_forward(model, tokenizer.encode(probe or CHECK_TEXT)[:64])
    config = options.engine or EngineConfig()
    if not config.compiled_decode:
        decode_layout_(model)  # eager fp32 matrix-vector products run faster column-major
    monitor = None
    if probe is not None or options.score_prompts:
        monitor = QualityMonitor(
            model, tokenizer.encode(probe) if probe else None, options.probe_every_s,
            score_prompts=options.score_prompts,
        )  # fmt: skip
    engine = AsyncEngine(model, tokenizer, config, monitor)
    # NOTE: the server answers from its first second: decode steps run eagerly until the
    # compiled graphs are ready (compiled after the first request, in the background).
    engine.warm_up()
    return engine


def read_probe(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LmscaleError(f"cannot read the probe text {path}: {error}") from None
    if len(text.split()) < 2:
        raise LmscaleError(f"the probe text {path} is empty")
    return text


def _check_same_shape(model, tokenizer, served, sample: str) -> None:
    """Refuse a model that could not take the served one's place under the same API name."""
    old = served.engine.model.config
    differ = [
        f"{name} {getattr(model.config, name)} (serving {getattr(old, name)})"
        for name in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                     "max_seq_len")
        if getattr(model.config, name) != getattr(old, name)
    ]  # fmt: skip
    if differ:
        raise LmscaleError("its shape differs from the served model's: " + ", ".join(differ))
    if tokenizer.encode(sample) != served.tokenizer.encode(sample) or (
        tokenizer.end_of_turn_ids != served.tokenizer.end_of_turn_ids
    ):
        raise LmscaleError("its tokenizer differs from the served model's")


def served_name(options: ServeOptions) -> str:
    return options.served_name or os.path.basename(os.path.normpath(options.model))


def api_key(options: ServeOptions) -> str | None:
    return options.api_key or os.environ.get("LMSCALE_API_KEY") or None


def admin_key(options: ServeOptions) -> str | None:
    return options.admin_key or os.environ.get("LMSCALE_ADMIN_KEY") or api_key(options)


def build_app(options: ServeOptions):
    """The app and its engine (an `EngineSwitch`: reloadable), ready for uvicorn."""
    from lmscale.serve.app import create_app

    engine, name = build_engine(options)
    switch = EngineSwitch(
        engine, ModelSource(options.model, options.adapter),
        lambda source, replacing: load_engine(options, source, replacing),
    )  # fmt: skip
    app = create_app(switch, name, api_key=api_key(options), admin_key=admin_key(options))
    app.router.on_shutdown.append(switch.close)
    return app, name


def reload_on_sighup(app) -> None:
    """SIGHUP reads the served model and adapter again from disk and switches to them."""
    import asyncio

    async def install() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_hup(app)))

    app.router.on_startup.append(install)


async def _hup(app) -> None:
    try:
        answer = await app.state.switch.reload()
        print(f"SIGHUP: now serving {app.state.switch.source.describe()} "
              f"(loaded in {answer['load_s']:.1f} s)", flush=True)  # fmt: skip
    except LmscaleError as error:
        print(f"SIGHUP: {error}", flush=True)


def serve(options: ServeOptions) -> None:
    import uvicorn

    app, name = build_app(options)
    reload_on_sighup(app)
    print(
        f"serving {name} on http://{options.host}:{options.port} (OpenAI API under /v1)", flush=True
    )
    uvicorn.run(
        app, host=options.host, port=options.port, log_level="warning",
        timeout_graceful_shutdown=options.drain_s,
    )  # fmt: skip
