"""Ray job entry point for the paper's whole training grid.

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/sweep.py --configs configs \
        --set dataset=s3://bucket/prepared/axt2 --set storage_path=s3://bucket/runs

Thin by design: arguments are those of ``adps sweep`` (see ``adps sweep --help``). Submitting
it again resumes: finished runs are skipped, the others continue from their checkpoints.
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
