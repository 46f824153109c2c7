"""`python -m ltserve.cli COMMAND ...` (what `torchrun -m ltserve.cli train ...` runs)."""

import sys

from ltserve.cli import main

sys.exit(main())
