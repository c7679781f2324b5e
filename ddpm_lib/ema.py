"""The exponential moving average (EMA) of a network's weights, which the paper samples from.

Ho et al. (2020) keep ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimizer step
with ``decay = 0.9999`` (book ``eq-ema``). That average spans about ``1 / (1 - decay) = 10,000`` steps, far
longer than a short run: for a few thousand steps use a faster decay (e.g. 0.999) and/or the warm-up
``min(decay, (1 + step) / (10 + step))`` of TensorFlow's ``ExponentialMovingAverage(num_updates=step)``,
which lets the average follow the fast-changing early weights.
"""
from __future__ import annotations

import copy
import math
from typing import Dict

import torch
from torch import nn

__all__ = ["EMA", "ema_decay_at", "ema_init_weight"]


def ema_decay_at(step: int, decay: float, warmup: bool = False) -> float:
    """The decay used by the update that follows optimizer step ``step`` (0-based) (book ``eq-ema``).

    ``decay`` when ``warmup`` is False (the paper); else ``min(decay, (1 + step) / (10 + step))``
    (0.1 at step 0, 0.5 at step 8, 0.9 at step 80, 0.99 at step 890, ...).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not warmup:
        return float(decay)
    return float(min(decay, (1.0 + step) / (10.0 + step)))


def ema_init_weight(updates: int, decay: float, warmup: bool = False) -> float:
    """The weight the average still gives the network's initial weights after ``updates`` updates.

    Unrolling ``theta_ema <- d_s theta_ema + (1 - d_s) theta_s`` from ``theta_ema = theta_0`` gives
    ``theta_0`` the weight ``prod_s d_s``: ``decay ** updates`` without warm-up (0.9999 ** 5000 = 0.61, so
    after 5,000 steps at the paper's decay the average is still mostly the untrained network, whose samples
    are noise), and a vanishing weight with the warm-up (the first decay is 0.1).
    """
    if isinstance(updates, bool) or int(updates) != updates or updates < 0:
        raise ValueError(f"updates must be an int >= 0, got {updates!r}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    updates, decay = int(updates), float(decay)
    if not warmup or updates == 0 or decay == 0.0:
        return decay**updates
    # the warm-up's (1 + s) / (10 + s) is below decay for s < s0, decay itself from then on; the product of
    # the first s0 telescopes to s0! 9! / (s0 + 9)! = 1 / C(s0 + 9, 9)
    s0 = updates if decay == 1.0 else min(updates, max(0, math.ceil((10.0 * decay - 1.0) / (1.0 - decay))))
    log_warm = math.lgamma(s0 + 1) + math.lgamma(10) - math.lgamma(s0 + 10)
    return math.exp(log_warm) * decay ** (updates - s0)


class EMA:
    """An exponential moving average of ``model``'s parameters, held in a copy of the model.

    ``ema.model`` is a deep copy of ``model`` (float32, evaluation mode, no gradients) whose parameters
    are updated in place by :meth:`update`:
    ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` (book ``eq-ema``), one fused ``lerp`` over
    all tensors, without any host synchronisation. Buffers (if any) are copied, not averaged.

    Args:
        model: the network being trained.
        decay: the EMA decay (the paper: 0.9999).
        warmup: use ``min(decay, (1 + step) / (10 + step))`` (see :func:`ema_decay_at`).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        # forward hooks belong to the trained model, not to its average
        for m in self.model.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        self._ema_params = [p for p in self.model.parameters()]

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (0-based)."""
        return ema_decay_at(step, self.decay, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Average ``model``'s current parameters in, after optimizer step ``step`` (0-based).

        Returns the decay used.
        """
        d = self.decay_at(step)
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._ema_params):
            raise ValueError("model does not have the parameters of the EMA copy")
        # ema + (1 - d) * (p - ema) = d * ema + (1 - d) * p
        torch._foreach_lerp_(self._ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return d

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights, as ``model.state_dict()``."""
        return self.model.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        model.load_state_dict(self.model.state_dict())
