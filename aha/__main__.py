"""`python -m aha ...` (and `torchrun -m aha ...`): the same as the `aha` command."""

import sys

from aha.cli import main

sys.exit(main())
