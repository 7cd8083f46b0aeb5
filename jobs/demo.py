"""Ray job entry point for the embedded demo.

    ray job submit --working-dir . -- python jobs/demo.py --quick

Thin by design: arguments are those of ``adps demo`` (see ``adps demo --help``).
"""

import sys

from adps.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
