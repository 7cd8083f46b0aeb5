"""Ray job entry point for data preparation.

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/prepare_data.py --config prepare.yaml \
        --set source=s3://bucket/fastmri/multicoil_train --set output=s3://bucket/prepared/axt2

Thin by design: arguments are those of ``adps prepare`` (see ``adps prepare --help``). Under
``ray job submit`` the driver joins the job's cluster (RAY_ADDRESS is set for it).
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
