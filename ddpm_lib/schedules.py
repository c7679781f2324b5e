"""Noise schedules: the betas beta_0 .. beta_{T-1} of the forward process.

Timesteps are 0-based in code: ``betas[t]`` is the paper's :math:`\\beta_{t+1}`. Every schedule is
returned as a float64 tensor of shape ``(T,)`` with values in (0, 1).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Union

import numpy as np
import torch

__all__ = ["make_beta_schedule", "as_betas", "SCHEDULES", "betas_for_alpha_bar", "BetasLike"]

BetasLike = Union[str, Sequence[float], np.ndarray, torch.Tensor]


def _check_T(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    return int(num_timesteps)


def _linear(T: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    # The paper: 1e-4 -> 0.02 at T=1000. For other T both ends scale by 1000/T (Improved DDPM), so
    # that the total amount of noise, and alpha-bar at the end, stay about the same.
    scale = 1000.0 / T
    start = beta_start if beta_start is not None else scale * 1e-4
    end = beta_end if beta_end is not None else scale * 0.02
    return np.linspace(start, end, T, dtype=np.float64)


def _quadratic(T: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    # Linear in sqrt(beta) (the "quad" schedule of the official code), same end points as linear.
    scale = 1000.0 / T
    start = beta_start if beta_start is not None else scale * 1e-4
    end = beta_end if beta_end is not None else scale * 0.02
    return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2


def _sigmoid(
    T: int, beta_start: float | None = None, beta_end: float | None = None, width: float = 6.0
) -> np.ndarray:
    # Betas follow a sigmoid between the two end points (used by GeoDiff and others).
    scale = 1000.0 / T
    start = beta_start if beta_start is not None else scale * 1e-4
    end = beta_end if beta_end is not None else scale * 0.02
    x = np.linspace(-width, width, T, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (end - start) + start


def betas_for_alpha_bar(
    T: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas whose cumulative product follows ``alpha_bar(s)`` for s in [0, 1].

    ``beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta)`` for t = 0..T-1
    (book equation ``eq-betas-from-alphabar``).
    """
    betas = []
    for i in range(T):
        t1, t2 = i / T, (i + 1) / T
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def _cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Improved DDPM: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped.
    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_for_alpha_bar(T, lambda u: f(u) / f(0.0), max_beta=max_beta)


SCHEDULES: Dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "cosine": _cosine,
    "quadratic": _quadratic,
    "sigmoid": _sigmoid,
}


def _validate_betas(betas: torch.Tensor, name: str = "betas") -> torch.Tensor:
    if betas.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (shape (T,)), got shape {tuple(betas.shape)}")
    if betas.numel() < 1:
        raise ValueError(f"{name} must hold at least one value (T >= 1)")
    if not torch.isfinite(betas).all():
        raise ValueError(f"{name} must be finite")
    if (betas <= 0).any() or (betas >= 1).any():
        raise ValueError(
            f"{name} must lie in the open interval (0, 1); got min {betas.min().item():.3g}, "
            f"max {betas.max().item():.3g}"
        )
    return betas


def make_beta_schedule(name: str, num_timesteps: int = 1000, **options) -> torch.Tensor:
    """The betas of a named schedule, float64, shape ``(num_timesteps,)``.

    Implements the book's equations ``eq-linear-schedule`` and ``eq-cosine-schedule``.

    Args:
        name: ``"linear"`` (the paper: 1e-4 to 0.02 at T=1000, both ends scaled by 1000/T for other
            T, as Improved DDPM does), ``"cosine"`` (Improved DDPM, ``s=0.008``, betas clipped at
            ``max_beta=0.999``), ``"quadratic"`` (linear in sqrt(beta)) or ``"sigmoid"``.
        num_timesteps: T, at least 1.
        **options: ``beta_start`` / ``beta_end`` for linear, quadratic and sigmoid (these override
            the scaled defaults), ``width`` for sigmoid, ``s`` and ``max_beta`` for cosine.

    Raises:
        ValueError: unknown ``name``, ``num_timesteps < 1``, unknown options, or betas outside (0, 1).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a schedule name (str), got {type(name).__name__}")
    key = name.lower()
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule name {name!r}; choose one of {sorted(SCHEDULES)}")
    T = _check_T(num_timesteps)
    try:
        betas = SCHEDULES[key](T, **options)
    except TypeError as err:
        raise ValueError(f"bad options {sorted(options)} for schedule {name!r}: {err}") from None
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if key != "cosine" and "beta_end" not in options and (betas >= 1).any():
        raise ValueError(
            f"the {name} schedule scales its default ends by 1000/T, which gives betas >= 1 for "
            f"num_timesteps={T}; for T this small pass beta_start and beta_end explicitly, or use the cosine "
            f"schedule (on the command line: --schedule cosine, or a larger --T)"
        )
    return _validate_betas(betas, name=f"{name} schedule betas")


def as_betas(betas: BetasLike, num_timesteps: int | None = None) -> torch.Tensor:
    """Accept a schedule name or explicit betas; return validated float64 betas of shape ``(T,)``."""
    if isinstance(betas, str):
        return make_beta_schedule(betas, 1000 if num_timesteps is None else num_timesteps)
    t = torch.as_tensor(np.asarray(betas, dtype=np.float64) if not torch.is_tensor(betas) else betas)
    t = t.detach().to(device="cpu", dtype=torch.float64)
    t = _validate_betas(t)
    if num_timesteps is not None and t.numel() != num_timesteps:
        raise ValueError(f"betas has {t.numel()} entries but num_timesteps={num_timesteps}")
    return t
