"""Ray job entry point for training.

    ray job submit --working-dir . -- python jobs/train.py --config configs/ambient_r4.yaml \
        --set dataset=s3://bucket/prepared/axt2 --set storage_path=s3://bucket/runs

Thin by design: arguments are those of ``adps train`` (see ``adps train --help``). Under
``ray job submit`` the driver joins the job's cluster (RAY_ADDRESS is set for it); re-submitting
with the same run name and storage resumes the run.
"""

import sys

from adps.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
