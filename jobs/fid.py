"""Ray job entry point for unconditional samples and FID (paper table 1).

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/fid.py \\
        --set dataset=s3://bucket/prepared/axt2 --set models=adps-edm-r1,adps-ncsnv2-r1 \\
        --set samples=100 --set use_gpu=true

Thin by design: arguments are those of ``adps fid`` (see ``adps fid --help``).
Each model is one Ray task (one GPU each with use_gpu=true).
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fid", *sys.argv[1:]]))
