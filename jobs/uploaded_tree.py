"""Which ``adps`` a submitted job runs: the uploaded checkout's, on the driver and every worker.

``ray job submit --working-dir .`` uploads the checkout, but its package lives in
``platform/``, which is not on the job's path: without more, the driver and its Ray workers
import the cluster's installed ``adps`` (or none), not the code that was uploaded. The job's
runtime environment must put ``platform`` on ``PYTHONPATH`` (relative: each process starts in
its copy of the working dir), which reaches the driver and every worker alike::

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"PYTHONPATH": "platform"}}' \\
        -- python jobs/train.py ...

:func:`check` refuses a submitted job that would run other code than the uploaded tree, with
that command, unless ``ADPS_INSTALLED=1`` asks for the cluster's installed package (an image
built from this repository, ``infra/docker``). Outside ``ray job submit`` it does nothing.
Only the standard library: it runs before ``adps`` is imported.
"""

import os
import sys
from pathlib import Path

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of a job started by ``ray job submit`` (Ray 2.60)."""


def check(job: str) -> None:
    """Exit with a message when the submitted job (the script ``job``) would not run the uploaded tree."""
    job = f"jobs/{Path(job).name}"
    tree = Path.cwd() / "platform"
    if SUBMITTED_JOB_ENV not in os.environ or not (tree / "adps").is_dir() or os.environ.get("ADPS_INSTALLED") == "1":
        return
    on_path = {Path(entry).resolve() for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry}
    if tree.resolve() not in on_path:
        sys.exit(f"{job}: submitted with the checkout as working dir, but its platform/ is not on PYTHONPATH, so this "
                 "driver and its Ray workers would import the cluster's installed adps (or none), not the uploaded "
                 "code. Submit with --runtime-env-json '{\"env_vars\": {\"PYTHONPATH\": \"platform\"}}' "
                 "(docs/deployment.md), or set ADPS_INSTALLED=1 in env_vars to run the cluster's package.")
    import adps

    print(f"{job}: adps from the uploaded tree, {Path(adps.__file__).resolve().parent}", flush=True)
