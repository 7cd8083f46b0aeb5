"""What a training run learns and how (layer 2): the method, its network, objective, optimiser, EMA and precision;
every default is METHOD.md's value, visible here.

:class:`LearningConfig` is the learning core's part of a run's settings; the orchestration's
:class:`adps.orchestration.train_config.TrainConfig` adds where the data is and how the run is distributed, stored
and tracked. A config file holds both parts' keys side by side.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from adps.config import ConfigFile

from .image_diffusion import DEFAULT_DELTA, IMAGE_PRESETS, PAPER_ERASURE_P
from .train_step import IMAGE_METHODS, METHODS, PAPER_PRESETS

__all__ = [
    "CHECKPOINTING_METHODS", "COMPILE_MODES", "DEFAULT_EPOCHS", "FULLY_SAMPLED", "IMAGE_GRID", "LearningConfig",
    "PAPER_ACCELERATIONS", "PAPER_GRID", "UNET_METHODS", "image_run_name"
]

# The paper grid's accelerations for the methods that train on undersampled data.
PAPER_ACCELERATIONS = (2, 4, 6, 8)
# Every training run of the paper's study: method -> the accelerations it is trained at.
PAPER_GRID: dict[str, tuple[float, ...]] = {
    "ambient": PAPER_ACCELERATIONS, "edm": (1,), "edm_l1": PAPER_ACCELERATIONS, "ncsnv2": (1,),
    "modl": PAPER_ACCELERATIONS, "ssdu": PAPER_ACCELERATIONS
}
# Methods whose network is the SongUNet (activation_checkpointing applies to them).
UNET_METHODS = ("ambient", "edm", "edm_l1", "image")
# Methods whose network has the memory-lean switch (TrainConfig.activation_checkpointing).
CHECKPOINTING_METHODS = (*UNET_METHODS, "ncsnv2")
# torch.compile's modes (TrainConfig.compile_mode; "" = eager).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Methods trained on fully sampled data (R = 1 only).
FULLY_SAMPLED = ("edm", "ncsnv2")
# The paper's natural-image models (section 3.1): method "image" at these erasure probabilities.
IMAGE_GRID: tuple[float, ...] = PAPER_ERASURE_P
# The keys that only the natural-image method reads, with their defaults (MRI runs must leave them).
_IMAGE_KEYS = {"erasure_p": 0.0, "delta": DEFAULT_DELTA, "resolution": 64}
# METHOD.md "Optimisation": 250 epochs (paper appendix E); MoDL and SSDU: 10 epochs each.
# The image models: the same 250 (a placeholder at the paper's scale, see TrainConfig.epochs).
DEFAULT_EPOCHS = {"ambient": 250, "edm": 250, "edm_l1": 250, "ncsnv2": 250, "modl": 10, "ssdu": 10, "image": 250}


@dataclass
class LearningConfig(ConfigFile):
    """Settings of ``adps train``. Defaults are METHOD.md's ("Optimisation") unless stated."""

    RETIRED_KEYS: typing.ClassVar[dict[str, str]] = {
        "lr_rampup_images": "the warm-up is now lr_rampup, a fraction of the run's steps (default 0.05; 0 = none): "
                            "EDM's 10 M-image ramp never let the paper grid's 2.5 M-image runs reach their lr",
    }

    RENAMED_KEYS: typing.ClassVar[dict[str, str]] = {"acceleration": "r_train"}

    method: str = "ambient"
    """One of :data:`adps.nn.train_step.METHODS`."""
    r_train: float = 4
    """R_train, the training acceleration (docs/protocol.md "Names"): 1 for ``edm`` / ``ncsnv2``; > 1 (paper: 2, 4, 6,
    8) otherwise, and one the prepared dataset stores masks for. Does not apply to ``image`` (its corruption is
    ``erasure_p``)."""
    preset: str = ""
    """Network preset: the method's paper preset (empty = that; ``image`` for the image method, EDM's 64 x 64 DDPM++)
    or ``tiny`` (tests, demo)."""
    erasure_p: float = 0.0
    """``image`` only: probability in [0, 1) that a training pixel is erased, one fixed mask per image drawn from
    ``(seed, index)`` (:func:`adps.images.fixed_erasure_mask`); the model then learns from the erased images only,
    with Ambient Diffusion's loss, and is an ambient model (a mask input channel). 0 = plain EDM on the clean images
    (paper grid: :data:`IMAGE_GRID`)."""
    delta: float = DEFAULT_DELTA
    """``image`` with ``erasure_p > 0``: probability in (0, 1) of erasing each kept pixel once more for the model's
    input (Ambient Diffusion's further corruption ``A~``, drawn afresh every step; the paper's 0.1)."""
    resolution: int = 64
    """``image`` only: side in pixels of the square training images (centre-cropped and resized to it); a multiple
    of 8 (the U-Net halves it three times). The paper: 64."""
    batch_size: int = 8
    """Slices per worker per step (METHOD.md: 8 per GPU); the global batch is this x workers."""
    # The objective and the network's preconditioning (METHOD.md "Ambient training", "Samplers") --
    p_mean: float = -1.2
    """EDM's noise-level distribution: ``ln sigma ~ N(p_mean, p_std^2)`` (ambient, edm, edm_l1, image)."""
    p_std: float = 1.2
    """See ``p_mean``."""
    sigma_data: float = 0.5
    """EDM's data standard deviation: the preconditioning and the loss weight."""
    scale_cond: bool = True
    """``ambient``: whether the mask channels are scaled by ``c_in`` with the image, as the reference code does; False
    keeps the mask at its own scale (:class:`adps.nn.precond.EDMPrecond`; docs/evaluation.md compares them)."""
    ssdu_rho: float = 0.2
    """``ssdu``: ``|Lambda| / |Omega|``, the share of the acquired columns held out for the loss."""
    ssdu_keep_center: int = 4
    """``ssdu``: central columns always kept in the input ``Theta``."""
    modl_unrolls: int = 0
    """``modl`` / ``ssdu``: unrolls ``K``; 0 = the preset's (``modl``: METHOD.md's 6; ``tiny``: 2)."""
    modl_cg_iterations: int = 0
    """``modl`` / ``ssdu``: CG steps per data consistency; 0 = the preset's (``modl``: 6; ``tiny``: 3)."""
    modl_lambda_init: float = 0.0
    """``modl`` / ``ssdu``: initial (learnable) ``lambda``; 0 = the preset's (0.05)."""
    validation_sigma: float = 0.0
    """Noise level of the priors' denoising validation (``val_nrmse`` of edm, edm_l1, ncsnv2; ``val_mse`` of image
    models); 0 = the method's (0.1 for MRI, 0.2 for images: :func:`adps.nn.reconstruct.validation_metric`)."""
    lr: float = 2e-4
    """Adam learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (0 = none)."""
    ema_half_life_images: float = 500_000
    """EMA half-life in training images (EDM)."""
    ema_rampup: float = 0.05
    """EMA ramp-up ratio: the half-life is at most ``images_seen * ema_rampup``."""
    lr_rampup: float = 0.05
    """Learning-rate warm-up, as a fraction of the run's optimiser steps: the rate rises linearly from 0 to ``lr``
    over the first 5 % of the run, then stays (0 = none, the MoDL / SSDU configs). METHOD.md asks that the run reach
    ``lr`` early: EDM's 10 M-image ramp, made for 200 M-image runs, would never pass 5e-5 in the paper grid's runs of
    about 2.5 M images (250 epochs of 9,900 slices). Training logs the effective rate (``lr``) during the warm-up."""
    epochs: int = 0
    """Passes over the split; 0 = the method's default (250; MoDL and SSDU 10; ``image`` 250, far below Ambient
    Diffusion's 200 M images, so set it for a paper-scale image run)."""
    max_steps: int = 0
    """Stop after this many optimiser steps in all (0 = no cap; tests and the demo)."""
    amp: str = ""
    """Mixed precision of the forward pass: ``""`` (float32, right on CPU), ``bf16`` or ``fp16``. METHOD.md trains in
    mixed precision: the GPU configs set ``bf16``."""
    activation_checkpointing: bool = False
    """Memory-lean mode of :data:`CHECKPOINTING_METHODS`: every residual block's activations are recomputed in the
    backward pass instead of kept (:attr:`adps.nn.unet.SongUNet.activation_checkpointing`,
    :attr:`adps.nn.ncsnv2.NCSNv2.activation_checkpointing`): the same gradients, about one more forward pass per
    step, for 24 GB cards. The paper grid's configs turn it on."""
    compile_mode: str = ""
    """``torch.compile`` the network for training: ``""`` (off, eager) or one of :data:`COMPILE_MODES`
    (``reduce-overhead`` adds CUDA graphs): faster and leaner on GPUs (bench/README.md). The first step pays the
    compilation (minutes for the ``ambient`` preset); validation, checkpoints and the EMA use the plain network."""
    activation_memory_budget: float = 1.0
    """With ``compile_mode``: the share of the activations the compiled backward may keep, in (0, 1]
    (``torch._functorch.config.activation_memory_budget``). Below 1 the partitioner recomputes the cheapest
    intermediates in the backward pass: checkpointing chosen by cost rather than by block."""
    cudnn_benchmark: bool = True
    """``torch.backends.cudnn.benchmark`` in the GPU workers: cuDNN times its convolution algorithms once per (fixed)
    training shape and keeps the fastest. No effect on CPU workers."""
    seed: int = 0
    """Seeds the model initialisation, the per-epoch shuffles and the loss's random draws."""

    # Resolved values -----------------------------------------------------------------------
    @property
    def resolved_preset(self) -> str:
        """``preset``, or the method's paper preset when empty."""
        return self.preset or PAPER_PRESETS.get(self.method, "")

    def network_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`adps.nn.train_step.build_model` this config sets besides method and preset:
        the EDM models' ``sigma_data`` (and the ambient one's ``scale_cond``), MoDL's where not the preset's."""
        if self.method in ("ambient", "edm", "edm_l1", "image"):
            return {"sigma_data": self.sigma_data, **({"scale_cond": self.scale_cond} if self.method == "ambient" else {})}
        if self.method in ("modl", "ssdu"):
            chosen = {"unrolls": self.modl_unrolls, "cg_iterations": self.modl_cg_iterations,
                      "lambda_init": self.modl_lambda_init}
            return {name: value for name, value in chosen.items() if value}
        return {}

    def loss_options(self) -> dict[str, Any]:
        """The hyper-parameters of :func:`adps.nn.train_step.method_loss` this config sets."""
        if self.method in ("ambient", "edm", "edm_l1"):
            return {"p_mean": self.p_mean, "p_std": self.p_std}
        if self.method == "image":
            return {"p_mean": self.p_mean, "p_std": self.p_std, "delta": self.delta}
        if self.method == "ssdu":
            return {"ssdu_rho": self.ssdu_rho, "ssdu_keep_center": self.ssdu_keep_center}
        return {}

    @property
    def resolved_epochs(self) -> int:
        """``epochs``, or the method's default (250; MoDL / SSDU 10) when 0."""
        return self.epochs or DEFAULT_EPOCHS.get(self.method, 250)

    @property
    def is_image(self) -> bool:
        """Whether this run trains a natural-image model (method ``image``)."""
        return self.method in IMAGE_METHODS

    # Checking ------------------------------------------------------------------------------
    def validate_learning(self) -> None:
        """Refuse learning settings that cannot work, naming the key."""
        if self.method not in METHODS:
            raise ValueError(f"config key 'method': unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.activation_checkpointing and self.method not in CHECKPOINTING_METHODS:
            raise ValueError(f"config key 'activation_checkpointing': only the methods {', '.join(CHECKPOINTING_METHODS)} "
                             f"have it, not {self.method}")
        if self.preset and self.preset not in (PAPER_PRESETS[self.method], "tiny"):
            raise ValueError(f"config key 'preset': {self.method} takes {PAPER_PRESETS[self.method]!r} or 'tiny', "
                             f"got {self.preset!r}")
        if self.is_image:
            self._check_image_keys()
        elif changed := [key for key, default in _IMAGE_KEYS.items() if getattr(self, key) != default]:
            raise ValueError(f"config key {changed[0]!r} applies to method 'image' only (natural images), "
                             f"not to {self.method}")
        elif self.method in FULLY_SAMPLED:
            if self.r_train != 1:
                raise ValueError(f"config key 'r_train': {self.method} trains on fully sampled data (R = 1), "
                                 f"got R = {self.r_train:g}")
        elif self.r_train <= 1:
            raise ValueError(f"config key 'r_train': {self.method} trains on undersampled data (R > 1; paper: "
                             f"{', '.join(map(str, PAPER_ACCELERATIONS))}), got R = {self.r_train:g}")
        if self.batch_size < 1:
            raise ValueError(f"config key 'batch_size' must be >= 1, got {self.batch_size}")
        for key in ("epochs", "max_steps", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "eps", "ema_half_life_images"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r} must be > 0, got {getattr(self, key)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"config key 'betas' must be two values in [0, 1), got {list(self.betas)}")
        if not 0 <= self.ema_rampup:
            raise ValueError(f"config key 'ema_rampup' must be >= 0, got {self.ema_rampup}")
        for key in ("p_std", "sigma_data"):
            if not getattr(self, key) > 0:
                raise ValueError(f"config key {key!r} must be > 0, got {getattr(self, key)}")
        if not 0 < self.ssdu_rho < 1:
            raise ValueError(f"config key 'ssdu_rho' must be in (0, 1), got {self.ssdu_rho}")
        for key in ("ssdu_keep_center", "modl_unrolls", "modl_cg_iterations", "modl_lambda_init", "validation_sigma"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0 (0 = the default), got {getattr(self, key)}")
        if not 0 <= self.lr_rampup <= 1:
            raise ValueError(f"config key 'lr_rampup' must be a fraction of the run in [0, 1], got {self.lr_rampup}")
        if not 0 < self.activation_memory_budget <= 1:
            raise ValueError(f"config key 'activation_memory_budget' must be in (0, 1], got {self.activation_memory_budget}")
        if self.compile_mode not in ("", *COMPILE_MODES):
            raise ValueError(f"config key 'compile_mode' must be '' (eager) or one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile_mode!r}")
        if self.amp not in ("", "bf16", "fp16"):
            raise ValueError(f"config key 'amp' must be '', 'bf16' or 'fp16', got {self.amp!r}")

    def _check_image_keys(self) -> None:
        """``erasure_p``, ``delta`` and ``resolution`` of an image run."""
        if not 0 <= self.erasure_p < 1:
            raise ValueError(f"config key 'erasure_p' must be in [0, 1), got {self.erasure_p}")
        if not 0 < self.delta < 1:
            raise ValueError(f"config key 'delta' must be in (0, 1) (Ambient Diffusion needs a further "
                             f"corruption; the paper's 0.1), got {self.delta}")
        levels = len(IMAGE_PRESETS[self.resolved_preset]["channel_mult"])
        multiple = 2 ** (levels - 1)
        if self.resolution < multiple or self.resolution % multiple:
            raise ValueError(f"config key 'resolution' must be a multiple of {multiple} (the {self.resolved_preset} "
                             f"U-Net halves it {levels - 1} times), got {self.resolution}")


def image_run_name(erasure_p: float) -> str:
    """The run name of the image model trained at ``erasure_p``: ``image_p<p>`` (``image_p0.6``)."""
    return f"image_p{erasure_p:g}"
