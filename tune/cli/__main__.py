"""`python -m tune.cli ...`: the same as the `tune` command (accelerate launch and torchrun use it)."""

import sys

from tune.cli import main

sys.exit(main())
