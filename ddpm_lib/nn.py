"""Small building blocks shared by the networks: the sinusoidal timestep embedding."""
from __future__ import annotations

import math

import torch

__all__ = ["timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer (or real) timesteps, as in the paper's code (book ``eq-time-embedding``).

    ``emb[:, i] = sin(t * w_i)`` for ``i < dim/2`` and ``cos(t * w_i)`` after, with
    ``w_i = exp(-log(max_period) * i / (dim/2 - 1))``. Shapes: ``t (B,)`` -> ``(B, dim)``; an odd
    ``dim`` gets a zero last column.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (batch,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"dim must be at least 2, got {dim}")
    half = dim // 2
    denom = max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / denom)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
