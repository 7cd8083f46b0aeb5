"""Ray job entry point for the embedded demo.

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/demo.py --quick

Thin by design: arguments are those of ``adps demo`` (see ``adps demo --help``).
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
