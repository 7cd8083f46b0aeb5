"""The memory-lean training switch shared by the networks that have one (SongUNet, NCSNv2).

A network that mixes in :class:`ActivationCheckpointing` runs each of its large blocks through
:meth:`ActivationCheckpointing.checkpointed`; :func:`set_activation_checkpointing` flips the
switch in every such network inside a model (preconditioning, DDP and compile wrappers included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["ActivationCheckpointing", "set_activation_checkpointing"]


class ActivationCheckpointing:
    """Mixin of an ``nn.Module`` whose blocks can be recomputed in the backward pass."""

    activation_checkpointing: bool = False
    """Memory-lean training: each block's activations are not kept for the backward pass but
    recomputed there (``torch.utils.checkpoint``, non-reentrant, RNG state preserved, so dropout
    draws the same masks and the gradients equal those without it). Costs about one more forward
    pass per step. A runtime switch, not part of the network's config: it changes no weight, so
    it is not saved with them. Active whenever gradients are enabled: in training, and in a
    posterior sampler's gradient with respect to ``x`` (DPS / A-DPS), where it lets more slices
    share one network call."""

    def checkpointed(self, block: nn.Module, *args: Any) -> Tensor:
        """``block(*args)``, recomputed in the backward pass when the switch is on."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn :attr:`ActivationCheckpointing.activation_checkpointing` on or off in every network
    inside ``model`` that has the switch; returns how many it set (0: none has it)."""
    nets = [m for m in model.modules() if isinstance(m, ActivationCheckpointing)]
    for net in nets:
        net.activation_checkpointing = bool(enabled)
    return len(nets)
