"""Sub-commands of the `tscd` command line (see tscd/cli.py)."""
