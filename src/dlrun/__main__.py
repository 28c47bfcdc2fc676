"""`python -m dlrun ...` behaves exactly like the `dlrun` command."""

from dlrun.cli import main

main()
