"""`python -m uue.cli ...` runs the `uue` command line."""

import sys

from uue.cli.main import main

sys.exit(main())
