"""``python -m adps`` is the ``adps`` command."""

import sys

from adps.cli import main

sys.exit(main())
