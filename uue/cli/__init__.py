"""The command line (`uue ...`: main.py) and `uue demo` (demo.py): the entry points above every other package."""

from uue.cli.main import main

__all__ = ["main"]
