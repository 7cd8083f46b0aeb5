"""Ray job entry point for the Ray Tune search of a model's sampler settings (guidance, steps).

    ray job submit --working-dir . --runtime-env-json "$RAY_RUNTIME_ENV" -- python jobs/tune_dps.py \\
        --model models:/adps-ambient-r4@latest --r-inf 8 --space tune_spaces/adps.yaml \\
        --set dataset=s3://bucket/prepared/axt2 --set gpus_per_trial=0.25 --set num_samples=64

Thin by design: arguments are those of ``adps tune`` (see ``adps tune --help``). Submitting it
again with the same name (default: derived from the model, R_inf and sampler) resumes the search.
"""

import sys

import uploaded_tree  # before adps: which adps runs (the uploaded one)

uploaded_tree.check(__file__)

from adps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
