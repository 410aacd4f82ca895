"""`python -m lmscale.finetune ARGS` is `lmscale finetune ARGS`: what torchrun starts on each rank."""

import sys

from lmscale.cli.main import main

sys.exit(main(["finetune", *sys.argv[1:]]))
