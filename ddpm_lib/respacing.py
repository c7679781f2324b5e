"""Sampling with fewer steps by respacing the schedule (Nichol & Dhariwal 2021, section 4; book section 11.2).

A model trained on T steps can be sampled on any increasing subsequence ``s_1 < ... < s_K`` of its
timesteps. The forward process restricted to those timesteps is again a Markov chain of the DDPM form,
with new betas (book ``eq-respace``)

    beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}},   abar_{s_0} = 1,

whose cumulative products are exactly ``abar_{s_i}``: the marginals ``q(x_{s_i} | x_0)`` are unchanged, so
the network's input distribution at each visited step is the one it was trained on. The posterior, the
fixed variances and Improved DDPM's learned interpolation between ``beta'_i`` and ``beta~'_i`` are then
recomputed from the new betas; the network only needs to be called with the *original* timestep
``s_i``, which :class:`RespacedModel` does. Unlike DDIM this keeps the stochastic (ancestral) sampler and
the model's learned variance, and gives a K-step variational bound as well.

Timesteps are 0-based, as everywhere in ``ddpm_lib``.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import nn

from .diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "respace", "RespacedModel"]


def space_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """``steps`` evenly strided 0-based timesteps from ``0`` to ``num_timesteps - 1``, both included.

    ``round(i (T - 1) / (K - 1))`` for ``i = 0..K-1`` (Improved DDPM's ``space_timesteps`` with one
    section); ``steps = 1`` gives ``[T - 1]``. Returns an increasing int64 array of shape ``(steps,)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    seq = np.round(np.arange(steps) * (num_timesteps - 1) / (steps - 1)).astype(np.int64)
    if len(np.unique(seq)) != steps:  # pragma: no cover - cannot happen for steps <= T
        raise ValueError(f"cannot space {steps} distinct steps in {num_timesteps}")
    return seq


def respace(diffusion: GaussianDiffusion, timesteps: Union[int, Sequence[int], np.ndarray]) -> GaussianDiffusion:
    """The diffusion restricted to a subsequence of its timesteps (book ``eq-respace``).

    Args:
        diffusion: the process the model was trained with.
        timesteps: an int K (then :func:`space_timesteps` picks K evenly strided steps) or an increasing
            sequence of distinct 0-based timesteps.

    Returns:
        a :class:`GaussianDiffusion` with ``K`` steps, the same mean, variance and loss types and decoder,
        betas ``1 - abar[s_i] / abar[s_{i-1}]``, and the attribute ``timestep_map`` (an int64 tensor of
        shape ``(K,)``: new step ``i`` is the original step ``timestep_map[i]``). Use it with
        :class:`RespacedModel`, or simply call :meth:`RespacedModel.wrap`.
    """
    T = diffusion.num_timesteps
    if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        seq = space_timesteps(T, int(timesteps))
    else:
        if torch.is_tensor(timesteps):
            timesteps = timesteps.detach().cpu()
        seq = np.asarray(timesteps)
        if seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(f"timesteps must be an int or a non-empty 1-D sequence of ints, got {timesteps!r}")
        if (np.diff(seq) <= 0).any():
            raise ValueError("timesteps must be strictly increasing")
        if seq[0] < 0 or seq[-1] >= T:
            raise ValueError(f"timesteps must lie in 0..{T - 1}, got {seq[0]}..{seq[-1]}")
    abar = diffusion.alphas_cumprod.numpy()[seq]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1.0 - abar / abar_prev
    new = GaussianDiffusion(
        betas,
        mean_type=diffusion.mean_type,
        var_type=diffusion.var_type,
        loss_type=diffusion.loss_type,
        vlb_weight=diffusion.vlb_weight,
        decoder=diffusion.decoder,
    )
    new.timestep_map = torch.as_tensor(seq, dtype=torch.long)
    new.original_num_timesteps = T
    return new


class RespacedModel(nn.Module):
    """Call ``model`` with the original timestep: ``RespacedModel(model, m)(x, t, **kw) = model(x, m[t], **kw)``.

    ``m`` is the ``timestep_map`` of :func:`respace`. ``t`` is a ``(B,)`` integer tensor of respaced
    (0-based) steps. The wrapper holds ``model`` as a sub-module, so ``.parameters()`` and ``.to()`` reach it.
    """

    def __init__(self, model: nn.Module, timestep_map: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("timestep_map", torch.as_tensor(timestep_map, dtype=torch.long).clone(),
                             persistent=False)

    @classmethod
    def wrap(cls, model: nn.Module, diffusion: GaussianDiffusion,
             timesteps: Union[int, Sequence[int], np.ndarray]):
        """``(respaced_diffusion, wrapped_model)`` for sampling ``model`` on ``timesteps`` (see :func:`respace`)."""
        new = respace(diffusion, timesteps)
        return new, cls(model, new.timestep_map)

    @property
    def num_classes(self):
        """The wrapped model's (so that :func:`~ddpm_lib.metrics.bits_per_dim` passes the labels on)."""
        return getattr(self.model, "num_classes", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if t.dtype.is_floating_point:
            raise TypeError("t must be an integer tensor of respaced steps")
        return self.model(x, self.timestep_map.to(t.device)[t], **kwargs)
