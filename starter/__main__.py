"""`python -m starter ...` is the same as the `atelier` command."""

import sys

from starter.cli import main

sys.exit(main())
