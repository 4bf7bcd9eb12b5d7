"""`python -m starter ...` is the same as the `atelier` command."""

from starter.cli import run

run()
