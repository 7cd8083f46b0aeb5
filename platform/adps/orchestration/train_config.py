"""Settings of one training run (``adps train``): the learning core's (:class:`adps.nn.learning_config.LearningConfig`)
and the orchestration's: the data, the Ray Train workers, storage, tracking and the registry.

Loaded and checked completely on the driver, before any Ray worker starts (the dataset's manifest or image folder is
read here), so that a typo costs a second, not a cluster start-up. The loading rules mirror
:class:`adps.data.preprocess.PrepareConfig`: :meth:`TrainConfig.from_yaml` with ``--set KEY=VALUE`` overrides
(:func:`adps.config.parse_overrides`), unknown keys and wrong types refused naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from adps.data.preprocess import SPLITS, mask_key
from adps.data.shards import read_manifest
from adps.images import ImageDataset
from adps.nn.learning_config import LearningConfig, image_run_name

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig(LearningConfig):
    """Settings of ``adps train``: :class:`~adps.nn.learning_config.LearningConfig`'s keys and these."""

    dataset: str = ""
    """Root (folder or ``s3://`` prefix) of a prepared dataset (holding ``manifest.json``); for ``image``: a folder,
    ``.zip`` or ``s3://`` prefix of image files (:class:`adps.images.ImageDataset`; no manifest), holding at least
    ``batch_size x num_workers`` images."""
    split: str = "train"
    """Split trained on (MRI; an image dataset has no splits: all of it is trained on)."""
    prefetch_batches: int = 2
    """Batches each worker loads ahead in a background thread while it trains (:class:`adps.data.prefetch.Prefetcher`;
    pinned memory on GPUs); 0 = load each batch when it is needed."""
    num_workers: int = 1
    """Ray Train workers (one per GPU); each reads a disjoint share of the train shards."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); False = CPU workers (Gloo)."""
    cpus_per_worker: float = 1
    """CPUs Ray reserves per worker (``resources_per_worker``)."""
    checkpoint_every_steps: int = 1000
    """A checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints Ray keeps (the newest)."""
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run fails."""
    storage_path: str = ""
    """Folder or ``s3://`` URI for Ray Train's run folders (empty = ``.adps/runs`` of the folder the command runs in,
    beside the default MLflow store; a submitted job needs durable storage)."""
    run_name: str = ""
    """Run folder name under ``storage_path``; re-running with the same name resumes. Empty = ``<method>_r<R>``
    (``image_p<erasure_p>`` for ``image``)."""
    on_finished: str = "refuse"
    """When ``run_name`` under ``storage_path`` holds a run that finished the steps this config asks for (a resubmission
    would train nothing): ``refuse`` (an error naming the run, its MLflow run and model version) or ``new_run`` (train
    ``<run_name>-2``, ``-3``, ...). A config asking for more steps (``max_steps``, ``epochs``) resumes it."""
    log_every_steps: int = 10
    """Metrics are reported to Ray and MLflow every this many steps (checkpoints always carry metrics)."""
    controller_poll_s: float = 0.5
    """How often Ray Train's controller polls the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default 2 s).
    A worker's ``ray.train.report`` waits for the next poll, so with Ray's default a step after a report stalls up to
    2 s (bench/train_scaling.py measured 1.8-2.0 s). The environment variable, where set, wins."""
    validate_every_steps: int = 1000
    """Validation metric (:func:`adps.nn.reconstruct.validation_metric`: A-OS NRMSE for ambient models, the unrolled
    network's NRMSE for MoDL / SSDU, one-pass denoising NRMSE for the priors; for ``image`` the denoising MSE
    ``val_mse`` on the observed pixels) of the EMA model every this many steps and at the end (0 = only at the end)."""
    validation_slices: int = 4
    """Slices of the ``val`` split the validation metric averages over (0 = no validation); for ``image``: the first
    this many training images, as the model sees them (an image dataset has no validation split, and an ambient
    model has no clean images to be scored on)."""
    tracking: bool = True
    """Log the run to MLflow (params, metrics, validation) and register the final EMA model."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///.adps/mlflow.db`` where the job starts."""
    experiment: str = "adps"
    """MLflow experiment of the run."""
    tracking_flush_s: float = 300.0
    """At the end of training, how long rank 0 waits for metrics still queued for an unreachable MLflow server (they
    are retried with backoff throughout the run)."""
    register: bool = True
    """At the end, register the EMA model as ``adps-<method>-r<R>`` (``adps-image-p<erasure_p>`` for ``image``; a new
    version, which ``models:/<name>@latest`` resolves to)."""
    max_skipped_in_a_row: int = 50
    """A step whose loss is NaN / Inf is skipped (nothing of it lands) and counted (``skipped_steps``); this many
    skipped *in a row* means the model diverged: the run stops with a checkpoint, its MLflow run FAILED with the
    reason, nothing registered (0 = never stop)."""
    fail_at_steps: tuple[int, ...] = ()
    """Fault injection (tests): the process of worker rank 1 (rank 0 when alone) is killed (SIGKILL) once just after
    each of these steps; a marker file in the run folder makes each fire only once."""

    @property
    def resolved_run_name(self) -> str:
        """``run_name``, or ``<method>_r<R>`` (``image_p<erasure_p>`` for the image method)."""
        if self.run_name:
            return self.run_name
        return image_run_name(self.erasure_p) if self.is_image else f"{self.method}_r{self.r_train:g}"

    def validate(self, *, check_dataset: bool = True) -> None:
        """Refuse settings that cannot work, naming the key, before any worker starts. ``check_dataset``: also read the
        dataset's manifest (it must exist, and hold masks at ``r_train``); off only for checks of the config alone."""
        self.validate_learning()
        if self.split not in SPLITS:
            raise ValueError(f"config key 'split' must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for key in ("num_workers", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("max_failures", "validate_every_steps", "validation_slices", "max_skipped_in_a_row",
                    "tracking_flush_s", "prefetch_batches"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        for key in ("cpus_per_worker", "controller_poll_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r} must be > 0, got {getattr(self, key)}")
        if self.on_finished not in ("refuse", "new_run"):
            raise ValueError(f"config key 'on_finished' must be 'refuse' or 'new_run', got {self.on_finished!r}")
        if any(s < 1 for s in self.fail_at_steps):
            raise ValueError(f"config key 'fail_at_steps' must list steps >= 1, got {list(self.fail_at_steps)}")
        if self.tracking and not self.experiment:
            raise ValueError("config key 'experiment' must name an MLflow experiment (tracking is on)")
        if not self.dataset:
            if self.is_image:
                raise ValueError("config key 'dataset' is required: a folder, .zip or s3:// prefix of images")
            raise ValueError("config key 'dataset' is required: the root of a prepared dataset (adps prepare)")
        if check_dataset:
            if self.is_image:
                self._check_image_dataset()
            else:
                self._check_dataset()

    def _check_image_dataset(self) -> None:
        try:
            dataset = ImageDataset(self.dataset, self.resolution)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"config key 'dataset': not an image folder, zip or s3:// prefix: {err}") from None
        try:
            n_images = len(dataset)
        finally:
            dataset.close()
        needed = self.batch_size * self.num_workers
        if n_images < needed:
            raise ValueError(f"config key 'dataset': {self.dataset!r} holds {n_images} image(s), fewer than one step "
                             f"needs (batch_size {self.batch_size} x num_workers {self.num_workers} = {needed})")

    def _check_dataset(self) -> None:
        try:
            manifest = read_manifest(self.dataset)
        except FileNotFoundError:
            raise ValueError(f"config key 'dataset': no manifest.json under {self.dataset!r} (not prepared, or not "
                             "finished)") from None
        accelerations = manifest["config"]["accelerations"]
        # R = 1 runs read the reference only, but the dataset class still loads masks: any stored R serves them
        # (see adps.orchestration.train_worker.dataset_acceleration).
        if self.r_train != 1 and mask_key(self.r_train) not in {mask_key(r) for r in accelerations}:
            raise ValueError(f"config key 'r_train': the dataset {self.dataset!r} has no masks at R = {self.r_train:g} "
                             f"(it has {', '.join(f'{r:g}' for r in accelerations)})")
        if self.method == "edm_l1" and not manifest["config"].get("l1"):
            raise ValueError(f"config key 'dataset': method edm_l1 needs L1 reconstructions, but {self.dataset!r} was "
                             "prepared with l1: false")
        if not manifest["splits"][self.split]["shards"]:
            raise ValueError(f"config key 'split': the dataset {self.dataset!r} has no {self.split!r} slices")
