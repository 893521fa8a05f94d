"""`python -m p2pfed ...` is the `p2pfed` command."""

import sys

from p2pfed.cli import main

sys.exit(main())
