"""The `silotune` command: every room registers its own subcommands (see main.py)."""
