"""Ray job entry point for the evaluation.

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/evaluate.py \\
        --set dataset=s3://bucket/prepared/axt2 --set models=adps-ambient-r4,adps-edm-r1 \\
        --set output=s3://bucket/eval/study --set use_gpu=true

The natural-image study (paper section 3.1: compressed sensing, super-resolution, NFE sweep):

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/evaluate.py --study images \\
        --config configs/evaluate/images.yaml --set output=s3://bucket/eval/images --set use_gpu=true

Thin by design: arguments are those of ``adps evaluate`` (see ``adps evaluate --help``).
Submitting it again with the same output resumes: finished cells are not recomputed.
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
