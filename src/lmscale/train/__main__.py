"""`python -m lmscale.train ARGS` is `lmscale train ARGS`: the module torchrun starts on each rank."""

import sys

from lmscale.cli.main import main

sys.exit(main(["train", *sys.argv[1:]]))
