"""Options shared by the verbs that run a model: how it loads, what is applied, how it decodes."""

from __future__ import annotations

import argparse


def keep_quantized_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-quantized",
        action="store_true",
        help="a .gguf's Q4_0, Q4_1 and Q4_K linear layers stay int4 (the file's own weights, "
        "run by the int4 kernels) instead of being dequantized to float32",
    )


def eager_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eager",
        action="store_true",
        help="decode op by op in eager PyTorch instead of the compiled decode step "
        "(no compilation; slower; for debugging)",
    )


def apply_adapter(model, adapter: str | None) -> None:
    if adapter is not None:
        from lmscale.finetune.adapter import load_adapter

        load_adapter(model, adapter)


def decode_step(model, eager: bool):
    """The compiled decode step for `generate` and `chat` (None with --eager).

    --eager keeps the column-major float32 layout the eager path reads fastest. The compiled
    step says on stderr when it compiles (once per process; the on-disk cache makes it quick).
    """
    from lmscale.engine.decode_step import DecodeStep
    from lmscale.model import decode_layout_

    if eager:
        decode_layout_(model)
        return None
    return DecodeStep(model, verbose=True)
