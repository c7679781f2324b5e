"""Flow matching and rectified flow (Lipman et al. 2023; Liu et al. 2023): straight paths between data
and noise, a regressed velocity field, few-step Euler sampling, and reflow.

Direction (book chapter 11.8): time runs as in the rest of the book, **data at t = 0, noise at t = 1**:

    x_t = (1 - t) x_0 + t eps,   eps ~ N(0, I),   velocity  d x_t / dt = eps - x_0,

and sampling integrates ``dx/dt = v(x, t)`` from t = 1 down to t = 0. (Lipman et al. and Liu et al.
put noise at t = 0 and data at t = 1; substitute ``t -> 1 - t`` and ``v -> -v`` to compare.)

The network is called ``model(x_t, time_scale * t, **model_kwargs)``: with the default
``time_scale = 1000`` a DDPM network (:class:`~ddpm_lib.ToyMLP`, :class:`~ddpm_lib.UNet`) sees labels
in the range it was designed for. Shapes: data ``(B, *)``, ``t (B,)`` float.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ["RectifiedFlow", "gaussian_mixture_path", "gaussian_mixture_velocity"]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype).reshape(x.shape[0], *([1] * (x.ndim - 1)))


def _randn(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class RectifiedFlow:
    """The straight-line path ``x_t = (1 - t) x_0 + t eps`` and its velocity (book ``eq-rf-path``,
    ``eq-rf-velocity``).

    Args:
        time_scale: the network is called with label ``time_scale * t`` (default 1000).

    :meth:`training_losses` has the signature of :meth:`GaussianDiffusion.training_losses
    <ddpm_lib.GaussianDiffusion.training_losses>`, so a training loop written for DDPM (such as
    ``ddpm_lib.trainer.Trainer`` without an ``out_dir``) trains a flow unchanged.
    """

    def __init__(self, time_scale: float = 1000.0):
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.time_scale = float(time_scale)

    def __repr__(self) -> str:
        return f"RectifiedFlow(time_scale={self.time_scale:g})"

    # ---- the path
    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t noise`` (book ``eq-rf-path``); ``x0, noise (B, *)``, ``t (B,)``."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        tb = _bcast(t, x0)
        return (1.0 - tb) * x0 + tb * noise

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``d x_t / dt = noise - x0`` (book ``eq-rf-velocity``), the same at every t."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        return noise - x0

    def velocity(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 model_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """The model's velocity ``v_theta(x, t)``: ``model(x, time_scale * t)``; ``x (B, *)``, ``t (B,)``."""
        out = model(x, self.time_scale * t.to(x.device, torch.float32), **(model_kwargs or {}))
        if out.shape != x.shape:
            raise ValueError(f"the model must return the shape of x {tuple(x.shape)}, got {tuple(out.shape)}")
        return out

    # ---- training
    def training_losses(self, model: nn.Module, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The conditional flow-matching loss ``|v_theta(x_t, t) - (noise - x0)|^2`` averaged over
        dimensions (book ``eq-cfm-loss``), per example.

        Args:
            x0: data ``(B, *)``; t: ``(B,)`` times in [0, 1] (uniform when None); noise: ``(B, *)``
                (standard normal when None; pass it to train on a fixed coupling, as reflow does);
            generator: for t and noise.
        Returns:
            dict of ``(B,)`` tensors ``loss`` and ``mse`` (equal), and ``t``.
        """
        B = x0.shape[0]
        gdev = generator.device if generator is not None else x0.device
        if t is None:
            t = torch.rand(B, generator=generator, device=gdev).to(x0.device)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.interpolate(x0, noise, t)
        pred = self.velocity(model, x_t, t, model_kwargs)
        mse = ((pred.float() - self.velocity_target(x0, noise).float()) ** 2).reshape(B, -1).mean(1)
        return {"loss": mse, "mse": mse, "t": t}

    # ---- sampling
    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, steps: int = 50, *, method: str = "euler",
               model_kwargs: Optional[Dict[str, Any]] = None, return_path: bool = False):
        """Integrate ``dx/dt = v_theta(x, t)`` from t = 1 (``noise``) to t = 0 with ``steps`` uniform
        steps (book ``eq-rf-euler``).

        ``method="euler"`` (one network call per step) or ``"heun"`` (two per step, except the last
        step, which is Euler: 2 steps - 1 calls). Shapes: ``noise (B, *)`` -> ``(B, *)``; with
        ``return_path`` also the states ``(steps + 1, B, *)`` on the CPU.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if method not in ("euler", "heun"):
            raise ValueError(f"unknown method {method!r}; choose 'euler' or 'heun'")
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        x = noise
        path = [x.cpu()] if return_path else None
        B = x.shape[0]
        for k in range(steps):
            t, s = float(ts[k]), float(ts[k + 1])
            v = self.velocity(model, x, torch.full((B,), t, device=x.device), model_kwargs)
            x_next = x + (s - t) * v
            if method == "heun" and k < steps - 1:
                v2 = self.velocity(model, x_next, torch.full((B,), s, device=x.device), model_kwargs)
                x_next = x + (s - t) * 0.5 * (v + v2)
            x = x_next
            if return_path:
                path.append(x.cpu())
        return (x, torch.stack(path)) if return_path else x

    @torch.no_grad()
    def straightness(self, model: nn.Module, noise: torch.Tensor, steps: int = 100,
                     model_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """Liu et al.'s straightness ``S = int_0^1 |(x_1 - x_0) - v(x_t, t)|^2 dt`` along the model's
        Euler trajectory from ``noise`` (book ``eq-straightness``); zero exactly for straight paths.

        The integral is the mean over the ``steps`` Euler steps. Shapes: ``noise (B, *)`` -> ``(B,)``
        (summed over dimensions).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        x = noise
        vs = []
        B = x.shape[0]
        for k in range(steps):
            t, s = float(ts[k]), float(ts[k + 1])
            v = self.velocity(model, x, torch.full((B,), t, device=x.device), model_kwargs)
            vs.append(v)
            x = x + (s - t) * v
        chord = noise - x  # x(1) - x(0)
        return torch.stack([((chord - v) ** 2).reshape(B, -1).sum(1) for v in vs]).mean(0)


# ---------------------------------------------------------------------------------------------- exact mixtures
def gaussian_mixture_path(mixture, t: float):
    """The law of ``x_t = (1 - t) x_0 + t eps`` when ``x_0`` follows a
    :class:`~ddpm_lib.GaussianMixture2D`: means ``(1 - t) mu_k``, stds ``sqrt((1-t)^2 s_k^2 + t^2)``,
    same weights: the law of the path (book ``eq-rf-path``); ``t`` in [0, 1]."""
    from .data import GaussianMixture2D

    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    stds = torch.sqrt((1 - t) ** 2 * mixture.stds**2 + t**2)
    return GaussianMixture2D((1 - t) * mixture.means, stds, mixture.weights)


def gaussian_mixture_velocity(mixture, x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact marginal velocity ``v(x, t) = E[eps - x_0 | x_t = x]`` for mixture data
    (book ``eq-fm-marginal-velocity``); ``t`` in [0, 1].

    With ``e = E[eps | x_t = x] = -t score_t(x)`` it is ``(e - x) / (1 - t)``; written out per
    component (responsibilities ``r_k`` under ``p_t``, variances ``var_k = (1-t)^2 s_k^2 + t^2``):
    ``v = sum_k r_k (x (t - (1 - t) s_k^2) - t mu_k) / var_k``, which is also valid at t = 1
    (``v = x - E[x_0]``). Shapes: ``x (N, d)`` -> ``(N, d)``.
    """
    t = float(t)
    p_t = gaussian_mixture_path(mixture, t)
    r = p_t.responsibilities(x)  # (N, K)
    mu = mixture.means.to(x.device, x.dtype)
    s2 = (mixture.stds**2).to(x.device, x.dtype)
    var = (1 - t) ** 2 * s2 + t**2
    coef_x = (r * (t - (1 - t) * s2) / var).sum(1, keepdim=True)  # (N, 1)
    return coef_x * x - t * (r / var) @ mu
