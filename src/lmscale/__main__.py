"""`python -m lmscale` is the `lmscale` command."""

import sys

from lmscale.cli.main import main

sys.exit(main())
