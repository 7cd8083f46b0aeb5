"""Exponential moving average of model weights, in EDM's "half-life in images" form.

EDM (Karras et al. 2022, training loop) specifies the EMA by the number of training images over which an old
weight's contribution halves, not by a per-step decay, so the average means the same thing at any batch size:

    beta = 0.5 ** (batch_size / half_life)

Early in training the half-life is capped at ``images_seen * rampup_ratio`` so that the average does not drag
the random initial weights along for half a million images.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_beta", "unwrap_model"]


def ema_beta(batch_size: int, half_life_images: float = 500_000, rampup_ratio: float | None = 0.05,
             images_seen: int = 0) -> float:
    """Weight ``beta`` in [0, 1) of the old average for one update of ``batch_size`` images (in this optimiser
    step, over all workers): new_average = beta * old_average + (1 - beta) * weights.

    ``half_life_images``: the EMA half-life in images (EDM/reference: 500k); with a ``rampup_ratio`` (the
    reference's 0.05) it is ``min(half_life_images, images_seen * rampup_ratio)``, ``images_seen`` being the
    images trained on before this step; at ``images_seen = 0`` beta is then 0 (the average starts as a copy).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    half_life = float(half_life_images)
    if rampup_ratio is not None:
        half_life = min(half_life, images_seen * rampup_ratio)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel (``.module``) / torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class EMA:
    """A frozen copy of a model whose weights follow the trained ones by EMA.

    ``update`` must be called after every optimiser step; it counts the images itself (``images_seen``) for the
    ramp-up. Restore ``images_seen`` together with the weights when resuming (:meth:`load_state_dict`).
    """

    def __init__(self, model: nn.Module, half_life_images: float = 500_000, rampup_ratio: float | None = 0.05,
                 images_seen: int = 0):
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.half_life_images = float(half_life_images)
        self.rampup_ratio = rampup_ratio
        self.images_seen = int(images_seen)

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int) -> float:
        """Move the average towards ``model``'s weights; returns the beta used."""
        beta = ema_beta(batch_size, self.half_life_images, self.rampup_ratio, self.images_seen)
        source = dict(unwrap_model(model).named_parameters())
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        for name, p_ema in self.model.named_parameters():
            if name not in source:
                raise KeyError(f"EMA.update: model has no parameter {name!r}")
            targets.append(p_ema)
            sources.append(source[name].detach().to(p_ema.dtype))
        # One fused multi-tensor kernel per device instead of one lerp per parameter.
        # lerp(avg, w, 1 - beta) = beta * avg + (1 - beta) * w.
        torch._foreach_lerp_(targets, sources, 1.0 - beta)
        # Buffers (if any) are state, not weights: copy, don't average.
        src_buffers = dict(unwrap_model(model).named_buffers())
        for name, b_ema in self.model.named_buffers():
            if name in src_buffers:
                b_ema.copy_(src_buffers[name])
        self.images_seen += int(batch_size)
        return beta

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like the model's own ``state_dict`` (safetensors-ready)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, Tensor], images_seen: int | None = None) -> None:
        """Restore averaged weights (and the image counter that drives the ramp-up)."""
        self.model.load_state_dict(state_dict, strict=True)
        if images_seen is not None:
            self.images_seen = int(images_seen)
