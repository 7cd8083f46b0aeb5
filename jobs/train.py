"""Ray job entry point for training.

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/train.py --config configs/ambient_r4.yaml \
        --set dataset=s3://bucket/prepared/axt2 --set storage_path=s3://bucket/runs

Thin by design: arguments are those of ``adps train`` (see ``adps train --help``). Under
``ray job submit`` the driver joins the job's cluster (RAY_ADDRESS is set for it); re-submitting
with the same run name and storage resumes the run.
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
