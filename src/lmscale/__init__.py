"""lmscale: train, compress, adapt, serve and plan Transformer language models at scale.

Importing the package is cheap: it loads no torch and initialises no CUDA.
"""

from lmscale.errors import LmscaleError

__version__ = "0.1.0"
__all__ = ["LmscaleError", "__version__"]
